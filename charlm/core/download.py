"""Fetching a corpus file: http(s):// with resume and back-off, file:// URLs and local paths, md5-verified.

A broken HTTP transfer is resumed with a Range request (or restarted if the server ignores it) up to `retries`
times; `timeout` bounds every wait. The file is written atomically: a failed fetch leaves nothing behind.
"""

from __future__ import annotations

import hashlib
import http.client
import socket
import time
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlparse
from urllib.request import url2pathname

from tqdm import tqdm

from charlm.base.errors import CharlmError
from charlm.base.io import atomic_path

RETRYABLE_HTTP = {408, 425, 429, 500, 502, 503, 504}
CHUNK = 1 << 16


def fetch(url: str, dest: Path, md5: str | None, timeout: float, retries: int, key: str) -> None:
    scheme = urlparse(url).scheme
    with atomic_path(dest) as tmp:
        if scheme in ("http", "https"):
            digest = _fetch_http(url, tmp, timeout, retries, key)
        elif scheme in ("file", "") or len(scheme) == 1:  # one letter: a Windows drive
            digest = _copy_local(url, tmp, key)
        else:
            raise CharlmError(f"{key}.url = {url!r}: unsupported scheme {scheme!r}; use http(s)://, file:// or a path")
        if md5 is not None and digest != md5:
            raise CharlmError(
                f"{url}: md5 mismatch: expected {md5}, got {digest}; check the file or set "
                f"{key}.md5 to {digest} (or null to skip the check)"
            )
    print(f"download: {dest} ({dest.stat().st_size:,} bytes, md5 {digest})")


def _copy_local(url: str, tmp: Path, key: str) -> str:
    path = Path(url2pathname(urlparse(url).path)) if url.startswith("file:") else Path(url)
    h = hashlib.md5()
    try:
        with open(path, "rb") as src, open(tmp, "wb") as out:
            while chunk := src.read(1 << 20):
                h.update(chunk)
                out.write(chunk)
    except FileNotFoundError:
        raise CharlmError(f"{path}: file not found; check {key}.url") from None
    except IsADirectoryError:
        raise CharlmError(f"{path}: is a directory, not a file; check {key}.url") from None
    return h.hexdigest()


def _fetch_http(url: str, tmp: Path, timeout: float, retries: int, key: str) -> str:
    h, got, total, failures = hashlib.md5(), 0, None, 0
    with (
        open(tmp, "wb") as out,
        tqdm(desc=tmp.name.split(".tmp")[0].lstrip("."), unit="B", unit_scale=True, disable=None, leave=False) as bar,
    ):
        while True:
            headers = {"User-Agent": "charlm"} | ({"Range": f"bytes={got}-"} if got else {})
            try:
                with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout) as r:
                    if got and r.status != 206:  # the server ignored Range: start again from byte 0
                        out.seek(0)
                        out.truncate()
                        bar.reset()
                        h, got = hashlib.md5(), 0
                    if total is None and r.headers.get("Content-Length"):
                        total = got + int(r.headers["Content-Length"])
                        bar.total = total
                    while chunk := r.read(CHUNK):
                        out.write(chunk)
                        h.update(chunk)
                        bar.update(len(chunk))
                        got += len(chunk)
                if total is not None and got < total:
                    raise http.client.IncompleteRead(b"", total - got)
                return h.hexdigest()
            except urllib.error.HTTPError as e:
                if e.code not in RETRYABLE_HTTP or failures >= retries:
                    raise CharlmError(f"{url}: HTTP {e.code} {e.reason}; check {key}.url") from None
                reason = f"HTTP {e.code}"
            except urllib.error.URLError as e:
                if isinstance(e.reason, ConnectionRefusedError):
                    raise CharlmError(f"{url}: connection refused; is the server up and {key}.url right?") from None
                if not isinstance(e.reason, (TimeoutError, socket.timeout)) or failures >= retries:
                    raise CharlmError(f"{url}: cannot connect ({e.reason}); check {key}.url and the network") from None
                reason = f"no answer within {timeout:g}s"
            except (TimeoutError, http.client.HTTPException, ConnectionError) as e:
                timed_out = isinstance(e, TimeoutError)
                reason = f"timed out, no data for {timeout:g}s" if timed_out else f"broke off at {got:,} bytes"
                if failures >= retries:
                    fix = "retry later" + (" or raise download.timeout" if timed_out else "")
                    raise CharlmError(f"{url}: {reason} of {total or '?'}, after {retries} retries; {fix}") from None
            failures += 1
            delay = min(0.5 * 2 ** (failures - 1), 8.0)
            tqdm.write(f"download: {reason}; retry {failures}/{retries} in {delay:g}s")
            time.sleep(delay)
