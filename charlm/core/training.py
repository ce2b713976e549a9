"""Training: the model, optimiser, schedule, AMP scaler and step in one object that steps, validates, saves and
resumes (in the spirit of minGPT's trainer.py). stages/train.py keeps what is the stage's: params, paths,
DVCLive and the loop's shape; the benchmarks train through this same object.

A checkpoint holds model, optimizer, scheduler, scaler, step and RNG states (plus what the caller adds, such as
its logs); the data position is the step itself, because batches are addressed by step. It is resumed only when
its fingerprint (params, data, vocabulary) matches the run, so a rerun after a kill continues, and a rerun after
a change starts over.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from charlm.base.errors import CharlmError
from charlm.core.data import Batches, Packed, load_packed
from charlm.core.model import CharRNN, n_params
from charlm.core.scoring import stream_bpc
from charlm.core.vocab import Vocab
from charlm.pipeline import artifact, params, paths

VAL_BATCH = 64  # validation items per forward pass, as evaluate.batch_size
KEEP_KEYED = 8  # checkpoints of unfinished temporary experiments kept there, newest first (~model + 2x Adam each)


def lr_factor(step: int, total: int, p: params.TrainParams) -> float:
    """Linear warm-up to 1, then cosine or linear decay to min_lr_ratio at the last step."""
    if step < p.warmup_steps:
        return (step + 1) / p.warmup_steps
    if p.schedule == "constant":
        return 1.0
    progress = min(1.0, (step - p.warmup_steps) / max(1, total - p.warmup_steps))
    decay = 0.5 * (1 + math.cos(math.pi * progress)) if p.schedule == "cosine" else 1 - progress
    return p.min_lr_ratio + (1 - p.min_lr_ratio) * decay


def fingerprint(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


class Trainer:
    """Steps `model` with AdamW (no decay on biases), the warm-up/decay schedule over `total` steps and, on CUDA,
    mixed precision. With world > 1 the step goes through DistributedDataParallel."""

    def __init__(self, model: CharRNN, tp: params.TrainParams, total: int, device: torch.device, world: int = 1):
        self.model, self.tp, self.total, self.device = model, tp, total, device
        self.net = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
        decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
        no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": tp.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=tp.lr,
            betas=(0.9, tp.beta2),
        )
        # reads self.total at every step, so a caller may fix the schedule's length after a calibration
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: lr_factor(s, self.total, tp))
        self.use_amp = device.type == "cuda" and tp.amp != "none"
        self.amp_dtype = torch.bfloat16 if tp.amp == "bf16" else torch.float16
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.use_amp and tp.amp == "fp16")

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.amp_dtype) if self.use_amp else contextlib.nullcontext()

    def step(self, x: np.ndarray, y: np.ndarray) -> torch.Tensor:
        """One optimisation step on a minibatch of token ids; returns the loss as a device tensor (no host sync)."""
        x_t = torch.from_numpy(x).to(self.device, non_blocking=True)
        y_t = torch.from_numpy(y).to(self.device, non_blocking=True)
        with self.autocast():
            loss, _ = self.net(x_t, targets=y_t)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.tp.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.tp.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        return loss.detach()

    def lr(self) -> float:
        return float(self.scheduler.get_last_lr()[0])

    def validate(self, stream: np.ndarray) -> float:
        """Bits per character of a packed split, scored exactly as evaluate scores the test split."""
        with self.autocast():
            return float(stream_bpc(self.model, stream, VAL_BATCH, self.device))

    def save(self, path: Path, run_id: str, step: int, vocab: Vocab, **extra) -> None:
        """A resumable checkpoint; `extra` holds the caller's own state (counters, logs)."""
        rng: dict[str, Any] = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        path.parent.mkdir(parents=True, exist_ok=True)
        artifact.save(
            path,
            {
                "format": artifact.CHECKPOINT_FORMAT,
                "run_id": run_id,
                "step": step,
                "model": self.model.state_dict(),
                "config": dict(self.model.config),  # config and vocab: `charlm generate --checkpoint` samples it
                "vocab": list(vocab.chars),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict(),
                "rng": rng,
                **extra,
            },
        )
        if path.parent.name == paths.KEYED_CHECKPOINTS.name:
            prune_keyed(path)

    def resume(self, path: Path, run_id: str, print_fn) -> dict | None:
        """Load the checkpoint at `path` if it belongs to this run and return it (for the caller's own state);
        None to start fresh."""
        if not path.exists():
            return None
        try:
            ck = artifact.load(path, "Starting from scratch.", map_location=self.device)
        except CharlmError as e:
            print_fn(f"train: ignoring unusable checkpoint: {e}")
            return None
        if ck.get("format") != artifact.CHECKPOINT_FORMAT or ck.get("run_id") != run_id:
            print_fn(f"train: {path} belongs to other params or data; starting from scratch")
            return None
        try:
            self.model.load_state_dict(ck["model"])
            self.optimizer.load_state_dict(ck["optimizer"])
            self.scheduler.load_state_dict(ck["scheduler"])
            self.scaler.load_state_dict(ck["scaler"])
            torch.set_rng_state(ck["rng"]["cpu"].cpu())
            if "cuda" in ck["rng"] and torch.cuda.is_available():
                torch.cuda.set_rng_state_all([s.cpu() for s in ck["rng"]["cuda"]])
        except (KeyError, RuntimeError, ValueError, TypeError) as e:
            raise CharlmError(
                f"{path}: does not fit this model ({str(e).splitlines()[0][:160]}); delete it to start over"
            ) from None
        return ck


@dataclass
class Run:
    """Everything a training run is made of, built the same way in every process."""

    mp: params.ModelParams
    vocab: Vocab
    packed: Packed
    batches: Batches
    total: int  # steps
    model: CharRNN
    trainer: Trainer
    run_id: str  # the fingerprint a checkpoint must match

    @property
    def has_val(self) -> bool:  # pack.val_fraction: 0 means no validation split
        return self.packed.meta["splits"]["val"]["items"] > 0

    def describe(self, world: int, start: int) -> str:
        mp, tp, seq_len = self.mp, self.trainer.tp, self.packed.meta["seq_len"]
        return (
            f"train: {mp.cell} {mp.layers}x{mp.hidden}, {n_params(self.model):,} parameters, {self.trainer.device.type}"
            + (f" x {world} processes" if world > 1 else "")
            + f", {self.total:,} steps of {tp.batch_size}x{seq_len} chars ({self.batches.per_epoch:,} per epoch)"
            + (f", resuming at step {start:,}" if start else "")
        )

    def save_model(self, path: Path, val_bpc: float | None) -> None:
        """The model file: config, vocabulary, weights and how they were trained. Nothing run-dependent (such as
        timings) goes in: identical runs give identical bytes, so DVC does not rerun evaluate and generate after a
        resume or a retrain."""
        info = {
            "steps": self.total,
            "seq_len": self.packed.meta["seq_len"],
            "val_bpc": val_bpc,
            "params": {"model": dataclasses.asdict(self.mp), "train": dataclasses.asdict(self.trainer.tp)},
        }
        self.model.to("cpu")
        artifact.save(path, artifact.model_record(self.model, self.vocab, info))


def build_run(mp, tp, vocab_path: Path, packed_dir: Path, rank: int, world: int, device: torch.device) -> Run:
    """Load the data, seed, build the model (from train.init_from's weights, if set) and its Trainer."""
    vocab, packed = Vocab.load(vocab_path), load_packed(packed_dir)
    meta = packed.meta
    if meta["vocab_size"] != len(vocab):
        raise CharlmError(
            f"{packed_dir} was built with {meta['vocab_size']} symbols but {vocab_path} has {len(vocab)}; "
            f"rerun `dvc repro pack`"
        )
    # train.batch_size is the global batch: each process takes a disjoint 1/world of every minibatch.
    align = meta.get("align", "stream")
    batches = Batches(
        packed.streams["train"], meta["seq_len"], tp.batch_size // world, meta["seed"], rank, world, align
    )
    total = min(batches.per_epoch * tp.epochs, tp.max_steps or batches.per_epoch * tp.epochs)
    if tp.deterministic and device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    torch.manual_seed(tp.seed)
    model = CharRNN(len(vocab), **dataclasses.asdict(mp)).to(device)
    init_sha = load_initial_weights(model, tp.init_from, vocab, mp) if tp.init_from else None
    # The number of processes is left out, so a checkpoint resumes under any world size; the starting model
    # counts by its bytes, not its path.
    run_id = fingerprint(
        dataclasses.asdict(mp), dataclasses.asdict(tp) | {"processes": None}, meta, vocab.itos, init_sha,
        device.type, torch.__version__,
    )  # fmt: skip
    return Run(mp, vocab, packed, batches, total, model, Trainer(model, tp, total, device, world), run_id)


def checkpoint_path(run_id: str) -> Path:
    """checkpoints/train.pt in a normal workspace. A queued or `--temp` experiment runs in a temporary copy of
    the repository (.dvc/tmp/exps/tmpXXX) that DVC deletes afterwards, killed or not: its checkpoint lives in
    the repository it was queued from, keyed by the run's fingerprint, where re-queuing it finds it."""
    parts = Path.cwd().resolve().parts
    for i in range(len(parts) - 3, 0, -1):
        if parts[i : i + 3] == (".dvc", "tmp", "exps"):
            return Path(*parts[:i]) / paths.KEYED_CHECKPOINTS / f"{run_id[:32]}.pt"
    return paths.CHECKPOINT


def prune_keyed(keep: Path) -> None:
    """Keep the KEEP_KEYED most recently written keyed checkpoints (always `keep`, the one just written)."""
    files = sorted(keep.parent.glob("*.pt"), key=lambda f: f.stat().st_mtime, reverse=True)
    for old in [f for f in files if f != keep][KEEP_KEYED - 1 :]:
        old.unlink(missing_ok=True)


def load_initial_weights(model: CharRNN, path: str, vocab: Vocab, mp: params.ModelParams) -> str:
    """Load the weights of a trained model into `model` (fine-tuning); return the file's sha256. The model must
    share the data's vocabulary and the model.* shape (dropout may differ)."""
    fix = "copy a charlm model there, or set train.init_from: null"
    init, init_vocab, _ = artifact.load_model(path, fix=fix)
    if init_vocab.chars != vocab.chars:
        raise CharlmError(
            f"{path} has a different vocabulary ({len(init_vocab)} symbols) from data/vocab.json ({len(vocab)}); "
            f"set vocab.from_model: {path} so the data is encoded with the model's characters"
        )
    shape = {k: v for k, v in model.config.items() if k not in ("dropout", "vocab_size")}
    theirs = {k: init.config[k] for k in shape}
    if theirs != shape:
        wanted = ", ".join(f"model.{k}: {v}" for k, v in theirs.items())
        raise CharlmError(f"{path} is a {theirs} model but params.yaml asks for {shape}; set {wanted}")
    model.load_state_dict(init.state_dict())
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


class StopRequested:
    """SIGINT/SIGTERM set a flag that the loop checks between steps, so the checkpoint is never mid-update."""

    def __init__(self):
        self.requested = False
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        if self.requested:  # a second Ctrl-C stops at once
            raise KeyboardInterrupt
        self.requested = True


class Progress:
    """What a resumed run must continue, saved in every checkpoint: the training seconds so far, the seconds
    spent in steps alone (for the throughput figure), and the train loss summed since the last log (a resume
    may land between two logs). The sum stays on the device: reading it is the only host sync between logs."""

    def __init__(self, device: torch.device, saved: dict | None = None):
        saved = saved or {"train_s": 0.0, "step_s": 0.0, "loss_sum": 0.0, "loss_n": 0}
        self.saved_train_s, self.step_s = saved["train_s"], saved["step_s"]
        self.loss_sum, self.loss_n = torch.tensor(saved["loss_sum"], device=device), saved["loss_n"]
        self.t_start = time.perf_counter() - saved["train_s"]
        self.restart_clock()

    def restart_clock(self) -> None:
        self.t_mark, self.steps = time.perf_counter(), 0

    @contextlib.contextmanager
    def paused(self):
        """Keep evaluation and I/O out of the throughput figure: the time spent inside does not count."""
        start = time.perf_counter()
        yield
        self.t_mark += time.perf_counter() - start

    def add(self, loss: torch.Tensor) -> None:
        self.loss_sum += loss
        self.loss_n += 1
        self.steps += 1

    def take(self, chars_per_step: int) -> tuple[float, float]:
        """(mean train loss, characters per second) since the last call; starts the next interval."""
        loss = (self.loss_sum / self.loss_n).item()
        now = time.perf_counter()
        self.step_s += now - self.t_mark
        chars_per_s = self.steps * chars_per_step / max(now - self.t_mark, 1e-9)
        self.loss_sum.zero_()
        self.loss_n = 0
        self.restart_clock()
        return loss, chars_per_s

    def train_s(self, ran: bool) -> float:
        return time.perf_counter() - self.t_start if ran else self.saved_train_s

    def state(self) -> dict:
        return {
            "train_s": self.train_s(True),
            "step_s": self.step_s,
            "loss_sum": self.loss_sum.item(),
            "loss_n": self.loss_n,
        }
