"""The README's recipe lines are the ones bench/quality.py measures, so a documented figure belongs to its line."""
from __future__ import annotations

from conftest import ROOT

from bench.quality import RECIPES, exp_run_line


def test_every_measured_recipe_is_in_the_readme_as_one_line():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for name, overrides in RECIPES.items():
        if overrides:  # the defaults are `dvc repro` / params.yaml itself
            assert exp_run_line(overrides) in readme, name


def test_recipes_override_only_known_params():
    import yaml

    shipped = yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))
    for overrides in RECIPES.values():
        for key in overrides:
            section, name = key.split(".")
            assert name in shipped[section], key
