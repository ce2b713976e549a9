"""charlm/pipeline/paths.py is the code's one spelling of what dvc.yaml declares: each stage output and data
dependency there is one of its names (or a file inside one), and each name is used by dvc.yaml."""
from __future__ import annotations

from pathlib import Path, PurePosixPath

import yaml

from charlm.pipeline import paths

ROOT = Path(__file__).resolve().parent.parent
DECLARED = {PurePosixPath(v) for k, v in vars(paths).items() if k.isupper()}


def dvc_files() -> set[PurePosixPath]:
    dvc = yaml.safe_load((ROOT / "dvc.yaml").read_text(encoding="utf-8"))
    found = set()
    for stage in dvc["stages"].values():
        for key in ("outs", "metrics", "deps"):
            for entry in stage.get(key, []):
                name = entry if isinstance(entry, str) else next(iter(entry))
                if not name.endswith(".py"):
                    found.add(PurePosixPath(name))
    return found


def covered(path: PurePosixPath) -> bool:
    return any(path == d or d in path.parents for d in DECLARED)


def test_every_data_path_in_dvc_yaml_has_a_name_in_paths():
    loose = sorted(str(p) for p in dvc_files() if not covered(p))
    assert loose == [], f"dvc.yaml names {loose}, which charlm/pipeline/paths.py does not"


def test_every_output_name_in_paths_is_declared_by_dvc_yaml():
    files = dvc_files()
    outside_dvc = {paths.CHECKPOINT, paths.KEYED_CHECKPOINTS}  # checkpoints are deliberately not DVC outputs
    unused = sorted(
        str(d) for d in DECLARED - {PurePosixPath(p) for p in outside_dvc}
        if not any(f == d or d in f.parents or f in d.parents for f in files)
    )
    assert unused == [], f"paths.py names {unused}, which dvc.yaml does not declare"
