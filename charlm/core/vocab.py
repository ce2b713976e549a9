"""Character vocabulary with stable ids: specials first, then characters by descending count.

Encoding is vectorised: text becomes an array of code points, and one `searchsorted` maps them to ids.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from charlm.base.errors import CharlmError
from charlm.base.io import read_json, write_json

PAD, EOS, UNK = "<pad>", "<eos>", "<unk>"
SPECIALS = (PAD, EOS, UNK)
PAD_ID, EOS_ID, UNK_ID = 0, 1, 2
FORMAT = "charlm-vocab/1"


def count_chars(text: str, chunk: int = 1 << 20) -> dict[str, int]:
    """Character counts, a chunk at a time: memory stays O(chunk) next to the text, not 4x its length."""
    total: dict[int, int] = {}
    for i in range(0, len(text), chunk):
        codes, counts = np.unique(codepoints(text[i : i + chunk]), return_counts=True)
        for c, n in zip(codes.tolist(), counts.tolist(), strict=True):
            total[c] = total.get(c, 0) + n
    return {chr(c): total[c] for c in sorted(total)}


def codepoints(text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)


class Vocab:
    def __init__(self, chars: list[str]):
        if len(set(chars)) != len(chars) or any(len(c) != 1 for c in chars):
            raise ValueError("vocabulary characters must be distinct single characters")
        self.chars = list(chars)
        self.itos = list(SPECIALS) + self.chars
        # Sorted code points and their ids for vectorised lookup. A sentinel above every code point keeps
        # `searchsorted` in range and maps to <unk>.
        order = np.argsort([ord(c) for c in self.chars], kind="stable")
        self._codes = np.array([ord(self.chars[i]) for i in order] + [2**32 - 1], dtype=np.uint32)
        self._ids = np.array(list(order + len(SPECIALS)) + [UNK_ID], dtype=np.int64)
        self._stoi = {c: i for i, c in enumerate(self.itos)}

    @classmethod
    def build(cls, counts: dict[str, int], min_count: int) -> Vocab:
        """Keep characters seen at least `min_count` times; ties in count are broken by code point."""
        kept = [c for c, n in counts.items() if n >= min_count and c != "\n"]
        return cls(sorted(kept, key=lambda c: (-counts[c], ord(c))))

    def __len__(self) -> int:
        return len(self.itos)

    @property
    def dtype(self) -> np.dtype:
        """The smallest unsigned integer type that holds every id."""
        return np.dtype(np.uint8 if len(self) <= 2**8 else np.uint16 if len(self) <= 2**16 else np.uint32)

    def encode(self, text: str) -> np.ndarray:
        """Ids for each character; '\\n' separates items and becomes <eos>; unseen characters become <unk>."""
        cps = codepoints(text)
        pos = np.searchsorted(self._codes, cps)
        ids = np.where(self._codes[pos] == cps, self._ids[pos], UNK_ID)
        ids[cps == ord("\n")] = EOS_ID
        return ids.astype(self.dtype)

    def ids(self, text: str) -> list[int]:
        return [self._stoi.get(c, UNK_ID) for c in text]

    def decode(self, ids, eos: str = "\n") -> str:
        """Text for ids; <eos> becomes `eos`, <pad> is dropped, <unk> shows as U+FFFD."""
        out = []
        for i in ids:
            i = int(i)
            if i == EOS_ID:
                out.append(eos)
            elif i == UNK_ID:
                out.append("\ufffd")
            elif PAD_ID < i < len(self.itos):
                out.append(self.itos[i])
        return "".join(out)

    def unknown(self, text: str) -> list[str]:
        return sorted({c for c in text if c not in self._stoi})

    # ----------------------------------------------------------------- persistence

    def to_json(self, counts: dict[str, int], stats: dict) -> dict:
        return {
            "format": FORMAT,
            "size": len(self),
            "specials": list(SPECIALS),
            "tokens": [{"id": i, "char": c, "count": counts.get(c, 0)} for i, c in enumerate(self.itos)],
            "dropped": {c: counts[c] for c in sorted(counts, key=ord) if c not in self._stoi and c != "\n"},
            "stats": stats,
        }

    def save(self, path: str | Path, counts: dict[str, int], stats: dict) -> None:
        write_json(path, self.to_json(counts, stats))

    @classmethod
    def load(cls, path: str | Path) -> Vocab:
        fix = "rerun `dvc repro vocab`"
        data = read_json(path, "vocabulary", fix)
        try:
            tokens = data["tokens"]
            itos = [t["char"] for t in sorted(tokens, key=lambda t: t["id"])]
            if data.get("format") != FORMAT or [t["id"] for t in tokens] != list(range(len(tokens))):
                raise ValueError("bad format or ids")
            if tuple(itos[: len(SPECIALS)]) != SPECIALS:
                raise ValueError("specials missing")
            if data.get("size") != len(tokens):
                raise ValueError(f"size {data.get('size')!r} but {len(tokens)} tokens")
            return cls(itos[len(SPECIALS) :])
        except (KeyError, TypeError, ValueError) as e:
            raise CharlmError(f"{path}: not a valid charlm vocabulary ({e}); {fix}") from None
