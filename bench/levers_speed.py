"""The train-time ratios of the defaults: in fp32 against bf16 (where this CPU has native bf16: elsewhere bf16
cannot run or is emulated, and `train.amp: auto` trains in fp32), against the defaults before issue 18 (1x384
fp32, 10,000 steps), against bare nn.LSTM loops of the defaults' shape doing the same characters; and the best
CPU recipe's against the defaults. Steps are timed interleaved; a stage's time is its step time x its max_steps.

    .venv/bin/python -m bench.levers_speed DATA_DIR [--rounds 7] [--seconds 6]

DATA_DIR is a folder where the prepare, vocab and pack stages ran (its data/vocab.json and data/packed/), such as
a clone that ran `dvc repro pack` on the bench split. The machine's speed drifts from day to day, so only ratios
of cases measured side by side, in rounds that take turns, are reported. The end of a run (two val passes and the
temperature fit, about 2.5 s) and validation every eval_every steps are left out: they are the same for both.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from bench import harness
from bench.harness import Case, Stat, measure, ratio_stat
from bench.quality import RECIPES
from bench.train_speed import BareLoop, CharlmLoop
from charlm.core.precision import capabilities

# The defaults before issue 18: 1x384, no weight drop, average, temperature or keep_best, fp32, 10,000 steps
BEFORE_MODEL: dict[str, object] = {"hidden": 384, "weight_drop": 0.0}
BEFORE_TRAIN: dict[str, object] = {
    "ema_decay": 0.0, "fit_temperature": False, "keep_best": False, "amp": "none", "weight_decay": 0.05
}  # fmt: skip
BEFORE_STEPS = 10_000


def recipe(overrides: dict[str, object]) -> tuple[dict, dict]:
    """A recipe's `-S section.key=value` overrides as (model, train) keyword overrides."""
    sections: dict[str, dict] = {"model": {}, "train": {}}
    for key, value in overrides.items():
        section, name = key.split(".")
        sections[section][name] = value
    return sections["model"], sections["train"]


def stage_ratio(fast: Stat, fast_steps: int, slow: Stat, slow_steps: int) -> Stat:
    """Time of `slow_steps` steps at the rates `slow` over that of `fast_steps` at `fast`, round by round."""
    return Stat([r * slow_steps / fast_steps for r in ratio_stat(fast, slow).values])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", type=Path)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--seconds", type=float, default=6.0)
    args = parser.parse_args()
    data = harness.Prepared(args.data, {})
    mp, tp = harness.model_params(), harness.train_params()
    best_m, best_t = recipe(RECIPES["best"])
    best_tp = harness.train_params(**best_t)
    packed = data.packed()
    stream, seq_len, vocab_size = packed.streams["train"], packed.meta["seq_len"], packed.meta["vocab_size"]

    def loop(model: dict, train: dict) -> CharlmLoop:
        return CharlmLoop(data, harness.model_params(**model), harness.train_params(**{**train, "max_steps": 0}), "cpu")

    def bare(bf16: bool) -> BareLoop:
        return BareLoop(stream, seq_len, vocab_size, mp, tp.lr, "cpu", batch=tp.batch_size, bf16=bf16)

    caps = capabilities(torch.device("cpu"))
    defaults = loop({}, {})
    precision = defaults.run.trainer.precision
    cases = [
        Case("defaults", defaults.step),
        Case("defaults fp32", loop({}, {"amp": "none"}).step),
        Case("before", loop(BEFORE_MODEL, BEFORE_TRAIN).step),
        Case("bare fp32", bare(False).step),
        Case("best", loop(best_m, best_t).step),
    ]
    if caps.native_cpu_bf16:  # elsewhere a bf16 LSTM cannot run (AVX2) or is emulated (AVX512 without BF16)
        cases += [Case("defaults bf16", loop({}, {"amp": "bf16"}).step), Case("bare bf16", bare(True).step)]
    print(f"{torch.get_num_threads()} threads; CPU {caps.features()}; defaults {mp}, precision {precision.explained}, "
          f"{tp.max_steps:,} steps; batch {tp.batch_size} x {seq_len}; best recipe {RECIPES['best']}")  # fmt: skip
    r = measure(cases, args.rounds, args.seconds, log=print)
    for name, stat in r.items():
        print(f"{name}: {stat.fmt()} chars/s")
    steps = tp.max_steps
    if caps.native_cpu_bf16:
        fp32_bf16 = ratio_stat(r["defaults bf16"], r["defaults fp32"])
        print(f"train stage, defaults in fp32 / in bf16: {fp32_bf16.fmt('×', 3)}")
    else:
        print(f"train stage, defaults in fp32 / in bf16: not measured, this CPU has no native bf16 ({caps.features()})")
    print(f"step time, defaults / before: {ratio_stat(r['before'], r['defaults']).fmt('×', 3)}")
    print(f"step time, defaults fp32 / before (1x384 fp32): {ratio_stat(r['before'], r['defaults fp32']).fmt('×', 3)}")
    same = r["bare bf16" if precision.step == "bf16" else "bare fp32"]
    print(f"step time, defaults / bare loop in the same precision: {ratio_stat(same, r['defaults']).fmt('×', 3)}")
    print(f"step time, best / defaults: {ratio_stat(r['defaults'], r['best']).fmt('×', 3)}")
    print(f"train stage, defaults ({steps:,} steps) / before ({BEFORE_STEPS:,}): "
          f"{stage_ratio(r['before'], BEFORE_STEPS, r['defaults'], steps).fmt('×', 3)}")  # fmt: skip
    print(f"train stage, defaults / a bare fp32 loop doing the same characters: "
          f"{ratio_stat(r['bare fp32'], r['defaults']).fmt('×', 3)}")  # fmt: skip
    print(f"train stage, best ({best_tp.max_steps:,} steps) / defaults ({steps:,}): "
          f"{stage_ratio(r['defaults'], steps, r['best'], best_tp.max_steps).fmt('×', 3)}")  # fmt: skip


if __name__ == "__main__":
    main()
