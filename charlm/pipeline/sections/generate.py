"""The `generate` section: prompts and sampling settings of the samples report (stages/generate.py)."""

from dataclasses import dataclass
from typing import ClassVar

from charlm.pipeline.params import fail, spec


@dataclass(frozen=True)
class GenerateParams:
    section: ClassVar[str] = "generate"
    prompts: list[str] = spec()
    temperatures: list[float] = spec(items=dict(ge=0.0))
    length: int = spec(ge=0, le=1_000_000)
    top_k: int = spec(ge=0)
    top_p: float = spec(gt=0.0, le=1.0)
    seed: int = spec(ge=0)
    stop_at_eos: bool = spec()
    device: str = spec(choices=("auto", "cpu", "cuda"))

    def check(self):
        if not self.prompts:
            fail("generate.prompts", self.prompts, "a non-empty list of strings")
        if not self.temperatures:
            fail("generate.temperatures", self.temperatures, "a non-empty list of numbers >= 0 (0 means greedy)")
