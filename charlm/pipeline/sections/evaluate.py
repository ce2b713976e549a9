"""The `evaluate` section: how the test split is scored, statically and adaptively (stages/evaluate.py)."""

from dataclasses import dataclass
from typing import ClassVar

from charlm.pipeline.params import spec


@dataclass(frozen=True)
class EvaluateParams:
    section: ClassVar[str] = "evaluate"
    batch_size: int = spec(ge=1)
    device: str = spec(choices=("auto", "cpu", "cuda"))
    cache_order: int = spec(ge=0, le=16)
    cache_discount: float = spec(ge=0.0, lt=1.0)
    cache_lambda: float = spec(gt=0.0, le=1.0)
    dynamic_eta: float = spec(ge=0.0, le=1.0)
    dynamic_lambda: float = spec(gt=0.0, le=1.0)
    dynamic_segment: int = spec(ge=1, le=10_000)
