"""The character vocabulary: stable ids, encoding, dtype, and its JSON file (charlm/core/vocab.py)."""
from __future__ import annotations

import copy
import json
from collections import Counter

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from charlm.base.errors import CharlmError
from charlm.base.io import read_text, read_text_chunks
from charlm.core import vocab as V
from charlm.core.vocab import EOS_ID, PAD_ID, UNK_ID, Vocab

TEXT = "the cat sat on the mat\nthe dog ate\n"


def test_special_ids():
    assert (PAD_ID, EOS_ID, UNK_ID) == (0, 1, 2)
    v = Vocab.build(V.count_chars(TEXT), 1)
    assert v.itos[:3] == ["<pad>", "<eos>", "<unk>"]


def test_order_is_descending_count_then_code_point():
    counts = V.count_chars(TEXT)
    v = Vocab.build(counts, 1)
    expected = sorted((c for c in counts if c != "\n"), key=lambda c: (-counts[c], ord(c)))
    assert v.chars == expected
    # Spelled out: ' ' and 't' are the most frequent (7 each) and ' ' < 't'; ties further down by code point.
    assert counts[" "] == counts["t"] == 7 and v.chars[:2] == [" ", "t"]
    assert v.itos[3:5] == [" ", "t"]
    assert Vocab.build({"b": 2, "a": 2, "c": 3, "\u00e9": 2, "Z": 2}, 1).chars == ["c", "Z", "a", "b", "\u00e9"]


def test_order_does_not_depend_on_dict_order():
    counts = {"x": 1, "a": 5, "m": 5, "b": 1}
    reordered = dict(reversed(list(counts.items())))
    expected = ["<pad>", "<eos>", "<unk>", "a", "m", "b", "x"]
    assert Vocab.build(counts, 1).itos == Vocab.build(reordered, 1).itos == expected


def test_newline_is_never_a_character():
    v = Vocab.build(V.count_chars("a\n\n\n\nb\n"), 1)
    assert "\n" not in v.chars
    assert v.encode("a\nb").tolist() == [v.itos.index("a"), EOS_ID, v.itos.index("b")]


def test_min_count_cut_off_maps_rare_characters_to_unk():
    counts = {"a": 5, "b": 4, "c": 5, "z": 1}
    v = Vocab.build(counts, 5)
    assert v.chars == ["a", "c"]
    ids = v.encode("abcz").tolist()
    assert ids == [3, UNK_ID, 4, UNK_ID]
    assert v.decode(ids) == "a\ufffdc\ufffd"
    assert Vocab.build(counts, 1).chars == ["a", "c", "b", "z"]
    assert Vocab.build(counts, 6).chars == []


def test_unknown_characters_become_unk():
    v = Vocab(list("abc"))
    assert v.encode("a\u00e9b\U0001F600c\x00").tolist() == [3, UNK_ID, 4, UNK_ID, 5, UNK_ID]
    assert v.ids("a\u00e9b") == [3, UNK_ID, 4]
    assert v.unknown("xa\u00e9x") == ["x", "\u00e9"]


def test_newline_encodes_to_eos_and_decodes_back():
    v = Vocab(list("ab"))
    assert v.encode("\na\n\nb\n").tolist() == [EOS_ID, 3, EOS_ID, EOS_ID, 4, EOS_ID]
    assert v.decode([EOS_ID, 3, EOS_ID]) == "\na\n"
    assert v.decode([EOS_ID, 3], eos="<EOS>") == "<EOS>a"


def test_decode_drops_pad_and_out_of_range_ids():
    v = Vocab(list("ab"))
    assert v.decode([PAD_ID, 3, PAD_ID, 4, 99]) == "ab"


def test_encode_of_empty_text():
    v = Vocab(list("ab"))
    out = v.encode("")
    assert out.shape == (0,) and out.dtype == np.uint8


chars_strategy = st.lists(st.characters(exclude_categories=["Cs"], exclude_characters="\n"), min_size=1, max_size=40,
                          unique=True)


@settings(max_examples=100, deadline=None)
@given(chars=chars_strategy, data=st.data())
def test_encode_decode_round_trip(chars, data):
    v = Vocab(chars)
    text = data.draw(st.text(st.sampled_from(chars + ["\n"]), max_size=200))
    ids = v.encode(text)
    assert ids.dtype == v.dtype and len(ids) == len(text)
    assert ids.tolist() == [EOS_ID if c == "\n" else v.itos.index(c) for c in text]
    assert v.ids(text.replace("\n", "")) == v.encode(text.replace("\n", "")).tolist()
    assert v.decode(ids) == text
    assert int(ids.min(initial=3)) >= 1 and int(ids.max(initial=0)) < len(v)


@settings(max_examples=50, deadline=None)
@given(st.text(st.characters(exclude_categories=["Cs"]), max_size=300), st.integers(1, 4))
def test_build_from_counts(text, min_count):
    counts = V.count_chars(text)
    assert counts == {c: text.count(c) for c in set(text)}
    v = Vocab.build(counts, min_count)
    assert set(v.chars) == {c for c, n in counts.items() if n >= min_count and c != "\n"}
    assert len(v) == 3 + len(v.chars)
    keys = [(-counts[c], ord(c)) for c in v.chars]
    assert keys == sorted(keys)
    # Every character of the text is either itself or <unk> after a round trip.
    back = v.decode(v.encode(text))
    assert len(back) == len(text)
    assert all(b == c or (b == "\ufffd" and counts[c] < min_count) for b, c in zip(back, text))


def cjk(n: int) -> list[str]:
    return [chr(0x4E00 + i) for i in range(n)]


def test_dtype_widens_past_256_symbols():
    assert len(Vocab(cjk(253))) == 256 and Vocab(cjk(253)).dtype == np.uint8
    wide = Vocab(cjk(254))
    assert len(wide) == 257 and wide.dtype == np.uint16
    text = "".join(cjk(254)) + "\n" + chr(0x4E00 + 253)
    ids = wide.encode(text)
    assert ids.dtype == np.uint16
    assert int(ids.max()) == 256 and ids[0] == 3 and ids[254] == EOS_ID
    assert wide.decode(ids) == text


def test_dtype_widens_when_built_from_cjk_text():
    text = "".join(c * (300 - i) for i, c in enumerate(cjk(300)))
    v = Vocab.build(V.count_chars(text), 1)
    assert v.chars == cjk(300) and v.dtype == np.uint16
    assert v.decode(v.encode(text)) == text


def test_constructor_rejects_bad_characters():
    for chars in (["a", "a"], ["ab"], [""], ["<pad>"]):
        with pytest.raises(ValueError):
            Vocab(chars)


# --------------------------------------------------------------------------- the vocab.json file


@pytest.fixture
def saved(tmp_path):
    counts = V.count_chars(TEXT)
    v = Vocab.build(counts, 2)
    path = tmp_path / "vocab.json"
    v.save(path, counts, {"min_count": 2})
    return v, path, counts


def test_save_load_round_trip(saved):
    v, path, counts = saved
    loaded = Vocab.load(path)
    assert loaded.itos == v.itos and loaded.dtype == v.dtype
    assert loaded.encode(TEXT).tolist() == v.encode(TEXT).tolist()
    data = json.loads(path.read_text(encoding="utf-8"))
    assert data["format"] == V.FORMAT and data["size"] == len(v)
    assert data["specials"] == ["<pad>", "<eos>", "<unk>"]
    assert [t["id"] for t in data["tokens"]] == list(range(len(v)))
    assert all(t["count"] == counts.get(t["char"], 0) for t in data["tokens"])
    assert data["dropped"] == {c: n for c, n in counts.items() if n < 2 and c != "\n"}
    assert data["stats"] == {"min_count": 2}


def test_save_load_round_trip_with_awkward_characters(tmp_path):
    chars = ['"', "\\", "\t", "\u00a0", "\u2028", "\U0001F600", "\u6771", " ", "<", "{"]
    v = Vocab(chars)
    path = tmp_path / "vocab.json"
    v.save(path, {c: 1 for c in chars}, {})
    assert Vocab.load(path).itos == v.itos


def test_save_leaves_no_temp_file(saved):
    _, path, _ = saved
    assert [p.name for p in path.parent.iterdir()] == ["vocab.json"]


def edit(path, change):
    data = json.loads(path.read_text(encoding="utf-8"))
    change(data)
    path.write_text(json.dumps(data), encoding="utf-8")


def _set(key, value):
    return lambda d: d.__setitem__(key, value)


def _token(i, key, value):
    return lambda d: d["tokens"][i].__setitem__(key, value)


EDITS = {
    "id gap": _token(4, "id", 40),
    "id as string": _token(4, "id", "4"),
    "id null": _token(4, "id", None),
    "ids shuffled": lambda d: d["tokens"].reverse(),
    "duplicate char": lambda d: d["tokens"][4].__setitem__("char", d["tokens"][3]["char"]),
    "two-letter char": _token(4, "char", "ab"),
    "empty char": _token(4, "char", ""),
    "char not a string": _token(4, "char", 7),
    "char missing": lambda d: d["tokens"][4].pop("char"),
    "specials missing": lambda d: d.__setitem__(
        "tokens", [dict(t, id=t["id"] - 3) for t in d["tokens"][3:]]) or d.__setitem__("size", len(d["tokens"])),
    "specials swapped": lambda d: (_token(0, "char", "<eos>")(d), _token(1, "char", "<pad>")(d)),
    "tokens missing": lambda d: d.pop("tokens"),
    "tokens not a list": _set("tokens", {"a": 1}),
    "tokens null": _set("tokens", None),
    "tokens of ints": _set("tokens", [0, 1, 2]),
    "wrong format": _set("format", "charlm-vocab/0"),
    "format missing": lambda d: d.pop("format"),
    "last token deleted": lambda d: d["tokens"].pop(),
    "size wrong": _set("size", 3),
}


@pytest.mark.parametrize("change", list(EDITS.values()), ids=list(EDITS))
def test_hand_edited_vocab_is_rejected_naming_the_file(saved, change):
    _, path, _ = saved
    edit(path, change)
    with pytest.raises(CharlmError) as info:
        Vocab.load(path)
    message = str(info.value)
    assert str(path) in message and "\n" not in message and "dvc repro vocab" in message


@pytest.mark.parametrize("cut", [0, 1, 20, -2])
def test_truncated_vocab_is_rejected_naming_the_file(saved, cut):
    _, path, _ = saved
    raw = path.read_bytes()
    path.write_bytes(raw[:cut] if cut >= 0 else raw[:len(raw) // 2])
    with pytest.raises(CharlmError, match="not valid JSON") as info:
        Vocab.load(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("raw, expected", [
    (b"not json at all", "not valid JSON"),
    (b"[1, 2, 3]", "JSON object"),
    (b'{"format": "\xff"}', "not valid JSON"),
    (b"{}", "not a valid charlm vocabulary"),
])
def test_non_vocab_files_are_rejected(tmp_path, raw, expected):
    path = tmp_path / "vocab.json"
    path.write_bytes(raw)
    with pytest.raises(CharlmError, match=expected) as info:
        Vocab.load(path)
    assert str(path) in str(info.value)


def test_missing_vocab_file(tmp_path):
    with pytest.raises(CharlmError, match="not found") as info:
        Vocab.load(tmp_path / "vocab.json")
    assert "vocab.json" in str(info.value)


def test_unedited_copy_still_loads(saved):
    # The edit helper itself does not break a valid file.
    v, path, _ = saved
    edit(path, lambda d: copy.deepcopy(d))
    assert Vocab.load(path).itos == v.itos


# --------------------------------------------------------------------------- counting a split a chunk at a time


@pytest.mark.parametrize("size", [1, 2, 3, 1 << 20])
def test_chunked_counts_are_the_counts_of_read_text(tmp_path, size):
    """The vocab stage reads a split with read_text_chunks and adds up count_chars of each chunk."""
    path = tmp_path / "train.txt"
    path.write_bytes("ab\r\ncd\rx\n\u00e9\u6771\U0001F600\r\n\r".encode("utf-8") * 3)
    chunks = list(read_text_chunks(path, "prepared train split", "rerun", size))
    whole = read_text(path, "prepared train split", "rerun")
    assert "".join(chunks) == whole and all(0 < len(c) <= size for c in chunks)
    total: Counter[str] = Counter()
    for chunk in chunks:
        total.update(V.count_chars(chunk))
    assert total == V.count_chars(whole) and total["\n"] == 15


@pytest.mark.parametrize("data", [None, b"ab\n" * 5000 + b"\xff\n", b"ok\n\xe2\x82"])
def test_chunked_reading_fails_as_read_text_does(tmp_path, data):
    path = tmp_path / "train.txt"
    if data is not None:
        path.write_bytes(data)
    with pytest.raises(CharlmError) as whole:
        read_text(path, "prepared train split", "rerun `dvc repro prepare`")
    with pytest.raises(CharlmError) as chunked:
        list(read_text_chunks(path, "prepared train split", "rerun `dvc repro prepare`", 7))
    assert str(chunked.value) == str(whole.value)
