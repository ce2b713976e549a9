"""vocab: build the character vocabulary from the train split and report test coverage.

Reads `vocab` from params.yaml. Writes data/vocab.json: ids, counts, dropped characters, and how many test
characters become <unk>. With `vocab.from_model`, the vocabulary is that model's, so that train can start from
it (`train.init_from`); characters the model never saw then become <unk>.
"""

from __future__ import annotations

from collections import Counter

from charlm.base.errors import CharlmError, run_main
from charlm.base.io import read_text_chunks
from charlm.core.vocab import Vocab, count_chars
from charlm.pipeline import params, paths
from charlm.pipeline.sections.vocab import VocabParams

PREPARED, OUT = paths.PREPARED, paths.VOCAB
CHUNK = 1 << 18  # characters counted at a time: count_chars' temporaries are ~10 bytes a character


def count_file(split: str, fix: str) -> dict[str, int]:
    """`count_chars` of a prepared split, read a chunk at a time: the text is never whole in memory."""
    total: Counter[str] = Counter()
    for chunk in read_text_chunks(PREPARED / f"{split}.txt", f"prepared {split} split", fix, CHUNK):
        total.update(count_chars(chunk))
    return {c: total[c] for c in sorted(total, key=ord)}


def outside(counts: dict[str, int], vocab: Vocab) -> dict[str, int]:
    """The counts of the characters that `vocab` reads as <unk> (the item separator is not a character)."""
    return {c: n for c, n in counts.items() if c != "\n" and c not in vocab.itos}


def main() -> None:
    config = params.load(VocabParams)
    fix = "rerun `dvc repro prepare`"
    counts = count_file("train", fix)
    if config.from_model:
        from charlm.pipeline import artifact  # imports torch: only when a model is asked for

        _, vocab, _ = artifact.load_model(
            config.from_model, fix="copy a charlm model there or set vocab.from_model: null"
        )
    else:
        vocab = Vocab.build(counts, config.min_count)
    if not vocab.chars:
        raise CharlmError(
            f"no character occurs vocab.min_count={config.min_count} times in the train split; lower vocab.min_count"
        )
    test_counts = count_file("test", fix)
    train_unseen, test_unseen = outside(counts, vocab), outside(test_counts, vocab)
    test_chars = sum(test_counts.values()) - test_counts.get("\n", 0)
    test_unk = sum(test_unseen.values())
    stats = {
        "min_count": config.min_count,
        "train_items": counts.get("\n", 0),
        "train_chars": sum(counts.values()) - counts.get("\n", 0),
        "from_model": config.from_model,
        "train_unk_chars": sum(train_unseen.values()),
        "test_chars": test_chars,
        "test_unk_chars": test_unk,
        "test_unk_rate": round(test_unk / max(test_chars, 1), 8),
        "test_unseen": sorted(test_unseen, key=ord),
    }
    vocab.save(OUT, counts, stats)
    source = f" from {config.from_model}" if config.from_model else ""
    print(
        f"vocab: {len(vocab)} symbols ({len(vocab.chars)} characters + 3 specials){source}, "
        f"test <unk> rate {stats['test_unk_rate']:.5%}"
    )
    if config.from_model and train_unseen:
        listed = "".join(sorted(train_unseen, key=ord))[:40]
        print(
            f"vocab: warning: {stats['train_unk_chars']:,} train characters ({listed!r}) are not in "
            f"{config.from_model}'s vocabulary and are read as <unk>"
        )


if __name__ == "__main__":
    run_main(main, "vocab")
