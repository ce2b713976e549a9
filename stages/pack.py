"""pack: encode each split into one token stream and record the window layout.

Reads `pack` from params.yaml. Writes data/packed/{train,val,test}.npy (one stream each, smallest integer
dtype) and data/packed/meta.json, all at once: the directory is replaced as a whole.
The validation split is carved out of train by item with `pack.seed`; the same seed orders training windows,
which start where `pack.align` says (see charlm/core/data.py).
"""

from __future__ import annotations

from charlm.base.errors import CharlmError, run_main
from charlm.base.io import atomic_dir, write_json, write_npy
from charlm.core.data import FORMAT, count_windows, pack_file, sha256
from charlm.core.vocab import Vocab
from charlm.pipeline import params, paths
from charlm.pipeline.sections.pack import PackParams

PREPARED, OUT = paths.PREPARED, paths.PACKED


def main() -> None:
    config = params.load(PackParams)
    vocab = Vocab.load(paths.VOCAB)
    fix = "rerun `dvc repro prepare`"
    # The prepared text is read a chunk at a time and never held whole: memory is the encoded streams (a byte a
    # character for up to 256 symbols), plus temporaries of a chunk or O(items) (see charlm/core/data.py).
    train, val = pack_file(vocab, PREPARED / "train.txt", "prepared train split", fix, config.val_fraction, config.seed)
    test, _ = pack_file(vocab, PREPARED / "test.txt", "prepared test split", fix)
    streams, splits = {}, {}
    for split, (stream, items) in {"train": train, "val": val, "test": test}.items():
        streams[split] = stream
        splits[split] = {
            "items": items,
            "tokens": int(len(stream)),
            "windows": count_windows(stream, config.seq_len, config.align),
            "sha256": sha256(stream),
        }
    # Check everything before writing anything, so a failed pack leaves no partial output.
    if splits["train"]["windows"] == 0:
        raise CharlmError(
            f"the train split has {splits['train']['tokens']} tokens, too few for one window of "
            f"pack.seq_len={config.seq_len}; lower pack.seq_len or use a larger corpus"
        )
    if config.val_fraction > 0 and splits["val"]["items"] == 0:
        raise CharlmError(
            f"pack.val_fraction={config.val_fraction} of {splits['train']['items']} train item(s) holds "
            f"out no item; use a corpus of more items, or set pack.val_fraction: 0"
        )
    meta = {
        "format": FORMAT,
        "seq_len": config.seq_len,
        "align": config.align,
        "seed": config.seed,
        "val_fraction": config.val_fraction,
        "vocab_size": len(vocab),
        "dtype": vocab.dtype.name,
        "splits": splits,
    }
    # The directory is replaced as a whole: a killed or failed pack never leaves some files new, some old.
    with atomic_dir(OUT) as tmp:
        for split, stream in streams.items():
            write_npy(tmp / f"{split}.npy", stream)
        write_json(tmp / "meta.json", meta)
    for split, s in splits.items():
        print(f"pack: {split}: {s['items']:,} items, {s['tokens']:,} tokens, {s['windows']:,} windows")


if __name__ == "__main__":
    run_main(main, "pack")
