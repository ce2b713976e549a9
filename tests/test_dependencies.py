"""The declared dependencies are the ones the code uses, and the runtime lock holds no test-only package."""
from __future__ import annotations

import ast
import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# distribution name -> the top-level module it provides, where the two differ
MODULE = {"ruamel.yaml": "ruamel", "vl-convert-python": "vl_convert", "pyyaml": "yaml", "moto": "moto"}


def project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]


def dist_name(requirement: str) -> str:
    return re.match(r"[A-Za-z0-9._-]+", requirement).group(0).lower()


def imported_top_level(*folders: str) -> set[str]:
    names = set()
    for folder in folders:
        for path in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.Import):
                    names.update(alias.name.split(".")[0] for alias in node.names)
                elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                    names.add(node.module.split(".")[0])
    return names


def test_every_runtime_dependency_is_imported_by_the_library_or_stages():
    used = imported_top_level("charlm", "stages")
    unused = [d for d in map(dist_name, project()["dependencies"]) if MODULE.get(d, d.replace("-", "_")) not in used]
    assert unused == [], f"pinned but imported nowhere in charlm/ or stages/: {unused}"


def test_every_test_and_bench_dependency_is_imported():
    used = imported_top_level("tests", "bench")
    extras = project()["optional-dependencies"]
    names = [dist_name(r) for r in extras["test"] + extras["bench"]]
    unused = [d for d in names if MODULE.get(d, d.replace("-", "_")) not in used]
    assert unused == [], f"declared but imported nowhere in tests/ or bench/: {unused}"


def test_the_runtime_lock_holds_no_test_only_package():
    def pins(name):
        return {dist_name(line) for line in (ROOT / name).read_text().splitlines() if line and line[0] != "#"}
    runtime, test = pins("requirements.lock"), pins("requirements-test.lock")
    assert not runtime & {"pytest", "hypothesis", "moto", "flask", "pyppmd", "ruff", "mypy", "playwright"}
    assert {"pytest", "hypothesis", "moto", "pyppmd", "ruff", "mypy", "playwright"} <= test
    assert "pandas" in runtime  # the playground's experiments table
    assert not runtime & test, "a package pinned in both locks"
    assert "torch==2.13.0" in (ROOT / "requirements.lock").read_text().splitlines()
