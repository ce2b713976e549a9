"""prepare: parse each raw split, select fields, repair escape debris, write one item per line.

Reads `prepare` from params.yaml. Writes data/prepared/train.txt and data/prepared/test.txt (UTF-8, one item
per line, empty items dropped), which later stages read without re-parsing CSV.
"""

from __future__ import annotations

from pathlib import Path

from charlm import corpus, params
from charlm.errors import CharlmError, run_main
from charlm.io import all_or_none, write_text

RAW, OUT = Path("data/raw"), Path("data/prepared")


def main() -> None:
    p = params.load(params.PrepareParams)
    prepared = {}
    # Read and check both splits before writing either, so a bad test split leaves no train output behind.
    for split in ("train", "test"):
        path = RAW / f"{split}.csv"
        if not path.is_file():
            raise CharlmError(f"{path}: not found; run the download stage (`dvc repro download`) first")
        if p.format == "ag_news":
            items = corpus.read_ag_news(path, p.fields, p.clean, p.separator)
        else:
            items = corpus.read_lines(path, p.clean)
        kept = [item for item in items if item]
        if not kept:
            raise CharlmError(f"{path}: no non-empty items after preparing; the corpus is empty")
        prepared[split] = (kept, len(items) - len(kept))
    with all_or_none() as written:
        for split, (kept, dropped) in prepared.items():
            write_text(OUT / f"{split}.txt", "\n".join(kept) + "\n")
            written.append(OUT / f"{split}.txt")
            print(
                f"prepare: {split}: {len(kept):,} items ({dropped} empty dropped), {sum(map(len, kept)):,} characters"
            )


if __name__ == "__main__":
    run_main(main, "prepare")
