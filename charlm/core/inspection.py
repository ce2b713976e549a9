"""What a trained model makes of a text: per-character scores (the Read view) and its hidden units (Inside).

Scores follow the evaluation protocol of `charlm.core.scoring` exactly: each item is read on its own from a zero
state, its first character conditioned on <eos>, an unseen character scored as <unk>. So the bits per character
of a pasted text are the figure evaluate would give for it as a test split.

Symbols are named by `vocab.itos`: a character is itself (one character long), and a special keeps its name,
"<eos>", "<unk>" or "<pad>" (longer than one character, so never mistaken for text). None is ever left out of a
top list, so the probabilities the model puts on specials stay visible.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from charlm.base.errors import CharlmError
from charlm.core.corpus import normalise_space
from charlm.core.data import item_bounds
from charlm.core.model import evaluating
from charlm.core.scoring import CHUNK, protocol_windows
from charlm.core.vocab import EOS_ID, PAD_ID, Vocab

BATCH = 64  # items per forward call; sorted by length first, so a batch pads little
_GATES = ("weight_ih", "weight_hh", "bias_ih", "bias_hh")


# --------------------------------------------------------------------------- items


def text_items(text: str) -> list[str]:
    """The items of a pasted text, as the `prepare` stage makes them from a `format: lines` file with clean on.

    `corpus.line_items` reads the file with utf-8-sig (a leading BOM goes), splits it at every boundary that
    `str.splitlines` knows (CRLF, CR, LF, \\v, \\x85, ...) and normalises each line's whitespace; `prepare` then
    drops the empty items. Only `normalise_space` runs per line on that route (`corpus.clean`'s AG News repairs
    are for the ag_news format), so a pasted text is cut into the same items its file would be.
    """
    items = (normalise_space(line) for line in text.removeprefix("\ufeff").splitlines())
    return [item for item in items if item]


def _encoded(vocab: Vocab, items: list[str]) -> list[np.ndarray]:
    for i, item in enumerate(items):
        # Vocab.encode reads "\n" as <eos>, which would end the item there; the protocol never sees one inside.
        if "\n" in item:
            raise CharlmError(f"item {i} holds a line break; split the text into items with text_items first")
    return [vocab.encode(item).astype(np.int64) for item in items]


def _batches(lengths: list[int]) -> Iterator[np.ndarray]:
    """Indices of non-empty items, shortest first, BATCH at a time."""
    order = [i for i in np.argsort(lengths, kind="stable").tolist() if lengths[i]]
    for start in range(0, len(order), BATCH):
        yield np.array(order[start : start + BATCH])


# --------------------------------------------------------------------------- Read: per-character scores


def char_scores(model, vocab: Vocab, items: list[str], top: int = 5) -> list[list[dict]]:
    """For every character of every item: {"bits", "top", "rank"}.

    bits: -log2 p of the character (of <unk> where the vocabulary lacks it), as `scoring.score_items` scores it.
    top: the `top` most likely symbols before the character was read, [[name, prob], ...], most likely first;
    names as in the module docstring. rank: 1-based rank of the character's id among all symbols (1 + the number
    of symbols the model found strictly more likely), so rank 1 means the model's first guess was right.
    An empty item gets an empty list.
    """
    if isinstance(top, bool) or not isinstance(top, int) or top < 0:
        raise CharlmError(f"top must be a whole number >= 0, got {top!r}")
    encoded = _encoded(vocab, items)
    names = list(vocab.itos)
    k = min(top, len(names))
    device = model.head.weight.device
    out: list[list[dict]] = [[] for _ in items]
    with evaluating(model):
        for idx in _batches([len(ids) for ids in encoded]):
            n_max = max(len(encoded[i]) for i in idx)
            # Inputs are <eos> then every character but the last; targets are the characters. Padding sits after
            # each item's end, where a forward-only RNN cannot reach a scored position (as in score_items).
            x = np.full((len(idx), n_max), PAD_ID, dtype=np.int64)
            y = np.full((len(idx), n_max), PAD_ID, dtype=np.int64)
            x[:, 0] = EOS_ID
            for row, i in enumerate(idx.tolist()):
                ids = encoded[i]
                x[row, 1 : len(ids)] = ids[:-1]
                y[row, : len(ids)] = ids
            bits, top_p, top_id, rank = [], [], [], []
            state = None
            for t in range(0, n_max, CHUNK):
                logits, state = model(torch.from_numpy(x[:, t : t + CHUNK]).to(device), state)
                logp = logits.float().log_softmax(-1)  # fp32, as the protocol's cross-entropy computes it
                target = logp.gather(-1, torch.from_numpy(y[:, t : t + CHUNK]).to(device)[..., None])
                bits.append(-target[..., 0].double() / math.log(2))
                rank.append((logp > target).sum(-1) + 1)
                values, ids_ = logp.topk(k, dim=-1)
                top_p.append(values.exp())
                top_id.append(ids_)
            bits_l = torch.cat(bits, 1).tolist()
            rank_l = torch.cat(rank, 1).tolist()
            top_p_l = torch.cat(top_p, 1).tolist()
            top_id_l = torch.cat(top_id, 1).tolist()
            for row, i in enumerate(idx.tolist()):
                out[i] = [
                    {
                        "bits": bits_l[row][j],
                        "top": [[names[s], p] for s, p in zip(top_id_l[row][j], top_p_l[row][j], strict=True)],
                        "rank": rank_l[row][j],
                    }
                    for j in range(len(encoded[i]))
                ]
    return out


def bits_per_char(scores: list[list[dict]]) -> float:
    """Total bits over all characters / their number; 0.0 for no characters, as `scoring.stream_bpc` gives."""
    bits = [c["bits"] for item in scores for c in item]
    return math.fsum(bits) / max(len(bits), 1)


# Rank buckets (GLTR's summary, with edges for a vocabulary of ~100 symbols rather than 50,000 tokens): the share
# of characters that were the model's first guess, in its top 3 (but not first), top 10, and further down.
RANK_BUCKETS = (("top 1", 1), ("top 3", 3), ("top 10", 10), ("beyond", None))


def rank_buckets(scores: list[list[dict]]) -> list[list]:
    """[[name, share], ...] in RANK_BUCKETS' order: the share of all characters whose rank falls in each bucket.
    The buckets do not overlap ("top 3" is ranks 2 and 3), so the shares sum to 1; all 0 for no characters."""
    ranks = np.array([c["rank"] for item in scores for c in item], dtype=np.int64)
    out, below = [], 0
    for name, edge in RANK_BUCKETS:
        count = int((ranks > below).sum() if edge is None else ((ranks > below) & (ranks <= edge)).sum())
        out.append([name, count / len(ranks) if len(ranks) else 0.0])
        below = edge if edge is not None else below
    return out


def item_bpc(scores: list[list[dict]]) -> list[float | None]:
    """Bits per character of each item (None for an empty one). Weighted by the items' lengths, they average to
    `bits_per_char` of the whole text."""
    return [math.fsum(c["bits"] for c in item) / len(item) if item else None for item in scores]


@torch.no_grad()
def hardest_items(model, stream: np.ndarray, batch_size: int, device, which: np.ndarray | None = None) -> list[dict]:
    """The items of a packed split by bits per character, most surprising first: [{"index", "bpc", "chars"}].

    Scored by the evaluation protocol (`scoring.protocol_windows`, as evaluate scores the split), each item's
    bits summed on its own. index: the item's place among the split's non-empty items (`data.item_bounds`);
    `which` scores only the items of these indices (all when None). Ties keep the split's order.
    """
    stream = np.asarray(stream)
    starts, lengths = item_bounds(stream, EOS_ID)  # the split's non-empty items, as every view numbers them
    index = np.arange(len(starts)) if which is None else np.asarray(which, dtype=np.int64)
    starts, lengths = starts[index], lengths[index]
    nats = np.zeros(len(starts))
    state = None
    with evaluating(model):
        for idx, _, valid, x, targets, new_batch in protocol_windows(stream, starts, lengths, batch_size):
            state = None if new_batch else state
            logits, state = model(torch.from_numpy(x).to(device), state)
            per_char = F.cross_entropy(
                logits.float().flatten(0, 1), torch.from_numpy(targets).to(device).flatten(), reduction="none"
            )
            per_item = (per_char.view(valid.shape).double().cpu().numpy() * valid).sum(1)
            np.add.at(nats, idx, per_item)
    bpc = nats / np.maximum(lengths, 1) / math.log(2)
    order = np.argsort(-bpc, kind="stable")
    return [{"index": int(index[i]), "bpc": float(bpc[i]), "chars": int(lengths[i])} for i in order.tolist()]


def step_scores(logits, tokens: list[int], names: list[str], top: int = 5) -> list[dict | None]:
    """`char_scores` for generation steps: for each row of `logits` (rows, symbols), the {"bits", "top", "rank"} of
    the token drawn from it, from the model's own next-character distribution (temperature 1, nothing filtered), as
    Read scores the same text; None for a row whose scores are not finite (a model whose numbers overflow).

    In numpy, all rows at once: a row holds one score per symbol (about a hundred), where each call costs more in
    dispatch than in arithmetic, so the playground scores what it streams a batch of characters at a time.
    """
    if not len(tokens):
        return []
    z = np.asarray(logits.detach().float().cpu().numpy() if isinstance(logits, torch.Tensor) else logits)
    z = z.astype(np.float64).reshape(len(tokens), -1)
    rows = np.arange(len(tokens))
    finite = np.asarray(np.isfinite(z).all(1))
    with np.errstate(invalid="ignore"):  # inf - inf in a row that is not finite: that row is None anyway
        shifted = np.where(finite[:, None], z - z.max(1, keepdims=True), 0.0)
    log_total = np.log(np.exp(shifted).sum(1))
    picked = shifted[rows, np.asarray(tokens)]
    bits = ((log_total - picked) / math.log(2)).tolist()
    ranks = ((shifted > picked[:, None]).sum(1) + 1).tolist()
    k = min(top, z.shape[1])
    best = np.argpartition(-shifted, k - 1, axis=1)[:, :k] if k else np.zeros((len(tokens), 0), dtype=np.int64)
    best = np.take_along_axis(best, np.argsort(-np.take_along_axis(shifted, best, 1), axis=1, kind="stable"), 1)
    probs = np.exp(np.take_along_axis(shifted, best, 1) - log_total[:, None]).tolist()
    out: list[dict | None] = []
    for row, ids in enumerate(best.tolist()):
        if not finite[row]:
            out.append(None)
            continue
        top_row = [[names[s], p] for s, p in zip(ids, probs[row], strict=True)]
        out.append({"bits": bits[row], "top": top_row, "rank": ranks[row]})
    return out


# --------------------------------------------------------------------------- Inside: hidden units


def unit_kinds(model) -> list[str]:
    """The per-layer states one can look at: an LSTM has a cell state c besides its output h."""
    return ["cell", "output"] if model.rnn.mode == "LSTM" else ["output"]


def _check(model, layer: int, kind: str) -> None:
    layers = model.rnn.num_layers
    if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < layers:
        raise CharlmError(f"layer {layer!r} does not exist: the model's layers are 0..{layers - 1}")
    kinds = unit_kinds(model)
    if kind not in kinds:
        raise CharlmError(f"unit kind {kind!r} does not exist for a {model.rnn.mode} model: use one of {kinds}")


def _single_layer(rnn, layer: int, width: int) -> nn.Module:
    """Layer `layer` of a stacked RNN on its own, with the same weights, so nn's own kernels run it."""
    extra = {"nonlinearity": rnn.nonlinearity} if isinstance(rnn, nn.RNN) else {}
    one = type(rnn)(width, rnn.hidden_size, 1, bias=rnn.bias, batch_first=True, **extra)
    one.load_state_dict(
        {f"{name}_l0": getattr(rnn, f"{name}_l{layer}") for name in _GATES if hasattr(one, f"{name}_l0")}
    )
    return one.to(device=rnn.weight_hh_l0.device, dtype=rnn.weight_hh_l0.dtype).eval()


def _lstm_cells(rnn, layer: int, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """The cell state c after every step of one LSTM layer, (batch, time, hidden), from its input x and its
    outputs h (nn.LSTM returns h for every step but c only for the last).

    With every h known, the gates of all steps (nn.LSTM's order: input, forget, cell, output) are one matrix
    product; what is left to run step by step is the elementwise c_t = f_t * c_(t-1) + i_t * g_t, far cheaper
    than a whole LSTM step in Python.
    """
    w_ih, w_hh, b_ih, b_hh = (getattr(rnn, f"{name}_l{layer}") for name in _GATES)
    h_before = torch.cat([torch.zeros_like(h[:, :1]), h[:, :-1]], 1)
    gates = torch.matmul(x, w_ih.T) + torch.matmul(h_before, w_hh.T) + (b_ih + b_hh)
    in_gate, forget, cell, _ = gates.chunk(4, -1)
    new, keep = torch.sigmoid(in_gate) * torch.tanh(cell), torch.sigmoid(forget)
    cells = torch.empty_like(new)
    c = torch.zeros_like(new[:, 0])
    for t in range(x.size(1)):
        c = torch.addcmul(new[:, t], keep[:, t], c)
        cells[:, t] = c
    return cells


def layer_states(model, vocab: Vocab, items: list[str], layer: int, kind: str) -> list[np.ndarray]:
    """`activations` of several items, batched; one (len(item), hidden) array each."""
    _check(model, layer, kind)
    encoded = _encoded(vocab, items)
    device = model.head.weight.device
    hidden = model.rnn.hidden_size
    out = [np.zeros((len(ids), hidden), dtype=np.float32) for ids in encoded]
    with evaluating(model):
        for idx in _batches([len(ids) for ids in encoded]):
            n_max = max(len(encoded[i]) for i in idx)
            # <eos> then every character; padding after the end cannot reach an earlier step.
            x_ids = np.full((len(idx), n_max + 1), PAD_ID, dtype=np.int64)
            x_ids[:, 0] = EOS_ID
            for row, i in enumerate(idx.tolist()):
                x_ids[row, 1 : len(encoded[i]) + 1] = encoded[i]
            x = model.embed(torch.from_numpy(x_ids).to(device))
            # Between layers nn.RNN applies dropout only in training mode, so none here: the eval model's states.
            for i in range(layer):
                x = _single_layer(model.rnn, i, x.size(-1))(x)[0]
            states = _single_layer(model.rnn, layer, x.size(-1))(x)[0]
            if kind == "cell":
                states = _lstm_cells(model.rnn, layer, x, states)
            # The state after <eos> goes: row j is the state after character j.
            rows = states[:, 1:].float().cpu().numpy()
            for row, i in enumerate(idx.tolist()):
                out[i] = rows[row, : len(encoded[i])]
    return out


def activations(model, vocab: Vocab, item: str, layer: int, kind: str) -> np.ndarray:
    """(len(item), hidden): the state of `layer` (0-based) after reading each character, having read <eos> first.

    Row j is the state after character j, the one the model predicts character j + 1 from. kind "output" is
    the layer's h (what the next layer, or the head, reads); "cell" is an LSTM's cell state c.
    """
    return layer_states(model, vocab, [item], layer, kind)[0]


# --------------------------------------------------------------------------- features and correlations


def _inside_quotes(text: str) -> np.ndarray:
    """1 inside a quotation: '"' toggles it; curly quotes open (“) and close (”). The value after reading a
    character, like the states: an opening quote is 1, a closing quote 0."""
    out = np.zeros(len(text))
    inside = False
    for j, c in enumerate(text):
        if c == '"':
            inside = not inside
        elif c == "“":
            inside = True
        elif c == "”":
            inside = False
        out[j] = inside
    return out


def _inside_parentheses(text: str) -> np.ndarray:
    """Nesting depth after reading a character: "(" adds one, ")" takes one off (never below 0). So "(" itself is
    at depth 1 and the ")" that closes it at depth 0."""
    out = np.zeros(len(text))
    depth = 0
    for j, c in enumerate(text):
        if c == "(":
            depth += 1
        elif c == ")":
            depth = max(depth - 1, 0)
        out[j] = depth
    return out


def _position_in_word(text: str) -> np.ndarray:
    """1 at a word's first character, 2 at its second, ...; 0 outside words. A word is a run of letters and
    digits (str.isalnum), so an apostrophe or hyphen ends one. Counting from 1 keeps a first letter apart
    from a space."""
    out = np.zeros(len(text))
    run = 0
    for j, c in enumerate(text):
        run = run + 1 if c.isalnum() else 0
        out[j] = run
    return out


def _position_in_item(text: str) -> np.ndarray:
    """0 at the item's first character, counting up."""
    return np.arange(len(text), dtype=np.float64)


def _capital(text: str) -> np.ndarray:
    """1 for an upper-case letter (str.isupper), else 0."""
    return np.array([c.isupper() for c in text], dtype=np.float64)


def _digit(text: str) -> np.ndarray:
    """1 for a digit (str.isdigit), else 0."""
    return np.array([c.isdigit() for c in text], dtype=np.float64)


FEATURES: dict[str, Callable[[str], np.ndarray]] = {
    "inside quotes": _inside_quotes,
    "inside parentheses": _inside_parentheses,
    "position in word": _position_in_word,
    "position in item": _position_in_item,
    "capital letter": _capital,
    "digit": _digit,
}


def correlations(acts: np.ndarray, feats: np.ndarray) -> np.ndarray:
    """Pearson r of every column of acts (n, units) with every column of feats (n, features): (units, features).

    A column that does not vary (max == min) has no correlation; it gets r = 0, never NaN. An exact test, not a
    small-variance threshold: the mean of a constant float column need not equal its values, which would leave
    rounding noise that normalises to any r.
    """
    a = np.asarray(acts, dtype=np.float64)
    f = np.asarray(feats, dtype=np.float64)
    if a.ndim != 2 or f.ndim != 2 or len(a) != len(f):
        raise ValueError(f"acts {a.shape} and feats {f.shape} must be (n, units) and (n, features)")
    r = np.zeros((a.shape[1], f.shape[1]))
    if len(a) < 2:
        return r
    a_var = np.ptp(a, axis=0) > 0
    f_var = np.ptp(f, axis=0) > 0
    a = a[:, a_var] - a[:, a_var].mean(0)
    f = f[:, f_var] - f[:, f_var].mean(0)
    cov = a.T @ f
    norms = np.outer(np.sqrt((a * a).sum(0)), np.sqrt((f * f).sum(0)))
    r[np.ix_(a_var, f_var)] = np.clip(cov / norms, -1.0, 1.0)
    return r


# A unit "explains" a feature when |r| reaches this; below it, a feature is listed as one no unit explains.
EXPLAINED_R = 0.3


def _features(items: list[str]) -> np.ndarray:
    """(characters of all items, len(FEATURES)): every feature, computed per item, items one after another."""
    columns = [np.concatenate([np.zeros(0), *(FEATURES[name](item) for item in items)]) for name in FEATURES]
    return np.column_stack(columns) if columns else np.zeros((0, 0))


def rank_units(
    model, vocab: Vocab, items: list[str], layer: int, kind: str, per_feature: int = 3, explained: float = EXPLAINED_R
) -> dict:
    """The units of `layer` that track each feature best.

    r is the Pearson correlation, over every character of `items`, of a unit's state after the character
    (`activations`) with a feature's value there (FEATURES, computed per item). Ranking units by their one best
    feature let the commonest signal fill the list (position in word took nearly every place), so each feature
    gets its own list instead:

    {"features": [{"feature", "units": [{"unit", "r"}]}], "unexplained": [...], "constant": [...]}

    features: those some unit explains (|r| >= `explained`), the best explained first, each with up to
    `per_feature` units by |r|; a unit may serve several features. unexplained: features that vary over the
    text but that no unit reaches `explained` on. constant: features that do not vary over the text (no quote
    in it, say), about which the text says nothing.
    """
    if isinstance(per_feature, bool) or not isinstance(per_feature, int) or per_feature < 0:
        raise CharlmError(f"per_feature must be a whole number >= 0, got {per_feature!r}")
    states = layer_states(model, vocab, items, layer, kind)
    acts = np.concatenate([np.zeros((0, model.rnn.hidden_size), dtype=np.float32), *states])
    feats = _features(items).reshape(len(acts), len(FEATURES))
    r = correlations(acts, feats)
    varies = np.ptp(feats, axis=0) > 0 if len(feats) else np.zeros(len(FEATURES), dtype=bool)
    found: list[dict] = []
    unexplained: list[str] = []
    constant: list[str] = []
    for f, name in enumerate(FEATURES):
        order = np.argsort(-np.abs(r[:, f]), kind="stable")
        units = [u for u in order.tolist() if abs(r[u, f]) >= explained][:per_feature]
        if not varies[f]:
            constant.append(name)
        elif not units:
            unexplained.append(name)
        else:
            found.append({"feature": name, "units": [{"unit": u, "r": float(r[u, f])} for u in units]})
    found.sort(key=lambda entry: -abs(entry["units"][0]["r"]))
    return {"features": found, "unexplained": unexplained, "constant": constant}


# --------------------------------------------------------------------------- Inside: units of a chosen span


def span_units(states: list[np.ndarray], spans: list[np.ndarray], top: int = 10) -> list[dict]:
    """The units whose state sets a chosen span of text apart from the rest (LSTMVis's selection):
    [{"unit", "score", "inside", "outside"}], by |score| descending.

    states: per item, (characters, units), as `activations` gives; spans: per item, a boolean mask of the chosen
    characters. inside/outside: a unit's mean state over the chosen characters and over all others; score:
    their difference over the unit's standard deviation over all characters, so a unit that is on in the span and
    off elsewhere scores high (positive), one that is off there and on elsewhere scores low (negative), and units
    with large and small ranges compare. A unit that does not vary scores 0 and is left out.
    """
    if isinstance(top, bool) or not isinstance(top, int) or top < 0:
        raise CharlmError(f"top must be a whole number >= 0, got {top!r}")
    if len(states) != len(spans) or any(len(a) != len(m) for a, m in zip(states, spans, strict=False)):
        raise CharlmError("spans must give one mask per item, as long as the item")
    acts = np.concatenate([np.zeros((0, states[0].shape[1] if states else 0)), *states]).astype(np.float64)
    mask = np.concatenate([np.zeros(0, dtype=bool), *(np.asarray(m, dtype=bool) for m in spans)])
    if not mask.any() or mask.all():
        raise CharlmError("choose a span that holds some characters of the text but not all of them")
    inside, outside = acts[mask].mean(0), acts[~mask].mean(0)
    spread = acts.std(0)
    varies = np.ptp(acts, axis=0) > 0
    score = np.where(varies, (inside - outside) / np.where(varies, spread, 1.0), 0.0)
    order = np.argsort(-np.abs(score), kind="stable")
    order = order[score[order] != 0][:top]
    return [
        {"unit": int(u), "score": float(score[u]), "inside": float(inside[u]), "outside": float(outside[u])}
        for u in order.tolist()
    ]
