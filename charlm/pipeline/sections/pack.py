"""The `pack` section: windows, alignment and the validation split (stages/pack.py)."""

from dataclasses import dataclass
from typing import ClassVar

from charlm.pipeline.params import spec


@dataclass(frozen=True)
class PackParams:
    section: ClassVar[str] = "pack"
    seq_len: int = spec(ge=1, le=1_000_000)
    align: str = spec(choices=("item", "stream"))
    val_fraction: float = spec(ge=0.0, lt=1.0)
    seed: int = spec(ge=0)
