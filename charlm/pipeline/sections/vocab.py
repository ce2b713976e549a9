"""The `vocab` section: which characters get their own id (stages/vocab.py)."""

from dataclasses import dataclass
from typing import ClassVar

from charlm.pipeline.params import check_init_path, spec


@dataclass(frozen=True)
class VocabParams:
    section: ClassVar[str] = "vocab"
    min_count: int = spec(ge=1)
    from_model: str | None = spec()

    def check(self):
        check_init_path("vocab.from_model", self.from_model)
