"""The real pipeline under real DVC, fed by a loopback HTTP server, in a temporary git repo."""
from __future__ import annotations

import json

import numpy as np
import pytest

from charlm.core.data import window_starts

pytestmark = pytest.mark.slow

DATA_STAGES = ["download", "prepare", "vocab", "pack"]


def ran(proc) -> list[str]:
    """Names of the stages `dvc repro` actually executed."""
    return [line.split("'")[1] for line in proc.stdout.splitlines() if line.startswith("Running stage")]


def test_data_stages_run_cache_and_rerun_only_what_changed(served_project):
    p = served_project
    first = p.dvc("repro", "pack")
    assert ran(first) == DATA_STAGES

    meta = json.loads((p.path / "data/packed/meta.json").read_text())
    vocab = json.loads((p.path / "data/vocab.json").read_text())
    assert meta["seq_len"] == 32 and meta["vocab_size"] == vocab["size"] and meta["align"] == "item"
    assert meta["splits"]["train"]["items"] + meta["splits"]["val"]["items"] == 240
    assert meta["splits"]["test"]["items"] == 40
    train = np.load(p.path / "data/packed/train.npy")
    assert train.dtype == np.uint8 and len(train) == meta["splits"]["train"]["tokens"]
    assert train[0] == train[-1] == 1  # the stream starts and ends with <eos>
    assert meta["splits"]["train"]["windows"] == len(window_starts(train, 32, "item"))
    prepared = (p.path / "data/prepared/train.txt").read_text()
    assert "#39;" not in prepared and "\\" not in prepared and "company's" in prepared

    assert ran(p.dvc("repro", "pack")) == []

    p.set_params(pack={"seq_len": 16})
    assert ran(p.dvc("repro", "pack")) == ["pack"]
    assert json.loads((p.path / "data/packed/meta.json").read_text())["seq_len"] == 16


def test_full_pipeline_produces_metrics_plots_and_samples(served_project):
    p = served_project
    assert ran(p.dvc("repro")) == DATA_STAGES + ["train", "evaluate", "generate"]

    metrics = json.loads((p.path / "metrics/eval.json").read_text())
    assert {"test_bpc", "test_loss", "test_chars", "unk_rate"} <= metrics.keys()
    assert 0 < metrics["test_bpc"] < 8
    assert metrics["test_bpc"] == pytest.approx(metrics["test_loss"] / np.log(2), rel=1e-4)

    shown = json.loads(p.dvc("metrics", "show", "--json").stdout)
    flat = json.dumps(shown)
    assert "test_bpc" in flat and "val" in flat

    plots = json.loads(p.dvc("plots", "show", "--json").stdout)["data"]
    assert {"bits per character", "learning rate", "throughput"} <= plots.keys()
    curve = json.dumps(plots["bits per character"][0]["content"])
    assert "train/bpc.tsv" in curve and "val/bpc.tsv" in curve

    # generate's readability figure: per temperature, a share of real words, shown with the other metrics
    known = json.loads((p.path / "metrics/generate.json").read_text())["known_words"]
    assert known.keys() == {"T=0", "T=1"} and all(0 <= v <= 1 for v in known.values() if v is not None)
    assert any(v is not None for v in known.values()) and "known_words" in flat

    samples = json.loads((p.path / "reports/samples.json").read_text())["samples"]
    assert len(samples) == 4 and all(text.startswith(("The ", "A ")) for text in samples.values())
    assert "## step" in (p.path / "reports/train_samples.md").read_text()

    # Changing a generate key reruns only generate.
    p.set_params(generate={"length": 20})
    assert ran(p.dvc("repro")) == ["generate"]
