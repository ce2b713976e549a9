"""charlm on the machine it meets: the shipped params.yaml runs the whole pipeline on a CPU without native bf16,
`charlm doctor` names the precision the train stage then uses, an explicit precision that cannot run here stops
the train stage before any work, and the precision is part of what a checkpoint must match.

`ONEDNN_MAX_CPU_ISA=AVX2` makes oneDNN behave as an AVX2 CPU (most laptops, AMD before Zen 4): it is read once,
at oneDNN's first use, so it goes into the environment of the subprocesses (`dvc repro`, the stages)."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, Project, ag_news_rows, csv_bytes, git_project, md5, raw_project

from charlm.core.precision import Precision
from charlm.pipeline import run as pipeline_run
from charlm.pipeline.sections.model import ModelParams
from charlm.pipeline.sections.train import TrainParams

pytestmark = pytest.mark.slow

AVX2 = {"ONEDNN_MAX_CPU_ISA": "AVX2"}
CHARLM = str(Path(sys.executable).parent / "charlm")


def doctor_precision(p: Project, env: dict | None = None) -> str:
    """The precision `charlm doctor` says the train stage will use (its label)."""
    out = p.run(CHARLM, "doctor", "--seconds", "0.5", env=env).stdout
    line = next(line for line in out.splitlines() if line.startswith("precision "))
    assert "estimate " in out, out
    return line.split()[1]


def trained_precision(p: Project) -> tuple[str, dict]:
    """(the precision in dvclive/metrics.json, the model file's record of it)."""
    metrics = json.loads((p.path / "dvclive/metrics.json").read_text())
    info = torch.load(p.path / "models/model.pt", weights_only=True)["info"]
    return metrics["precision"], info["precision"]


def test_the_shipped_params_run_the_whole_pipeline_on_a_cpu_without_native_bf16(tmp_path, http_server):
    """Only the step count is cut and the data is local: with `train.amp: bf16` shipped, the train stage crashed
    here in nn.LSTM ('could not create a primitive descriptor for the LSTM forward propagation primitive')."""
    p = git_project(tmp_path / "repo")
    shutil.copy2(ROOT / "params.yaml", p.path / "params.yaml")  # the shipped params, not the tests' tiny ones
    train, test = csv_bytes(ag_news_rows(240, seed=1)), csv_bytes(ag_news_rows(40, seed=2))
    p.set_params(download={"train": {"url": http_server.serve("/train.csv", train), "md5": md5(train)},
                           "test": {"url": http_server.serve("/test.csv", test), "md5": md5(test)}},
                 train={"max_steps": 3})  # fmt: skip
    p.git("add", "-A")
    p.git("commit", "-qm", "the pipeline")
    p.dvc("repro", "pack", env=AVX2)
    said = doctor_precision(p, AVX2)
    p.dvc("repro", env=AVX2)
    in_metrics, in_model = trained_precision(p)
    assert said == in_metrics == in_model["label"] == "fp32"
    assert in_model["setting"] == "auto" and "no native bf16" in in_model["reason"]
    assert json.loads((p.path / "metrics/eval.json").read_text())["test_bpc"] > 0
    assert len(json.loads((p.path / "reports/samples.json").read_text())["samples"]) == 25
    shown = json.loads(p.dvc("exp", "show", "--json", env=AVX2).stdout)
    assert '"precision": "fp32"' in json.dumps(shown)  # `dvc exp show` has it beside the params


def test_doctor_names_the_precision_that_the_train_stage_then_uses(tmp_path):
    p = raw_project(tmp_path / "p")
    before_data = p.run(CHARLM, "doctor", "--seconds", "0.5").stdout  # random tokens, train.max_steps
    assert "validation not counted: run `dvc repro pack` first" in before_data
    for stage in ("prepare", "vocab", "pack"):
        p.stage(stage)
    said = doctor_precision(p)
    assert f"precision   {said} (" in before_data
    started = p.stage("train").stdout
    in_metrics, in_model = trained_precision(p)
    assert said == in_metrics == in_model["label"] and f"precision {said} (train.amp=auto: " in started
    after = p.run(CHARLM, "doctor", "--seconds", "0.5").stdout
    assert f"model       models/model.pt: lstm 2x32, 30 steps in {said}, val " in after


@pytest.mark.parametrize(
    "amp, env, message",
    [("fp16", None, "train.amp=fp16 needs a CUDA GPU"), ("bf16", AVX2, "train.amp=bf16 cannot train an LSTM")],
)
def test_a_precision_that_cannot_run_here_stops_the_train_stage_before_any_work(tmp_path, amp, env, message):
    p = raw_project(tmp_path / "p")
    for stage in ("prepare", "vocab", "pack"):
        p.stage(stage)
    p.set_params(train={"amp": amp})
    proc = p.stage("train", check=False, env=env)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.splitlines() == [proc.stderr.strip()] and proc.stderr.startswith(f"train: error: {message}")
    assert "set train.amp=auto" in proc.stderr
    assert not any((p.path / out).exists() for out in ("models/model.pt", "checkpoints", "dvclive/metrics.json"))


def test_a_checkpoint_resumes_only_in_the_precision_it_was_trained_in(tmp_path, monkeypatch):
    """`auto` differs by machine: a checkpoint of a bf16 run must not continue in fp32 on another CPU kind."""
    p = raw_project(tmp_path / "p")
    for stage in ("prepare", "vocab", "pack"):
        p.stage(stage)
    monkeypatch.chdir(p.path)
    from charlm.pipeline import params

    mp, tp = params.load(ModelParams), params.load(TrainParams)

    def run_id(step: str, recurrent: str) -> str:
        monkeypatch.setattr(pipeline_run, "resolve", lambda *_a, **_k: Precision("auto", step, recurrent, "test"))
        return pipeline_run.build_run(mp, tp, Path("data/vocab.json"), Path("data/packed"), 0, 1, torch.device("cpu")).run_id

    assert run_id("fp32", "fp32") == run_id("fp32", "fp32")
    assert len({run_id("fp32", "fp32"), run_id("bf16", "bf16"), run_id("bf16", "fp32")}) == 3
