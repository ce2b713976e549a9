"""The train-time ratio of issue 18: the defaults' training step against the same step with the round-2 levers off
(today's defaults before them), against a bare nn.LSTM loop of the same shape and batch, and against the
defaults at 1×512 (the best CPU recipe's step), interleaved.

    .venv/bin/python -m bench.levers_speed DATA_DIR [--rounds 7] [--seconds 6]

DATA_DIR is a folder where the prepare, vocab and pack stages ran (its data/vocab.json and data/packed/), such as
a clone that ran `dvc repro pack` on the bench split. The machine's speed drifts from day to day, so only ratios
of cases measured side by side, in rounds that take turns, are reported.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from bench import harness
from bench.harness import Case, measure, ratio_stat
from bench.train_speed import BareLoop, CharlmLoop

LEVERS_OFF = {"model": {"weight_drop": 0.0}, "train": {"ema_decay": 0.0, "fit_temperature": False}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", type=Path)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--seconds", type=float, default=6.0)
    args = parser.parse_args()
    data = harness.Prepared(args.data, {})
    mp, tp = harness.model_params(), harness.train_params(max_steps=0)
    mp_off = harness.model_params(**LEVERS_OFF["model"])
    tp_off = harness.train_params(max_steps=0, **LEVERS_OFF["train"])
    packed = data.packed()
    stream, seq_len, vocab_size = packed.streams["train"], packed.meta["seq_len"], packed.meta["vocab_size"]
    cases = [
        Case("defaults", CharlmLoop(data, mp, tp, "cpu").step),
        Case("levers off", CharlmLoop(data, mp_off, tp_off, "cpu").step),
        Case("bare", BareLoop(stream, seq_len, vocab_size, mp, tp.lr, "cpu", batch=tp.batch_size).step),
        Case("1x512", CharlmLoop(data, harness.model_params(hidden=512), tp, "cpu").step),  # the best CPU recipe
    ]
    print(f"{torch.get_num_threads()} threads; model {mp}; batch {tp.batch_size} x {seq_len}")
    r = measure(cases, args.rounds, args.seconds, log=print)
    for name, stat in r.items():
        print(f"{name}: {stat.fmt()} chars/s")
    print(f"time of defaults / levers off: {ratio_stat(r['levers off'], r['defaults']).fmt('×', 3)}")
    print(f"time of defaults / bare loop:  {ratio_stat(r['bare'], r['defaults']).fmt('×', 3)}")
    print(f"time of levers off / bare loop: {ratio_stat(r['bare'], r['levers off']).fmt('×', 3)}")
    print(f"step time of 1x512 / defaults:  {ratio_stat(r['defaults'], r['1x512']).fmt('×', 3)}")


if __name__ == "__main__":
    main()
