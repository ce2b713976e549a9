"""The train stage through subprocesses: resuming after SIGKILL and SIGINT, reproducibility, stale checkpoints,
one-line errors and the DVCLive logs."""
from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import Project, assert_same_weights, copy_of, raw_project, weights

from charlm.core.data import load_packed
from charlm.core.scoring import TEMPERATURES, stream_bpc
from charlm.pipeline import artifact

pytestmark = pytest.mark.slow

ENV = {"OMP_NUM_THREADS": "1"}  # 2 OpenMP threads on a busy 2-core machine slow tiny models down many times
CHECKPOINT = "checkpoints/train.pt"
# Long enough to be stopped part-way (200 steps, over an epoch boundary at step 184), checkpoints every
# 10 steps, dropout on so that resuming must restore the RNG too.
LONG = {"model": {"dropout": 0.1},
        "train": {"epochs": 2, "max_steps": 200, "checkpoint_every": 10, "eval_every": 30, "log_every": 10,
                  "sample_every": 100, "sample_length": 20}}
EVAL_STEPS = [30, 60, 90, 120, 150, 180, 200]




@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Project:
    """Packed data and LONG params, built once; each test trains in its own copy."""
    p = raw_project(tmp_path_factory.mktemp("train") / "base")
    p.set_params(**LONG)
    for stage in ("prepare", "vocab", "pack"):
        p.stage(stage, env=ENV)
    return p


def train(p: Project, check: bool = True) -> subprocess.CompletedProcess:
    return p.stage("train", check=check, env=ENV)


def start_train(p: Project, env: dict | None = None) -> subprocess.Popen:
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    return subprocess.Popen([sys.executable, "-m", "stages.train"], cwd=p.path, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PATH": path, **ENV, **(env or {})})


def checkpoint_step(p: Project) -> int | None:
    try:
        return int(torch.load(p.path / CHECKPOINT, weights_only=True)["step"])
    except (FileNotFoundError, RuntimeError, EOFError):
        return None


def wait_for_checkpoint(p: Project, proc: subprocess.Popen, at_least: int, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        step = checkpoint_step(p)
        if step is not None and step >= at_least:
            return
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"train exited ({proc.returncode}) before a checkpoint at step {at_least}\n{out}\n{err}")
        time.sleep(0.01)
    proc.kill()
    pytest.fail("no checkpoint appeared in time")




def tsv(p: Project, metric: str) -> list[tuple[int, str]]:
    """(step, value) rows of a DVCLive plot file (the timestamp column is left out)."""
    with open(p.path / "dvclive/plots/metrics" / f"{metric}.tsv", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    name = metric.rsplit("/", 1)[-1]
    return [(int(r["step"]), r[name]) for r in rows]


@pytest.fixture(scope="module")
def uninterrupted(base, tmp_path_factory):
    p = copy_of(base, tmp_path_factory.mktemp("uninterrupted") / "repo")
    proc = train(p)
    return p, weights(p), proc


def test_dvclive_logs_metrics_and_one_row_per_evaluation(uninterrupted):
    p, _, proc = uninterrupted
    assert "resuming" not in proc.stdout + proc.stderr
    metrics = json.loads((p.path / "dvclive/metrics.json").read_text())
    assert metrics["step"] == 200
    assert 0 < metrics["val"]["bpc"] < 8 and metrics["train"]["loss"] > 0
    assert [step for step, _ in tsv(p, "val/bpc")] == EVAL_STEPS
    assert [step for step, _ in tsv(p, "train/loss")] == list(range(10, 201, 10))
    last_val = float(tsv(p, "val/bpc")[-1][1])
    assert metrics["val"]["bpc"] == pytest.approx(last_val)
    info = torch.load(p.path / "models/model.pt", weights_only=True)["info"]
    assert info["steps"] == 200 and info["val_bpc"] == pytest.approx(last_val)
    samples = (p.path / "reports/train_samples.md").read_text()
    assert "## step 100" in samples and "## step 200" in samples
    assert checkpoint_step(p) == 200


def test_val_bpc_is_the_test_protocol_on_the_val_split(uninterrupted):
    p, _, _ = uninterrupted
    model, _, info = artifact.load_model(p.path / "models/model.pt", torch.device("cpu"))
    val = load_packed(p.path / "data/packed").streams["val"]
    assert stream_bpc(model, val, 7, "cpu") == pytest.approx(info["val_bpc"], rel=1e-4)


def test_adam_beta2_reaches_the_optimizer(base, tmp_path):
    p = copy_of(base, tmp_path / "repo")
    p.set_params(train={"beta2": 0.95, "max_steps": 10})
    train(p)
    groups = torch.load(p.path / CHECKPOINT, weights_only=True)["optimizer"]["param_groups"]
    assert {tuple(g["betas"]) for g in groups} == {(0.9, 0.95)}


def resume_and_compare(p, step: int, reference, reference_weights) -> None:
    """Rerun train: it must resume at `step` and end with the uninterrupted run's weights and logs, with no
    logged row lost or repeated."""
    again = train(p)
    assert f"resuming at step {step:,}" in again.stdout + again.stderr
    assert_same_weights(weights(p), reference_weights)
    assert tsv(p, "val/bpc") == tsv(reference, "val/bpc")
    assert tsv(p, "train/loss") == tsv(reference, "train/loss")


def killed_after_a_checkpoint(base, path: Path, **params) -> tuple[Project, int]:
    """A copy of `base` (with `params`) whose training was SIGKILLed after its first checkpoint; and that step."""
    p = copy_of(base, path)
    if params:
        p.set_params(**params)
    proc = start_train(p)
    try:
        wait_for_checkpoint(p, proc, at_least=10)
    finally:
        proc.kill()
        proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    killed_at = checkpoint_step(p)
    assert killed_at is not None and 10 <= killed_at < 200 and killed_at % 10 == 0
    return p, killed_at


def test_resume_after_sigkill_is_bit_identical(base, uninterrupted, tmp_path):
    reference, reference_weights, _ = uninterrupted
    p, killed_at = killed_after_a_checkpoint(base, tmp_path / "repo")
    assert not (p.path / "models/model.pt").exists()

    resume_and_compare(p, killed_at, reference, reference_weights)
    assert (p.path / "reports/train_samples.md").read_text() == (reference.path / "reports/train_samples.md").read_text()


def test_sigint_saves_a_checkpoint_exits_130_and_resumes(base, uninterrupted, tmp_path):
    reference, reference_weights, _ = uninterrupted
    p = copy_of(base, tmp_path / "repo")
    proc = start_train(p)
    try:
        wait_for_checkpoint(p, proc, at_least=10)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130, err
    stopped_at = checkpoint_step(p)
    assert stopped_at is not None and 10 <= stopped_at < 200
    last = err.strip().splitlines()[-1]
    assert last == f"train: interrupted; checkpoint saved at step {stopped_at:,}; rerun to resume", err
    assert not (p.path / "models/model.pt").exists()

    # SIGINT lands between two train-loss logs: the average must still span the steps before the interrupt.
    resume_and_compare(p, stopped_at, reference, reference_weights)


def test_same_seed_reproduces_and_stale_or_broken_checkpoints_are_ignored(base, tmp_path):
    p = copy_of(base, tmp_path / "repo")
    p.set_params(train={"max_steps": 20, "eval_every": 10, "sample_every": 0})
    first = train(p)
    assert "starting from scratch" not in first.stdout
    w0 = weights(p)

    p.set_params(train={"seed": 1})
    other = train(p)  # the checkpoint left behind belongs to seed 0
    assert "belongs to other params or data; starting from scratch" in other.stdout
    assert "resuming" not in other.stdout
    w1 = weights(p)
    assert any(not torch.equal(w0[k], w1[k]) for k in w0)

    p.set_params(train={"seed": 0})
    (p.path / CHECKPOINT).write_bytes(b"PK\x03\x04 not a checkpoint")
    second = train(p)  # from scratch again: same params and seed as the first run
    assert "ignoring unusable checkpoint" in second.stdout and "resuming" not in second.stdout
    assert_same_weights(weights(p), w0)


def test_weight_drop_average_best_and_temperature_reach_the_model_file_and_resume_bit_identically(base, tmp_path):
    """model.weight_drop, train.ema_decay, train.keep_best and train.fit_temperature together: the model file holds
    the best-validated average with the temperature folded in and scores the logged final val; a killed run resumes
    to the same bytes and logs."""
    # a constant learning rate this high turns val up mid-run (best at step 90), so keep_best has a choice to make
    train_on = {"ema_decay": 0.9, "fit_temperature": True, "keep_best": True, "sample_every": 0, "lr": 2.0,
                "schedule": "constant"}  # fmt: skip
    on = {"model": {"weight_drop": 0.3}, "train": train_on}
    reference = copy_of(base, tmp_path / "reference")
    reference.set_params(**on)
    train(reference)
    metrics = json.loads((reference.path / "dvclive/metrics.json").read_text())
    final = metrics["val"]["bpc"]
    assert metrics["step"] == 200 and [step for step, _ in tsv(reference, "val/bpc")] == EVAL_STEPS
    assert final <= metrics["val_bpc_before_temperature"]  # T = 1 is on the grid
    assert metrics["val_bpc_trained_weights"] != pytest.approx(metrics["val_bpc_before_temperature"], abs=1e-5)
    assert min(TEMPERATURES) <= metrics["temperature"] <= max(TEMPERATURES)
    # keep_best: the chosen weights score the best of every validation (the last step's is scored, not plotted)
    earlier = {step: float(value) for step, value in tsv(reference, "val/bpc") if step < 200}
    assert metrics["best_step"] in EVAL_STEPS and metrics["best_step"] < 200
    assert metrics["val_bpc_before_temperature"] == pytest.approx(earlier[metrics["best_step"]], abs=1e-6)
    assert metrics["val_bpc_before_temperature"] == pytest.approx(min(earlier.values()), abs=1e-6)
    assert not (reference.path / "dvclive/plots/metrics/temperature.tsv").exists()  # logged once, not plotted
    model, _, info = artifact.load_model(reference.path / "models/model.pt", torch.device("cpu"))
    assert model.config["weight_drop"] == 0.3 and info["val_bpc"] == pytest.approx(final)
    val = load_packed(reference.path / "data/packed").streams["val"]
    assert stream_bpc(model, val, 7, "cpu") == pytest.approx(final, abs=1e-4)
    last = torch.load(reference.path / CHECKPOINT, weights_only=True)  # saved after the average went in
    assert "average" not in last
    assert_same_weights(last["model"], weights(reference))

    p, killed_at = killed_after_a_checkpoint(base, tmp_path / "killed", **on)
    assert "average" in torch.load(p.path / CHECKPOINT, weights_only=True)
    resume_and_compare(p, killed_at, reference, weights(reference))
    resumed = json.loads((p.path / "dvclive/metrics.json").read_text())
    for name in ("val", "val_bpc_trained_weights", "val_bpc_before_temperature", "temperature", "best_step"):
        assert resumed[name] == metrics[name], name


def one_line_error(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("train: error: "), proc.stderr
    return lines[0]


def test_cuda_on_a_machine_without_cuda(base, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    p = copy_of(base, tmp_path / "repo")
    p.set_params(train={"device": "cuda"})
    assert "train.device" in one_line_error(train(p, check=False))
    assert not (p.path / CHECKPOINT).exists()


def test_batch_larger_than_the_training_windows(base, tmp_path):
    p = copy_of(base, tmp_path / "repo")
    p.set_params(train={"batch_size": 100_000})
    line = one_line_error(train(p, check=False))
    assert "train.batch_size=100000" in line and "windows" in line


def test_each_logged_step_signals_the_dvc_extension_while_training_runs(base, tmp_path):
    """DVCLive's next_step() writes .dvc/tmp/exps/run/DVCLIVE_STEP_COMPLETED ({"pid", "step"}) under the DVC
    root, which VS Code's DVC extension watches to refresh live plots; end() removes it. DVC gives a stage
    its root in DVC_ROOT."""
    p = copy_of(base, tmp_path / "p")
    signal_file = p.path / ".dvc/tmp/exps/run/DVCLIVE_STEP_COMPLETED"
    proc = start_train(p, env={"DVC_ROOT": str(p.path)})
    seen = set()
    while proc.poll() is None:
        try:
            signal = json.loads(signal_file.read_text())
            seen.add(signal["step"])
            assert signal["pid"] == proc.pid
        except (FileNotFoundError, ValueError):  # not written yet, or caught mid-write
            pass
        time.sleep(0.002)
    out, err = proc.communicate()
    assert proc.returncode == 0, err
    log_steps = set(range(10, 201, 10))
    assert len(seen) >= 3 and seen <= log_steps, sorted(seen)  # it advances, one logged step at a time
    assert not signal_file.exists()  # the run ended: end() cleaned up
    assert json.loads((p.path / "dvclive/metrics.json").read_text())["step"] == 200


def test_generate_samples_from_the_training_checkpoint(uninterrupted):
    """The checkpoint carries the model config and vocabulary: `charlm generate --checkpoint` samples from it
    (as one would while training runs), and the last checkpoint samples exactly like the finished model."""
    p, _, _ = uninterrupted
    charlm = [str(Path(sys.executable).parent / "charlm"), "generate", "--prompt", "The ", "--seed", "3",
              "--length", "60", "--device", "cpu"]
    from_checkpoint = p.run(*charlm, "--checkpoint", env=ENV).stdout
    assert from_checkpoint.startswith("The ") and len(from_checkpoint) > 10
    assert from_checkpoint == p.run(*charlm, "--model", "models/model.pt", env=ENV).stdout
    assert "--rev" in p.run(*charlm, "--checkpoint", "--rev", "HEAD", check=False).stderr  # one source at a time


def fine_tune_copy(uninterrupted, path: Path, **train_params) -> Project:
    """A copy of the trained project that starts from its model: init/start.pt, vocab.from_model, init_from."""
    done, _, _ = uninterrupted
    p = copy_of(done, path)
    shutil.copy(done.path / "models/model.pt", p.path / "init/start.pt")
    shutil.rmtree(p.path / "checkpoints")
    p.set_params(vocab={"from_model": "init/start.pt"},
                 train={"init_from": "init/start.pt", "max_steps": 5, **train_params})
    return p


def test_init_from_starts_from_the_given_model(uninterrupted, tmp_path):
    _, start, _ = uninterrupted
    # no fitted temperature: it would rescale the head of even an unchanged model
    p = fine_tune_copy(uninterrupted, tmp_path / "ft", lr=1e-12, warmup_steps=0, fit_temperature=False)
    assert "from init/start.pt" in p.stage("vocab", env=ENV).stdout
    p.stage("pack", env=ENV)
    out = train(p).stdout
    assert "step 0: val" in out and "before fine-tuning" in out
    # validation of the starting model at step 0, then after training: the before/after of a fine-tune
    (step0, before), (step5, after) = tsv(p, "val/bpc")
    assert (step0, step5) == (0, 5) and float(after) == pytest.approx(float(before), abs=1e-4)  # lr 1e-12
    tuned = weights(p)
    for name in start:  # 5 steps at lr 1e-12: still the starting weights, not a fresh initialisation
        assert torch.allclose(tuned[name], start[name], atol=1e-6), name
    # a real learning rate moves them
    p.set_params(train={"lr": 1e-2})
    train(p)
    assert not torch.allclose(weights(p)["head.weight"], start["head.weight"])


def test_init_from_with_another_vocabulary_or_shape_is_a_one_line_error(uninterrupted, tmp_path):
    p = fine_tune_copy(uninterrupted, tmp_path / "ft")
    p.set_params(vocab={"from_model": None, "min_count": 50})  # a vocabulary of the data, not of the model
    p.stage("vocab", env=ENV)
    p.stage("pack", env=ENV)
    proc = train(p, check=False)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert "different vocabulary" in proc.stderr and "vocab.from_model: init/start.pt" in proc.stderr
    p.set_params(vocab={"from_model": "init/start.pt"}, model={"hidden": 48})
    p.stage("vocab", env=ENV)
    p.stage("pack", env=ENV)
    proc = train(p, check=False)
    assert proc.returncode == 2 and "model.hidden: 32" in proc.stderr, proc.stderr
