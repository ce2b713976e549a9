"""DVCLive for a DVC stage, and the train stage's logs that a checkpoint carries."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

from charlm.base.io import write_text


def stage_live(directory: Path, resume: bool):
    """DVCLive for a DVC stage whose dvc.yaml already declares the metrics and plots: no dvc.yaml of its own,
    no experiment of its own (DVC runs this stage), no HTML report. Its `next_step()` signals each logged step
    to DVC's VS Code extension and DVC Studio, so a running or queued experiment shows live plots."""
    from dvclive import Live  # imported late: slow to import, and unused when params are invalid

    kwargs: dict[str, Any] = {"resume": resume, "report": None, "save_dvc_exp": False, "dvcyaml": None}
    if git_has_commits():
        return Live(str(directory), **kwargs)

    # In a git repo with no commits yet, DVCLive's DVC integration crashes: scm.get_rev() raises "Empty git repo"
    # (https://github.com/treeverse/dvclive/issues/522, fixed upstream only for save_dvc_exp=True). Only there
    # is it skipped; the step signals do not depend on it.
    class EmptyRepoLive(Live):
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
