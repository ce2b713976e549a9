"""`dvc exp` workflows on the real pipeline: -S overrides, a queued grid, exp show / sort / apply / branch,
plots diff across experiments (rendered offline), sample comparison, and param granularity."""
from __future__ import annotations

import contextlib
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
    p.run(sys.executable, "-m", "charlm.apps.cli", "plots", "seed1", "seed2", "--out", str(out))
    png = (out / "bits_per_character.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    html = (out / "index.html").read_text()
    assert "data:image/png;base64," in html and "<script" not in html and "src=\"http" not in html

    table = p.run(sys.executable, "-m", "charlm.apps.cli", "compare", "seed1", "seed2").stdout
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


def declare_key(p, section: str, key: str, value) -> None:
    """Add a key to a params section's declaration (charlm/pipeline/sections/<section>.py) and to params.yaml,
    as a developer adding a feature would."""
    module = p.path / "charlm" / "pipeline" / "sections" / f"{section}.py"
    line = f'    section: ClassVar[str] = "{section}"\n'
    text = module.read_text(encoding="utf-8")
    assert line in text
    module.write_text(text.replace(line, line + f"    {key}: {type(value).__name__} = spec()\n"), encoding="utf-8")
    p.set_params(**{section: {key: value}})


def test_a_declaration_change_reruns_only_the_stages_that_read_the_section(baseline):
    """Adding a key to the generate section's declaration reruns generate alone; to the train section's, train
    (and evaluate and generate only because the model file, which records the train params, changed). A
    declaration kept in a module every stage imports would rerun the whole pipeline here."""
    p = baseline
    declare_key(p, "generate", "note", "x")
    assert ran(p.dvc("repro")) == ["generate"]
    declare_key(p, "train", "note", "x")
    stages = ran(p.dvc("repro"))
    assert stages[0] == "train" and set(stages) <= {"train", "evaluate", "generate"}, stages


# Long enough to be caught part-way (a few seconds of training; 200 steps take 2 s), checkpointing every 20 steps.
GRID = ["-S", "train.max_steps=1500", "-S", "train.epochs=100", "-S", "train.checkpoint_every=20",
        "-S", "train.log_every=20", "-S", "train.eval_every=500", "-S", "train.sample_every=0"]
ENV = {"OMP_NUM_THREADS": "1"}


def keyed_checkpoints(p) -> list[Path]:
    return list((p.path / ".dvc/tmp/charlm-checkpoints").glob("*.pt"))


def wait_for_keyed_checkpoint(p, at_least: int, running, timeout: float = 300) -> int:
    """Poll the keyed checkpoint of a temporary experiment until its step reaches `at_least`."""
    import torch

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and running():
        for f in keyed_checkpoints(p):
            try:
                step = int(torch.load(f, weights_only=True)["step"])
            except Exception:  # caught while being renamed into place
                continue
            if step >= at_least:
                return step
        time.sleep(0.05)
    pytest.fail("the run was not caught mid-training")


def start_queue(p) -> None:
    """`dvc queue start` without waiting for the queue: its worker daemon inherits the caller's stdout, so a
    captured run would only return once the worker exits."""
    import os
    import subprocess

    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    subprocess.run([str(Path(sys.executable).parent / "dvc"), "queue", "start", "-j", "1"], cwd=p.path, check=True,
                   env={**os.environ, "PATH": path, **ENV}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def assert_same_model(p, rev_a: str, rev_b: str) -> None:
    import torch

    from charlm.pipeline import artifact

    with contextlib.chdir(p.path):
        a, _, _ = artifact.load_model(rev=rev_a)
        b, _, _ = artifact.load_model(rev=rev_b)
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(x, y), name


def test_a_killed_temp_experiment_resumes_from_its_keyed_checkpoint(baseline):
    """`dvc exp run --temp` trains in a temporary copy that DVC deletes, so the checkpoint lives in the repository
    under .dvc/tmp/charlm-checkpoints/<fingerprint>.pt: SIGKILL the whole run mid-training, rerun the same
    experiment, and it resumes there and ends with the weights of an uninterrupted run."""
    import os
    import signal
    import subprocess

    p = baseline
    p.dvc("exp", "run", "--temp", "-n", "reference", *GRID, env=ENV, timeout=600)
    assert not keyed_checkpoints(p), "a finished experiment leaves no checkpoint behind"

    # -f: the reference left these params in DVC's run-cache, which would restore train instead of running it
    # (a real rerun after a kill has no such entry: the killed run never finished).
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    proc = subprocess.Popen([str(Path(sys.executable).parent / "dvc"), "exp", "run", "--temp", "-f", "-n", "killed",
                             *GRID], cwd=p.path, env={**os.environ, "PATH": path, **ENV}, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    step = wait_for_keyed_checkpoint(p, 100, lambda: proc.poll() is None)
    os.killpg(proc.pid, signal.SIGKILL)  # DVC and the stage together, like a lost machine
    proc.wait()
    assert step < 1500 and len(keyed_checkpoints(p)) == 1

    out = p.dvc("exp", "run", "--temp", "-f", "-n", "resumed", *GRID, env=ENV, timeout=600).stdout
    assert "resuming at step" in out, out[-3000:]
    assert not keyed_checkpoints(p)
    assert_same_model(p, "reference", "resumed")



def test_a_killed_queued_experiment_resumes_when_queued_again(baseline):
    """The same through the queue: `dvc queue kill --force` mid-training, queue it again, and it resumes and
    ends with the weights of an uninterrupted run (made last, with -f, so that no run-cache entry of the same
    params could restore train instead of running it)."""
    p = baseline
    p.dvc("exp", "run", "--queue", "-n", "killed", *GRID, env=ENV)
    start_queue(p)
    try:
        step = wait_for_keyed_checkpoint(p, 100, lambda: True, timeout=120)
        p.dvc("queue", "kill", "--force", "killed")
    finally:
        p.dvc("queue", "stop", "--kill", check=False)
    assert step < 1500 and keyed_checkpoints(p)

    p.dvc("exp", "run", "--queue", "-n", "resumed", *GRID, env=ENV)
    start_queue(p)
    deadline = time.monotonic() + 900  # a minute on a quiet machine; far longer when other jobs share the cores
    while time.monotonic() < deadline and "resumed" not in p.dvc("exp", "list", "--name-only").stdout:
        time.sleep(2)
    p.dvc("queue", "stop", check=False)
    assert "resumed" in p.dvc("exp", "list", "--name-only").stdout, "the re-queued experiment did not finish in time"
    logs = p.dvc("queue", "logs", "resumed").stdout
    assert "resuming at step" in logs, logs[-3000:]
    assert not keyed_checkpoints(p)
    p.dvc("exp", "run", "--temp", "-f", "-n", "reference", *GRID, env=ENV, timeout=600)
    assert_same_model(p, "reference", "resumed")
