"""Atomic file output: every artifact is written to a temp file beside it and renamed into place.

A killed stage therefore leaves either the old file, the complete new file, or nothing; never a
truncated file for DVC to cache.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from charlm.base.errors import CharlmError


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path next to `path`; on success fsync it and rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        _unlink(tmp)
        _raise_if_full(e, path)
        raise
    except BaseException:
        _unlink(tmp)
        raise


@contextlib.contextmanager
def all_or_none() -> Iterator[list[Path]]:
    """For a stage that writes several output files: yields a list to append each finished output to; if the
    block fails (a full disk on the second file, Ctrl-C), those are removed again, so DVC never finds some of
    the stage's new outputs without the others."""
    written: list[Path] = []
    try:
        yield written
    except BaseException:
        for path in written:
            _unlink(Path(path))
        raise


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temp directory next to `path`; on success it replaces `path` as a whole.

    A killed writer leaves the old directory, the complete new one, or none: never a directory with some
    files missing or half written (DVC caches a directory output as it finds it)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    old = path.with_name(f".{path.name}.old-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        _raise_if_full(e, path)
        raise
    except CharlmError as e:  # a full disk while writing a file inside: name the output, not the temp directory
        shutil.rmtree(tmp, ignore_errors=True)
        raise CharlmError(str(e).replace(str(tmp), str(path))) from e.__cause__
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _raise_if_full(e: OSError, path: Path) -> None:
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        raise CharlmError(f"no space left on device while writing {path}; free disk space and rerun") from e
    if e.errno == errno.EFBIG:
        raise CharlmError(
            f"file too large while writing {path} (the file system's or the process's file-size "
            f"limit); free space, raise the limit (ulimit -f) and rerun"
        ) from e


def sweep_stale(path: Path) -> None:
    """Remove temp files that killed writers of `path` left beside it (`.NAME.tmp-PID`, `.NAME.old-PID`)."""
    try:
        siblings = list(path.parent.glob(f".{glob.escape(path.name)}.*-*"))
    except OSError:
        return
    for stale in siblings:
        kind, _, pid = stale.name[len(path.name) + 2 :].rpartition("-")
        if kind not in ("tmp", "old") or not pid.isdigit() or _alive(int(pid)):
            continue
        if stale.is_dir() and not stale.is_symlink():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            _unlink(stale)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # an earlier attempt of this very process, already given up
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: someone else's live process
        return True
    try:  # a killed writer stays a zombie until it is reaped: dead all the same
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rpartition(b")")[2].split()[0] != b"Z"
    except (OSError, IndexError):
        return True


def _unlink(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def markdown_cell(text: str | None) -> str:
    """Text as one cell of a Markdown table: pipes escaped, line breaks shown as ⏎ (a cell is one line)."""
    return "" if text is None else text.replace("|", "\\|").replace("\n", " ⏎ ")


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


def read_text_chunks(path: str | os.PathLike, what: str, fix: str, size: int = 1 << 20) -> Iterator[str]:
    """`read_text`, `size` characters at a time (no chunk is empty), so a large artifact is never whole in memory.
    Newlines are read as `read_text` reads them: "\\r\\n" and "\\r" arrive as "\\n", never split across chunks."""
    try:
        with open(path, encoding="utf-8") as f:
            while chunk := f.read(size):
                yield chunk
    except FileNotFoundError:
        raise CharlmError(f"{path}: {what} not found; {fix}") from None
    except UnicodeDecodeError:
        read_text(path, what, fix)  # the whole file once more, only to name the first bad byte as read_text does
        raise


def read_json(path: str | os.PathLike, what: str, fix: str) -> dict:
    """Read a JSON artifact; a missing or damaged file is a CharlmError naming `what` and `fix`."""
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except FileNotFoundError:
        raise CharlmError(f"{path}: {what} not found; {fix}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CharlmError(f"{path}: {what} is not valid JSON ({e}); {fix}") from None
    except RecursionError:  # a file from a remote may nest arrays deeper than the parser recurses
        raise CharlmError(f"{path}: {what} nests too deeply to be read; {fix}") from None
    if not isinstance(obj, dict):
        raise CharlmError(f"{path}: {what} must be a JSON object; {fix}")
    return obj


def write_npy(path: str | os.PathLike, array: np.ndarray) -> None:
    """The bytes of `np.save`, written through Python's file object so that a full disk raises
    OSError(ENOSPC) (np.save's C writer reports a short write without an errno)."""
    array = np.ascontiguousarray(array)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.lib.format.write_array_header_1_0(f, np.lib.format.header_data_from_array_1_0(array))
        f.write(array.data)


def read_npy(path: str | os.PathLike, fix: str, mmap: bool = True) -> np.ndarray:
    """Memory-map a .npy written by `write_npy`; a missing or truncated file is a CharlmError."""
    try:
        return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except FileNotFoundError:
        raise CharlmError(f"{path}: not found; {fix}") from None
    except (ValueError, OSError, EOFError) as e:
        raise CharlmError(f"{path}: unreadable or truncated array ({e}); {fix}") from None
