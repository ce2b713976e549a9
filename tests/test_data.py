"""Packed token streams, the validation split and the minibatch iterator (charlm/core/data.py)."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import WORDS, raw_project
from hypothesis import given, settings
from hypothesis import strategies as st

from charlm.base.errors import CharlmError
from charlm.base.io import write_json, write_npy
from charlm.core import data
from charlm.core.data import Batches, encode_items, item_bounds, load_packed, n_windows, split_items, window_starts
from charlm.core.vocab import EOS_ID, Vocab

VOCAB = Vocab(list("abcdefgh \u00e9\u6771"))
item_text = st.text(st.sampled_from(VOCAB.chars), max_size=12)
items_strategy = st.lists(item_text, min_size=1, max_size=12)


# --------------------------------------------------------------------------- encode_items


def expected_stream(items: list[str]) -> list[int]:
    out = [EOS_ID]
    for item in items:
        out += VOCAB.encode(item).tolist() + [EOS_ID]
    return out


@settings(max_examples=100, deadline=None)
@given(items=st.lists(item_text.filter(bool), min_size=1, max_size=12), chunk=st.sampled_from([1, 2, 3, 7, 1 << 20]))
def test_encode_items_is_eos_separated_and_chunking_does_not_matter(items, chunk):
    # Prepared items are never empty (prepare drops them), so a text never ends in an empty item.
    saved = data._CHUNK
    data._CHUNK = chunk  # the chunked encoder must agree with itself at any chunk size
    try:
        stream = encode_items(VOCAB, "\n".join(items))
    finally:
        data._CHUNK = saved
    assert stream.dtype == VOCAB.dtype
    assert stream[0] == EOS_ID and stream[-1] == EOS_ID
    assert stream.tolist() == expected_stream(items)
    assert int((stream == EOS_ID).sum()) == len(items) + 1


def test_encode_items_accepts_a_trailing_newline():
    expected = expected_stream(["ab", "c"])
    assert encode_items(VOCAB, "ab\nc\n").tolist() == encode_items(VOCAB, "ab\nc").tolist() == expected


def test_encode_items_uses_the_vocab_dtype():
    wide = Vocab([chr(0x4E00 + i) for i in range(300)])
    stream = encode_items(wide, chr(0x4E00 + 299) + "\n" + chr(0x4E00))
    assert stream.dtype == np.uint16 and stream.tolist() == [EOS_ID, 302, EOS_ID, 3, EOS_ID]


# --------------------------------------------------------------------------- split_items


def expected_val_size(n: int, fraction: float) -> int:
    k = int(round(n * fraction))
    return max(k, 1) if fraction > 0 and n > 1 else k


@settings(max_examples=100, deadline=None)
@given(n=st.integers(0, 300), fraction=st.floats(0.0, 0.99), seed=st.integers(0, 2**32 - 1))
def test_split_items_is_exact_disjoint_covering_and_seeded(n, fraction, seed):
    items = [f"item{i}" for i in range(n)]
    train, val = split_items(items, fraction, seed)
    assert (train, val) == split_items(list(items), fraction, seed)
    assert len(val) == expected_val_size(n, fraction)
    assert len(train) + len(val) == n
    assert not set(train) & set(val)
    assert set(train) | set(val) == set(items)
    # Both keep the original order.
    assert train == [s for s in items if s in set(train)]
    assert val == [s for s in items if s in set(val)]


def test_split_items_by_position_even_with_duplicate_items():
    items = ["same"] * 10 + ["other"] * 10
    train, val = split_items(items, 0.25, 3)
    assert len(train) == 15 and len(val) == 5 and sorted(train + val) == sorted(items)


def test_split_items_depends_on_the_seed():
    items = [f"item{i}" for i in range(200)]
    vals = {tuple(split_items(items, 0.1, seed)[1]) for seed in range(5)}
    assert len(vals) == 5


def test_split_items_zero_fraction_keeps_everything_in_train():
    items = [f"item{i}" for i in range(10)]
    assert split_items(items, 0.0, 0) == (items, [])


# --------------------------------------------------------------------------- lines_of, pack_file (what pack runs)

BREAKS = "\n\v\f\x1c\x1d\x1e\x85\u2028\u2029"  # where str.splitlines() breaks, "\r" aside (read as "\n")


@settings(max_examples=200, deadline=None)
@given(text=st.text(st.sampled_from("ab\u00e9" + BREAKS), max_size=40), cuts=st.lists(st.integers(1, 39), max_size=8))
def test_lines_of_is_splitlines_at_any_chunking(text, cuts):
    bounds = sorted({0, len(text), *(c for c in cuts if c < len(text))})
    chunks = [text[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]
    assert [line for lines in data.lines_of(chunks) for line in lines] == text.splitlines()


def test_lines_of_joins_a_line_longer_than_many_chunks_once():
    chunks = ["ab"] * 1000 + ["c\nd", "e"]
    assert list(data.lines_of(chunks)) == [["ab" * 1000 + "c"], ["de"]]


@settings(max_examples=150, deadline=None)
@given(items=st.lists(item_text, max_size=14), val_fraction=st.sampled_from([0.0, 0.3, 0.5, 0.99]),
       seed=st.integers(0, 5), chunk=st.sampled_from([1, 2, 5, 1 << 18]), newline=st.sampled_from(["\n", "\r\n"]))
def test_pack_file_is_encode_items_of_split_items(tmp_path_factory, items, val_fraction, seed, chunk, newline):
    """pack_file reads a split twice, a chunk at a time; its streams are those of the whole text, as pack made
    them before, also for empty items (a trailing one included), no items at all and CRLF line ends."""
    path = tmp_path_factory.mktemp("pack") / "train.txt"
    path.write_bytes("".join(item + newline for item in items).encode("utf-8"))
    saved = data._CHUNK
    data._CHUNK = chunk
    try:
        halves = data.pack_file(VOCAB, path, "prepared train split", "rerun", val_fraction, seed)
    finally:
        data._CHUNK = saved
    for (stream, n), expected in zip(halves, split_items(items, val_fraction, seed), strict=True):
        assert n == len(expected)
        assert stream.dtype == VOCAB.dtype
        assert stream.tolist() == encode_items(VOCAB, "\n".join(expected)).tolist()


def test_pack_file_errors_name_the_file_as_read_text_does(tmp_path):
    with pytest.raises(CharlmError, match="prepared test split not found; rerun"):
        data.pack_file(VOCAB, tmp_path / "missing.txt", "prepared test split", "rerun")
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"ab\n" * 100_000 + b"\xff\n")
    with pytest.raises(CharlmError, match=r"prepared train split is not UTF-8 \(byte 300000\); rerun"):
        data.pack_file(VOCAB, bad, "prepared train split", "rerun")


# --------------------------------------------------------------------------- Batches


def unique_stream(length: int) -> np.ndarray:
    # Every position holds a different value, so a window proves where it was cut from.
    return np.arange(length, dtype=np.uint16)


@settings(max_examples=100, deadline=None)
@given(length=st.integers(2, 400), seq_len=st.integers(1, 24), batch_size=st.integers(1, 8),
       world=st.integers(1, 3), seed=st.integers(0, 2**31))
def test_batches_windows_cover_each_epoch_once(length, seq_len, batch_size, world, seed):
    stream = unique_stream(length)
    n = n_windows(length, seq_len)
    assert n == (length - 1) // seq_len
    if n < batch_size * world:
        with pytest.raises(CharlmError, match="windows"):
            Batches(stream, seq_len, batch_size, seed, rank=0, world=world)
        return
    ranks = [Batches(stream, seq_len, batch_size, seed, rank=r, world=world) for r in range(world)]
    whole = Batches(stream, seq_len, batch_size * world, seed)
    per_epoch = ranks[0].per_epoch
    assert per_epoch == n // (batch_size * world) == whole.per_epoch
    for epoch in (0, 1):
        seen = []
        for index in range(per_epoch):
            starts = []
            for b in ranks:
                x, y = b.batch(epoch, index)
                s = b.starts(epoch, index)
                assert x.shape == y.shape == (batch_size, seq_len)
                assert x.dtype == y.dtype == np.int64
                for row_x, row_y, start in zip(x, y, s):
                    window = stream[start:start + seq_len + 1]
                    assert len(window) == seq_len + 1
                    assert row_x.tolist() == window[:-1].tolist()
                    assert row_y.tolist() == window[1:].tolist()
                assert (x[:, 1:] == y[:, :-1]).all()  # targets are the inputs shifted by one
                starts.append(s)
            # The ranks' batches are disjoint and together are the single-process batch of the world's size.
            together = np.concatenate(starts)
            assert len(set(together.tolist())) == batch_size * world
            assert together.tolist() == whole.starts(epoch, index).tolist()
            seen += together.tolist()
        assert len(seen) == len(set(seen)) == per_epoch * batch_size * world
        assert all(s % seq_len == 0 and 0 <= s // seq_len < n for s in seen)
        assert n - len(seen) < batch_size * world  # only the remainder is dropped
    # The same seed gives the same order, from a fresh iterator too.
    again = Batches(stream, seq_len, batch_size, seed, rank=0, world=world)
    for index in range(per_epoch):
        assert again.starts(1, index).tolist() == ranks[0].starts(1, index).tolist()
    with pytest.raises(IndexError):
        ranks[0].batch(0, per_epoch)
    with pytest.raises(IndexError):
        ranks[0].batch(0, -1)


def all_starts(b: Batches, epoch: int) -> list[int]:
    return [s for i in range(b.per_epoch) for s in b.starts(epoch, i).tolist()]


def test_batches_epochs_differ_and_seeds_differ():
    stream = unique_stream(32 * 40 + 1)
    b = Batches(stream, 32, 4, seed=0)
    assert b.n_windows == 40 and b.per_epoch == 10
    e0, e1, e2 = all_starts(b, 0), all_starts(b, 1), all_starts(b, 2)
    assert e0 != e1 and e1 != e2 and e0 != e2
    assert sorted(e0) == sorted(e1) == list(range(0, 32 * 40, 32))
    assert all_starts(b, 0) == e0  # going back to an epoch gives its order again
    assert all_starts(Batches(stream, 32, 4, seed=1), 0) != e0
    assert all_starts(Batches(stream, 32, 4, seed=0), 1) == e1


def test_batches_read_memory_mapped_uint8_streams(tmp_path):
    stream = (np.arange(1000) % 250).astype(np.uint8)
    write_npy(tmp_path / "s.npy", stream)
    mapped = np.load(tmp_path / "s.npy", mmap_mode="r")
    x, y = Batches(mapped, 10, 3, seed=5).batch(0, 0)
    ref = Batches(stream, 10, 3, seed=5).batch(0, 0)
    assert (x == ref[0]).all() and (y == ref[1]).all() and x.dtype == np.int64


@pytest.mark.parametrize("length, seq_len, batch_size, world", [
    (2, 2, 1, 1),     # one token after <eos>: no window of two
    (11, 10, 2, 1),   # one window, a batch needs two
    (41, 10, 3, 2),   # four windows, a global batch needs six
])
def test_batches_too_few_windows(length, seq_len, batch_size, world):
    with pytest.raises(CharlmError) as info:
        Batches(unique_stream(length), seq_len, batch_size, 0, rank=0, world=world)
    message = str(info.value)
    assert f"pack.seq_len={seq_len}" in message and f"train.batch_size={batch_size}" in message
    assert "\n" not in message


# --------------------------------------------------------------------------- window_starts (pack.align)


@settings(max_examples=200, deadline=None)
@given(items=st.lists(item_text.filter(bool), min_size=1, max_size=12), seq_len=st.integers(1, 20))
def test_item_windows_start_at_items_and_cover_every_target(items, seq_len):
    stream = encode_items(VOCAB, "\n".join(items))
    starts = window_starts(stream, seq_len, "item")
    last = len(stream) - seq_len - 1  # the last offset where a whole window fits
    if last < 0:
        assert len(starts) == 0
        return
    assert starts.dtype == np.int64 and (np.diff(starts) > 0).all() and 0 <= starts[0] and starts[-1] <= last
    eos = np.flatnonzero(stream == EOS_ID)
    # Every item whose window fits gets one starting at its <eos>: the state the evaluation scores it from.
    assert set(eos[eos <= last].tolist()) <= set(starts.tolist())
    # The others continue their item a whole number of windows on, or were pulled back to the last offset.
    opening = eos[np.searchsorted(eos, starts, side="right") - 1]
    assert all((s - o) % seq_len == 0 or s == last for s, o in zip(starts.tolist(), opening.tolist()))
    # Every token after the first is a target of some window.
    covered = np.zeros(len(stream), dtype=bool)
    for s in starts.tolist():
        covered[s + 1:s + seq_len + 1] = True
    assert covered[1:].all()


def test_item_windows_of_a_long_item_continue_every_seq_len():
    stream = encode_items(VOCAB, "\n".join(["abcdefghab", "ab", "abc"]))  # <eos> at 0, 11, 14, 18
    assert window_starts(stream, 4, "item").tolist() == [0, 4, 8, 11, 14]
    assert window_starts(stream, 5, "item").tolist() == [0, 5, 10, 11, 13]  # 13: 14 pulled back to fit
    assert window_starts(stream, 4, "stream").tolist() == [0, 4, 8, 12]
    assert window_starts(stream, 18, "item").tolist() == [0]


@given(length=st.integers(1, 300), seq_len=st.integers(1, 40))
def test_stream_windows_tile_the_stream(length, seq_len):
    stream = unique_stream(length)
    assert window_starts(stream, seq_len, "stream").tolist() == list(range(0, n_windows(length, seq_len) * seq_len,
                                                                        seq_len))


def test_item_aligned_batches_visit_every_item_window_once_per_epoch():
    stream = encode_items(VOCAB, "\n".join(["abcdefgh" * (i % 3 + 1) for i in range(40)]))
    b = Batches(stream, 12, 5, seed=3, align="item")
    expected = window_starts(stream, 12, "item")
    assert b.n_windows == len(expected) and b.per_epoch == len(expected) // 5
    for epoch in (0, 1):
        seen = all_starts(b, epoch)
        assert len(set(seen)) == len(seen) == b.per_epoch * 5 and set(seen) <= set(expected.tolist())
    x, y = b.batch(0, 0)
    starts = b.starts(0, 0)
    assert (x[:, 0] == stream[starts]).all() and (y[:, -1] == stream[starts + 12]).all()


@settings(max_examples=300, deadline=None)
@given(tokens=st.lists(st.integers(0, 3), max_size=40), seq_len=st.integers(1, 12),
       align=st.sampled_from(["item", "stream"]), chunk=st.sampled_from([1, 3, 1 << 18]))
def test_count_windows_is_the_number_of_window_starts(tokens, seq_len, align, chunk):
    """pack records count_windows (memory O(items)); training draws from window_starts: they must agree."""
    stream = np.array(tokens, dtype=np.uint8)
    saved = data._CHUNK
    data._CHUNK = chunk
    try:
        assert data.eos_positions(stream).tolist() == np.flatnonzero(stream == EOS_ID).tolist()
        assert data.count_windows(stream, seq_len, align) == len(window_starts(stream, seq_len, align))
    finally:
        data._CHUNK = saved


@settings(max_examples=100, deadline=None)
@given(items=st.lists(item_text.filter(bool), min_size=1, max_size=12), seq_len=st.integers(1, 20))
def test_count_windows_of_packed_items(items, seq_len):
    stream = encode_items(VOCAB, "\n".join(items))
    for align in ("item", "stream"):
        assert data.count_windows(stream, seq_len, align) == len(window_starts(stream, seq_len, align))


# --------------------------------------------------------------------------- item_bounds


@settings(max_examples=100, deadline=None)
@given(items=items_strategy)
def test_item_bounds_find_every_non_empty_item(items):
    stream = encode_items(VOCAB, "\n".join(items))
    starts, lengths = item_bounds(stream, EOS_ID)
    found = [VOCAB.decode(stream[s:s + n]) for s, n in zip(starts.tolist(), lengths.tolist())]
    assert found == [item for item in items if item]
    assert all(stream[s - 1] == EOS_ID and stream[s + n] == EOS_ID for s, n in zip(starts, lengths))


# --------------------------------------------------------------------------- load_packed


@pytest.fixture
def packed(tmp_path):
    directory = tmp_path / "packed"
    streams = {split: encode_items(VOCAB, text) for split, text in
               [("train", "abc\nde\nf" * 20), ("val", "gh\na"), ("test", "\u00e9\u6771\nb")]}
    for split, stream in streams.items():
        write_npy(directory / f"{split}.npy", stream)
    meta = {"format": data.FORMAT, "splits": {s: {"tokens": len(v)} for s, v in streams.items()}}
    write_json(directory / "meta.json", meta)
    return directory, streams, meta


def test_load_packed_round_trip(packed):
    directory, streams, meta = packed
    got = load_packed(directory)
    assert got.meta == meta
    for split, stream in streams.items():
        assert got.streams[split].dtype == stream.dtype
        assert got.streams[split].tolist() == stream.tolist()


def load_error(directory) -> str:
    with pytest.raises(CharlmError) as info:
        load_packed(directory)
    message = str(info.value)
    assert "\n" not in message and "dvc repro pack" in message
    return message


@pytest.mark.parametrize("keep", [0, 10, 100, 127, -1])
def test_load_packed_truncated_npy(packed, keep):
    directory, _, _ = packed
    path = directory / "val.npy"
    raw = path.read_bytes()
    path.write_bytes(raw[:keep] if keep >= 0 else raw[:-1])
    message = load_error(directory)
    assert str(path) in message


def test_load_packed_missing_npy(packed):
    directory, _, _ = packed
    (directory / "test.npy").unlink()
    assert str(directory / "test.npy") in load_error(directory)


def test_load_packed_npy_disagrees_with_meta(packed):
    directory, streams, _ = packed
    write_npy(directory / "train.npy", streams["train"][:-5])
    message = load_error(directory)
    assert "train.npy" in message and str(len(streams["train"])) in message


def test_load_packed_2d_array(packed):
    directory, streams, meta = packed
    write_npy(directory / "val.npy", streams["val"].reshape(1, -1))
    assert "val.npy" in load_error(directory)


@pytest.mark.parametrize("meta, expected", [
    (None, "not found"),
    ({"format": "charlm-packed/0"}, "unknown format"),
    ({"format": data.FORMAT}, "meta.json"),
    ({"format": data.FORMAT, "splits": {}}, "train"),
    ({"format": data.FORMAT, "splits": []}, "train"),
    ({"format": data.FORMAT, "splits": {"train": {}}}, "train"),
])
def test_load_packed_bad_meta(packed, meta, expected):
    directory, _, _ = packed
    if meta is None:
        (directory / "meta.json").unlink()
    else:
        write_json(directory / "meta.json", meta)
    message = load_error(directory)
    assert "meta.json" in message and expected in message


def test_load_packed_truncated_meta(packed):
    directory, _, _ = packed
    path = directory / "meta.json"
    path.write_bytes(path.read_bytes()[:15])
    assert "not valid JSON" in load_error(directory)


# --------------------------------------------------------------------------- memory of the data stages

PEAK_RSS = """import json, os, sys
pid = os.fork()
if pid == 0:
    os.execv(sys.executable, [sys.executable] + sys.argv[1:])
_, status, usage = os.wait4(pid, 0)
print(json.dumps([usage.ru_maxrss * 1024, os.waitstatus_to_exitcode(status)]), file=sys.stderr)
"""
MiB = 1 << 20


def peak_rss(cwd, *args: str) -> int:
    """Peak resident set size in bytes of a fresh `python *args` in `cwd` (ru_maxrss, as bench/run.py reads it)."""
    proc = subprocess.run([sys.executable, "-c", PEAK_RSS, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=600)
    peak, code = json.loads(proc.stderr.strip().splitlines()[-1])
    assert code == 0, proc.stderr[-3000:]
    return peak


@pytest.mark.slow
def test_data_stages_memory_is_about_the_corpus_once(tmp_path):
    """prepare, vocab and pack stream the text: each peaks at about the corpus once (pack's encoded streams)
    above the interpreter with their imports, never at several copies of it (they were 3x to 9x the corpus)."""
    p = raw_project(tmp_path / "repo")
    rng = np.random.default_rng(0)
    # A few characters outside Latin-1 make Python strings 2 bytes a character, as in real text.
    words = np.array(WORDS + ["caf\u00e9", "\u2014", "it\u2019s"])
    with open(p.path / "data/raw/train.csv", "w", encoding="utf-8") as f:
        for _ in range(60):
            n = rng.integers(5, 80, size=1000)
            ids = np.split(rng.integers(0, len(words), size=int(n.sum())), np.cumsum(n)[:-1])
            f.write("".join(" ".join(words[i]) + "\n" for i in ids))
    (p.path / "data/raw/test.csv").write_text("the market rose\nshares fell\n" * 5000, encoding="utf-8")
    p.set_params(prepare={"format": "lines"}, pack={"seq_len": 100, "val_fraction": 0.05})
    corpus = sum(f.stat().st_size for f in (p.path / "data/raw").iterdir())
    assert corpus > 10 * MiB
    base = peak_rss(p.path, "-c", "import numpy, yaml, charlm.core.corpus, charlm.core.data, charlm.core.vocab, charlm.pipeline.params")
    for stage in ("prepare", "vocab", "pack"):
        extra = peak_rss(p.path, "-m", f"stages.{stage}") - base
        assert extra < 1.3 * corpus + 16 * MiB, (stage, extra / MiB, corpus / MiB)
