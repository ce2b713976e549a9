"""Training checkpoints: where they live, writing them, resuming from them, and stopping on a signal.

A checkpoint holds the Trainer's state (weights, optimiser, schedule, scaler, RNGs), the step (which fixes the
data position, because batches are addressed by step), the model config and vocabulary (so that `charlm generate
--checkpoint` and the playground can sample it) and what the stage adds, such as its logs. It is resumed only
when its fingerprint (params, data, vocabulary) matches the run: a rerun after a kill continues, a rerun after a
change starts over. Checkpoints are not DVC outputs: DVC deletes a stage's outputs before rerunning it.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from pathlib import Path

from charlm.base.errors import CharlmError
from charlm.core.training import Trainer
from charlm.core.vocab import Vocab
from charlm.pipeline import artifact, paths

KEEP_KEYED = 8  # checkpoints of unfinished temporary experiments kept, newest first (~model + 2x Adam each)


def location(run_id: str) -> Path:
    """checkpoints/train.pt in a normal workspace. A queued or `--temp` experiment runs in a temporary copy of
    the repository (.dvc/tmp/exps/tmpXXX) that DVC deletes afterwards, killed or not: its checkpoint lives in
    the repository it was queued from, keyed by the run's fingerprint, where re-queuing it finds it."""
    parts = Path.cwd().resolve().parts
    for i in range(len(parts) - 3, 0, -1):
        if parts[i : i + 3] == (".dvc", "tmp", "exps"):
            return Path(*parts[:i]) / paths.KEYED_CHECKPOINTS / f"{run_id[:32]}.pt"
    return paths.CHECKPOINT


def save(path: Path, trainer: Trainer, run_id: str, step: int, vocab: Vocab, **extra) -> None:
    """A resumable checkpoint; `extra` holds the caller's own state (counters, logs)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "format": artifact.CHECKPOINT_FORMAT,
        "run_id": run_id,
        "exp_name": os.environ.get("DVC_EXP_NAME"),  # set by `dvc exp run`; None under `dvc repro` (the playground)
        "step": step,
        "config": dict(trainer.model.config),
        "vocab": list(vocab.chars),
        **trainer.state_dict(),
        **extra,
    }
    artifact.save(path, record)
    if path.parent.name == paths.KEYED_CHECKPOINTS.name:
        prune_keyed(path)


def resume(path: Path, trainer: Trainer, run_id: str, log: Callable[[str], None]) -> dict | None:
    """Load the checkpoint at `path` into `trainer` if it belongs to this run and return it (for the caller's own
    state); None to start fresh."""
    if not path.exists():
        return None
    try:
        saved = artifact.load(path, "Starting from scratch.", map_location=trainer.device)
    except CharlmError as e:
        log(f"train: ignoring unusable checkpoint: {e}")
        return None
    if saved.get("format") != artifact.CHECKPOINT_FORMAT or saved.get("run_id") != run_id:
        log(f"train: {path} belongs to other params or data; starting from scratch")
        return None
    try:
        trainer.load_state_dict(saved)
    except (KeyError, RuntimeError, ValueError, TypeError) as e:
        raise CharlmError(
            f"{path}: does not fit this model ({str(e).splitlines()[0][:160]}); delete it to start over"
        ) from None
    return saved


def prune_keyed(keep: Path) -> None:
    """Keep the KEEP_KEYED most recently written keyed checkpoints (always `keep`, the one just written)."""
    files = sorted(keep.parent.glob("*.pt"), key=lambda f: f.stat().st_mtime, reverse=True)
    for old in [f for f in files if f != keep][KEEP_KEYED - 1 :]:
        old.unlink(missing_ok=True)


class StopRequested:
    """SIGINT/SIGTERM set a flag that the loop checks between steps, so a checkpoint is never mid-update."""

    def __init__(self):
        self.requested = False
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        if self.requested:  # a second Ctrl-C stops at once
            raise KeyboardInterrupt
        self.requested = True
