"""Sampling: temperature, top-k, top-p, specials, numerical safety, <eos> handling and batched streams."""
from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

from charlm.core.model import CharRNN
from charlm.core.sampling import (
    Sampler,
    encode_prompt,
    few_rows_backend,
    generate,
    generated_words,
    known_word_share,
    token_steps,
    words_in,
)
from charlm.core.vocab import EOS_ID, PAD_ID, UNK_ID, Vocab

VOCAB = Vocab(list("abcdefghijklmnopqrstuvwxyz .,"))
V = len(VOCAB)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model() -> CharRNN:
    torch.manual_seed(0)
    m = CharRNN(V, cell="lstm", hidden=24, layers=2, embedding=8).eval()
    with torch.no_grad():
        m.head.weight.mul_(8)  # sharper, more varied distributions than a fresh init gives
    return m


def random_logits(rows: int, seed: int, scale: float = 3.0) -> torch.Tensor:
    return torch.randn(rows, V, generator=torch.Generator().manual_seed(seed)) * scale


def draws(logits: torch.Tensor, n: int, temperature: float = 1.0, **kw) -> torch.Tensor:
    """n draws for every row: (n, rows)."""
    gen = torch.Generator().manual_seed(1)
    temps = torch.full((logits.size(0),), temperature)
    return torch.stack([Sampler(temps, generator=gen, **kw)(logits) for _ in range(n)])


def tokens(model, prompts, temperatures, length, **kw) -> list[list[int | None]]:
    return list(token_steps(model, VOCAB, prompts, temperatures, length, **kw))


def valid(out: torch.Tensor) -> bool:
    """Every token is a real id that may be emitted: neither <pad> nor <unk>."""
    return bool(((out >= 0) & (out < V) & (out != PAD_ID) & (out != UNK_ID)).all())


# --------------------------------------------------------------------------- Sampler


def test_tiny_temperature_equals_greedy():
    logits = random_logits(64, seed=0)
    greedy = Sampler(torch.zeros(64))(logits)
    assert torch.equal(greedy, logits.index_fill(-1, torch.tensor([PAD_ID, UNK_ID]), -math.inf).argmax(-1))
    for t in (1e-4, 1e-6):
        assert torch.equal(draws(logits, 20, temperature=t), greedy.expand(20, -1))


def test_tiny_temperature_equals_greedy_in_a_stream(model):
    prompts = ["the ", "a", ""]
    cold = tokens(model, prompts, [1e-4], 60, seed=3, stop_at_eos=False)
    greedy = tokens(model, prompts, [0.0], 60, seed=4, stop_at_eos=False)
    assert cold == greedy


@pytest.mark.parametrize("temperature,filters", [(1.0, {}), (0.8, {"top_k": 5}), (1.5, {"top_p": 0.9})])
def test_draws_follow_the_tempered_distribution(temperature, filters):
    """Each token's share of 20,000 draws is its probability under softmax(logits / T), renormalised over what
    top-k / top-p keep, within 4.5 standard errors (a fixed seed: the test cannot flake)."""
    logits = random_logits(1, seed=11, scale=1.5)
    n = 20_000
    out = Sampler(torch.full((n,), temperature), generator=torch.Generator().manual_seed(2),
                  **filters)(logits.expand(n, -1))
    expected = torch.softmax(logits[0].double().index_fill(-1, torch.tensor([PAD_ID, UNK_ID]), -math.inf)
                             / temperature, -1)
    if "top_k" in filters:
        expected[expected < expected.topk(filters["top_k"]).values[-1]] = 0
    if "top_p" in filters:
        kept = nucleus(logits[0], temperature, filters["top_p"])
        expected = torch.zeros(V, dtype=torch.float64).index_put_((torch.tensor(list(kept)),),
                                                                   torch.tensor(list(kept.values())))
    expected /= expected.sum()
    share = torch.bincount(out, minlength=V).double() / n
    tolerance = 4.5 * (expected * (1 - expected) / n).sqrt() + 1e-12
    assert ((share - expected).abs() <= tolerance).all(), (share, expected)
    assert (share[expected == 0] == 0).all()


def test_a_token_that_holds_all_the_mass_is_always_drawn_wherever_it_sits():
    for token in (3, V - 1):  # the first and the last id that may be emitted
        logits = torch.full((4, V), -1e4)
        logits[:, token] = 0.0
        assert (draws(logits, 200, temperature=1.0) == token).all()


@pytest.mark.parametrize("k", [1, 3, 7])
def test_top_k_never_leaves_the_k_largest_logits(k):
    logits = random_logits(16, seed=k)
    allowed = logits.index_fill(-1, torch.tensor([PAD_ID, UNK_ID]), -math.inf).topk(k, -1).indices
    out = draws(logits, 400, temperature=5.0, top_k=k)
    for row in range(logits.size(0)):
        seen = set(out[:, row].tolist())
        # Exactly the k largest: every one of them is drawn at this temperature, nothing else ever is.
        assert seen == set(allowed[row].tolist()), (row, seen, allowed[row])


def nucleus(logits_row: torch.Tensor, temperature: float, top_p: float) -> dict[int, float]:
    """The top-p set computed independently, in float64: most likely first until the mass reaches top_p.
    Returns {token: probability renormalised over the set}."""
    z = logits_row.double().numpy().copy()
    z[[PAD_ID, UNK_ID]] = -np.inf
    p = np.exp((z - z.max()) / temperature)
    p /= p.sum()
    kept, mass = {}, 0.0
    for i in np.argsort(-p, kind="stable"):
        kept[int(i)] = p[i]
        mass += p[i]
        if mass >= top_p:
            break
    return {i: q / mass for i, q in kept.items()}


@pytest.mark.parametrize("top_p,temperature", [(0.5, 1.0), (0.9, 1.0), (0.3, 2.0), (0.95, 0.7)])
def test_top_p_never_leaves_the_nucleus(top_p, temperature):
    logits = random_logits(16, seed=int(top_p * 100))
    out = draws(logits, 400, temperature=temperature, top_p=top_p)
    multi = 0
    for row in range(logits.size(0)):
        allowed = nucleus(logits[row], temperature, top_p)
        seen = set(out[:, row].tolist())
        assert seen <= allowed.keys(), (row, seen - allowed.keys())
        # ... and the nucleus is not cut short: every member with a fair share turns up in 400 draws.
        assert {i for i, q in allowed.items() if q > 0.03} <= seen, (row, allowed, seen)
        multi += len(seen) > 1
    assert multi > 0  # the nucleus is not trivially a single token everywhere


def test_top_k_and_top_p_together_respect_both():
    logits = random_logits(16, seed=9)
    out = draws(logits, 300, temperature=3.0, top_k=4, top_p=0.8)
    top4 = logits.index_fill(-1, torch.tensor([PAD_ID, UNK_ID]), -math.inf).topk(4, -1).indices
    for row in range(16):
        assert set(out[:, row].tolist()) <= set(top4[row].tolist())


@pytest.mark.parametrize("temperature", [0.0, 1e-6, 1.0, 100.0])
def test_pad_and_unk_are_never_emitted_even_when_most_likely(temperature):
    logits = random_logits(8, seed=2)
    logits[:, PAD_ID] = 50.0
    logits[:, UNK_ID] = 40.0
    out = draws(logits, 200, temperature=temperature)
    assert valid(out)


@pytest.mark.parametrize("temperature", [0.0, 1e-6, 1e-3, 1.0, 100.0, 1e6])
@pytest.mark.parametrize("scale", [1e4, 1e30])
@pytest.mark.parametrize("filters", [{}, {"top_k": 3}, {"top_p": 0.5}])
def test_extreme_logits_and_temperatures_stay_finite(temperature, scale, filters):
    logits = random_logits(8, seed=5, scale=1.0) * scale
    logits[0, 3] = logits[0, 4] = logits[0].max() + 1  # an exact tie
    out = draws(logits, 50, temperature=temperature, **filters)
    assert valid(out)
    if temperature <= 1e-3:  # at these scales a tiny temperature is greedy, ties aside
        masked = logits.index_fill(-1, torch.tensor([PAD_ID, UNK_ID]), -math.inf)
        top = masked.max(-1).values
        assert (masked.gather(-1, out.T) == top[:, None]).all()


def test_temperature_per_row():
    logits = random_logits(2, seed=6, scale=0.5)
    out = draws(logits, 300, temperature=1.0)
    temps = torch.tensor([0.0, 1.0])
    gen = torch.Generator().manual_seed(0)
    mixed = torch.stack([Sampler(temps, generator=gen)(logits) for _ in range(300)])
    assert len(set(mixed[:, 0].tolist())) == 1  # the greedy row
    assert len(set(mixed[:, 1].tolist())) > 3 and len(set(out[:, 1].tolist())) > 3


# --------------------------------------------------------------------------- token_steps()


def eos_model(bias: float) -> CharRNN:
    """A model whose next-token distribution is fixed: <eos> beats every other token by `bias` nats."""
    torch.manual_seed(0)
    m = CharRNN(V, cell="gru", hidden=8, layers=1, embedding=4).eval()
    with torch.no_grad():
        m.head.weight.zero_()
        m.head.bias.zero_()
        m.head.bias[EOS_ID] = bias
    return m


def test_stop_at_eos_ends_a_stream_and_yields_none_after():
    m = eos_model(bias=3.0)
    # Stream 0 is greedy: <eos> at once. Stream 1 (T=100) is near uniform and goes on until it draws <eos>.
    steps = tokens(m, ["ab"], [0.0, 100.0], 40, seed=0)
    assert steps[0][0] == EOS_ID
    assert all(s[0] is None for s in steps[1:])
    col = [s[1] for s in steps]
    assert len(col) > 1 and all(t is not None and t != EOS_ID for t in col[:-1])
    if len(steps) < 40:  # the stream ended early: only because stream 1 emitted <eos> as well
        assert col[-1] == EOS_ID
    records = generate(m, VOCAB, ["ab"], [0.0], 40)
    assert records == [{"prompt": "ab", "temperature": 0.0, "text": "ab", "stopped_at_eos": True}]


def test_stream_stops_once_every_stream_has_ended():
    m = eos_model(bias=30.0)
    assert tokens(m, ["x", "yy"], [0.0, 1.0], 50, seed=0) == [[EOS_ID] * 4]


def test_without_stop_at_eos_it_runs_to_length():
    m = eos_model(bias=30.0)
    steps = tokens(m, ["x"], [0.0, 1.0], 25, seed=0, stop_at_eos=False)
    assert steps == [[EOS_ID, EOS_ID]] * 25
    records = generate(m, VOCAB, ["x"], [0.0], 3, stop_at_eos=False)
    assert records[0]["text"] == "x\n\n\n" and records[0]["stopped_at_eos"] is False


def test_unseen_prompt_characters_warn_and_generate(model):
    with pytest.warns(UserWarning, match="not in the vocabulary"):
        assert encode_prompt(VOCAB, "ÄbQ") == [EOS_ID, UNK_ID, VOCAB.ids("b")[0], UNK_ID]
    with pytest.warns(UserWarning, match="'QÄ'|'ÄQ'"):
        steps = tokens(model, ["hello ÄQ"], [0.0, 1.0], 30, seed=0, stop_at_eos=False)
    assert len(steps) == 30 and valid(torch.tensor(steps))


def test_empty_prompt_starts_a_new_item(model):
    steps = tokens(model, [""], [0.0], 30, stop_at_eos=False)
    # Equivalent to priming with <eos> alone and stepping greedily.
    logits, state = model.prime([[EOS_ID]])
    expected = []
    for _ in range(30):
        logits = logits.index_fill(-1, torch.tensor([PAD_ID, UNK_ID]), -math.inf)
        token = logits.argmax(-1)
        expected.append(token.item())
        logits, state = model.step(token, state)
    assert [s[0] for s in steps] == expected


def test_prompt_longer_than_any_training_window(model):
    long_prompt = ("the quick brown fox jumps over the lazy dog. " * 60)[:2500]
    batch = tokens(model, [long_prompt, "ab"], [0.0], 20, stop_at_eos=False)
    alone = tokens(model, [long_prompt], [0.0], 20, stop_at_eos=False)
    assert [s[0] for s in batch] == [s[0] for s in alone]


@pytest.mark.parametrize("length", [0, -3])
def test_length_zero_yields_nothing(model, length):
    assert tokens(model, ["ab"], [0.0, 1.0], length) == []
    assert generate(model, VOCAB, ["ab"], [1.0], length)[0]["text"] == "ab"


def test_same_seed_same_samples_other_seed_other_samples(model):
    kw = dict(top_k=10, top_p=0.95, stop_at_eos=False)
    a = tokens(model, ["the ", "a"], [0.8, 1.5], 80, seed=7, **kw)
    b = tokens(model, ["the ", "a"], [0.8, 1.5], 80, seed=7, **kw)
    c = tokens(model, ["the ", "a"], [0.8, 1.5], 80, seed=8, **kw)
    assert a == b
    assert a != c


def test_batched_greedy_streams_equal_each_pair_alone(model):
    prompts = ["the ", "a", "", "hello world, this is a longer prompt"]
    temperatures = [0.0, 0.0, 1.0]
    batch = tokens(model, prompts, temperatures, 50, stop_at_eos=False)
    assert len(batch) == 50 and all(len(s) == len(prompts) * len(temperatures) for s in batch)
    for i, prompt in enumerate(prompts):
        alone = [s[0] for s in tokens(model, [prompt], [0.0], 50, stop_at_eos=False)]
        for j, t in enumerate(temperatures):
            if t == 0.0:
                assert [s[i * len(temperatures) + j] for s in batch] == alone, (prompt, j)


def test_batched_greedy_with_stop_at_eos_equals_each_alone(model):
    prompts = ["the ", "a", "", "x.y"]
    batch = generate(model, VOCAB, prompts, [0.0], 60)
    for prompt, record in zip(prompts, batch):
        assert record["prompt"] == prompt and record["text"].startswith(prompt)
        assert generate(model, VOCAB, [prompt], [0.0], 60) == [record]


def test_generate_text_never_shows_specials(model):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        records = generate(model, VOCAB, ["the ", "q"], [0.5, 1.0, 3.0], 100, seed=1)
    for r in records:
        assert "\ufffd" not in r["text"] and "<" not in r["text"]
        body = r["text"][len(r["prompt"]):]
        assert r["stopped_at_eos"] or len(body) == 100
        assert "\n" not in body


@pytest.mark.parametrize("device, batch, inside", [("cpu", 1, False), ("cpu", 32, False), ("cpu", 33, True),
                                                   ("cuda", 1, True)])
def test_onednn_is_off_only_while_generating_few_cpu_streams(device, batch, inside):
    before = torch.backends.mkldnn.enabled
    try:
        torch.backends.mkldnn.enabled = True
        with few_rows_backend(torch.device(device), batch):
            assert torch.backends.mkldnn.enabled is inside
        assert torch.backends.mkldnn.enabled is True
        with pytest.raises(RuntimeError), few_rows_backend(torch.device(device), batch):
            raise RuntimeError  # an error inside generation still restores the setting
        assert torch.backends.mkldnn.enabled is True
    finally:
        torch.backends.mkldnn.enabled = before


def test_overlapping_generations_keep_onednn_off_until_the_last_one_ends(model):
    """Two generations stepped in turn (the playground steps a job's models so): the first to end must not switch
    oneDNN back on under the second, whose written-out steps and priming assume it off."""
    before = torch.backends.mkldnn.enabled
    try:
        torch.backends.mkldnn.enabled = True
        short = token_steps(model, VOCAB, ["ab"], [0.0], 2, stop_at_eos=False)
        long = token_steps(model, VOCAB, ["ab"], [0.0], 5, stop_at_eos=False)
        next(short), next(long)
        assert list(short) and torch.backends.mkldnn.enabled is False  # short has ended; long still steps
        next(long)
        assert torch.backends.mkldnn.enabled is False
        list(long)
        assert torch.backends.mkldnn.enabled is True
    finally:
        torch.backends.mkldnn.enabled = before


# --------------------------------------------------------------------------- known-word share (generate's metric)


def record(prompt: str, text: str, stopped: bool) -> dict:
    return {"prompt": prompt, "temperature": 1.0, "text": text, "stopped_at_eos": stopped}


@pytest.mark.parametrize("rec, words", [
    # a word that the model finished counts; words wholly inside the prompt do not
    (record("Tod", "Today the cat", True), ["Today", "the", "cat"]),
    (record("Moscow, ", "Moscow, Putin said", True), ["Putin", "said"]),
    # a last word cut by the length limit is not a whole word; one ended by <eos> is
    (record("A ", "A big cat", False), ["big"]),
    (record("A ", "A big cat.", False), ["big", "cat"]),
    # digits, punctuation and spaces separate words; any script's letters make one
    (record("", "a1b c-d \u00e9t\u00e9 \u6771\u4eac", True), ["a", "b", "c", "d", "\u00e9t\u00e9", "\u6771\u4eac"]),
    (record("The ", "The ", False), []),
])
def test_generated_words(rec, words):
    assert generated_words(rec) == words


def test_known_word_share_counts_words_of_the_training_text():
    known = words_in(["The cat sat.", "on 3 mats"])
    assert known == {"The", "cat", "sat", "on", "mats"}
    share, n = known_word_share([record("", "The cat ate", True), record("", "the mats", True)], known)
    assert (share, n) == (pytest.approx(3 / 5), 5)  # "ate" is new and "the" is not "The"
    assert known_word_share([record("x", "x", True)], known) == (None, 0)


def test_observe_sees_the_models_own_logits_and_the_tokens_then_yielded(model):
    # The playground colours what it streams by these: they must be the untempered, unfiltered next-token logits
    # of exactly the text so far, and the tokens drawn from them.
    seen: list[tuple[torch.Tensor, list[int]]] = []
    steps = list(
        token_steps(
            model, VOCAB, ["ab", "c"], [0.7], 12, top_k=3, top_p=0.9, seed=4, stop_at_eos=False,
            observe=lambda logits, drawn: seen.append((logits.clone(), drawn)),
        )
    )  # fmt: skip
    assert [drawn for _, drawn in seen] == steps and len(steps) == 12
    texts = [[EOS_ID, *VOCAB.ids("ab")], [EOS_ID, *VOCAB.ids("c")]]
    for logits, drawn in seen:
        expected, _ = model.prime(texts)
        torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)
        for row, token in zip(texts, drawn, strict=True):
            row.append(token)
    # Observing changes nothing in what is drawn.
    assert steps == tokens(model, ["ab", "c"], [0.7], 12, top_k=3, top_p=0.9, seed=4, stop_at_eos=False)
