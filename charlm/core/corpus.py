"""Reading raw corpora into items (one string each) and repairing AG News escape debris.

Raw files are read a row or line at a time, never whole. Prepared corpora are UTF-8 text files with one item
per line, so later stages read them as plain text and never re-parse CSV. Items therefore never contain a newline.
"""

from __future__ import annotations

import codecs
import csv
import html
import re
from collections.abc import Iterator
from pathlib import Path

from charlm.base.errors import CharlmError

AG_NEWS_COLUMNS = ("label", "title", "description")

# AG News lost the '&' of HTML entities, usually to a space: "Europe #39;s", "said  quot;no quot;".
# An entity is only repaired when it follows a space, an '&' or the start, so "#1;" in prose stays.
_ENTITY = re.compile(r"(?:^|[ &])(#\d{2,4}|#x[0-9a-fA-F]{2,4}|quot|amp|lt|gt|apos|nbsp);")
_FULL_ENTITY = re.compile(r"&(#\d{2,4}|#x[0-9a-fA-F]{2,4}|[a-zA-Z]{2,8});")
# Only real HTML markup is dropped; Reuters tickers such as <TXN.N> are content and stay.
_TAG = re.compile(r"</?(?:a|b|i|p|br|em|strong|font|span|div|img|u)\b[^<>]*>", re.IGNORECASE)
_SPACE = re.compile(r"\s+")
_BRACKET = re.compile(r"([<>])")


def clean(text: str) -> str:
    """Repair AG News debris and normalise whitespace. Text without debris only has its spacing normalised."""
    text = text.replace("\\$", "$")  # an escaped dollar sign: "\$1 billion"
    text = text.replace("\\", " ")  # the CSV's newline escape: "second\team"
    # Literal '<' and '>' are content ("a <b> c" stays); only markup decoded from &lt;...&gt; is dropped.
    parts = _BRACKET.split(text)
    text = "".join(part if i % 2 else _repair(part) for i, part in enumerate(parts))
    return _SPACE.sub(" ", text).strip()


def _repair(text: str) -> str:
    text = _ENTITY.sub(_unescape, text)
    text = _FULL_ENTITY.sub(_unescape, text)
    return _TAG.sub(" ", text)


def _unescape(match: re.Match) -> str:
    out = html.unescape(f"&{match.group(1)};")
    # Leave anything that does not decode to one printable character, e.g. "#10;" in prose.
    return out if len(out) == 1 and out.isprintable() else match.group(0)


# Every line boundary that str.splitlines() knows: later stages split prepared files with it.
_LINE_BREAK = re.compile("\r\n|[\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029]")


def flatten(text: str) -> str:
    """Keep an item on one line without changing anything else."""
    return _LINE_BREAK.sub(" ", text)


_CHUNK = 1 << 20  # bytes checked, or characters normalised, at a time


def decode(raw: bytes, path: Path) -> str:
    if not raw.strip():
        raise CharlmError(f"{path}: the file is empty; check the download URL or the input file")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise CharlmError(
            f"{path}: line {line}: bytes {raw[e.start : e.start + 4]!r} are not UTF-8; convert the file to UTF-8"
        ) from None
    if "\x00" in text:
        line = text[: text.index("\x00")].count("\n") + 1
        raise CharlmError(f"{path}: line {line}: NUL byte, this is not a text file; check the input file")
    return text.removeprefix("\ufeff")


def check_text(path: Path) -> None:
    """`decode`'s checks (empty, not UTF-8, NUL) over the whole file, a chunk at a time. The readers below run it
    before they parse, so a file with an encoding problem anywhere is refused for that, as when it was decoded
    whole, and not for a CSV error on an earlier line."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    blank = True
    with open(path, "rb") as f:
        try:
            while chunk := f.read(_CHUNK):
                blank = blank and not chunk.strip()
                if b"\x00" in chunk:
                    break
                decoder.decode(chunk)
            else:
                decoder.decode(b"", final=True)
                if not blank:
                    return
        except UnicodeDecodeError:
            pass
    decode(Path(path).read_bytes(), path)  # a bad file: read whole once more, only to name the line as before


# Both readers open the file with newline="" (a CSV field may hold a newline; lines end at "\n", "\r" or
# "\r\n", untranslated) and utf-8-sig, which drops a leading BOM as `decode` does.


def ag_news_items(path: Path, fields: list[str], clean_text: bool, separator: str) -> Iterator[str]:
    """The items of an AG News CSV (no header; label, title, description), a row at a time, checking every row."""
    check_text(path)
    # Every field is read as a string (a title such as "NaN" or "1" stays text), and every row is checked:
    # a short row is an error, not a row padded with empty fields.
    picks = [AG_NEWS_COLUMNS.index(f) for f in fields]
    fix = clean if clean_text else flatten
    row, line = 0, 1
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f, strict=True)
        try:
            for record in reader:
                if record:  # a blank line
                    row += 1
                    if len(record) != 3:
                        raise CharlmError(
                            f"{path}: line {line}: row {row} has {len(record)} columns, expected 3 "
                            f"(label, title, description); is this an AG News CSV? "
                            f"For plain text use prepare.format: lines"
                        )
                    if record[0] not in ("1", "2", "3", "4"):
                        raise CharlmError(
                            f"{path}: line {line}: row {row}: label {record[0]!r} is outside 1..4; "
                            f"is this an AG News CSV? For plain text use prepare.format: lines"
                        )
                    yield fix(separator.join(record[i] for i in picks))
                line = reader.line_num + 1
        except csv.Error as e:
            raise CharlmError(
                f'{path}: line {line}: malformed CSV ({e}); each row must be "label","title","description"'
            ) from None
    if not row:
        raise CharlmError(f"{path}: the file has no rows; check the download URL or the input file")


def line_items(path: Path, clean_text: bool) -> Iterator[str]:
    """Plain UTF-8 text, one item per line (a char-rnn style input.txt), a line at a time: the items of
    `text.splitlines()`."""
    check_text(path)
    with open(path, encoding="utf-8-sig", newline="") as f:
        # Each line is split once more at the boundaries that only splitlines() knows ("\v", "\x85", ...), and is
        # dropped once split, so that a very long line is not held once more beside its item.
        for items in map(str.splitlines, f):
            for item in items:
                yield normalise_space(item) if clean_text else item


def normalise_space(line: str) -> str:
    """`_SPACE.sub(" ", line).strip()`, a megabyte at a time (cut at whitespace): one regex pass over a 50 MB
    line holds millions of temporary strings at once, many times the line in memory."""
    if len(line) <= _CHUNK:
        return " ".join(line.split())
    pieces, start = [], 0
    while start < len(line):
        cut = _SPACE.search(line, min(start + _CHUNK, len(line)))  # never inside a word
        end = cut.start() if cut else len(line)
        piece = " ".join(line[start:end].split())
        if piece:
            pieces.append(piece)
        start = end
    return " ".join(pieces)
