"""evaluate: test bits per character under charlm's protocol.

Reads `evaluate` from params.yaml, models/model.pt and data/packed/test.npy. Writes metrics/eval.json.
The protocol (also in the README) is charlm/core/scoring.py's: each test item is scored on its own from a zero
state, its first character conditioned on <eos>; test_bpc = total -log2 p over scored characters / their count.
With `evaluate.dynamic_lr` > 0 it also reports test_bpc_dynamic: the same characters scored while the model
keeps learning from the test text it has already scored (dynamic evaluation), which is how PPMd reads it.
"""

from __future__ import annotations

import math
import time

import numpy as np

from charlm.base.errors import CharlmError, run_main
from charlm.base.io import write_json
from charlm.core.data import item_bounds, load_packed
from charlm.core.device import pick_device
from charlm.core.scoring import score_items, score_items_dynamic
from charlm.core.vocab import EOS_ID
from charlm.pipeline import artifact, params, paths
from charlm.pipeline.sections.evaluate import EvaluateParams

OUT = paths.EVAL_METRICS


def main() -> None:
    config = params.load(EvaluateParams)
    device = pick_device(config.device, "evaluate.device")
    model, vocab, info = artifact.load_model(paths.MODEL, device)
    packed = load_packed(paths.PACKED)
    if packed.meta["vocab_size"] != len(vocab):
        raise CharlmError(
            f"{paths.MODEL} has {len(vocab)} symbols but {paths.PACKED} has "
            f"{packed.meta['vocab_size']}; rerun `dvc repro train`"
        )
    stream = packed.streams["test"]
    starts, lengths = item_bounds(np.asarray(stream), EOS_ID)
    if len(starts) == 0:
        raise CharlmError("the test split has no items; check download.test.url")
    t0 = time.perf_counter()
    nats, chars, unk = score_items(model, np.asarray(stream), starts, lengths, config.batch_size, device)
    seconds = time.perf_counter() - t0
    metrics = {
        "test_bpc": round(nats / chars / math.log(2), 6),
        "test_loss": round(nats / chars, 6),
        "test_chars": chars,
        "test_items": int(len(starts)),
        "unk_rate": round(unk / chars, 8),
        "eval_chars_per_s": round(chars / seconds, 1),
    }
    if config.dynamic_lr > 0:
        nats, _ = score_items_dynamic(model, np.asarray(stream), starts, lengths, config.dynamic_lr, device)
        metrics["test_bpc_dynamic"] = round(nats / chars / math.log(2), 6)
    write_json(OUT, metrics)
    dynamic = f" ({metrics['test_bpc_dynamic']:.4f} dynamic)" if "test_bpc_dynamic" in metrics else ""
    print(
        f"evaluate: {metrics['test_bpc']:.4f} bpc{dynamic} over {chars:,} characters of {len(starts):,} items "
        f"({metrics['eval_chars_per_s']:,.0f} chars/s)"
    )


if __name__ == "__main__":
    run_main(main, "evaluate")
