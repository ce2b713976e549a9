"""evaluate: test bits per character under charlm's protocol, and adaptive scores beside it.

Reads `evaluate` from params.yaml, models/model.pt and data/packed/{train,val,test}.npy. Writes metrics/eval.json.
The protocol (also in the README) is charlm/core/scoring.py's: each test item is scored on its own from a zero
state, its first character conditioned on <eos>; test_bpc = total -log2 p over scored characters / their count.

Adaptive scores (charlm/core/adaptive.py) learn from the text as they read it, as PPMd does, and are separate
metrics: *_bpc_cache mixes the network with an n-gram cache (`evaluate.cache_lambda` < 1), *_bpc_dynamic is
dynamic evaluation (`evaluate.dynamic_eta` > 0), *_bpc_adaptive both. Each is reported on val (val_bpc_*, with
the static val_bpc beside them), where its settings are chosen, and on test.
"""

from __future__ import annotations

import math
import time

import numpy as np

from charlm.base.errors import CharlmError, run_main
from charlm.base.io import write_json
from charlm.core import adaptive
from charlm.core.data import item_bounds, load_packed
from charlm.core.device import pick_device
from charlm.core.scoring import score_items
from charlm.core.vocab import EOS_ID
from charlm.pipeline import artifact, params, paths
from charlm.pipeline.sections.evaluate import EvaluateParams

OUT = paths.EVAL_METRICS


def bpc(log_probs: np.ndarray) -> float:
    """Bits per character from the log probability (nats) of each scored character."""
    return round(float(-log_probs.sum()) / len(log_probs) / math.log(2), 6)


def adaptive_metrics(
    config: EvaluateParams, model, streams: dict[str, np.ndarray], device
) -> tuple[dict, dict[str, float]]:
    """val_* and test_* adaptive bpc, and the seconds each method on took over both splits. The seconds are
    printed, not written to the metrics: the metrics of a rerun must equal the first run's."""
    use_cache, use_dynamic = config.cache_lambda < 1, config.dynamic_eta > 0
    metrics: dict = {}
    seconds: dict[str, float] = {}
    if use_cache:
        seconds["cache"] = 0.0
    if use_dynamic:
        seconds["dynamic"] = 0.0
    if not seconds:
        return metrics, seconds
    t0 = time.perf_counter()
    vocab_size = model.config["vocab_size"]
    counts = (
        adaptive.train_counts(streams["train"], order=config.cache_order, vocab_size=vocab_size) if use_cache else None
    )
    if use_cache:
        seconds["cache"] += time.perf_counter() - t0
    t0 = time.perf_counter()
    ms = adaptive.gradient_rms(model, streams["train"], device) if use_dynamic else None
    if use_dynamic:
        seconds["dynamic"] += time.perf_counter() - t0
    for split in ("val", "test"):
        stream = streams[split]
        starts, lengths = item_bounds(stream, EOS_ID)
        if len(starts) == 0:
            continue  # no validation items (pack.val_fraction: 0)

        network = adaptive.item_log_probs(model, stream, starts, lengths, config.batch_size, device)
        if split == "val":
            metrics["val_bpc"] = bpc(network)
        if counts is not None:
            t0 = time.perf_counter()
            cache = adaptive.cache_probs(counts, stream, discount=config.cache_discount)
            metrics[f"{split}_bpc_cache"] = bpc(adaptive.mix_log_probs(network, cache, config.cache_lambda))
            seconds["cache"] += time.perf_counter() - t0
        if ms is not None:
            t0 = time.perf_counter()
            dynamic = adaptive.dynamic_log_probs(
                model,
                stream,
                starts,
                lengths,
                ms,
                lr=config.dynamic_eta,
                decay=config.dynamic_lambda,
                segment=config.dynamic_segment,
                device=device,
            )
            seconds["dynamic"] += time.perf_counter() - t0
            metrics[f"{split}_bpc_dynamic"] = bpc(dynamic)
            if counts is not None:
                metrics[f"{split}_bpc_adaptive"] = bpc(adaptive.mix_log_probs(dynamic, cache, config.cache_lambda))
    return metrics, seconds


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
    streams = {split: np.asarray(stream) for split, stream in packed.streams.items()}
    stream = streams["test"]
    starts, lengths = item_bounds(stream, EOS_ID)
    if len(starts) == 0:
        raise CharlmError("the test split has no items; check download.test.url")
    t0 = time.perf_counter()
    nats, chars, unk = score_items(model, stream, starts, lengths, config.batch_size, device)
    seconds = time.perf_counter() - t0
    metrics = {
        "test_bpc": round(nats / chars / math.log(2), 6),
        "test_loss": round(nats / chars, 6),
        "test_chars": chars,
        "test_items": int(len(starts)),
        "unk_rate": round(unk / chars, 8),
        "eval_chars_per_s": round(chars / seconds, 1),
    }
    adaptive_results, adaptive_seconds = adaptive_metrics(config, model, streams, device)
    metrics.update(adaptive_results)
    write_json(OUT, metrics)
    extra = ", ".join(
        f"{metrics[f'test_bpc_{name}']:.4f} {name}"
        for name in ("cache", "dynamic", "adaptive")
        if f"test_bpc_{name}" in metrics
    )
    print(
        f"evaluate: {metrics['test_bpc']:.4f} bpc{f' ({extra})' if extra else ''} over {chars:,} characters of "
        f"{len(starts):,} items ({metrics['eval_chars_per_s']:,.0f} chars/s)"
    )
    if adaptive_seconds:
        spent = ", ".join(f"{name} {s:.1f} s" for name, s in adaptive_seconds.items())
        print(f"evaluate: adaptive scoring of val and test took {spent}")


if __name__ == "__main__":
    run_main(main, "evaluate")
