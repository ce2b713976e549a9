"""`dvc exp` workflows on the real pipeline: -S overrides, a queued grid, exp show / sort / apply / branch,
plots diff across experiments (rendered offline), sample comparison, and param granularity."""
from __future__ import annotations

import csv
import io
import json
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

COLUMNS = ["model.cell", "model.hidden", "train.lr", "test_bpc", "val.bpc", "train_time_s", "train_chars_per_s"]


def ran(proc) -> list[str]:
    return [line.split("'")[1] for line in proc.stdout.splitlines() if line.startswith("Running stage")]


def exp_table(p, *extra) -> list[dict]:
    """`dvc exp show --csv` as a list of rows (experiments only, not the baseline)."""
    text = p.dvc("exp", "show", "--csv", *extra).stdout
    return [row for row in csv.DictReader(io.StringIO(text)) if row.get("Experiment")]


@pytest.fixture
def baseline(served_project):
    p = served_project
    p.dvc("repro")
    p.git("add", "-A")
    p.git("commit", "-qm", "baseline")
    return p


def test_exp_run_with_overrides_show_sort_and_promote(baseline):
    p = baseline
    p.dvc("exp", "run", "-n", "wide", "-S", "model.hidden=48", "-S", "train.lr=3.0e-3")
    p.dvc("exp", "run", "-n", "narrow", "-S", "model.hidden=16", "-S", "train.lr=1.0e-2")
    rows = exp_table(p)
    assert {r["Experiment"] for r in rows} == {"wide", "narrow"}
    header = rows[0].keys()
    for column in COLUMNS:
        assert any(h == column or h.endswith(":" + column) or h.endswith(column) for h in header), (column, header)

    def bpc(row):
        return float(next(v for k, v in row.items() if k.endswith("test_bpc")))

    ordered = exp_table(p, "--sort-by", "metrics/eval.json:test_bpc", "--sort-order", "asc")
    assert [bpc(r) for r in ordered] == sorted(bpc(r) for r in ordered)
    best = ordered[0]["Experiment"]

    p.dvc("exp", "branch", best, "best-model")
    assert "best-model" in p.git("branch").stdout
    p.dvc("exp", "apply", best)
    applied = json.loads((p.path / "metrics/eval.json").read_text())
    assert applied["test_bpc"] == pytest.approx(bpc(ordered[0]), abs=1e-4)


def test_queued_grid_runs_with_queue_start(baseline):
    p = baseline
    p.dvc("exp", "run", "--queue", "-S", "model.cell=lstm,gru")
    p.dvc("queue", "start", "-j", "1")
    deadline = time.monotonic() + 400
    while time.monotonic() < deadline:
        status = p.dvc("queue", "status").stdout
        if "Queued" not in status and "Running" not in status:
            break
        time.sleep(3)
    else:
        pytest.fail("the queue did not finish:\n" + status)
    p.dvc("queue", "stop", check=False)
    rows = exp_table(p)
    cells = sorted(next(v for k, v in r.items() if k.endswith("model.cell")) for r in rows)
    assert cells == ["gru", "lstm"], rows
    assert all(next(v for k, v in r.items() if k.endswith("test_bpc")) not in ("", "-") for r in rows)


def test_plots_diff_and_samples_compare_across_experiments(baseline, tmp_path):
    p = baseline
    p.dvc("exp", "run", "-n", "seed1", "-S", "train.seed=1")
    p.dvc("exp", "run", "-n", "seed2", "-S", "train.seed=2")
    plots = json.loads(p.dvc("plots", "diff", "seed1", "seed2", "--json").stdout)["data"]
    curve = json.dumps(plots["bits per character"][0]["content"])
    assert "seed1" in curve and "seed2" in curve

    out = tmp_path / "plots"
    p.run(sys.executable, "-m", "charlm.cli", "plots", "seed1", "seed2", "--out", str(out))
    png = (out / "bits_per_character.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    html = (out / "index.html").read_text()
    assert "data:image/png;base64," in html and "<script" not in html and "src=\"http" not in html

    table = p.run(sys.executable, "-m", "charlm.cli", "compare", "seed1", "seed2").stdout
    lines = table.splitlines()
    assert lines[0] == "| sample | seed1 | seed2 |"
    assert len(lines) == 2 + 4  # header, rule, 2 prompts x 2 temperatures
    assert "'The ' @ T=0" in table


def test_param_granularity(baseline):
    p = baseline
    p.set_params(generate={"length": 30})
    assert ran(p.dvc("repro")) == ["generate"]
    p.set_params(model={"hidden": 24})
    assert ran(p.dvc("repro")) == ["train", "evaluate", "generate"]
    p.set_params(evaluate={"batch_size": 4})
    assert ran(p.dvc("repro")) == ["evaluate"]
    p.set_params(vocab={"min_count": 2})
    assert ran(p.dvc("repro"))[:2] == ["vocab", "pack"]
