"""Packed token streams and the minibatch iterator that train reads them with.

A split is one contiguous stream: `<eos> item1 <eos> item2 <eos> ... itemN <eos>`. Every item is thus
preceded by `<eos>`, the same context the evaluation protocol gives the first character of an item.

Training windows are `seq_len + 1` tokens; a window is only ever an offset, never a copy. Where they start is
`pack.align`:
- `token_steps`: at multiples of `seq_len`, so windows tile the stream and most start mid-item;
- `item`: at the <eos> before every item, plus continuation windows every `seq_len` tokens through an item
  longer than one window. Each window then begins exactly as the evaluation protocol scores an item: from a
  zero state, conditioned on <eos>. Windows of consecutive short items overlap; every token is still covered.

Each epoch visits every window once in an order drawn from `(seed, epoch)`, cut into equal-size minibatches
(the last partial batch of an epoch is dropped). Memory is O(stream), and one minibatch is gathered at a time.

Packing reads a prepared split twice, a chunk at a time (`pack_file`), so that only the encoded streams are ever
whole in memory, never the text.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import compress
from pathlib import Path

import numpy as np

from charlm.base.errors import CharlmError
from charlm.base.io import read_json, read_npy, read_text_chunks
from charlm.core.vocab import EOS_ID, Vocab

FORMAT = "charlm-packed/1"
SPLITS = ("train", "val", "test")
# Characters read or encoded (or tokens scanned) at a time: Vocab.encode's temporaries are ~30 bytes a character,
# so 2 MiB a chunk; larger chunks are no faster.
_CHUNK = 1 << 16
_BREAKS = frozenset("\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029")  # where str.splitlines() breaks


def encode_items(vocab: Vocab, text: str) -> np.ndarray:
    """Encode newline-separated items into one stream that starts and ends with <eos>."""
    body = text if text.endswith("\n") else text + "\n"
    out = np.empty(len(body) + 1, dtype=vocab.dtype)
    out[:1] = vocab.encode("\n")
    _encode_into(out, 1, vocab, body)
    return out


def _encode_into(out: np.ndarray, start: int, vocab: Vocab, text: str) -> int:
    """Encode `text` into `out` from `start`, a chunk at a time; where it ends."""
    for i in range(0, len(text), _CHUNK):
        chunk = text[i : i + _CHUNK]
        out[start + i : start + i + len(chunk)] = vocab.encode(chunk)
    return start + len(text)


def lines_of(chunks: Iterable[str]) -> Iterator[list[str]]:
    """`"".join(chunks).splitlines()`, a list per chunk. A line that spans chunks is joined once, when it ends.
    No chunk may end between the "\\r" and "\\n" of a "\\r\\n" (`read_text_chunks` turns both into "\\n")."""
    pending: list[str] = []  # the start of a line that goes on in a later chunk
    for chunk in chunks:
        lines = chunk.splitlines()
        tail = [] if chunk[-1] in _BREAKS else [lines.pop()]  # its last line goes on in the next chunk
        if lines:
            pending.append(lines[0])
            lines[0] = "".join(pending)
            pending = []
            yield lines
        pending += tail
    if pending:
        yield ["".join(pending)]


def val_mask(n_items: int, val_fraction: float, seed: int) -> np.ndarray:
    """Which items `split_items` holds out for validation: a seeded, exact-size random subset."""
    n_val = int(round(n_items * val_fraction))
    if val_fraction > 0 and n_val == 0 and n_items > 1:
        n_val = 1
    is_val = np.zeros(n_items, dtype=bool)
    is_val[np.random.default_rng(seed).permutation(n_items)[:n_val]] = True
    return is_val


def split_items(items: list[str], val_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Carve a validation split out by item: a seeded, exact-size random subset; order is kept in both."""
    is_val = val_mask(len(items), val_fraction, seed)
    train = [s for s, v in zip(items, is_val, strict=True) if not v]
    val = [s for s, v in zip(items, is_val, strict=True) if v]
    return train, val


class _Stream:
    """`encode_items(vocab, "\\n".join(items))`, filled a list of items at a time; `lengths` are the items'."""

    def __init__(self, vocab: Vocab, lengths: np.ndarray, path: str | os.PathLike):
        self.vocab, self.path, self.items = vocab, path, len(lengths)
        # An opening <eos>, then every item and its closing <eos>; no items make [<eos>, <eos>], as in encode_items.
        self.out = np.empty(1 + int(lengths.sum()) + max(self.items, 1), dtype=vocab.dtype)
        self.out[:2] = EOS_ID
        self.pos = 1 if self.items else 2
        # Also as in encode_items: an empty last item gets no closing <eos> (the joined text already ends in "\n").
        self.end = len(self.out) - int(self.items > 1 and lengths[-1] == 0)

    def add(self, items: list[str]) -> None:
        if not items:
            return
        text = "\n".join(items)
        if self.pos + len(text) >= len(self.out):
            self.changed()
        self.pos = _encode_into(self.out, self.pos, self.vocab, text)
        self.out[self.pos] = EOS_ID
        self.pos += 1

    def finish(self) -> tuple[np.ndarray, int]:
        if self.pos != len(self.out):
            self.changed()
        return self.out[: self.end], self.items

    def changed(self) -> None:
        raise CharlmError(f"{self.path}: changed while pack read it; rerun `dvc repro pack`")


def pack_file(
    vocab: Vocab, path: str | os.PathLike, what: str, fix: str, val_fraction: float = 0.0, seed: int = 0
) -> list[tuple[np.ndarray, int]]:
    """[(stream, items) of the items kept, the same of those held out]: `encode_items` of each half of
    `split_items(read_text(path).splitlines(), val_fraction, seed)`. The file is read twice, a chunk at a time:
    once for the items' lengths, which size the streams exactly, then to encode each chunk into its place."""

    def chunks() -> Iterator[list[str]]:
        return lines_of(read_text_chunks(path, what, fix, _CHUNK))

    lengths = np.fromiter((len(line) for lines in chunks() for line in lines), dtype=np.int64)
    is_val = val_mask(len(lengths), val_fraction, seed)
    halves = [_Stream(vocab, lengths[~is_val], path), _Stream(vocab, lengths[is_val], path)]
    done = 0
    for lines in chunks():
        held = is_val[done : done + len(lines)]
        done += len(lines)
        halves[0].add(list(compress(lines, ~held)) if held.any() else lines)
        halves[1].add(list(compress(lines, held)))
    return [half.finish() for half in halves]


def sha256(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).view(np.uint8).data).hexdigest()


def n_windows(stream_len: int, seq_len: int) -> int:
    return max(stream_len - 1, 0) // seq_len


def window_starts(stream: np.ndarray, seq_len: int, align: str = "stream") -> np.ndarray:
    """Sorted start offsets of the training windows of a stream (see the module docstring)."""
    if align == "stream":
        return np.arange(n_windows(len(stream), seq_len), dtype=np.int64) * seq_len
    last = len(stream) - seq_len - 1  # the last offset where a whole window fits
    if last < 0:
        return np.zeros(0, dtype=np.int64)
    eos = eos_positions(stream)
    spans = np.diff(eos)  # an item with its opening <eos>
    per_item = -(-spans // seq_len)
    first = np.repeat(eos[:-1], per_item)
    # k-th window of its item: k = position in the flattened list minus where the item's windows begin
    k = np.arange(len(first)) - np.repeat(np.cumsum(per_item) - per_item, per_item)
    # Windows past the end are pulled back to the last fitting offset, so the stream's tail is still covered.
    return np.unique(np.minimum(first + k * seq_len, last))


def count_windows(stream: np.ndarray, seq_len: int, align: str = "stream") -> int:
    """`len(window_starts(stream, seq_len, align))` in memory O(items), not O(windows): pack only records it."""
    if align == "stream":
        return n_windows(len(stream), seq_len)
    last = len(stream) - seq_len - 1
    if last < 0:
        return 0
    eos = eos_positions(stream)
    per_item = -(-np.diff(eos) // seq_len)
    # Each item's starts eos + k * seq_len rise through the stream, so the starts before `last` are all distinct,
    # and every start from `last` on is pulled back onto the one window at `last`.
    before = int(np.minimum(np.maximum(-(-(last - eos[:-1]) // seq_len), 0), per_item).sum())
    return before + int(per_item.sum() > before)


def eos_positions(stream: np.ndarray) -> np.ndarray:
    """`np.flatnonzero(stream == EOS_ID)`, a chunk at a time: the comparison's mask would be as long as the stream."""
    stream = np.asarray(stream)
    parts = [np.flatnonzero(stream[i : i + _CHUNK] == EOS_ID) + i for i in range(0, len(stream), _CHUNK)]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


class Batches:
    """Equal-size `(inputs, targets)` minibatches of shuffled windows, addressed by `(epoch, index)`.

    With `world > 1` each rank takes a disjoint slice of every global batch, so the union of the ranks'
    batches equals the single-process batch of size `batch_size * world`.
    """

    def __init__(
        self,
        stream: np.ndarray,
        seq_len: int,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world: int = 1,
        align: str = "stream",
    ):
        self.stream, self.seq_len, self.batch_size = stream, seq_len, batch_size
        self.seed, self.rank, self.world = seed, rank, world
        self._starts = window_starts(stream, seq_len, align)
        self.n_windows = len(self._starts)
        self.per_epoch = self.n_windows // (batch_size * world)
        if self.per_epoch == 0:
            raise CharlmError(
                f"the training stream has {self.n_windows} windows of pack.seq_len={seq_len}, fewer than one "
                f"batch of train.batch_size={batch_size}"
                + (f" x {world} processes" if world > 1 else "")
                + "; lower train.batch_size or pack.seq_len, or use a larger corpus"
            )
        self._offsets = np.arange(seq_len + 1)
        self._order_epoch, self._order = -1, np.empty(0, dtype=np.int64)

    def order(self, epoch: int) -> np.ndarray:
        if epoch != self._order_epoch:
            self._order = np.random.default_rng([self.seed, epoch]).permutation(self.n_windows)
            self._order_epoch = epoch
        return self._order

    def starts(self, epoch: int, index: int) -> np.ndarray:
        """Start offsets of this rank's windows in batch `index` of `epoch`."""
        if not 0 <= index < self.per_epoch:
            raise IndexError(index)
        b, g = self.batch_size, self.batch_size * self.world
        return self._starts[self.order(epoch)[index * g + self.rank * b : index * g + (self.rank + 1) * b]]

    def batch(self, epoch: int, index: int) -> tuple[np.ndarray, np.ndarray]:
        windows = self.stream[self.starts(epoch, index)[:, None] + self._offsets].astype(np.int64)
        return windows[:, :-1], windows[:, 1:]


@dataclass
class Packed:
    meta: dict
    streams: dict[str, np.ndarray]


def load_packed(directory: str | Path) -> Packed:
    directory = Path(directory)
    fix = "rerun `dvc repro pack`"
    meta = read_json(directory / "meta.json", "packed-data metadata", fix)
    if meta.get("format") != FORMAT:
        raise CharlmError(f"{directory / 'meta.json'}: unknown format {meta.get('format')!r}; {fix}")
    streams = {}
    for split in SPLITS:
        path = directory / f"{split}.npy"
        stream = read_npy(path, fix)
        try:
            expected = meta["splits"][split]["tokens"]
        except (KeyError, TypeError):
            raise CharlmError(f"{directory / 'meta.json'}: no token count for the {split} split; {fix}") from None
        if stream.ndim != 1 or len(stream) != expected:
            raise CharlmError(f"{path}: holds {stream.shape} tokens, meta.json says {expected}; {fix}")
        streams[split] = stream
    return Packed(meta, streams)


def item_bounds(stream: np.ndarray, eos_id: int) -> tuple[np.ndarray, np.ndarray]:
    """(start, length) of every item in a stream, excluding the <eos> around it."""
    eos = np.flatnonzero(stream == eos_id)
    starts, lengths = eos[:-1] + 1, np.diff(eos) - 1
    keep = lengths > 0
    return starts[keep], lengths[keep]
