"""Training: the model, optimiser, schedule, AMP scaler and step in one object (in the spirit of minGPT's
trainer.py). The train stage and the benchmarks step through this same object; what a run is built from and
where its checkpoints go is pipeline plumbing (charlm/pipeline/run.py, checkpoints.py)."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from charlm.core.model import CharRNN
from charlm.core.precision import Precision, autocast, resolve
from charlm.core.scoring import best_temperature, stream_bpc

# Validation items per forward pass. It only sets speed and memory: padding comes after an item's end, where a
# forward RNN cannot see it, so the figure does not depend on it (evaluate's own batch is `evaluate.batch_size`).
VALIDATION_BATCH = 64


@dataclass(frozen=True)
class Optimisation:
    """What the Trainer reads of the `train` params section (charlm/pipeline/sections/train.py)."""

    lr: float
    beta2: float
    weight_decay: float
    warmup_steps: int
    schedule: str  # cosine | linear | constant
    min_lr_ratio: float
    grad_clip: float
    amp: str  # auto | none | bf16 | fp16 (charlm/core/precision.py)
    ema_decay: float = 0.0  # 0 = off
    fit_temperature: bool = False
    keep_best: bool = False

    @classmethod
    def of(cls, train_params) -> Optimisation:
        """The Trainer's part of a `train` section (any object with these attributes)."""
        return cls(**{f.name: getattr(train_params, f.name) for f in dataclasses.fields(cls)})


def lr_factor(step: int, total: int, settings: Optimisation) -> float:
    """Linear warm-up to 1, then cosine or linear decay to min_lr_ratio at the last step."""
    if step < settings.warmup_steps:
        return (step + 1) / settings.warmup_steps
    if settings.schedule == "constant":
        return 1.0
    progress = min(1.0, (step - settings.warmup_steps) / max(1, total - settings.warmup_steps))
    decay = 0.5 * (1 + math.cos(math.pi * progress)) if settings.schedule == "cosine" else 1 - progress
    return settings.min_lr_ratio + (1 - settings.min_lr_ratio) * decay


class Trainer:
    """Steps `model` with AdamW (no decay on biases), the warm-up/decay schedule over `total` steps and mixed
    precision (`precision`, or else `settings.amp` resolved on this machine: charlm/core/precision.py). With
    world > 1 the step goes through DistributedDataParallel."""

    def __init__(
        self,
        model: CharRNN,
        settings: Optimisation,
        total: int,
        device: torch.device,
        world: int = 1,
        precision: Precision | None = None,
    ):
        self.model, self.settings, self.total, self.device = model, settings, total, device
        self.net = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
        decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
        no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": settings.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=settings.lr,
            betas=(0.9, settings.beta2),
        )
        # reads self.total at every step, so a caller may fix the schedule's length after a calibration
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: lr_factor(step, self.total, settings)
        )
        # bf16 autocast halves the step on CPUs with AMX or AVX512-BF16 (bench/results/levers.md); fp16 needs
        # CUDA's GradScaler. The weights, the optimiser and the average stay fp32 either way.
        self.precision = precision or resolve(
            settings.amp, device, model.config, notice=lambda text: warnings.warn(text, stacklevel=3)
        )
        self.amp_dtype = self.precision.autocast_dtype
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.precision.step == "fp16")
        self.params: list[torch.Tensor] = [*decay, *no_decay]
        # The exponential moving average of the weights (train.ema_decay), kept in fp32 beside them
        self.average = [p.detach().clone() for p in self.params] if settings.ema_decay > 0 else None
        # train.keep_best: the weights of the validation that scored best so far (early stopping, chosen on val)
        self.best: list[torch.Tensor] | None = None
        self.best_bpc, self.best_step = math.inf, 0

    def autocast(self):
        """Mixed precision for the training step only: validation and the temperature fit score in fp32, as
        evaluate scores the test split."""
        return autocast(self.device, self.amp_dtype)

    def step(self, x: np.ndarray, y: np.ndarray) -> torch.Tensor:
        """One optimisation step on a minibatch of token ids; returns the loss as a device tensor (no host sync)."""
        x_t = torch.from_numpy(x).to(self.device, non_blocking=True)
        y_t = torch.from_numpy(y).to(self.device, non_blocking=True)
        with self.autocast():
            loss, _ = self.net(x_t, targets=y_t)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.settings.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.settings.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        if self.average is not None:
            # TensorFlow's ExponentialMovingAverage warm-up: early on the average follows the weights closely
            done = self.scheduler.last_epoch
            decay = min(self.settings.ema_decay, (1 + done) / (10 + done))
            torch._foreach_lerp_(self.average, [p.detach() for p in self.params], 1 - decay)
        return loss.detach()

    def lr(self) -> float:
        return float(self.scheduler.get_last_lr()[0])

    def validate(self, stream: np.ndarray, averaged: bool = True) -> float:
        """Bits per character of a packed split, scored exactly as evaluate scores the test split; with
        train.ema_decay, of the averaged weights (the ones the model file gets) unless `averaged` is False."""
        with self.averaged() if averaged else contextlib.nullcontext():
            return float(stream_bpc(self.model, stream, VALIDATION_BATCH, self.device))

    def keep_if_best(self, step: int, bpc: float) -> None:
        """With train.keep_best: keep a copy of the weights that validation just scored (the average, with
        train.ema_decay) when they score better than at every earlier validation."""
        if not (self.settings.keep_best and bpc < self.best_bpc):
            return
        scored = self.average if self.average is not None else self.params
        if self.best is None:
            self.best = [t.detach().clone() for t in scored]
        else:
            torch._foreach_copy_(self.best, scored)
        self.best_bpc, self.best_step = bpc, step

    @contextlib.contextmanager
    def averaged(self):
        """The model holds the averaged weights for the duration (no-op without train.ema_decay)."""
        if self.average is None:
            yield
            return
        with torch.no_grad():
            trained = [p.detach().clone() for p in self.params]
            torch._foreach_copy_(self.params, self.average)
        try:
            yield
        finally:
            with torch.no_grad():
                torch._foreach_copy_(self.params, trained)

    @torch.no_grad()
    def finish(self, stream: np.ndarray | None) -> float | None:
        """After the last step: put the best-validated weights (train.keep_best) or else the averaged weights
        (train.ema_decay) into the model for good, and with
        train.fit_temperature fold the softmax temperature that scores `stream` (val) best into the head, so the
        model file, generate, fine-tuning and the playground all see one model. Returns that temperature."""
        chosen = self.best if self.best is not None else self.average
        if chosen is not None:
            torch._foreach_copy_(self.params, chosen)
        self.average = self.best = None
        if not (self.settings.fit_temperature and stream is not None):
            return None
        temperature = best_temperature(self.model, stream, VALIDATION_BATCH, self.device)
        self.model.head.weight.div_(temperature)
        self.model.head.bias.div_(temperature)
        return temperature

    def state_dict(self) -> dict:
        """Everything a resumed run needs to continue bit for bit: weights, optimiser, schedule, scaler, RNGs."""
        rng: dict[str, Any] = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        return (
            {
                "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict(),
                "rng": rng,
            }
            | ({"average": self.average} if self.average is not None else {})
            | (
                {"best": {"weights": self.best, "bpc": self.best_bpc, "step": self.best_step}}
                if self.best is not None
                else {}
            )
        )

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        # absent from checkpoints without train.ema_decay, and from the one saved after `finish`
        self.average = [a.detach().clone().to(self.device) for a in state["average"]] if "average" in state else None
        best = state.get("best")  # absent without train.keep_best, before the first validation and after `finish`
        self.best = [b.detach().clone().to(self.device) for b in best["weights"]] if best else None
        self.best_bpc, self.best_step = (float(best["bpc"]), int(best["step"])) if best else (math.inf, 0)
        torch.set_rng_state(state["rng"]["cpu"].cpu())
        if "cuda" in state["rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all([s.cpu() for s in state["rng"]["cuda"]])
