"""The `download` section: where the corpus comes from (stages/download.py)."""

from dataclasses import dataclass
from typing import ClassVar

from charlm.pipeline.params import fail, spec


@dataclass(frozen=True)
class Source:
    url: str = spec()
    md5: str | None = spec()


@dataclass(frozen=True)
class DownloadParams:
    section: ClassVar[str] = "download"
    train: Source = spec()
    test: Source = spec()
    timeout: float = spec(gt=0)
    retries: int = spec(ge=0, le=100)

    def check(self):
        for name in ("train", "test"):
            src = getattr(self, name)
            if not src.url:
                fail(f"download.{name}.url", src.url, "a URL (http://, https://, file://) or a local path")
            if src.md5 is not None and not (len(src.md5) == 32 and all(c in "0123456789abcdef" for c in src.md5)):
                fail(f"download.{name}.md5", src.md5, "32 lower-case hex digits, or null to skip the check")
