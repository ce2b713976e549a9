"""charlm's evaluation protocol, in one place for evaluate (test bpc) and train (validation bpc).

Each item is scored on its own from a zero state; its first character is conditioned on <eos>; every character
of the item is scored, the closing <eos> is not. bpc = total -log2 p over scored characters / their count.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch.nn import functional as F

from charlm.core.data import item_bounds
from charlm.core.model import IGNORE, evaluating
from charlm.core.vocab import EOS_ID, PAD_ID, UNK_ID

CHUNK = 512  # time steps per forward call; the state is carried, so items of any length fit in memory


def protocol_windows(stream: np.ndarray, starts: np.ndarray, lengths: np.ndarray, batch_size: int):
    """The protocol's batching of items given by (start, length) in `stream`: sorted by length so a batch pads
    little, `batch_size` items at a time, CHUNK steps at a time (the state carries between a batch's chunks).
    Yields (item indices, steps, valid mask, inputs, targets, whether a new batch starts). Padding sits after every
    item's last character, where a forward-only RNN cannot let it change any scored position."""
    order = np.argsort(lengths, kind="stable")
    for i in range(0, len(order), batch_size):
        idx = order[i : i + batch_size]
        first, n = starts[idx][:, None] - 1, lengths[idx][:, None]  # first: the <eos> before each item
        for t in range(0, int(n.max()), CHUNK):
            steps = np.arange(t, min(t + CHUNK, int(n.max())))
            valid = steps < n
            window = stream[np.minimum(first + steps, len(stream) - 2)[..., None] + (0, 1)].astype(np.int64)
            yield idx, steps, valid, np.where(valid, window[..., 0], PAD_ID), window[..., 1], t == 0


@torch.no_grad()
def score_items(
    model, stream: np.ndarray, starts: np.ndarray, lengths: np.ndarray, batch_size: int, device
) -> tuple[float, int, int]:
    """Total nats, scored characters and <unk> targets over items given by (start, length) in `stream`."""
    total = torch.zeros((), dtype=torch.float64, device=device)
    chars = unk = 0
    state = None
    for _, _, valid, x, targets, new_batch in protocol_windows(stream, starts, lengths, batch_size):
        state = None if new_batch else state
        y = np.where(valid, targets, IGNORE)
        nats, state = model(
            torch.from_numpy(x).to(device), state, targets=torch.from_numpy(y).to(device), reduction="sum"
        )
        total += nats
        chars += int(valid.sum())
        unk += int((y == UNK_ID).sum())
    return total.item(), chars, unk


def stream_bpc(model, stream: np.ndarray, batch_size: int, device) -> float:
    """Bits per character of every item of a packed split, by the protocol above; the model is left as it was."""
    stream = np.asarray(stream)
    starts, lengths = item_bounds(stream, EOS_ID)
    with evaluating(model):
        nats, chars, _ = score_items(model, stream, starts, lengths, batch_size, device)
    return nats / max(chars, 1) / math.log(2)


# The softmax temperatures `best_temperature` tries: 0.01 apart, wide enough for an over- or under-confident model
TEMPERATURES = tuple(round(0.6 + 0.01 * i, 2) for i in range(101))


def best_temperature(model, stream: np.ndarray, batch_size: int, device) -> float:
    """The temperature T of TEMPERATURES whose softmax(logits / T) scores every item of a packed split best, by
    the protocol above, in one pass over the split; the model is left as it was."""
    stream = np.asarray(stream)
    starts, lengths = item_bounds(stream, EOS_ID)
    grid = torch.tensor(TEMPERATURES, device=device)
    nats = torch.zeros(len(grid), dtype=torch.float64, device=device)
    state = None
    with evaluating(model):
        for _, _, valid, x, targets, new_batch in protocol_windows(stream, starts, lengths, batch_size):
            state = None if new_batch else state
            logits, state = model(torch.from_numpy(x).to(device), state)
            mask = torch.from_numpy(valid).to(device)
            scored, y = logits[mask].float(), torch.from_numpy(targets).to(device)[mask]
            for i, temperature in enumerate(grid):
                nats[i] += F.cross_entropy(scored / temperature, y, reduction="sum")
    return TEMPERATURES[int(nats.argmin())]
