"""The `train` section: optimisation, schedule, logging and checkpoints (stages/train.py)."""

from dataclasses import dataclass
from typing import ClassVar

from charlm.pipeline.params import check_init_path, spec


@dataclass(frozen=True)
class TrainParams:
    section: ClassVar[str] = "train"
    batch_size: int = spec(ge=1)
    lr: float = spec(gt=0.0, le=10.0)
    beta2: float = spec(gt=0.0, lt=1.0)
    epochs: int = spec(ge=1)
    max_steps: int = spec(ge=0)
    seed: int = spec(ge=0)
    device: str = spec(choices=("auto", "cpu", "cuda"))
    warmup_steps: int = spec(ge=0)
    schedule: str = spec(choices=("cosine", "linear", "constant"))
    min_lr_ratio: float = spec(ge=0.0, le=1.0)
    weight_decay: float = spec(ge=0.0)
    grad_clip: float = spec(ge=0.0)
    amp: str = spec(choices=("auto", "none", "bf16", "fp16"))
    ema_decay: float = spec(ge=0.0, lt=1.0)
    fit_temperature: bool = spec()
    keep_best: bool = spec()
    deterministic: bool = spec()
    processes: int = spec(ge=1, le=1024)
    eval_every: int = spec(ge=1)
    log_every: int = spec(ge=1)
    checkpoint_every: int = spec(ge=1)
    sample_every: int = spec(ge=0)
    sample_prompt: str = spec()
    sample_length: int = spec(ge=1, le=100_000)
    init_from: str | None = spec()

    def check(self):
        check_init_path("train.init_from", self.init_from)
