"""The evaluation protocol: every item from a zero state, first character conditioned on <eos>, every character
of the item scored and the closing <eos> not; batching and chunking must not change the result."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from conftest import Project, peaked_model, raw_project

from charlm.core import scoring
from charlm.core.model import CharRNN
from charlm.core.vocab import EOS_ID, UNK_ID
from charlm.pipeline import artifact

ENV = {"OMP_NUM_THREADS": "1"}  # 2 OpenMP threads on a busy 2-core machine slow tiny models down many times


@pytest.fixture
def evaluate():
    return scoring


pytestmark = pytest.mark.usefixtures("one_thread")


V = 9


def random_stream(seed: int = 0) -> tuple[np.ndarray, list[list[int]]]:
    """`<eos> item <eos> item ... <eos>` with items of 1..40 characters (some <unk>) and one empty item."""
    rng = np.random.default_rng(seed)
    items = [rng.integers(3, V, size=n).tolist() for n in rng.integers(1, 41, size=17)]
    items[2] = [UNK_ID] + items[2]  # starts with <unk>
    items[5][-1] = UNK_ID  # ends with <unk>
    items[7] = items[7] + [UNK_ID, UNK_ID]
    items.insert(9, [])  # two <eos> in a row: an empty item, nothing to score
    stream = [EOS_ID]
    for item in items:
        stream += item + [EOS_ID]
    return np.array(stream, dtype=np.uint8), items


def item_bounds_of(stream: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    eos = np.flatnonzero(stream == EOS_ID)
    starts, lengths = eos[:-1] + 1, np.diff(eos) - 1
    return starts[lengths > 0], lengths[lengths > 0]


def naive_nats(model: CharRNN, items: list[list[int]]) -> float:
    """Per item, per character, in plain Python: feed <eos> then each character, from a zero state."""
    total = 0.0
    with torch.no_grad():
        for item in items:
            state, prev = None, EOS_ID
            for target in item:
                logits, state = model(torch.tensor([[prev]]), state)
                total -= torch.log_softmax(logits[0, -1].double(), -1)[target].item()
                prev = target
    return total


@pytest.fixture(params=["lstm", "gru"])
def model(request) -> CharRNN:
    return peaked_model(request.param, V)


def test_stream_bpc_is_the_naive_score_in_bits_and_leaves_the_mode_alone(model):
    # train validates with stream_bpc: the same protocol as the test score, on a whole packed split.
    stream, items = random_stream()
    chars = sum(len(item) for item in items)
    model.train()  # dropout on: scoring must switch it off, then give the model back as it came
    bpc = scoring.stream_bpc(model, stream, 3, "cpu")
    assert model.training
    assert bpc == pytest.approx(naive_nats(model.eval(), items) / chars / math.log(2), rel=1e-5)


def test_score_items_equals_a_naive_per_character_loop(evaluate, model):
    stream, items = random_stream()
    starts, lengths = item_bounds_of(stream)
    nats, chars, unk = evaluate.score_items(model, stream, starts, lengths, 4, "cpu")
    assert chars == sum(len(i) for i in items) == lengths.sum()
    assert unk == sum(t == UNK_ID for i in items for t in i) == 4
    assert nats == pytest.approx(naive_nats(model, items), rel=1e-5)


def test_protocol_is_not_a_sliding_window_over_the_stream(evaluate, model):
    """Guard the reference: scoring the stream in one pass (state carried across items) gives a number well
    outside the 1e-5 tolerance used above, so that equality can tell the protocols apart."""
    stream, items = random_stream()
    starts, lengths = item_bounds_of(stream)
    nats, _, _ = evaluate.score_items(model, stream, starts, lengths, 4, "cpu")
    with torch.no_grad():
        x = torch.from_numpy(stream[None, :-1].astype(np.int64))
        y = torch.from_numpy(stream[None, 1:].astype(np.int64))
        logits, _ = model(x)
        nll = torch.nn.functional.cross_entropy(logits[0].double(), y[0], reduction="none")
        carried = nll[y[0] != EOS_ID].sum().item()
    assert not math.isclose(nats, carried, rel_tol=1e-4)


@pytest.mark.parametrize("batch_size", [1, 3, 64])
def test_result_does_not_depend_on_batch_size(evaluate, model, batch_size):
    stream, items = random_stream(seed=1)
    starts, lengths = item_bounds_of(stream)
    reference = naive_nats(model, items)
    nats, chars, unk = evaluate.score_items(model, stream, starts, lengths, batch_size, "cpu")
    assert nats == pytest.approx(reference, rel=1e-5)
    assert chars == lengths.sum()


@pytest.mark.parametrize("chunk", [1, 3, 7])
def test_result_does_not_depend_on_chunk_size(evaluate, model, monkeypatch, chunk):
    stream, items = random_stream(seed=2)
    starts, lengths = item_bounds_of(stream)
    assert lengths.max() > 3 * chunk  # items span several chunks
    reference = naive_nats(model, items)
    monkeypatch.setattr(evaluate, "CHUNK", chunk)
    for batch_size in (2, 64):
        nats, chars, unk = evaluate.score_items(model, stream, starts, lengths, batch_size, "cpu")
        assert nats == pytest.approx(reference, rel=1e-5), batch_size
        assert chars == lengths.sum()
        assert unk == sum(t == UNK_ID for i in items for t in i)


def test_the_last_item_of_the_stream_and_a_one_character_item(evaluate, model):
    items = [[5, 6, 7, 8], [4], [3, 3, 8, 6, 5, 4, 7]]
    stream = np.array([EOS_ID] + [t for item in items for t in item + [EOS_ID]], dtype=np.uint8)
    starts, lengths = item_bounds_of(stream)
    nats, chars, _ = evaluate.score_items(model, stream, starts, lengths, 2, "cpu")
    assert chars == 12
    assert nats == pytest.approx(naive_nats(model, items), rel=1e-5)


# --------------------------------------------------------------------------- the stage




@pytest.fixture(scope="module")
def evaluated(tmp_path_factory) -> Project:
    p = raw_project(tmp_path_factory.mktemp("evaluate") / "repo")
    # A higher min_count than TINY's so that some test characters are <unk>.
    p.set_params(vocab={"min_count": 40}, train={"max_steps": 10, "sample_every": 0})
    for stage in ("prepare", "vocab", "pack", "train", "evaluate"):
        p.stage(stage, env=ENV)
    return p


def test_evaluate_stage_writes_the_metrics(evaluated):
    metrics = json.loads((evaluated.path / "metrics/eval.json").read_text())
    assert {"test_bpc", "test_loss", "test_chars", "test_items", "unk_rate"} <= metrics.keys()
    assert metrics["test_bpc"] == pytest.approx(metrics["test_loss"] / math.log(2), rel=1e-5)
    assert 0 < metrics["test_bpc"] < math.log2(200)

    test = np.load(evaluated.path / "data/packed/test.npy")
    items = [item for item in np.split(test, np.flatnonzero(test == EOS_ID)) if len(item) > 1]
    items = [item[1:].astype(np.int64) for item in items]  # drop the leading <eos>
    assert metrics["test_items"] == len(items) == 40
    assert metrics["test_chars"] == sum(len(i) for i in items)
    unk = sum(int((i == UNK_ID).sum()) for i in items)
    assert unk > 0
    assert metrics["unk_rate"] == pytest.approx(unk / metrics["test_chars"], rel=1e-6)

    # The protocol, independently: each item in one forward pass from a zero state, after <eos>.
    model, _, _ = artifact.load_model(evaluated.path / "models/model.pt")
    nats = 0.0
    with torch.no_grad():
        for item in items:
            x = torch.from_numpy(np.concatenate([[EOS_ID], item[:-1]]))[None]
            logits, _ = model(x)
            nats += torch.nn.functional.cross_entropy(logits[0].double(), torch.from_numpy(item),
                                                      reduction="sum").item()
    assert metrics["test_loss"] == pytest.approx(nats / metrics["test_chars"], rel=1e-5)
