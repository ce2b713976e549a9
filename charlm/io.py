"""Atomic file output: every artifact is written to a temp file beside it and renamed into place.

A killed stage therefore leaves either the old file, the complete new file, or nothing; never a
truncated file for DVC to cache.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
from pathlib import Path
from typing import Iterator

import numpy as np

from charlm.errors import CharlmError


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path next to `path`; on success fsync it and rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        _unlink(tmp)
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise CharlmError(f"no space left on device while writing {path}; free disk space and rerun") from e
        raise
    except BaseException:
        _unlink(tmp)
        raise


def _unlink(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | os.PathLike, obj) -> None:
    write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def read_text(path: str | os.PathLike, what: str, fix: str) -> str:
    """Read a UTF-8 artifact; a missing or undecodable file is a CharlmError naming `what` and `fix`."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CharlmError(f"{path}: {what} not found; {fix}") from None
    except UnicodeDecodeError as e:
        raise CharlmError(f"{path}: {what} is not UTF-8 (byte {e.start}); {fix}") from None


def read_json(path: str | os.PathLike, what: str, fix: str) -> dict:
    """Read a JSON artifact; a missing or damaged file is a CharlmError naming `what` and `fix`."""
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except FileNotFoundError:
        raise CharlmError(f"{path}: {what} not found; {fix}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CharlmError(f"{path}: {what} is not valid JSON ({e}); {fix}") from None
    if not isinstance(obj, dict):
        raise CharlmError(f"{path}: {what} must be a JSON object; {fix}")
    return obj


def write_npy(path: str | os.PathLike, array: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, array, allow_pickle=False)


def read_npy(path: str | os.PathLike, fix: str, mmap: bool = True) -> np.ndarray:
    """Memory-map a .npy written by `write_npy`; a missing or truncated file is a CharlmError."""
    try:
        return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except FileNotFoundError:
        raise CharlmError(f"{path}: not found; {fix}") from None
    except (ValueError, OSError, EOFError) as e:
        raise CharlmError(f"{path}: unreadable or truncated array ({e}); {fix}") from None
