"""Adaptive evaluation: scores that learn from the evaluated text as they read it, as PPMd does.

Two methods, each scored beside (never instead of) the static protocol of charlm/core/scoring.py:

- an n-gram cache: interpolated character n-gram counts (Witten-Bell or absolute discounting) of the training
  text, to which each evaluated item is added once it has been scored, mixed linearly with the network;
- dynamic evaluation (Krause et al., 2018, "Dynamic Evaluation of Neural Sequence Models"): the network keeps
  learning from the text it has scored, by an RMS-normalised gradient step after each segment, decayed back
  towards the trained weights.

Both obey one rule: a character is scored before any count or update uses it, items are read in the stream's
order, and nothing after a scored character is used to score it. Each item still starts from a zero recurrent
state, its first character conditioned on <eos>, exactly as in the static protocol. Both produce the log
probability of every scored character, in stream order, so they can be mixed with each other (`mix_log_probs`).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from charlm.base.errors import CharlmError
from charlm.core.model import evaluating
from charlm.core.scoring import protocol_windows
from charlm.core.vocab import EOS_ID

# --------------------------------------------------------------------------- the network's per-character scores


def item_log_probs(
    model, stream: np.ndarray, starts: np.ndarray, lengths: np.ndarray, batch_size: int, device
) -> np.ndarray:
    """log p (nats) of every scored character under the static protocol, item by item in the given order.

    The same batching as scoring.score_items (items sorted by length, padding after each item's end, long items
    in chunks with the state carried); its sum is score_items' total, and no result depends on the batching.
    Dropout is off while scoring; the model is given back in the mode it came in.
    """
    with evaluating(model):
        return _item_log_probs(model, stream, starts, lengths, batch_size, device)


def _item_log_probs(model, stream, starts, lengths, batch_size, device) -> np.ndarray:
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    out = np.zeros(int(offsets[-1]), dtype=np.float64)
    state = None
    for idx, steps, valid, x, targets, new_batch in protocol_windows(stream, starts, lengths, batch_size):
        state = None if new_batch else state
        logits, state = model(torch.from_numpy(x).to(device), state)
        logp = torch.log_softmax(logits.double(), -1).gather(-1, torch.from_numpy(targets[..., None]).to(device))
        rows, cols = np.nonzero(valid)
        out[offsets[idx][rows] + steps[cols]] = logp[..., 0].cpu().numpy()[rows, cols]
    return out


def mix_log_probs(net_log_probs: np.ndarray, cache_probs: np.ndarray, network_weight: float) -> np.ndarray:
    """log p (nats) per character of the linear mixture p = w p_network + (1 - w) p_cache; with w = 1, exactly the
    network's own."""
    with np.errstate(divide="ignore"):
        return np.logaddexp(
            np.log(network_weight) + net_log_probs, np.log1p(-network_weight) + np.log(np.maximum(cache_probs, 1e-300))
        )


# --------------------------------------------------------------------------- the n-gram cache


def _history(stream: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each target position p = 1..len-1: how many tokens of its item precede it (the opening <eos>
    included), and the index of its item (the <eos>-separated segment it belongs to, counting empty ones)."""
    positions = np.arange(len(stream))
    last_eos = np.maximum.accumulate(np.where(stream == EOS_ID, positions, -1))
    available = positions[1:] - last_eos[:-1]  # a stream not starting with <eos> starts a segment all the same
    available[last_eos[:-1] < 0] = positions[1:][last_eos[:-1] < 0]
    segment = np.maximum(np.cumsum(stream == EOS_ID)[:-1] - 1, 0)
    return available, segment


def _keys(stream: np.ndarray, order: int, radix: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """For each context length k = 0..order in turn: the context key and the (context, next token) key of every
    target position p = 1..len-1 (contexts longer than the item's history are computed too; callers mask them).

    Keys are base-`radix` numbers of the context's tokens, exact while radix ** (order + 1) < 2**63, and a
    polynomial hash modulo 2**64 (an odd radix, collisions improbable at corpus sizes) beyond that.
    """
    s = stream.astype(np.uint64)
    n = len(stream) - 1
    target = s[1:]
    ctx = np.zeros(n, dtype=np.uint64)
    r = np.uint64(radix)
    for k in range(order + 1):
        if k > 0:
            prev = np.zeros(n, dtype=np.uint64)
            prev[k - 1 :] = s[: n - k + 1]  # the token k places before each target
            ctx = ctx * r + prev + np.uint64(1)
        yield ctx, ctx * r + target


def _search(table: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """np.searchsorted(table, keys), with the keys visited in sorted order, which is faster on large tables."""
    order = np.argsort(keys, kind="stable")
    at = np.empty(len(keys), dtype=np.int64)
    at[order] = np.searchsorted(table, keys[order])
    return at


def _find(table: np.ndarray, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each key: its index in a sorted, non-empty `table` (clipped to it) and whether it is there."""
    at = np.minimum(_search(table, keys), len(table) - 1)
    return at, table[at] == keys


def _lookup(table: np.ndarray, counts: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """counts[table == key] for each key of a sorted `table`, 0 where absent."""
    if len(table) == 0:
        return np.zeros(len(keys), dtype=np.int64)
    at, found = _find(table, keys)
    return np.where(found, counts[at], 0)


class _Earlier:
    """Occurrences of keys in the evaluated stream, each tagged with its segment: counts how many occurrences
    of a key lie in segments before a given one, vectorised over queries."""

    def __init__(self, keys: np.ndarray, segments: np.ndarray, n_segments: int):
        self.ids = np.unique(keys)
        self.width = n_segments + 1
        dense = np.searchsorted(self.ids, keys)
        self.sorted = np.sort(dense.astype(np.int64) * self.width + segments)

    def before(self, keys: np.ndarray, segments: np.ndarray) -> np.ndarray:
        if len(self.ids) == 0:
            return np.zeros(len(keys), dtype=np.int64)
        at, found = _find(self.ids, keys)
        base = at * self.width
        n = _search(self.sorted, base + segments) - _search(self.sorted, base)
        return np.where(found, n, 0)


@dataclass(frozen=True)
class _Level:
    """The training counts of one context length, as sorted key tables."""

    pairs: np.ndarray  # distinct (context, next token) keys
    pair_counts: np.ndarray
    contexts: np.ndarray  # distinct context keys
    context_counts: np.ndarray
    followers: np.ndarray  # per context: how many distinct tokens followed it


@dataclass(frozen=True)
class NGramCounts:
    """Character n-gram counts of a training stream, for context lengths 0..order (`train_counts`)."""

    order: int
    vocab_size: int
    radix: int
    levels: list[_Level]


def train_counts(train: np.ndarray, *, order: int, vocab_size: int) -> NGramCounts:
    """Every (context, next token) of a packed stream, the closing <eos> of each item included. A context is
    the up to `order` tokens before a token within its item, the opening <eos> included, never the item before.
    """
    if order < 0:
        raise CharlmError(f"the cache order must be 0 or more, not {order}")
    train = np.asarray(train)
    _check_tokens(train, vocab_size, "training")
    radix = vocab_size + 1 if (vocab_size + 1) ** (order + 1) < 2**63 else 0x9E3779B97F4A7C15
    empty = np.zeros(0, dtype=np.uint64)
    if len(train) < 2:
        return NGramCounts(order, vocab_size, radix, [_Level(empty, empty, empty, empty, empty)] * (order + 1))
    avail, _ = _history(train)
    levels = []
    for k, (contexts, pairs) in enumerate(_keys(train, order, radix)):
        known = avail >= k
        pair_table, first, pair_counts = np.unique(pairs[known], return_index=True, return_counts=True)
        context_table, context_counts = np.unique(contexts[known], return_counts=True)
        # Every context occurs in some pair, so the distinct pairs' contexts, counted, align with context_table.
        _, followers = np.unique(contexts[known][first], return_counts=True)
        levels.append(_Level(pair_table, pair_counts, context_table, context_counts, followers))
    return NGramCounts(order, vocab_size, radix, levels)


def _check_tokens(stream: np.ndarray, vocab_size: int, name: str) -> None:
    if len(stream) and int(stream.max()) >= vocab_size:
        raise CharlmError(f"the {name} stream holds token {int(stream.max())}, outside a vocabulary of {vocab_size}")


def cache_probs(
    counts: NGramCounts, stream: np.ndarray, *, discount: float = 0.0, distribution: bool = False
) -> np.ndarray:
    """The adaptive n-gram cache's probability of every scored character of `stream`, in stream order.

    The scored characters are those of item_bounds: every token after the first that is not <eos>. Counts start
    from the training counts, and each item of `stream` is added to them once all of it has been scored (its
    closing <eos> with it), with contexts as in `train_counts`. The estimate interpolates from the uniform
    distribution up through context lengths 0..order; with `discount` 0 by Witten-Bell,

        p_k(x | c) = (n(c, x) + t(c) p_{k-1}(x | c')) / (n(c) + t(c)),

    and with 0 < `discount` = D < 1 by absolute discounting, which trusts a context seen once less than
    Witten-Bell does (with long contexts, most are):

        p_k(x | c) = (max(n(c, x) - D, 0) + D t(c) p_{k-1}(x | c')) / n(c),

    and p_k = p_{k-1} where n(c) = 0; n counts, t(c) is the number of distinct tokens seen after c and c' is c
    without its oldest token. With `distribution`, returns instead the whole distribution over the vocabulary at
    each scored character, shape (characters, vocab_size), which sums to 1.
    """
    if not 0 <= discount < 1:
        raise CharlmError(f"the cache discount must be in [0, 1), not {discount}")
    stream = np.asarray(stream)
    _check_tokens(stream, counts.vocab_size, "evaluated")
    radix = np.uint64(counts.radix)
    avail, segment = _history(stream)
    n_segments = int(segment.max()) + 1 if len(segment) else 1
    scored = np.flatnonzero(stream[1:] != EOS_ID)
    q_seg, q_avail = segment[scored], avail[scored]
    if distribution:
        targets = np.arange(counts.vocab_size, dtype=np.uint64)[None, :]
    else:
        targets = stream[1:][scored].astype(np.uint64)[:, None]
    p = np.full((len(scored), targets.shape[1]), 1.0 / counts.vocab_size)
    levels = zip(counts.levels, _keys(stream, counts.order, counts.radix), strict=True)
    for k, (level, (contexts, pairs)) in enumerate(levels):
        ok = avail >= k
        e_pair, e_ctx, e_seg = pairs[ok], contexts[ok], segment[ok]
        earlier_pairs, earlier_ctx = _Earlier(e_pair, e_seg, n_segments), _Earlier(e_ctx, e_seg, n_segments)
        # Followers first seen in the evaluated stream: each new pair once, in the segment where it first occurs.
        new = ~_find(level.pairs, e_pair)[1] if len(level.pairs) else np.ones(len(e_pair), dtype=bool)
        by_pair = np.lexsort((e_seg[new], e_pair[new]))
        first = np.ones(len(by_pair), dtype=bool)
        first[1:] = e_pair[new][by_pair][1:] != e_pair[new][by_pair][:-1]
        new_followers = _Earlier(e_ctx[new][by_pair][first], e_seg[new][by_pair][first], n_segments)

        q_ctx = contexts[scored]
        n_ctx, t = earlier_ctx.before(q_ctx, q_seg), new_followers.before(q_ctx, q_seg)
        if len(level.contexts):
            at, found = _find(level.contexts, q_ctx)
            n_ctx += np.where(found, level.context_counts[at], 0)
            t += np.where(found, level.followers[at], 0)
        q_pairs = (q_ctx[:, None] * radix + targets).ravel()
        n_pair = _lookup(level.pairs, level.pair_counts, q_pairs) + earlier_pairs.before(
            q_pairs, np.repeat(q_seg, targets.shape[1])
        )
        use = ((q_avail >= k) & (n_ctx > 0))[:, None]
        n_pair = n_pair.reshape(p.shape)
        if discount > 0:
            level_p = (np.maximum(n_pair - discount, 0) + discount * t[:, None] * p) / np.maximum(n_ctx, 1)[:, None]
        else:
            level_p = (n_pair + t[:, None] * p) / np.maximum(n_ctx + t, 1)[:, None]
        p = np.where(use, level_p, p)
    return p if distribution else p[:, 0]


# --------------------------------------------------------------------------- dynamic evaluation

EPSILON = 1e-5  # keeps the step finite for weights whose gradients are ~0 on the training text


def _trainable(model) -> list[torch.Tensor]:
    return [p for p in model.parameters() if p.requires_grad]


def _learning_copy(model):
    """A copy of the model that can run backward and never drops units: cuDNN runs an RNN backward only in
    training mode, so that mode is on with every dropout switched off."""
    model = copy.deepcopy(model)
    model.train()
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.eval()
    model.rnn.dropout = 0.0
    model.weight_drop = 0.0
    return model


@torch.enable_grad()  # also when called under no_grad
def gradient_rms(
    model, train: np.ndarray, device, *, batches: int = 200, batch_size: int = 16, seq_len: int = 20, seed: int = 0
) -> list[torch.Tensor]:
    """MS of Krause et al.: the per-parameter root mean square of the mean-loss gradient over `batches` random
    minibatches of `batch_size` windows of `seq_len` characters of the training stream, each from a zero state.
    One tensor per trainable parameter, in `model.parameters()` order. The model is left unchanged."""
    train = np.asarray(train)
    if len(train) < seq_len + 2:
        raise CharlmError(f"the training stream has {len(train)} tokens, too few for windows of {seq_len}")
    learner = _learning_copy(model)
    params = _trainable(learner)
    squares = [torch.zeros_like(p) for p in params]
    rng = np.random.default_rng(seed)
    offsets = np.arange(seq_len + 1)
    for _ in range(batches):
        starts = rng.integers(0, len(train) - seq_len - 1, size=batch_size)
        w = torch.from_numpy(train[starts[:, None] + offsets].astype(np.int64)).to(device)
        loss, _ = learner(w[:, :-1], None, targets=w[:, 1:])
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        for sq, g in zip(squares, grads, strict=True):
            if g is not None:
                sq += g.detach() ** 2
    return [(sq / batches).sqrt() for sq in squares]


@torch.enable_grad()
def dynamic_log_probs(
    model,
    stream: np.ndarray,
    starts: np.ndarray,
    lengths: np.ndarray,
    ms: list[torch.Tensor],
    *,
    lr: float,
    decay: float,
    segment: int,
    device,
) -> np.ndarray:
    """log p (nats) of every scored character when the network learns from the text as it scores it.

    Items go in the given order, each from a zero state, its first character conditioned on <eos>. Each item is
    read in segments of `segment` characters, the state carried between them; a segment is scored, and only
    then its mean loss's gradient g makes one step of Krause et al.'s RMS rule,

        θ ← θ − lr · g / (MS + ε) + decay · r · (θ₀ − θ),   r = min(MS / mean(MS), 1 / decay),

    which pulls each weight back towards its trained value θ₀, faster where training gradients are larger.
    The weights carry from item to item. With lr = 0 this is the static score. The caller's model is unchanged.
    """
    if segment < 1:
        raise CharlmError(f"the dynamic-evaluation segment must be 1 character or more, not {segment}")
    learner = _learning_copy(model)
    params = _trainable(learner)
    if len(ms) != len(params) or any(m.shape != p.shape for m, p in zip(ms, params, strict=False)):
        raise CharlmError("the gradient statistics do not match the model's parameters; measure them on this model")
    ms = [m.to(p.device) for m, p in zip(ms, params, strict=True)]
    origin = [p.detach().clone() for p in params]
    step = [lr / (m + EPSILON) for m in ms]
    mean = torch.cat([m.flatten() for m in ms]).mean()
    pull = [decay * torch.clamp(m / mean, max=1.0 / decay) if decay > 0 else torch.zeros_like(m) for m in ms]
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    out = np.zeros(int(offsets[-1]), dtype=np.float64)
    for item, (start, n) in enumerate(zip(starts.tolist(), lengths.tolist(), strict=True)):
        state = None
        for t in range(0, n, segment):
            end = min(t + segment, n)
            w = torch.from_numpy(stream[start - 1 + t : start + end].astype(np.int64))[None].to(device)
            logits, state = learner(w[:, :-1], state)
            logp = torch.log_softmax(logits[0].float(), -1).gather(-1, w[0, 1:, None])[:, 0]
            out[offsets[item] + t : offsets[item] + end] = logp.detach().double().cpu().numpy()
            if lr > 0:
                grads = torch.autograd.grad(-logp.mean(), params, materialize_grads=True)
                with torch.no_grad():  # fused over all parameters: the update costs as much as the backward
                    torch._foreach_addcmul_(params, grads, step, value=-1.0)
                    torch._foreach_addcmul_(params, pull, torch._foreach_sub(origin, params))
            state = tuple(s.detach() for s in state) if isinstance(state, tuple) else state.detach()
    return out
