"""The `prepare` section: how the raw corpus becomes one cleaned item per line (stages/prepare.py)."""

from dataclasses import dataclass
from typing import ClassVar

from charlm.pipeline.params import fail, spec


@dataclass(frozen=True)
class PrepareParams:
    section: ClassVar[str] = "prepare"
    format: str = spec(choices=("ag_news", "lines"))
    fields: list[str] = spec(items=dict(choices=("title", "description")))
    clean: bool = spec()
    separator: str = spec()

    def check(self):
        if not self.fields or len(set(self.fields)) != len(self.fields):
            fail(
                "prepare.fields",
                self.fields,
                "a non-empty list without repeats: [title], [description] or [title, description]",
            )
