"""download: fetch the raw train and test corpora and verify their md5.

Reads `download` from params.yaml. Writes data/raw/train.csv and data/raw/test.csv. The client (http(s)://
with resume and back-off, file:// and local paths) is charlm/core/download.py.
"""

from __future__ import annotations

from charlm.base.errors import run_main
from charlm.base.io import all_or_none
from charlm.core.download import fetch
from charlm.pipeline import params, paths
from charlm.pipeline.sections.download import DownloadParams


def main() -> None:
    config = params.load(DownloadParams)
    with all_or_none() as written:
        for split in ("train", "test"):
            source = getattr(config, split)
            dest = paths.RAW / f"{split}.csv"
            fetch(source.url, dest, source.md5, config.timeout, config.retries, key=f"download.{split}")
            written.append(dest)


if __name__ == "__main__":
    run_main(main, "download")
