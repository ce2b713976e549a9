"""prepare: parse each raw split, select fields, repair escape debris, write one item per line.

Reads `prepare` from params.yaml. Writes data/prepared/train.txt and data/prepared/test.txt (UTF-8, one item
per line, empty items dropped), which later stages read without re-parsing CSV.
"""

from __future__ import annotations

from pathlib import Path

from charlm.base.errors import CharlmError, run_main
from charlm.base.io import all_or_none, atomic_path
from charlm.core import corpus
from charlm.pipeline import params, paths
from charlm.pipeline.sections.prepare import PrepareParams

RAW, OUT = paths.RAW, paths.PREPARED


def prepare(config: PrepareParams, split: str, out: Path) -> str:
    """Stream one raw split into `out`, an item at a time (memory stays small next to the corpus); a summary."""
    path = RAW / f"{split}.csv"
    if not path.is_file():
        raise CharlmError(f"{path}: not found; run the download stage (`dvc repro download`) first")
    if config.format == "ag_news":
        items = corpus.ag_news_items(path, config.fields, config.clean, config.separator)
    else:
        items = corpus.line_items(path, config.clean)
    kept = dropped = chars = 0
    with open(out, "w", encoding="utf-8") as f:
        for item in items:
            if item:
                f.write(item)  # not item + "\n": that would copy a long item once more
                f.write("\n")
                kept, chars = kept + 1, chars + len(item)
            else:
                dropped += 1
    if not kept:
        raise CharlmError(f"{path}: no non-empty items after preparing; the corpus is empty")
    return f"prepare: {split}: {kept:,} items ({dropped} empty dropped), {chars:,} characters"


def main() -> None:
    config = params.load(PrepareParams)
    # Read and check both splits before either output is replaced: each is written to a temp file, and both are
    # renamed only once both are complete, so a bad test split leaves no new train output behind. Each split is
    # written inside its own atomic_path only, so a full disk names the file that did not fit.
    with all_or_none() as written:
        with atomic_path(OUT / "train.txt") as train:
            done = [prepare(config, "train", train)]
            with atomic_path(OUT / "test.txt") as test:
                done.append(prepare(config, "test", test))
            written.append(OUT / "test.txt")  # renamed: removed again if renaming train fails
        written.append(OUT / "train.txt")
    print("\n".join(done))


if __name__ == "__main__":
    run_main(main, "prepare")
