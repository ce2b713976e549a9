"""Serve a local copy of the AG News test split over loopback HTTP as a train/test pair, for realistic runs
without internet.

    python -m bench.serve_ag_news --ag-news PATH --train-rows 6600 --port 8765

The first --train-rows rows become /train.csv and the rest /test.csv (split by row, deterministically).
It prints the `-S` overrides that point the download stage at them (md5s included); pass them to
`dvc exp run`, or put the URLs and md5s in params.yaml. Stop it with Ctrl-C.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import http.server
import tempfile
from pathlib import Path

from bench import harness


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    harness.add_ag_news_argument(parser)
    parser.add_argument("--train-rows", type=int, default=harness.TRAIN_ROWS, help="rows for train; the rest are test")
    parser.add_argument("--port", type=int, default=8765)
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="ag_news_"))
    overrides = []
    for split, data in zip(("train", "test"), harness.split_rows(args.ag_news, args.train_rows), strict=True):
        (folder / f"{split}.csv").write_bytes(data)
        url = f"http://127.0.0.1:{args.port}/{split}.csv"
        overrides += [f"-S download.{split}.url={url}", f"-S download.{split}.md5={hashlib.md5(data).hexdigest()}"]
        print(f"{split}: {len(data.splitlines()):,} rows at {url}")
    print("dvc exp run " + " ".join(overrides), flush=True)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    http.server.ThreadingHTTPServer(("127.0.0.1", args.port), handler).serve_forever()


if __name__ == "__main__":
    main()
