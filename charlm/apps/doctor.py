"""`charlm doctor`: what the train stage will do on this machine, and for how long.

It prints the device, the precision that `train.amp` resolves to here and why (the train stage's own
`resolve`, so the two cannot disagree), the threads, the CPU features that decide it, the versions, and an
estimate of the train stage's time for the current params.yaml from a few seconds of real training steps.
With data/packed/ present (`dvc repro pack`) the estimate uses the real data, step count and validation split,
through the train stage's own `build_run`; without it, random tokens and train.max_steps, and no validation.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import re
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from charlm.core.device import pick_device
from charlm.core.model import CharRNN
from charlm.core.precision import capabilities, resolve
from charlm.core.training import Optimisation, Trainer
from charlm.core.vocab import Vocab
from charlm.pipeline import artifact, params, paths
from charlm.pipeline.run import build_run
from charlm.pipeline.sections.model import ModelParams
from charlm.pipeline.sections.pack import PackParams
from charlm.pipeline.sections.train import TrainParams

GUESSED_VOCAB = 100  # about AG News' characters, for the estimate before `dvc repro vocab`


def doctor(seconds: float, say=print) -> None:
    model_params, train_params = params.load(ModelParams), params.load(TrainParams)
    device = pick_device(train_params.device, "train.device")
    caps = capabilities(device)
    say(f"device      {device.type}" + (f" ({caps.gpu})" if caps.gpu else f" ({cpu_name()})"))
    say(f"CPU         {caps.features()}")
    say(f"threads     {torch.get_num_threads()} (of {os.cpu_count()} cores)")
    say(f"versions    torch {torch.__version__}, oneDNN {onednn_version()}, python {platform.python_version()}")
    if paths.MODEL.exists():
        say(f"model       {describe_model(paths.MODEL)}")
    has_data = (paths.PACKED / "meta.json").exists() and paths.VOCAB.exists()
    notices: list[str] = []
    if has_data:
        trainer, total, val, batch = real_run(model_params, train_params, device)
    else:
        trainer, total, batch = synthetic_run(model_params, train_params, device, notices.append)
        val = None
    for text in notices:
        say(f"notice      {text}")
    precision = trainer.precision
    say(f"precision   {precision.explained}")
    say(estimate(trainer, batch, total, val, train_params, seconds, has_data))


Batch = Callable[[int], tuple[np.ndarray, np.ndarray]]


def real_run(mp: ModelParams, tp: TrainParams, device) -> tuple[Trainer, int, np.ndarray | None, Batch]:
    """The train stage's own run, on the packed data: its Trainer, step count, val split and minibatches."""
    run = build_run(mp, tp, paths.VOCAB, paths.PACKED, 0, 1, device)

    def batch(step: int) -> tuple[np.ndarray, np.ndarray]:
        return run.batches.batch(*divmod(step, run.batches.per_epoch))

    return run.trainer, run.total, run.packed.streams["val"] if run.has_val else None, batch


def synthetic_run(mp: ModelParams, tp: TrainParams, device, notice) -> tuple[Trainer, int, Batch]:
    """Before `dvc repro pack`: the same model and Trainer on random tokens, for train.max_steps."""
    vocab = len(Vocab.load(paths.VOCAB)) if paths.VOCAB.exists() else GUESSED_VOCAB
    torch.manual_seed(tp.seed)
    model = CharRNN(vocab, **dataclasses.asdict(mp)).to(device)
    precision = resolve(tp.amp, device, model.config, notice=notice)
    trainer = Trainer(model, Optimisation.of(tp), max(tp.max_steps, 1), device, 1, precision)
    rng, shape = np.random.default_rng(0), (tp.batch_size, params.load(PackParams).seq_len + 1)

    def batch(_step: int) -> tuple[np.ndarray, np.ndarray]:
        window = rng.integers(3, vocab, size=shape)
        return window[:, :-1], window[:, 1:]

    return trainer, tp.max_steps, batch


def estimate(trainer: Trainer, batch, total: int, val, tp: TrainParams, seconds: float, has_data: bool) -> str:
    """The train stage's time: steps timed for `seconds` (after two warm-up steps), plus the validation passes
    and the temperature fit the stage will make, timed on part of the val split."""
    trainer.model.train()
    for step in range(2):
        trainer.step(*batch(step)).item()
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds or done < 3:
        loss = trainer.step(*batch(2 + done))
        done += 1
    loss.item()
    per_step = (time.perf_counter() - start) / done
    steps_s = per_step * total
    lines = [f"step        {per_step * 1000:,.1f} ms ({done} steps timed in {time.perf_counter() - start:.1f} s)"]
    if not has_data:
        lines.append(f"estimate    {fmt(steps_s)} for {total:,} steps (train.max_steps); validation not counted: "
                     f"run `dvc repro pack` first for the step count and validation of your data")  # fmt: skip
        return "\n".join(lines)
    val_s, passes = 0.0, 0
    if val is not None:
        passes = validation_passes(total, tp)
        val_s = passes * time_validation(trainer, val, seconds / 2)
    lines.append(f"estimate    {fmt(steps_s + val_s)} for the train stage: {total:,} steps {fmt(steps_s)} + "
                 f"{passes} passes over val (validation and temperature fit) {fmt(val_s)}")  # fmt: skip
    return "\n".join(lines)


def validation_passes(total: int, tp: TrainParams) -> int:
    """Passes over val that stages/train.py makes: one per eval_every before the last step; at the last, the
    trained weights (with ema), the chosen weights (with keep_best or the temperature fit), the fit itself and
    the model file's weights."""
    at_last = (tp.ema_decay > 0) + (tp.keep_best or tp.fit_temperature) + tp.fit_temperature + 1
    return (total - 1) // tp.eval_every + at_last


def time_validation(trainer: Trainer, val: np.ndarray, seconds: float) -> float:
    """Seconds for one validation pass over `val`, timed on growing leading parts of it (whole items)."""
    eos = np.flatnonzero(val == val[0])
    part, elapsed = min(len(eos) - 1, 8), 0.0
    while True:
        end = int(eos[part]) + 1
        start = time.perf_counter()
        trainer.validate(val[:end])
        elapsed = time.perf_counter() - start
        if elapsed >= seconds or part == len(eos) - 1:
            return elapsed * len(val) / end
        part = min(len(eos) - 1, part * 4)


def describe_model(path: Path) -> str:
    """One line on a trained model: shape, steps, the precision it was trained in, and its val bpc."""
    model, vocab, info = artifact.load_model(path, fix="retrain it with `dvc repro train`")
    c = model.config
    precision = info.get("precision", {}).get("label", "not recorded (trained before charlm recorded it)")
    val = f", val {info['val_bpc']:.4f} bpc" if info.get("val_bpc") is not None else ""
    return f"{path}: {c['cell']} {c['layers']}x{c['hidden']}, {info.get('steps', 0):,} steps in {precision}{val}"


def fmt(seconds: float) -> str:
    return f"{seconds / 60:,.1f} min" if seconds >= 90 else f"{seconds:,.1f} s"


def cpu_name() -> str:
    try:
        found = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.M)
    except OSError:
        found = None
    return found.group(1).strip() if found else (platform.processor() or platform.machine())


def onednn_version() -> str:
    found = re.search(r"(?:oneDNN|MKL-DNN) v([\d.]+)", torch.__config__.show())
    return found.group(1) if found else "absent"
