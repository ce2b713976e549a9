"""dvc.yaml cannot drift from the code: every file a stage executes is one of that stage's deps.

DVC reruns a stage only when a declared dep changes, so an undeclared import would let a cached metric describe
old code. Per-file deps (not a `charlm/` folder dep) keep a change to, say, charlm/core/sampling.py's generation-only
code from rerunning train needlessly... unless train imports it, which this test then requires.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("charlm", "stages")


def module_file(name: str) -> Path:
    path = ROOT.joinpath(*name.split("."))
    return path / "__init__.py" if path.is_dir() else path.with_suffix(".py")


def imported_modules(path: Path) -> set[str]:
    """Our modules that `path` imports anywhere in its body (lazy imports inside functions included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            # `from charlm.pipeline import artifact` imports the module charlm.pipeline.artifact
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return {name for name in found if name.split(".")[0] in PACKAGES and module_file(name).exists()}


def executed_files(module: str) -> set[str]:
    """Repository-relative files that run when `python -m <module>` runs: the module, its packages'
    __init__.py files, and the same for everything it imports, transitively."""
    todo, seen = [module], set()
    while todo:
        name = todo.pop()
        parts = name.split(".")
        for i in range(1, len(parts) + 1):
            prefix = ".".join(parts[:i])
            if prefix in seen:
                continue
            seen.add(prefix)
            todo.extend(imported_modules(module_file(prefix)))
    return {module_file(name).relative_to(ROOT).as_posix() for name in seen}


def stages() -> dict[str, dict]:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text(encoding="utf-8"))["stages"]


def missing_deps(stage: dict) -> set[str]:
    module = stage["cmd"].removeprefix("python -m ").split()[0]
    return executed_files(module) - set(stage["deps"])


@pytest.mark.parametrize("name", sorted(stages()))
def test_every_executed_file_is_a_dep(name):
    missing = sorted(missing_deps(stages()[name]))
    assert not missing, f"stage {name} runs {missing} but dvc.yaml does not list them as its deps"


def test_the_check_catches_a_removed_dep():
    """The check can fail: drop one real dep of evaluate and it is reported."""
    evaluate = stages()["evaluate"]
    assert "charlm/core/data.py" in evaluate["deps"]
    evaluate["deps"].remove("charlm/core/data.py")
    assert missing_deps(evaluate) == {"charlm/core/data.py"}


def test_a_generate_change_does_not_rerun_train():
    """Per-file deps keep generation-only code out of train's deps: stages/generate.py is nobody else's."""
    for name, stage in stages().items():
        assert (name == "generate") == ("stages/generate.py" in stage["deps"]), name
        assert "charlm" not in stage["deps"] and "charlm/" not in stage["deps"], name


def test_lazy_imports_are_followed():
    """charlm.apps.cli imports charlm.apps.report inside a function; the walk must see it."""
    assert "charlm.apps.report" in imported_modules(ROOT / "charlm" / "apps" / "cli.py")


def test_a_stage_depends_on_exactly_the_declarations_of_the_sections_it_reads():
    """A section's declaration is a dep of the stages that read it and of no other, so that adding a key reruns
    only those (tests/test_experiments.py shows it with real DVC). Moving the declarations back into one shared
    module makes this fail."""
    for name, stage in stages().items():
        declared = {d.removeprefix("charlm/pipeline/sections/").removesuffix(".py") for d in stage["deps"]
                    if d.startswith("charlm/pipeline/sections/") and not d.endswith("__init__.py")}
        assert declared == set(stage["params"]), (name, declared, stage["params"])
        for section in stage["params"]:
            assert (ROOT / "charlm" / "pipeline" / "sections" / f"{section}.py").exists(), section
