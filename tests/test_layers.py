"""Imports point one way: apps -> pipeline -> core -> base. A module may import its own layer and those below it,
never one above (charlm/README: "Where things go"). Stage scripts sit on top, beside the apps, and the apps never
import a stage."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ORDER = ["base", "core", "pipeline", "apps"]  # lowest first


def layer_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if parts[0] == "charlm" and len(parts) > 1 and parts[1] in ORDER else None


def imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):  # lazy imports inside functions too
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


def violations(path: Path, own: str) -> list[str]:
    return sorted(
        f"{path.relative_to(ROOT)} ({own}) imports {name}"
        for name in imports(path)
        if (layer := layer_of(name)) and ORDER.index(layer) > ORDER.index(own)
    )


@pytest.mark.parametrize("layer", ORDER)
def test_a_layer_imports_only_itself_and_the_layers_below(layer):
    bad = [v for path in sorted((ROOT / "charlm" / layer).rglob("*.py")) for v in violations(path, layer)]
    assert bad == []


def test_every_library_module_sits_in_a_layer():
    loose = [p.name for p in (ROOT / "charlm").glob("*.py") if p.name != "__init__.py"]
    assert loose == [], f"modules outside charlm/{{{','.join(ORDER)}}}: {loose}"


def test_nothing_in_the_library_imports_a_stage_script():
    bad = [str(p) for p in (ROOT / "charlm").rglob("*.py") if any(n.split(".")[0] == "stages" for n in imports(p))]
    assert bad == []


def test_the_check_catches_an_upward_import(tmp_path):
    """The check can fail: a core module that imports the pipeline is reported."""
    core = tmp_path / "charlm" / "core"
    core.mkdir(parents=True)
    (core / "bad.py").write_text("def f():\n    from charlm.pipeline import artifact\n")
    global ROOT
    saved, ROOT = ROOT, tmp_path
    try:
        assert violations(core / "bad.py", "core") == ["charlm/core/bad.py (core) imports charlm.pipeline"]
    finally:
        ROOT = saved
