"""inspection: the Read view's per-character scores agree with the evaluation protocol, and the Inside view's
states, features and correlations are what they claim, on tiny random models."""
from __future__ import annotations

import math
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from charlm.base.errors import CharlmError
from charlm.core import corpus, inspection
from charlm.core.data import encode_items, item_bounds
from charlm.core.model import CharRNN
from charlm.core.scoring import CHUNK, score_items
from charlm.core.vocab import EOS_ID, Vocab

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = Vocab(list("abcde fgh(\")XY1."))
# Characters outside VOCAB ("z", "Q", "é") are read as <unk>; one item is empty, one crosses a CHUNK boundary.
ITEMS = ["abc de", "a", "", "zQ a(b) \"XY\" 1.é", "hh" * (CHUNK // 2 + 40), "b e"]
MODELS = [("lstm", 1, 6), ("lstm", 2, 0), ("gru", 2, 5), ("rnn", 1, 4)]


def model(cell: str, layers: int, embedding: int, hidden: int = 8, seed: int = 0, dropout: float = 0.0) -> CharRNN:
    torch.manual_seed(seed)
    return CharRNN(len(VOCAB), cell=cell, hidden=hidden, layers=layers, dropout=dropout, embedding=embedding).eval()


def protocol_bpc(m: CharRNN, items: list[str]) -> float:
    stream = encode_items(VOCAB, "\n".join(items))
    starts, lengths = item_bounds(stream, EOS_ID)
    nats, chars, _ = score_items(m, stream, starts, lengths, batch_size=2, device="cpu")
    return nats / chars / math.log(2)


# --------------------------------------------------------------------------- char_scores


@pytest.mark.parametrize("cell,layers,embedding", MODELS)
def test_bits_per_char_is_the_protocol_figure(cell, layers, embedding):
    m = model(cell, layers, embedding)
    scores = inspection.char_scores(m, VOCAB, ITEMS)
    assert [len(s) for s in scores] == [len(item) for item in ITEMS]
    assert inspection.bits_per_char(scores) == pytest.approx(protocol_bpc(m, ITEMS), abs=1e-4)


def test_each_item_is_scored_on_its_own_whatever_its_batch():
    # More items than one batch holds, in an order that sorting by length shuffles: every item's scores must be
    # those it gets alone.
    m = model("lstm", 2, 6)
    items = [("abc de" * 7)[: 1 + (i * 7) % 40] for i in range(inspection.BATCH + 9)]
    together = inspection.char_scores(m, VOCAB, items)
    for i in (0, 5, len(items) - 1):
        alone = inspection.char_scores(m, VOCAB, [items[i]])[0]
        assert [c["bits"] for c in together[i]] == pytest.approx([c["bits"] for c in alone], abs=1e-5)
        assert [c["rank"] for c in together[i]] == [c["rank"] for c in alone]


def test_an_unseen_character_is_scored_as_unk():
    m = model("gru", 1, 5)
    one, other = inspection.char_scores(m, VOCAB, ["aQb", "aéb"])
    assert [c["bits"] for c in one] == pytest.approx([c["bits"] for c in other], abs=1e-6)
    full = inspection.char_scores(m, VOCAB, ["aQb"], top=len(VOCAB))[0]
    p_unk = dict(full[1]["top"])["<unk>"]
    assert full[1]["bits"] == pytest.approx(-math.log2(p_unk), abs=1e-5)


@pytest.mark.parametrize("cell,layers,embedding", MODELS)
def test_top_guesses_are_sorted_and_the_rank_agrees_with_the_bits(cell, layers, embedding):
    m = model(cell, layers, embedding, seed=3)
    items = ITEMS[:4]
    five = inspection.char_scores(m, VOCAB, items)
    full = inspection.char_scores(m, VOCAB, items, top=len(VOCAB) + 10)
    for item, item5, item_full in zip(items, five, full, strict=True):
        for char, c5, c in zip(item, item5, item_full, strict=True):
            probs = [p for _, p in c5["top"]]
            assert len(probs) == 5 and probs == sorted(probs, reverse=True) and sum(probs) <= 1 + 1e-6
            names = [name for name, _ in c["top"]]
            assert sorted(names) == sorted(VOCAB.itos)  # every symbol, specials included by name
            assert sum(p for _, p in c["top"]) == pytest.approx(1, abs=1e-5)
            actual = char if char in VOCAB.chars else "<unk>"
            p_actual = 2 ** -c["bits"]
            assert dict(c["top"])[actual] == pytest.approx(p_actual, rel=1e-5)
            assert c["rank"] == c5["rank"] == 1 + sum(p > p_actual * (1 + 1e-6) for _, p in c["top"])
            assert (c["rank"] == 1) == (c5["top"][0][0] == actual)
            if c["rank"] <= 5:
                assert c5["top"][c["rank"] - 1][0] == actual


def test_scoring_leaves_a_training_model_training_and_scores_it_without_dropout():
    m = model("lstm", 2, 6, dropout=0.5).train()
    scores = inspection.char_scores(m, VOCAB, ITEMS[:4])
    assert m.training
    assert inspection.bits_per_char(scores) == pytest.approx(protocol_bpc(m.eval(), ITEMS[:4]), abs=1e-4)


def test_edge_cases_of_scoring():
    m = model("rnn", 1, 4)
    assert inspection.char_scores(m, VOCAB, []) == []
    assert inspection.char_scores(m, VOCAB, ["", ""]) == [[], []]
    assert inspection.bits_per_char([[], []]) == 0.0
    assert all(c["top"] == [] for c in inspection.char_scores(m, VOCAB, ["ab"], top=0)[0])
    with pytest.raises(CharlmError, match="line break"):
        inspection.char_scores(m, VOCAB, ["a\nb"])
    with pytest.raises(CharlmError, match="top"):
        inspection.char_scores(m, VOCAB, ["ab"], top=-1)


# --------------------------------------------------------------------------- text_items


def pipeline_items(text: str) -> list[str]:
    """The items `prepare` writes for `text` as a raw `format: lines` file with clean on."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "train.csv"
        path.write_bytes(text.encode("utf-8"))
        return [item for item in corpus.line_items(path, True) if item]


def test_text_items_cleans_like_the_lines_route():
    text = "\ufeff  First  line\t here \r\n\r\nsecond\rthird\x85fourth\u2028 \n\t\n last &amp; \\$5 "
    assert inspection.text_items(text) == pipeline_items(text)
    assert inspection.text_items(text) == ["First line here", "second", "third", "fourth", "last &amp; \\$5"]
    assert inspection.text_items("") == inspection.text_items(" \r\n\t") == []


@settings(max_examples=60, deadline=None)
@given(st.text(st.sampled_from(list("ab \t\r\n\v\f\x1c\x85\u2028\u2029\u00a0\ufeffé&;<"))))
def test_text_items_matches_the_pipeline_on_any_text(text):
    if not text.encode("utf-8").strip():
        assert inspection.text_items(text) == []  # the pipeline refuses such a file as empty
    else:
        assert inspection.text_items(text) == pipeline_items(text)


# --------------------------------------------------------------------------- activations


@pytest.mark.parametrize("cell,layers,embedding", MODELS)
def test_activations_are_the_models_own_states_after_each_character(cell, layers, embedding):
    m = model(cell, layers, embedding, hidden=6)
    item = "zQ a(b) X"
    ids = VOCAB.ids(item)
    # The state after character j is the state prime() ends in for <eos> and the first j + 1 characters.
    _, state = m.prime([[EOS_ID] + ids[: j + 1] for j in range(len(item))])
    h, c = state if cell == "lstm" else (state, None)
    assert inspection.unit_kinds(m) == (["cell", "output"] if cell == "lstm" else ["output"])
    for layer in range(layers):
        out = inspection.activations(m, VOCAB, item, layer, "output")
        assert out.shape == (len(item), 6) and out.dtype == np.float32
        np.testing.assert_allclose(out, h[layer].numpy(), atol=1e-5)
        if c is not None:
            np.testing.assert_allclose(inspection.activations(m, VOCAB, item, layer, "cell"), c[layer], atol=1e-5)
    assert inspection.activations(m, VOCAB, "", 0, "output").shape == (0, 6)


def test_bad_layer_or_kind_is_one_line_error():
    lstm, gru = model("lstm", 2, 6), model("gru", 1, 5)
    for bad in (-1, 2, True, 1.0):
        with pytest.raises(CharlmError, match=r"layers are 0\.\.1"):
            inspection.activations(lstm, VOCAB, "ab", bad, "output")
    for m, kind in ((gru, "cell"), (lstm, "hidden"), (lstm, "")):
        with pytest.raises(CharlmError, match="unit kind") as e:
            inspection.activations(m, VOCAB, "ab", 0, kind)
        assert "\n" not in str(e.value)
    with pytest.raises(CharlmError):
        inspection.rank_units(gru, VOCAB, ["ab"], 0, "cell")


# --------------------------------------------------------------------------- features and ranking


def feature(name: str, text: str) -> list[float]:
    values = inspection.FEATURES[name](text)
    assert values.shape == (len(text),)
    return values.tolist()


def test_features_on_hand_checked_strings():
    assert feature("inside quotes", 'a "bc" d') == [0, 0, 1, 1, 1, 0, 0, 0]
    assert feature("inside quotes", "“x” y") == [1, 1, 0, 0, 0]
    assert feature("inside parentheses", "a(b(c))d)e") == [0, 1, 1, 2, 2, 1, 0, 0, 0, 0]
    assert feature("position in word", "Hi, you2 ok") == [1, 2, 0, 0, 1, 2, 3, 4, 0, 1, 2]
    assert feature("position in item", "abc") == [0, 1, 2]
    assert feature("capital letter", "aBC d") == [0, 1, 1, 0, 0]
    assert feature("digit", "a1 23") == [0, 1, 0, 1, 1]
    assert all(feature(name, "") == [] for name in inspection.FEATURES)


def test_correlations_find_a_planted_unit_and_give_constant_columns_zero():
    rng = np.random.default_rng(0)
    feats = np.column_stack([rng.normal(size=200), np.full(200, 7.0), rng.integers(0, 2, 200)])
    acts = rng.normal(size=(200, 5))
    acts[:, 1] = 3 * feats[:, 2] - 2  # tracks feature 2 exactly
    acts[:, 3] = -feats[:, 0]  # exactly against feature 0
    acts[:, 4] = 0.1  # a unit that never moves
    r = inspection.correlations(acts, feats)
    assert r.shape == (5, 3) and np.isfinite(r).all()
    assert r[1, 2] == pytest.approx(1) and r[3, 0] == pytest.approx(-1)
    assert (r[:, 1] == 0).all() and (r[4] == 0).all()
    reference = np.corrcoef(acts[:, [0, 2]].T, feats[:, [0, 2]].T)[:2, 2:]
    np.testing.assert_allclose(r[np.ix_([0, 2], [0, 2])], reference, atol=1e-12)
    assert (inspection.correlations(acts[:1], feats[:1]) == 0).all()


def capital_tracker(hidden: int = 6) -> CharRNN:
    """A one-hot RNN whose unit 2 is tanh(+4) after a capital letter and tanh(-4) after anything else."""
    m = model("rnn", 1, 0, hidden=hidden, seed=1)
    with torch.no_grad():
        m.rnn.weight_ih_l0[2] = torch.tensor([4.0 if s.isupper() and len(s) == 1 else -4.0 for s in VOCAB.itos])
        m.rnn.weight_hh_l0[2] = 0
        m.rnn.bias_ih_l0[2] = m.rnn.bias_hh_l0[2] = 0
    return m


def test_rank_units_finds_a_planted_capital_letter_unit():
    items = ["aXb cY", "XX a", "abc (d) 1"]
    ranked = inspection.rank_units(capital_tracker(), VOCAB, items, 0, "output", per_feature=3, explained=0.3)
    capital = next(f for f in ranked["features"] if f["feature"] == "capital letter")
    assert capital["units"][0]["unit"] == 2 and capital["units"][0]["r"] > 0.999
    assert ranked["features"][0] is capital  # the best explained feature comes first
    # No quote in the text: that feature is constant, not unexplained.
    assert "inside quotes" in ranked["constant"] and "inside quotes" not in ranked["unexplained"]
    named = [f["feature"] for f in ranked["features"]] + ranked["unexplained"] + ranked["constant"]
    assert sorted(named) == sorted(inspection.FEATURES)  # every feature accounted for, once


def test_rank_units_lists_the_best_units_of_every_feature_and_names_those_none_explains():
    m = model("lstm", 2, 6)
    items = ['a "b(c)" XY1', "", "de (f (g))", 'h "a" b.']
    acts_of = {kind: np.concatenate([inspection.activations(m, VOCAB, item, 1, kind) for item in items]) for kind in ("cell", "output")}
    feats = np.column_stack([np.concatenate([f(item) for item in items]) for f in inspection.FEATURES.values()])
    for kind, acts in acts_of.items():
        r = inspection.correlations(acts, feats)
        for threshold in (0.0, 0.3, 0.6, 1.01):
            ranked = inspection.rank_units(m, VOCAB, items, 1, kind, per_feature=2, explained=threshold)
            names = list(inspection.FEATURES)
            listed = {f["feature"]: f["units"] for f in ranked["features"]}
            for name, units in listed.items():
                f = names.index(name)
                best = np.argsort(-np.abs(r[:, f]), kind="stable")[: len(units)]
                assert [u["unit"] for u in units] == best.tolist() and 1 <= len(units) <= 2
                assert [u["r"] for u in units] == pytest.approx(r[best, f].tolist())
                assert all(abs(u["r"]) >= threshold for u in units)
            for name in ranked["unexplained"]:
                assert np.abs(r[:, names.index(name)]).max() < threshold
            best_r = [abs(f["units"][0]["r"]) for f in ranked["features"]]
            assert best_r == sorted(best_r, reverse=True)
            assert ranked["constant"] == []  # every feature varies over these items
            assert len(listed) + len(ranked["unexplained"]) == len(names)
    # Nothing varies over one character: every feature is constant, and no unit is listed.
    one = inspection.rank_units(m, VOCAB, ["a"], 0, "cell")
    assert one["features"] == one["unexplained"] == [] and one["constant"] == list(inspection.FEATURES)
    assert inspection.rank_units(m, VOCAB, [""], 0, "output")["constant"] == list(inspection.FEATURES)


# --------------------------------------------------------------------------- Read's summary


def test_rank_buckets_sum_to_one_and_agree_with_the_top_five():
    m = model("lstm", 1, 6, seed=4)
    scores = inspection.char_scores(m, VOCAB, ITEMS, top=5)
    buckets = inspection.rank_buckets(scores)
    assert [name for name, _ in buckets] == ["top 1", "top 3", "top 10", "beyond"]
    assert math.fsum(share for _, share in buckets) == pytest.approx(1)
    chars = [(c, actual) for item, sc in zip(ITEMS, scores, strict=True) for actual, c in zip(item, sc, strict=True)]
    named = [(c, actual if actual in VOCAB.chars else "<unk>") for c, actual in chars]
    first = sum(c["top"][0][0] == actual for c, actual in named)
    in_three = sum(actual in [n for n, _ in c["top"][:3]] for c, actual in named)
    assert buckets[0][1] == pytest.approx(first / len(chars))
    assert buckets[0][1] + buckets[1][1] == pytest.approx(in_three / len(chars))
    assert buckets[3][1] == pytest.approx(sum(c["rank"] > 10 for c, _ in named) / len(chars))
    # A hand-made case: ranks 1, 1, 2, 3, 4, 10, 11, 90.
    made = [[{"rank": r} for r in (1, 1, 2, 3)], [], [{"rank": r} for r in (4, 10, 11, 90)]]
    assert inspection.rank_buckets(made) == [["top 1", 0.25], ["top 3", 0.25], ["top 10", 0.25], ["beyond", 0.25]]
    assert inspection.rank_buckets([[], []]) == [["top 1", 0.0], ["top 3", 0.0], ["top 10", 0.0], ["beyond", 0.0]]


@pytest.mark.parametrize("cell,layers,embedding", MODELS[:2])
def test_item_bpc_weighted_by_characters_averages_to_the_texts_bpc(cell, layers, embedding):
    m = model(cell, layers, embedding)
    scores = inspection.char_scores(m, VOCAB, ITEMS)
    per_item = inspection.item_bpc(scores)
    assert per_item[2] is None  # the empty item
    weighted = math.fsum(b * len(item) for b, item in zip(per_item, ITEMS, strict=True) if b is not None)
    assert weighted / sum(map(len, ITEMS)) == pytest.approx(inspection.bits_per_char(scores), rel=1e-12)
    alone = inspection.char_scores(m, VOCAB, [ITEMS[0]])
    assert per_item[0] == pytest.approx(inspection.bits_per_char(alone), abs=1e-5)


def test_hardest_items_are_ordered_by_bpc_and_agree_with_read():
    m = model("lstm", 2, 6, seed=2)
    items = ["abc de", "XY1 (", "a", "", "hh" * 300, "b e", "\"XY\" 1."]
    stream = encode_items(VOCAB, "\n".join(items))
    hardest = inspection.hardest_items(m, stream, batch_size=2, device="cpu")
    bpcs = [h["bpc"] for h in hardest]
    assert bpcs == sorted(bpcs, reverse=True)
    items = [item for item in items if item]  # the empty item is no item of the split
    assert sorted(h["index"] for h in hardest) == list(range(len(items)))
    read = inspection.item_bpc(inspection.char_scores(m, VOCAB, items))
    for h in hardest:
        assert h["chars"] == len(items[h["index"]])
        assert h["bpc"] == pytest.approx(read[h["index"]], abs=1e-4)
    # Their bits, weighted by characters, are the split's bpc by the protocol.
    total = math.fsum(h["bpc"] * h["chars"] for h in hardest) / sum(h["chars"] for h in hardest)
    assert total == pytest.approx(protocol_bpc(m, items), abs=1e-5)
    some = inspection.hardest_items(m, stream, batch_size=64, device="cpu", which=np.array([5, 0, 2]))
    assert sorted(h["index"] for h in some) == [0, 2, 5]
    assert {h["index"]: h["bpc"] for h in some} == pytest.approx({h["index"]: h["bpc"] for h in hardest if h["index"] in (0, 2, 5)})


def test_step_scores_are_char_scores_for_a_drawn_character():
    m = model("lstm", 1, 6, seed=5)
    text = "abc (de)"
    logits, _ = m.prime([[EOS_ID] + VOCAB.ids(text[:j]) for j in range(len(text))])
    steps = inspection.step_scores(logits, VOCAB.ids(text), list(VOCAB.itos), top=5)
    read = inspection.char_scores(m, VOCAB, [text], top=5)[0]
    for s, r in zip(steps, read, strict=True):
        assert s is not None
        assert s["bits"] == pytest.approx(r["bits"], abs=1e-5) and s["rank"] == r["rank"]
        assert [n for n, _ in s["top"]] == [n for n, _ in r["top"]]
        assert [p for _, p in s["top"]] == pytest.approx([p for _, p in r["top"]], abs=1e-6)


def test_step_scores_of_logits_that_are_not_finite_are_none():
    logits = torch.tensor([[0.0, 1.0, float("nan")], [float("inf"), 0.0, 1.0], [0.0, 1.0, 2.0]])
    scores = inspection.step_scores(logits, [1, 1, 2], ["a", "b", "c"], top=2)
    assert scores[0] is None and scores[1] is None
    assert scores[2]["rank"] == 1 and [n for n, _ in scores[2]["top"]] == ["c", "b"]


# --------------------------------------------------------------------------- Inside: a chosen span


def test_span_search_finds_a_unit_planted_in_a_small_model():
    items = ["ab XY cd", "hh X a", "abc"]
    states = inspection.layer_states(capital_tracker(), VOCAB, items, 0, "output")
    spans = [np.array([c.isupper() for c in item]) for item in items]
    found = inspection.span_units(states, spans, top=3)
    assert found[0]["unit"] == 2 and found[0]["score"] > 0
    assert found[0]["inside"] == pytest.approx(math.tanh(4), abs=1e-5)
    assert found[0]["outside"] == pytest.approx(-math.tanh(4), abs=1e-5)
    assert [abs(u["score"]) for u in found] == sorted((abs(u["score"]) for u in found), reverse=True)
    # The complement selects the same unit, now off in the span and on elsewhere.
    against = inspection.span_units(states, [~m for m in spans], top=1)[0]
    assert against["unit"] == 2 and against["score"] == pytest.approx(-found[0]["score"])


def test_span_search_scores_by_hand_and_refuses_an_empty_or_whole_span():
    states = [np.array([[0.0, 1.0, 5.0], [2.0, 1.0, 5.0]]), np.array([[0.0, 1.0, 5.0], [0.0, 1.0, 5.0]])]
    spans = [np.array([False, True]), np.array([False, False])]
    found = inspection.span_units(states, spans)
    assert [u["unit"] for u in found] == [0]  # units 1 and 2 never move
    acts = np.array([0.0, 2.0, 0.0, 0.0])
    assert found[0]["score"] == pytest.approx((2.0 - 0.0) / acts.std())
    for bad in ([np.zeros(2, bool), np.zeros(2, bool)], [np.ones(2, bool), np.ones(2, bool)]):
        with pytest.raises(CharlmError, match="span"):
            inspection.span_units(states, bad)
    with pytest.raises(CharlmError, match="one mask per item"):
        inspection.span_units(states, [np.ones(3, bool), np.ones(2, bool)])
