"""The `model` section: the shape of the network, read by train (stages/train.py). Its keys are CharRNN's
constructor arguments, and the cell choices are the model's own (charlm.core.model.CELLS)."""

from dataclasses import dataclass
from typing import ClassVar

from charlm.core.model import CELLS
from charlm.pipeline.params import spec


@dataclass(frozen=True)
class ModelParams:
    section: ClassVar[str] = "model"
    cell: str = spec(choices=tuple(CELLS))
    hidden: int = spec(ge=1, le=65536)
    layers: int = spec(ge=1, le=64)
    dropout: float = spec(ge=0.0, lt=1.0)
    embedding: int = spec(ge=0, le=65536)
    weight_drop: float = spec(ge=0.0, lt=1.0)
