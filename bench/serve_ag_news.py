"""Serve a local AG News CSV over loopback HTTP as a train/test pair, for realistic runs without internet.

    python bench/serve_ag_news.py ../shared/data/ag_news/test.csv --train-rows 6600 --port 8765

The first --train-rows rows become /train.csv and the rest /test.csv (split by row, deterministically).
It prints the `-S` overrides that point the download stage at them (md5s included); pass them to
`dvc exp run`, or put the URLs and md5s in params.yaml. Stop it with Ctrl-C.
"""
from __future__ import annotations

import argparse
import hashlib
import http.server
import tempfile
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("csv", type=Path, help="an AG News CSV (label,title,description)")
    parser.add_argument("--train-rows", type=int, default=6600, help="rows for train; the rest are test")
    parser.add_argument("--port", type=int, default=8765)
    args = parser.parse_args()
    lines = args.csv.read_bytes().splitlines(keepends=True)
    folder = Path(tempfile.mkdtemp(prefix="ag_news_"))
    overrides = []
    for split, rows in (("train", lines[:args.train_rows]), ("test", lines[args.train_rows:])):
        data = b"".join(rows)
        (folder / f"{split}.csv").write_bytes(data)
        url = f"http://127.0.0.1:{args.port}/{split}.csv"
        overrides += [f"-S download.{split}.url={url}", f"-S download.{split}.md5={hashlib.md5(data).hexdigest()}"]
        print(f"{split}: {len(rows):,} rows at {url}")
    print("dvc exp run " + " ".join(overrides), flush=True)
    handler = lambda *a, **kw: http.server.SimpleHTTPRequestHandler(*a, directory=str(folder), **kw)  # noqa: E731
    http.server.ThreadingHTTPServer(("127.0.0.1", args.port), handler).serve_forever()


if __name__ == "__main__":
    main()
