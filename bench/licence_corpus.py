"""A second corpus of another kind: the licence texts of a Debian machine as a `lines` corpus.

    .venv/bin/python -m bench.licence_corpus OUT_DIR     # writes OUT_DIR/train.txt and OUT_DIR/test.txt

Legal English, long sentences and few names: unlike AG News, so a lever tuned on AG News that only fits news
shows here. Each paragraph of each file in /usr/share/common-licenses (symbolic links skipped, files in name
order) becomes one item, its whitespace joined to single spaces; the last TEST_ITEMS paragraphs are the test
split. Point the pipeline at it with

    -S prepare.format=lines -S download.train.url=OUT_DIR/train.txt -S download.train.md5=null
    -S download.test.url=OUT_DIR/test.txt -S download.test.md5=null
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from charlm.base.io import write_text

LICENCES = Path("/usr/share/common-licenses")
TEST_ITEMS = 74


def paragraphs(folder: Path = LICENCES) -> list[str]:
    items = []
    for path in sorted(folder.iterdir()):
        if path.is_symlink() or not path.is_file():
            continue
        for block in re.split(r"\n\s*\n", path.read_text(encoding="utf-8", errors="replace")):
            if text := " ".join(block.split()):
                items.append(text)
    return items


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    out = parser.parse_args().out
    items = paragraphs()
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / "train.txt", "\n".join(items[:-TEST_ITEMS]) + "\n")
    write_text(out / "test.txt", "\n".join(items[-TEST_ITEMS:]) + "\n")
    train_chars = sum(len(t) for t in items[:-TEST_ITEMS])
    print(f"{out}: {len(items) - TEST_ITEMS} train items ({train_chars:,} characters), {TEST_ITEMS} test items")


if __name__ == "__main__":
    main()
