"""DVCLive for a DVC stage, and the train stage's logs: metrics, progress bar, throughput and samples, which every
checkpoint carries so that a resumed run ends with the same logs as an uninterrupted one."""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from charlm.base.io import write_text
from charlm.pipeline import paths


def stage_live(directory: Path, resume: bool):
    """DVCLive for a DVC stage whose dvc.yaml already declares the metrics and plots: no dvc.yaml of its own,
    no experiment of its own (DVC runs this stage), no HTML report. Its `next_step()` signals each logged step
    to DVC's VS Code extension and DVC Studio, so a running or queued experiment shows live plots."""
    from dvclive import Live  # imported late: slow to import, and unused when params are invalid
    from dvclive.plots import NumpyEncoder

    class AtomicLive(Live):
        def make_summary(self):
            # DVCLive rewrites metrics.json in place, so a run killed mid-write left it empty: write it atomically
            if self._step is not None:
                self.summary["step"] = self.step
            write_text(self.metrics_file, json.dumps(self.summary, indent=4, cls=NumpyEncoder) + "\n")

    kwargs: dict[str, Any] = {"resume": resume, "report": None, "save_dvc_exp": False, "dvcyaml": None}
    if git_has_commits():
        return AtomicLive(str(directory), **kwargs)

    # In a git repo with no commits yet, DVCLive's DVC integration crashes: scm.get_rev() raises "Empty git repo"
    # (https://github.com/treeverse/dvclive/issues/522, fixed upstream only for save_dvc_exp=True). Only there
    # is it skipped; the step signals do not depend on it.
    class EmptyRepoLive(AtomicLive):
        def _init_dvc(self):
            pass

    return EmptyRepoLive(str(directory), **kwargs)


def git_has_commits() -> bool:
    """False only inside a git repo with no commits (exit 1); outside git (128) DVCLive copes by itself."""
    try:
        code = subprocess.run(["git", "rev-parse", "--verify", "--quiet", "HEAD"], capture_output=True).returncode
    except OSError:  # no git at all
        return True
    return code != 1


class StageLogs:
    """What the train stage logs besides the model: DVCLive's folder and a page of samples. Every checkpoint
    carries a snapshot of both, so a resumed run ends with the same logs as an uninterrupted one."""

    def __init__(self, live_dir: Path, samples: Path, title: str):
        self.live_dir, self.samples, self.title = live_dir, samples, title

    def start(self, saved: dict | None) -> None:
        """Put back the logs as they were at a checkpoint, or start a new samples page."""
        if saved is None:
            write_text(self.samples, f"# {self.title}\n\n")
            return
        shutil.rmtree(self.live_dir, ignore_errors=True)
        for rel, text in saved["live"].items():
            write_text(self.live_dir / rel, text)
        if saved.get("samples") is not None:
            write_text(self.samples, saved["samples"])

    def add_samples(self, step: int, text: str) -> None:
        write_text(self.samples, self.samples.read_text(encoding="utf-8") + f"## step {step}\n\n{text}\n")

    def snapshot(self) -> dict:
        files = sorted(p for p in self.live_dir.rglob("*") if p.is_file())
        return {
            "live": {str(p.relative_to(self.live_dir)): p.read_text(encoding="utf-8") for p in files},
            "samples": self.samples.read_text(encoding="utf-8") if self.samples.exists() else None,
        }


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


LN2 = math.log(2)


class TrainLog:
    """Everything the train stage logs, in one object: DVCLive metrics, the progress bar (plain lines when there is
    no terminal), the samples page and the throughput. Only the lead process of a data-parallel run logs: on the
    others (`lead=False`) every method does nothing, so the loop needs no rank checks to log."""

    def __init__(self, lead: bool, saved: dict | None, total: int, start: int, chars_per_step: int, device, title: str):
        self.lead, self.total, self.chars_per_step = lead, total, chars_per_step
        self.progress = Progress(device, saved["progress"] if saved else None)
        self.logs = StageLogs(paths.LIVE, paths.TRAIN_SAMPLES, title)
        self.bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True, disable=None if lead else True,
                        leave=False)  # fmt: skip
        self.live = None
        if lead:
            self.logs.start(saved)  # the logs as they were at the checkpoint, if any
            self.live = stage_live(paths.LIVE, resume=saved is not None)

    def message(self, text: str, end: str = "\n") -> None:
        if self.lead:
            tqdm.write(text, end=end)

    def fact(self, name: str, value: str) -> None:
        """A fact of the run that does not change, such as its precision: in metrics.json, which `dvc exp show`
        shows beside the params."""
        if self.live is not None:
            self.live.log_metric(name, value, plot=False)

    def paused(self):
        """Keep evaluation and I/O out of the throughput figure."""
        return self.progress.paused()

    def step(self, loss: torch.Tensor) -> None:
        self.progress.add(loss)
        self.bar.update(1)

    def train(self, done: int, lr: float) -> None:
        if not self.lead:
            return
        train_loss, chars_per_s = self.progress.take(self.chars_per_step)
        self._log(done, {"train/loss": train_loss, "train/bpc": train_loss / LN2, "lr": lr, "chars_per_s": chars_per_s})
        self.bar.set_postfix(loss=f"{train_loss:.3f}", chars_s=f"{chars_per_s:,.0f}")
        if self.bar.disable:  # no terminal (CI, nohup, a queued experiment): plain progress lines instead
            eta = (self.total - done) * self.chars_per_step / max(chars_per_s, 1e-9)
            self.message(f"step {done:,}/{self.total:,}: loss {train_loss:.4f}, {chars_per_s:,.0f} chars/s, "
                     f"ETA {eta / 60:.1f} min")  # fmt: skip

    def val(self, step: int, val_bpc: float, note: str = "") -> None:
        if self.lead:
            self._log(step, {"val/loss": val_bpc * LN2, "val/bpc": val_bpc})
            self.message(f"step {step:,}: val {val_bpc:.4f} bpc{note}")

    def final(self, step: int, metrics: dict[str, float]) -> None:
        """Figures logged once, at the end (not plotted)."""
        if self.lead:
            self._log(step, metrics, plot=False)
            shown = (
                f"{name} {value:,}" if isinstance(value, int) else f"{name} {value:.4f}"
                for name, value in metrics.items()
            )
            self.message(f"step {step:,}: " + ", ".join(shown))

    def samples(self, step: int, text: str) -> None:
        if self.lead:
            self.message(f"step {step:,} samples:\n{text}", end="")
            self.logs.add_samples(step, text)

    def commit(self) -> None:
        """Write the summary and signal DVC's extension that a step completed."""
        if self.live is not None:
            self.live.next_step()

    def state(self) -> dict:
        """What a checkpoint carries of the logs."""
        return {"progress": self.progress.state(), **(self.logs.snapshot() if self.lead else {})}

    def finish(self, ran: bool, chars: int, steps: int) -> tuple[float, float | None]:
        """Log the run's totals and close; (training seconds, the last val bpc or None)."""
        self.bar.close()
        train_s = self.progress.train_s(ran)
        if self.live is None:
            return train_s, None
        self.live.log_metric("train_time_s", round(train_s, 2), plot=False)
        self.live.log_metric("train_chars_per_s", round(chars / max(self.progress.step_s, 1e-9), 1), plot=False)
        self.live.log_metric("steps", steps, plot=False)
        self.live.end()  # the summary keeps the last logged step
        return train_s, self.live.summary.get("val", {}).get("bpc")

    def _log(self, step: int, metrics: dict[str, float], plot: bool = True) -> None:
        assert self.live is not None
        self.live.step = step
        for name, value in metrics.items():
            self.live.log_metric(name, value, plot=plot)
