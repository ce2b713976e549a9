"""The `evaluate` section: how the test split is scored (stages/evaluate.py)."""

from dataclasses import dataclass
from typing import ClassVar

from charlm.pipeline.params import spec


@dataclass(frozen=True)
class EvaluateParams:
    section: ClassVar[str] = "evaluate"
    batch_size: int = spec(ge=1)
    device: str = spec(choices=("auto", "cpu", "cuda"))
    dynamic_lr: float = spec(ge=0.0, le=10.0)
