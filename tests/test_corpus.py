"""Reading raw corpora and repairing AG News escape debris (charlm/core/corpus.py)."""
from __future__ import annotations

import csv
import io

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from charlm.base.errors import CharlmError
from charlm.core import corpus

HREF = ('&lt;A HREF="http://www.investor.reuters.com/FullQuote.aspx?ticker=TXN.N target=/stocks/quickinfo/'
        'fullquote"&gt;TXN.N&lt;/A&gt;')

# Real-looking AG News debris and what `clean` makes of it.
REPAIRS = [
    ("The EU #39;s plans", "The EU's plans"),
    ("Europe #39;s biggest bank", "Europe's biggest bank"),
    (" #39;s start", "'s start"),
    ('He said  quot;no quot; on Monday', 'He said "no" on Monday'),
    (' quot;We are confident, quot; he said.', '"We are confident," he said.'),
    ("Procter  amp; Gamble", "Procter & Gamble"),
    ("AT amp;T Wireless", "AT&T Wireless"),
    ("shares rose  #36;10 to close", "shares rose $10 to close"),
    (" #36;5.5 billion deal", "$5.5 billion deal"),
    ("a \\$1 billion deal", "a $1 billion deal"),
    ("costs \\$2.50 a share", "costs $2.50 a share"),
    ("Reuters - Dock workers, the port's largest\\union of crane operators",
     "Reuters - Dock workers, the port's largest union of crane operators"),
    ("which keeps a habit\\of filing early\\returns", "which keeps a habit of filing early returns"),
    ("&lt;b&gt;Bold&lt;/b&gt;", "Bold"),
    ("&lt;p&gt;ADVERTISEMENT&lt;/p&gt;&lt;p&gt;Text", "ADVERTISEMENT Text"),
    ("first&lt;br/&gt;second", "first second"),
    ('&lt;img src="http://x/y.gif"&gt;Photo', "Photo"),
    ("&lt;strong&gt;Analysis&lt;/strong&gt; The market", "Analysis The market"),
    (HREF, "TXN.N"),
    (f"Texas Instruments Inc. {HREF} said", "Texas Instruments Inc. TXN.N said"),
    ("Texas Instruments Inc. &lt;TXN.N&gt; said on Monday", "Texas Instruments Inc. <TXN.N> said on Monday"),
    ("Microsoft Corp. &lt;MSFT.O&gt;", "Microsoft Corp. <MSFT.O>"),
    ("the war #151; and its cost", "the war\u2014 and its cost"),
    (" #151;", "\u2014"),
    ("Fish &amp; chips", "Fish & chips"),
    ("&quot;Hello&quot;", '"Hello"'),
    ("It&#39;s over", "It's over"),
    ("price of  #163;5", "price of \u00a35"),
    ("  Oil   prices\trise \n again  ", "Oil prices rise again"),
    ("\u00a0Oil\u2003prices\u3000rise", "Oil prices rise"),
    ("", ""),
    ("   ", ""),
]


@pytest.mark.parametrize("raw, expected", REPAIRS, ids=[r[:40] for r, _ in REPAIRS])
def test_clean_repairs_ag_news_debris(raw, expected):
    assert corpus.clean(raw) == expected


# Ordinary text that only has its whitespace normalised.
LOSSLESS = [
    "AT&T", "R&D spending", "S&P 500", "#1", "ranked #10; next", "C#", "C# and F#", "Q&A; more",
    "The \U0001F600 emoji \U0001F1EB\U0001F1F7", "caf\u00e9 na\u00efve r\u00e9sum\u00e9", "\u6771\u4eac\u3068\u5927\u962a",
    "\u041c\u043e\u0441\u043a\u0432\u0430", "a < b > c", "x<y and y>z", "<TXN.N>", "a <b>bold</b> c",
    "http://example.com/a?b=1&c=2", "https://x.org/#frag", "5;6", "3 ; 4", "semi;colon", "50% off",
    "back` tick", "he said 'ok'", 'he said "ok"', "e-mail: a@b.com", "1 #2; 3", "#hashtag;",
]


@pytest.mark.parametrize("text", LOSSLESS)
def test_clean_keeps_ordinary_text(text):
    assert corpus.clean(text) == " ".join(text.split())
    assert corpus.clean("  " + text.replace(" ", " \t ") + "\n") == " ".join(text.split())


@settings(max_examples=100, deadline=None)
@given(st.text(st.characters(exclude_categories=["Cs"], exclude_characters="\\&;")))
def test_clean_only_normalises_whitespace_without_debris_characters(text):
    assert corpus.clean(text) == " ".join(text.split())


@settings(max_examples=50, deadline=None)
@given(st.text(st.characters(exclude_categories=["Cs"])))
def test_clean_output_is_one_normalised_line(text):
    out = corpus.clean(text)
    assert out == " ".join(out.split())
    assert len(out.splitlines()) <= 1


def read_ag_news(path, fields, clean_text, separator) -> list[str]:
    return list(corpus.ag_news_items(path, fields, clean_text, separator))


def read_lines(path, clean_text) -> list[str]:
    return list(corpus.line_items(path, clean_text))


# --------------------------------------------------------------------------- read_ag_news


def write_csv(path, rows, *, bom=False, newline="\n"):
    buf = io.StringIO()
    csv.writer(buf, quoting=csv.QUOTE_ALL, lineterminator=newline).writerows(rows)
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + buf.getvalue().encode("utf-8"))
    return path


ROWS = [
    ("3", "Harbor Cranes Idle as Dock Talks Stall (Reuters)",
     "Reuters - Dock workers, the port's largest\\union of crane operators, are waiting again."),
    ("2", 'He said "no"', "Procter  amp; Gamble #39;s profit"),
    ("1", "NaN", "1"),
    ("4", "1", "null"),
]


@pytest.mark.parametrize("fields, expected", [
    (["title", "description"], [
        "Harbor Cranes Idle as Dock Talks Stall (Reuters) Reuters - Dock workers, the port's largest union "
        "of crane operators, are waiting again.",
        'He said "no" Procter & Gamble\'s profit', "NaN 1", "1 null"]),
    (["title"], ["Harbor Cranes Idle as Dock Talks Stall (Reuters)", 'He said "no"', "NaN", "1"]),
    (["description"], [
        "Reuters - Dock workers, the port's largest union of crane operators, are waiting again.",
        "Procter & Gamble's profit", "1", "null"]),
    (["description", "title"], [
        "Reuters - Dock workers, the port's largest union of crane operators, are waiting again. "
        "Harbor Cranes Idle as Dock Talks Stall (Reuters)",
        'Procter & Gamble\'s profit He said "no"', "1 NaN", "null 1"]),
])
def test_read_ag_news_selects_fields_and_cleans(tmp_path, fields, expected):
    path = write_csv(tmp_path / "train.csv", ROWS)
    assert read_ag_news(path, fields, True, " ") == expected


def test_read_ag_news_separator_and_no_clean(tmp_path):
    path = write_csv(tmp_path / "train.csv", [("1", "A  #39;s", "b\\c"), ("2", "multi\nline", "x\r\ny")])
    assert read_ag_news(path, ["title", "description"], False, " | ") == [
        "A  #39;s | b\\c", "multi line | x y"]


def test_read_ag_news_without_clean_keeps_every_item_on_one_line(tmp_path):
    # Later stages split prepared files with str.splitlines(), which also breaks at these characters.
    breaks = "\r\n \n \r \v \f \x1c \x1d \x1e \x85 \u2028 \u2029"
    path = write_csv(tmp_path / "train.csv", [("1", "a" + breaks + "b", "c")])
    (item,) = read_ag_news(path, ["title", "description"], False, " ")
    assert item.splitlines() == [item]
    assert item.startswith("a") and item.endswith("b c")


def test_read_ag_news_handles_quotes_commas_and_newlines_in_fields(tmp_path):
    path = tmp_path / "train.csv"
    path.write_bytes(b'"1","He said ""hi"", then left","a, b\nc"\n"2","x","y"\n')
    assert read_ag_news(path, ["title", "description"], True, " ") == ['He said "hi", then left a, b c', "x y"]


def test_read_ag_news_bom_and_crlf(tmp_path):
    plain = read_ag_news(write_csv(tmp_path / "a.csv", ROWS), ["title", "description"], True, " ")
    bom = read_ag_news(write_csv(tmp_path / "b.csv", ROWS, bom=True), ["title", "description"], True, " ")
    crlf = read_ag_news(write_csv(tmp_path / "c.csv", ROWS, newline="\r\n"), ["title", "description"], True, " ")
    both = read_ag_news(write_csv(tmp_path / "d.csv", ROWS, bom=True, newline="\r\n"),
                               ["title", "description"], True, " ")
    assert plain == bom == crlf == both
    assert len(plain) == 4 and not plain[0].startswith("\ufeff")


def test_read_ag_news_skips_blank_lines_and_accepts_unquoted(tmp_path):
    path = tmp_path / "train.csv"
    path.write_bytes(b'1,T1,D1\n\n2,T2,D2\n')
    assert read_ag_news(path, ["title", "description"], True, " ") == ["T1 D1", "T2 D2"]


def read_error(path, fields=("title", "description")) -> str:
    with pytest.raises(CharlmError) as info:
        read_ag_news(path, list(fields), True, " ")
    message = str(info.value)
    assert "\n" not in message
    assert str(path) in message
    return message


@pytest.mark.parametrize("data, expected", [
    (b'"1","T1","D1"\n"2","T2"\n"3","T3","D3"\n', ["line 2", "row 2", "2 columns", "expected 3"]),
    (b'"1","T1","D1"\n"2","T2","D2","extra"\n', ["line 2", "row 2", "4 columns", "expected 3"]),
    (b'"1","T1"\n"2","T2"\n', ["line 1", "row 1", "2 columns"]),
    (b'"1","T1","D1","x"\n"2","T2","D2","y"\n', ["line 1", "row 1", "4 columns"]),
    (b'"1","T1","multi\nline"\n"2","T2"\n', ["line 3", "row 2", "2 columns"]),
    (b'just some plain text\nanother line\n', ["line 1", "1 columns", "prepare.format: lines"]),
])
def test_read_ag_news_wrong_column_count(tmp_path, data, expected):
    path = tmp_path / "train.csv"
    path.write_bytes(data)
    message = read_error(path)
    for part in expected:
        assert part in message, (part, message)


@pytest.mark.parametrize("label", ["0", "5", "", "1.0", " 1", "label", "World"])
def test_read_ag_news_label_outside_1_to_4(tmp_path, label):
    path = write_csv(tmp_path / "train.csv", [("1", "a", "b"), ("2", "c", "d"), (label, "e", "f")])
    message = read_error(path)
    assert "row 3" in message and "line 3" in message and repr(label) in message and "1..4" in message


def test_read_ag_news_non_utf8_names_the_line(tmp_path):
    path = tmp_path / "train.csv"
    path.write_bytes(b'"1","a","b"\n"2","c","d"\n"3","caf\xe9","e"\n')
    message = read_error(path)
    assert "line 3" in message and "UTF-8" in message


@pytest.mark.parametrize("data", [b"", b"\n\n", b"   \r\n\t"])
def test_read_ag_news_empty_file(tmp_path, data):
    path = tmp_path / "train.csv"
    path.write_bytes(data)
    assert "empty" in read_error(path)


@pytest.mark.parametrize("data, expected", [
    (bytes(range(256)) * 8, "UTF-8"),
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "UTF-8"),
    (b'"1","T\x00","D"\n', "NUL"),
    (b"PK\x03\x04\x14\x00\x00\x00\x08\x00", "NUL"),
])
def test_read_ag_news_binary_garbage(tmp_path, data, expected):
    path = tmp_path / "train.csv"
    path.write_bytes(data)
    assert expected in read_error(path)


def test_read_ag_news_malformed_quoting(tmp_path):
    path = tmp_path / "train.csv"
    path.write_bytes(b'"1","a","b"\n"2","unterminated,"c"\n')
    message = read_error(path)
    assert "line 2" in message and "CSV" in message


# --------------------------------------------------------------------------- read_lines

LINE_BREAKS = "\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029"  # where str.splitlines() breaks


def test_read_lines_clean(tmp_path):
    path = tmp_path / "input.txt"
    text = "\ufeffFirst  Citizen:\r\n\tBefore we proceed \n\n caf\u00e9 \u6771\u4eac \U0001F600\nlast"
    path.write_bytes(text.encode())
    assert read_lines(path, True) == [
        "First Citizen:", "Before we proceed", "", "caf\u00e9 \u6771\u4eac \U0001F600", "last"]


def test_read_lines_keeps_text_without_clean(tmp_path):
    path = tmp_path / "input.txt"
    path.write_bytes("a  b\t\r\n #39;s &amp; \\x\n".encode())
    assert read_lines(path, False) == ["a  b\t", " #39;s &amp; \\x"]


@settings(max_examples=50, deadline=None)
@given(st.lists(st.text(st.characters(exclude_categories=["Cs"], exclude_characters=LINE_BREAKS + "\x00\ufeff"),
                        min_size=1), min_size=1, max_size=8).filter(lambda lines: "".join(lines).strip()))
def test_read_lines_round_trips_lines(tmp_path_factory, lines):
    path = tmp_path_factory.mktemp("lines") / "input.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8", newline="")
    assert read_lines(path, False) == lines
    assert read_lines(path, True) == [" ".join(line.split()) for line in lines]


@pytest.mark.parametrize("data, expected", [(b"", "empty"), (b"ok\n\xff\xfe\n", "line 2"), (b"a\x00b", "NUL")])
def test_read_lines_errors(tmp_path, data, expected):
    path = tmp_path / "input.txt"
    path.write_bytes(data)
    with pytest.raises(CharlmError) as info:
        read_lines(path, True)
    assert expected in str(info.value) and str(path) in str(info.value)


# --------------------------------------------------------------------------- streaming: the whole file is never held


@settings(max_examples=100, deadline=None)
@given(text=st.text(st.sampled_from("ab \u00e9" + LINE_BREAKS), max_size=40), pad=st.integers(0, 12),
       bom=st.booleans())
def test_read_lines_is_splitlines_of_the_whole_text(tmp_path_factory, text, pad, bom):
    """Lines are read a few KiB at a time; a "\r\n" that straddles two reads is still one line end."""
    text = "x" * (8192 - pad) + text  # so that line ends fall on the reader's 8 KiB boundary
    path = tmp_path_factory.mktemp("lines") / "input.txt"
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + text.encode("utf-8"))
    assert read_lines(path, False) == text.splitlines()


@pytest.mark.parametrize("pad", [8187, 8188, 8189, 8190, 8191, 8192])
def test_read_ag_news_crlf_across_read_boundaries(tmp_path, pad):
    rows = [("1", "x" * pad, "a\r\nb"), ("2", "t", "y" * pad), ("3", "u", "v")]
    for bom in (False, True):
        path = write_csv(tmp_path / f"{bom}.csv", rows, bom=bom, newline="\r\n")
        assert read_ag_news(path, ["title", "description"], False, " ") == [
            "x" * pad + " a b", "t " + "y" * pad, "u v"]


@pytest.mark.parametrize("data, expected", [
    (b'"1","T1"\n' + b'"2","a","b"\n' * 3 + b'"3","caf\xe9","e"\n', ["line 5", "UTF-8"]),
    (b'"1","T1","D1"\n"9","T2","D2"\n' + b'"2","a","b"\n' * 40_000 + b'"3","\x00","e"\n', ["line 40003", "NUL"]),
    (b'"1","unterminated,"c"\n' + b'"2","a","b"\n' * 200_000 + b'\xff\n', ["line 200002", "UTF-8"]),
])
def test_read_ag_news_checks_the_encoding_of_the_whole_file_first(tmp_path, data, expected):
    """The file is parsed a row at a time, but an encoding problem anywhere is still the error reported, as when
    the file was decoded whole, ahead of a bad row on an earlier line."""
    path = tmp_path / "train.csv"
    path.write_bytes(data)
    message = read_error(path)
    for part in expected:
        assert part in message, (part, message)


def test_readers_stream_items_without_reading_the_whole_file(tmp_path):
    path = tmp_path / "train.csv"
    path.write_bytes(b'"1","a","b"\n' * 100 + b'"2","T2"\n')  # row 101 is bad, found only when reached
    items = corpus.ag_news_items(path, ["title", "description"], True, " ")
    assert [next(items) for _ in range(100)] == ["a b"] * 100
    with pytest.raises(CharlmError, match="row 101 has 2 columns"):
        next(items)
    path.write_bytes(b"one\ntwo  words\n")
    assert list(corpus.line_items(path, True)) == ["one", "two words"]
