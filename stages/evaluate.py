"""evaluate: test bits per character under charlm's protocol.

Reads `evaluate` from params.yaml, models/model.pt and data/packed/test.npy. Writes metrics/eval.json.
Protocol (also in the README): each test item is scored on its own from a zero state; its first character
is conditioned on <eos>; every character of the item is scored, the closing <eos> is not;
test_bpc = total -log2 p over scored characters / their count.
"""
from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from charlm import artifact, params
from charlm.data import item_bounds, load_packed
from charlm.errors import CharlmError, run_main
from charlm.io import write_json
from charlm.vocab import EOS_ID, PAD_ID, UNK_ID

OUT = Path("metrics/eval.json")
IGNORE = -100
CHUNK = 512  # time steps per forward call; the state is carried, so items of any length fit in memory


@torch.no_grad()
def score_items(model, stream: np.ndarray, starts: np.ndarray, lengths: np.ndarray, batch_size: int,
                device) -> tuple[float, int, int]:
    """Total nats, scored characters and <unk> targets over items given by (start, length) in `stream`.

    Items are sorted by length so a batch pads little; padding sits after every item's last character,
    where a forward-only RNN cannot let it change any scored position.
    """
    order = np.argsort(lengths, kind="stable")
    total = torch.zeros((), dtype=torch.float64, device=device)
    chars = unk = 0
    for i in range(0, len(order), batch_size):
        idx = order[i:i + batch_size]
        first, n = starts[idx][:, None] - 1, lengths[idx][:, None]  # first: the <eos> before each item
        state = None
        for t in range(0, int(n.max()), CHUNK):
            steps = np.arange(t, min(t + CHUNK, int(n.max())))
            valid = steps < n
            window = stream[np.minimum(first + steps, len(stream) - 2)[..., None] + (0, 1)].astype(np.int64)
            x = np.where(valid, window[..., 0], PAD_ID)
            y = np.where(valid, window[..., 1], IGNORE)
            logits, state = model(torch.from_numpy(x).to(device), state)
            total += F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(),
                                     torch.from_numpy(y).to(device).reshape(-1), ignore_index=IGNORE, reduction="sum")
            chars += int(valid.sum())
            unk += int((y == UNK_ID).sum())
    return total.item(), chars, unk


def main() -> None:
    p = params.load(params.EvaluateParams)
    device = artifact.pick_device(p.device, "evaluate.device")
    model, vocab, info = artifact.load_model("models/model.pt", device)
    packed = load_packed("data/packed")
    if packed.meta["vocab_size"] != len(vocab):
        raise CharlmError(f"models/model.pt has {len(vocab)} symbols but data/packed has "
                          f"{packed.meta['vocab_size']}; rerun `dvc repro train`")
    stream = packed.streams["test"]
    starts, lengths = item_bounds(np.asarray(stream), EOS_ID)
    if len(starts) == 0:
        raise CharlmError("the test split has no items; check download.test.url")
    t0 = time.perf_counter()
    nats, chars, unk = score_items(model, np.asarray(stream), starts, lengths, p.batch_size, device)
    seconds = time.perf_counter() - t0
    metrics = {
        "test_bpc": round(nats / chars / math.log(2), 6),
        "test_loss": round(nats / chars, 6),
        "test_chars": chars,
        "test_items": int(len(starts)),
        "unk_rate": round(unk / chars, 8),
        "eval_chars_per_s": round(chars / seconds, 1),
    }
    write_json(OUT, metrics)
    print(f"evaluate: {metrics['test_bpc']:.4f} bpc over {chars:,} characters of {len(starts):,} items "
          f"({metrics['eval_chars_per_s']:,.0f} chars/s)")


if __name__ == "__main__":
    run_main(main, "evaluate")
