"""DVCLive for a DVC stage, and the snapshot of its logs that a training checkpoint carries."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

from charlm.io import write_text


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


def snapshot_files(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): p.read_text(encoding="utf-8") for p in sorted(root.rglob("*")) if p.is_file()}


def restore_files(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        write_text(root / rel, text)
