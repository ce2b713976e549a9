"""Adaptive evaluation (charlm/core/adaptive.py): the n-gram cache, dynamic evaluation and their mixture score
every character before anything learns from it, reduce to the static score when switched off, and are
reported by the evaluate stage beside the unchanged static test_bpc."""
from __future__ import annotations

import json
import math
import shutil
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import Project, peaked_model, raw_project

from charlm.core import adaptive, scoring
from charlm.core.data import item_bounds
from charlm.core.model import CharRNN
from charlm.core.vocab import EOS_ID

pytestmark = pytest.mark.usefixtures("one_thread")

V = 9
ENV = {"OMP_NUM_THREADS": "1"}


def stream_of(items: list[list[int]]) -> np.ndarray:
    tokens = [EOS_ID] + [t for item in items for t in item + [EOS_ID]]
    return np.array(tokens, dtype=np.uint8 if max(tokens) < 256 else np.int32)


def random_items(seed: int, n: int = 14, vocab: int = V) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    items = [rng.integers(2, vocab, size=k).tolist() for k in rng.integers(1, 30, size=n)]
    items.insert(3, [])  # an empty item: nothing scored, but it is a boundary all the same
    return items


def naive_cache(train: np.ndarray, stream: np.ndarray, order: int, vocab: int, full: bool,
                discount: float = 0.0) -> np.ndarray:
    """The cache's definition in plain Python, one character at a time: Witten-Bell (or absolute discounting)
    over the contexts within the item, counts of the training stream plus every item of `stream` once it has ended. The probability of each
    scored character, or with `full` the distribution over the vocabulary there."""
    pair, ctx, follow = defaultdict(int), defaultdict(int), defaultdict(set)

    def events(s):
        history = None
        for i, token in enumerate(map(int, s)):
            if i > 0:
                yield list(history), token
            history = [token] if token == EOS_ID or history is None else history + [token]

    def add(history, x):
        for k in range(min(order, len(history)) + 1):
            c = tuple(history[len(history) - k :])
            pair[c, x] += 1
            ctx[c] += 1
            follow[c].add(x)

    for history, x in events(train):
        add(history, x)
    out, pending = [], []
    for history, x in events(stream):
        if x != EOS_ID:
            dist = []
            for y in range(vocab) if full else [x]:
                p = 1.0 / vocab
                for k in range(min(order, len(history)) + 1):
                    c = tuple(history[len(history) - k :])
                    if ctx[c] and discount:
                        p = (max(pair[c, y] - discount, 0) + discount * len(follow[c]) * p) / ctx[c]
                    elif ctx[c]:
                        p = (pair[c, y] + len(follow[c]) * p) / (ctx[c] + len(follow[c]))
                dist.append(p)
            out.append(dist)
        pending.append((history, x))
        if x == EOS_ID:
            for h, y in pending:
                add(h, y)
            pending = []
    return np.array(out)


@pytest.fixture(params=["lstm", "gru"])
def model(request) -> CharRNN:
    return peaked_model(request.param, V)


TRAIN = stream_of(random_items(1, n=40))


# --------------------------------------------------------------------------- the n-gram cache


@pytest.mark.parametrize("discount", [0.0, 0.7])  # Witten-Bell, absolute discounting
@pytest.mark.parametrize("order", [0, 1, 3, 6])
@pytest.mark.parametrize("vocab", [V, 3000])  # 3000: keys too long for exact numbers are hashed
def test_cache_is_the_interpolated_estimate_over_counts_updated_after_each_item(order, vocab, discount):
    rng = np.random.default_rng(order)
    train = stream_of(random_items(1, n=40, vocab=vocab)).astype(np.int32)
    stream = stream_of(random_items(2, vocab=vocab) + [[5, 6, 7, 5, 6, 7]] * 2).astype(np.int32)
    stream[rng.integers(1, len(stream) - 1, size=3)] = 4  # some items merged, some context changed
    counts = adaptive.train_counts(train, order=order, vocab_size=vocab)
    probs = adaptive.cache_probs(counts, stream, discount=discount)
    assert probs == pytest.approx(naive_cache(train, stream, order, vocab, False, discount)[:, 0], rel=1e-12)
    if vocab == V:
        dist = adaptive.cache_probs(counts, stream, discount=discount, distribution=True)
        assert dist == pytest.approx(naive_cache(train, stream, order, vocab, True, discount), rel=1e-12)
        assert dist.sum(axis=1) == pytest.approx(1.0, abs=1e-12)
        assert (dist > 0).all()


def test_cache_without_training_text_and_what_it_learns():
    item = [3, 4, 5, 6, 7, 8]
    counts = adaptive.train_counts(np.zeros(0, dtype=np.uint8), order=3, vocab_size=V)
    probs = adaptive.cache_probs(counts, stream_of([item, item]))
    assert probs[: len(item)] == pytest.approx(1.0 / V)  # nothing known before the first item ends
    assert (probs[len(item) :] > 0.5).all()  # the repeat is predicted from the counts of the first


def test_mixture_with_weight_one_is_the_network_and_is_a_mixture():
    rng = np.random.default_rng(0)
    net = np.log(rng.uniform(0.01, 1, size=50))
    cache = rng.uniform(0.01, 1, size=50)
    assert np.array_equal(adaptive.mix_log_probs(net, cache, 1.0), net)
    assert np.exp(adaptive.mix_log_probs(net, cache, 0.7)) == pytest.approx(0.7 * np.exp(net) + 0.3 * cache)


# --------------------------------------------------------------------------- the network's scores


@pytest.mark.parametrize("batch_size", [1, 4, 64])
def test_per_character_static_scores_are_the_protocol(model, batch_size, monkeypatch):
    stream = stream_of(random_items(3))
    starts, lengths = item_bounds(stream, EOS_ID)
    nats, chars, _ = scoring.score_items(model, stream, starts, lengths, 4, "cpu")
    monkeypatch.setattr(scoring, "CHUNK", 7)  # long items in several chunks, the state carried
    model.train()  # dropout on: scoring must switch it off, then give the model back as it came
    log_probs = adaptive.item_log_probs(model, stream, starts, lengths, batch_size, "cpu")
    assert model.training
    model.eval()
    assert len(log_probs) == chars and -log_probs.sum() == pytest.approx(nats, rel=1e-5)
    first = lengths[0]  # in stream order: the first item's characters come first
    alone = adaptive.item_log_probs(model, stream, starts[:1], lengths[:1], 1, "cpu")
    assert log_probs[:first] == pytest.approx(alone, rel=1e-5)


def dynamic(model, stream, lr, segment=4, decay=0.3):
    starts, lengths = item_bounds(stream, EOS_ID)
    stats = adaptive.gradient_rms(model, TRAIN, "cpu", batches=5, batch_size=4, seq_len=8)
    return adaptive.dynamic_log_probs(
        model, stream, starts, lengths, stats, lr=lr, decay=decay, segment=segment, device="cpu"
    )


def test_dynamic_evaluation_without_steps_is_the_static_score(model):
    stream = stream_of(random_items(4))
    starts, lengths = item_bounds(stream, EOS_ID)
    static = adaptive.item_log_probs(model, stream, starts, lengths, 8, "cpu")
    assert dynamic(model, stream, lr=0.0) == pytest.approx(static, rel=1e-5, abs=1e-6)
    with torch.no_grad():  # a caller's no_grad does not stop it learning
        assert not np.allclose(dynamic(model, stream, lr=0.05), static)


def test_dynamic_evaluation_learns_and_leaves_the_model_alone(model):
    item = [3, 4, 5, 6, 7, 3, 4, 5, 6, 7, 8]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    once = dynamic(model, stream_of([item]), lr=0.0, segment=16).sum()
    twice = dynamic(model, stream_of([item, item]), lr=0.05, segment=16)  # one step, after the first item
    assert twice[: len(item)].sum() == pytest.approx(once, rel=1e-5)  # nothing learnt before it was scored
    assert twice[len(item) :].sum() > once + 1.0  # the repeat, scored after learning from the first
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_gradient_rms_is_the_rms_of_minibatch_gradients(model):
    stats = adaptive.gradient_rms(model, TRAIN, "cpu", batches=3, batch_size=2, seq_len=5, seed=7)
    rng = np.random.default_rng(7)
    learner = adaptive._learning_copy(model)
    squares = [torch.zeros_like(p) for p in learner.parameters()]
    for _ in range(3):
        starts = rng.integers(0, len(TRAIN) - 6, size=2)
        w = torch.from_numpy(TRAIN[starts[:, None] + np.arange(6)].astype(np.int64))
        learner.zero_grad()
        learner(w[:, :-1], None, targets=w[:, 1:])[0].backward()
        squares = [s + p.grad**2 for s, p in zip(squares, learner.parameters(), strict=True)]
    for s, r in zip(squares, stats, strict=True):
        assert r == pytest.approx((s / 3).sqrt(), rel=1e-4, abs=1e-9)


# --------------------------------------------------------------------------- scored before used


def scores(method: str, model, stream: np.ndarray) -> np.ndarray:
    """log p of every scored character of `stream` under one adaptive method."""
    starts, lengths = item_bounds(stream, EOS_ID)
    cache = adaptive.cache_probs(adaptive.train_counts(TRAIN, order=4, vocab_size=V), stream, discount=0.5)
    if method == "cache":
        # One item per batch: other batch sizes group items differently when the text changes, which moves
        # the static scores by rounding only.
        network = adaptive.item_log_probs(model, stream, starts, lengths, 1, "cpu")
        return adaptive.mix_log_probs(network, cache, 0.6)
    learnt = dynamic(model, stream, lr=0.05, segment=3)
    return learnt if method == "dynamic" else adaptive.mix_log_probs(learnt, cache, 0.6)


@pytest.mark.parametrize("method", ["cache", "dynamic", "both"])
def test_a_score_never_depends_on_what_comes_after_it(method, model):
    """Change the text after some point, and no character before that point scores differently: at an item
    boundary (the score of item k does not depend on items after k) and in the middle of an item."""
    items = random_items(5) + [[3, 4, 5, 6, 7, 8, 3, 4]] * 3
    stream = stream_of(items)
    reference = scores(method, model, stream)
    boundaries = np.flatnonzero(stream == EOS_ID)
    rng = np.random.default_rng(0)
    for cut in (boundaries[5] + 1, boundaries[8] + 5, boundaries[-3] + 2):
        other = stream.copy()
        tail = other[cut:]
        inside = tail != EOS_ID
        tail[inside] = rng.integers(2, V, size=int(inside.sum()))  # different characters, same item lengths
        before = int((stream[1:cut] != EOS_ID).sum())  # scored characters before the cut
        changed = scores(method, model, other)
        assert np.array_equal(changed[:before], reference[:before]), cut
        assert not np.allclose(changed[before:], reference[before:])  # the change itself is seen
    shorter = scores(method, model, stream[: boundaries[-2] + 1])  # the last item dropped
    assert np.array_equal(shorter, reference[: len(shorter)])


# --------------------------------------------------------------------------- the stage


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Project:
    p = raw_project(tmp_path_factory.mktemp("adaptive") / "repo")
    p.set_params(train={"max_steps": 10, "sample_every": 0})
    for stage in ("prepare", "vocab", "pack", "train"):
        p.stage(stage, env=ENV)
    return p


def evaluate(trained: Project, path: Path, **settings) -> dict:
    p = Project(Path(shutil.copytree(trained.path, path)))
    p.set_params(evaluate=settings)
    out = p.stage("evaluate", env=ENV).stdout
    metrics = json.loads((p.path / "metrics/eval.json").read_text())
    adaptive_on = settings["cache_lambda"] < 1 or settings["dynamic_eta"] > 0
    assert ("adaptive scoring of val and test took" in out) == adaptive_on, out  # times are printed, not metrics
    return metrics


def test_evaluate_stage_reports_adaptive_metrics_beside_the_static_ones(trained, tmp_path):
    static = evaluate(trained, tmp_path / "static", cache_lambda=1.0, dynamic_eta=0.0)
    assert not [k for k in static if "cache" in k or "dynamic" in k or "adaptive" in k or k.startswith("val")]
    settings = dict(cache_lambda=0.6, cache_order=4, cache_discount=0.5, dynamic_eta=0.002, dynamic_lambda=0.2,
                    dynamic_segment=16)
    metrics = evaluate(trained, tmp_path / "adaptive", **settings)
    for key in ("test_bpc", "test_loss", "test_chars", "test_items", "unk_rate"):
        assert metrics[key] == static[key], key  # the static protocol is untouched
    assert metrics.keys() - static.keys() == {"val_bpc"} | {f"{split}_bpc_{name}" for split in ("val", "test")
                                                            for name in ("cache", "dynamic", "adaptive")}

    # Each figure, recomputed with the library from the same files.
    from charlm.pipeline import artifact

    model, _, _ = artifact.load_model(trained.path / "models/model.pt")
    streams = {s: np.load(trained.path / f"data/packed/{s}.npy") for s in ("train", "val", "test")}
    counts = adaptive.train_counts(streams["train"], order=4, vocab_size=model.config["vocab_size"])
    stats = adaptive.gradient_rms(model, streams["train"], "cpu")
    for split in ("val", "test"):
        stream = streams[split]
        starts, lengths = item_bounds(stream, EOS_ID)
        network = adaptive.item_log_probs(model, stream, starts, lengths, 16, "cpu")
        cache = adaptive.cache_probs(counts, stream, discount=0.5)
        learnt = adaptive.dynamic_log_probs(model, stream, starts, lengths, stats, lr=0.002, decay=0.2, segment=16,
                                            device="cpu")
        expected = {"cache": adaptive.mix_log_probs(network, cache, 0.6), "dynamic": learnt,
                    "adaptive": adaptive.mix_log_probs(learnt, cache, 0.6)}
        for name, log_probs in expected.items():
            bpc = -log_probs.sum() / lengths.sum() / math.log(2)
            assert metrics[f"{split}_bpc_{name}"] == pytest.approx(bpc, abs=2e-6), (split, name)
    assert metrics["test_bpc_cache"] < metrics["test_bpc"]  # the tiny corpus repeats itself: the cache helps
    assert metrics["val_bpc"] == pytest.approx(
        -adaptive.item_log_probs(model, streams["val"], *item_bounds(streams["val"], EOS_ID), 16, "cpu").sum()
        / item_bounds(streams["val"], EOS_ID)[1].sum() / math.log(2), abs=2e-6)
