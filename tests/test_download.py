"""stages/download.py as a subprocess against a real loopback HTTP server (and local files)."""
from __future__ import annotations

import socket

import pytest
from conftest import ag_news_rows, csv_bytes, md5

TRAIN = csv_bytes(ag_news_rows(150, seed=11))
TEST = csv_bytes(ag_news_rows(30, seed=12))


def configure(project, train_url, test_url, *, train_md5="auto", test_md5="auto", timeout=1.0, retries=1):
    project.set_params(download={
        "train": {"url": train_url, "md5": md5(TRAIN) if train_md5 == "auto" else train_md5},
        "test": {"url": test_url, "md5": md5(TEST) if test_md5 == "auto" else test_md5},
        "timeout": timeout, "retries": retries})


def serve(project, server, train_mode="ok", test_mode="ok", **kw):
    configure(project, server.serve("/train.csv", TRAIN, train_mode), server.serve("/test.csv", TEST, test_mode), **kw)


def raw_dir(project):
    return project.path / "data" / "raw"


def leftovers(project) -> list[str]:
    """Everything in data/raw that is not a finished output (temp files, partial downloads)."""
    d = raw_dir(project)
    return sorted(p.name for p in d.iterdir() if p.name not in ("train.csv", "test.csv")) if d.exists() else []


def succeeds(project):
    proc = project.stage("download")
    assert (raw_dir(project) / "train.csv").read_bytes() == TRAIN
    assert (raw_dir(project) / "test.csv").read_bytes() == TEST
    assert leftovers(project) == []
    return proc


def fails(project) -> str:
    """Run download, expect the one-line error and exit status 2; return the message."""
    proc = project.stage("download", check=False)
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("download: error: "), proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (raw_dir(project) / "train.csv").exists()
    assert leftovers(project) == []
    return lines[0]


def test_happy_path_with_md5(project, http_server):
    serve(project, http_server)
    proc = succeeds(project)
    assert md5(TRAIN) in proc.stdout and md5(TEST) in proc.stdout
    assert [path for path, _ in http_server.requests] == ["/train.csv", "/test.csv"]
    # A second run replaces the files in place.
    succeeds(project)


def test_md5_mismatch(project, http_server):
    wrong = md5(b"something else")
    serve(project, http_server, train_md5=wrong)
    message = fails(project)
    assert "md5 mismatch" in message and wrong in message and md5(TRAIN) in message
    assert "download.train.md5" in message


def test_null_md5_skips_the_check(project, http_server):
    serve(project, http_server, train_md5=None, test_md5=None)
    succeeds(project)


def test_404(project, http_server):
    configure(project, http_server.url("/missing.csv"), http_server.url("/test.csv"))
    message = fails(project)
    assert "HTTP 404" in message and "/missing.csv" in message and "download.train.url" in message
    assert not raw_dir(project).exists() or not any(raw_dir(project).iterdir())


def test_failure_on_the_test_split_leaves_no_train_file(project, http_server):
    configure(project, http_server.serve("/train.csv", TRAIN), http_server.url("/missing.csv"))
    message = fails(project)
    assert "HTTP 404" in message and "download.test.url" in message
    assert not (raw_dir(project) / "test.csv").exists()
    assert [path for path, _ in http_server.requests] == ["/train.csv", "/missing.csv"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_connection_refused(project):
    url = f"http://127.0.0.1:{free_port()}/train.csv"
    configure(project, url, url)
    message = fails(project)
    assert "connection refused" in message and url in message and "download.train.url" in message


def test_hanging_server_times_out(project, http_server):
    http_server.hang_seconds = 4.0
    serve(project, http_server, train_mode="hang", timeout=1.0, retries=1)
    message = fails(project)
    assert "timed out" in message and "download.timeout" in message
    # The first try and one retry.
    assert [path for path, _ in http_server.requests] == ["/train.csv", "/train.csv"]


def test_broken_transfer_resumes_with_range(project, http_server):
    serve(project, http_server, train_mode="die-once", retries=2)
    proc = succeeds(project)
    assert md5(TRAIN) in proc.stdout
    train_requests = [rng for path, rng in http_server.requests if path == "/train.csv"]
    assert train_requests == [None, f"bytes={len(TRAIN) // 3}-"]


def test_server_ignoring_range_restarts_from_zero(project, http_server):
    serve(project, http_server, train_mode="no-range", retries=2)
    succeeds(project)  # byte-identical: the partial first try was discarded, not prepended
    train_requests = [rng for path, rng in http_server.requests if path == "/train.csv"]
    assert train_requests == [None, f"bytes={len(TRAIN) // 3}-"]


def test_transfer_that_always_breaks_gives_up(project, http_server):
    serve(project, http_server, train_mode="die", retries=1)
    message = fails(project)
    assert "broke off" in message and "1 retries" in message
    assert len([p for p, _ in http_server.requests if p == "/train.csv"]) == 2


def test_file_url_and_local_path(project, tmp_path):
    src = tmp_path / "sources"
    src.mkdir()
    (src / "train.csv").write_bytes(TRAIN)
    (src / "test.csv").write_bytes(TEST)
    configure(project, (src / "train.csv").as_uri(), str(src / "test.csv"))
    succeeds(project)


def test_relative_local_path(project):
    (project.path / "inputs").mkdir()
    (project.path / "inputs" / "train.csv").write_bytes(TRAIN)
    (project.path / "inputs" / "test.csv").write_bytes(TEST)
    configure(project, "inputs/train.csv", "inputs/test.csv")
    succeeds(project)


def test_local_md5_mismatch(project, tmp_path):
    (tmp_path / "train.csv").write_bytes(TRAIN + b"extra")
    configure(project, str(tmp_path / "train.csv"), str(tmp_path / "train.csv"))
    message = fails(project)
    assert "md5 mismatch" in message and md5(TRAIN + b"extra") in message


@pytest.mark.parametrize("kind", ["path", "file-url"])
def test_missing_local_file(project, tmp_path, kind):
    missing = tmp_path / "nowhere" / "train.csv"
    configure(project, missing.as_uri() if kind == "file-url" else str(missing), str(missing))
    message = fails(project)
    assert "file not found" in message and str(missing) in message and "download.train.url" in message


def test_unsupported_scheme(project):
    configure(project, "ftp://example.com/train.csv", "ftp://example.com/test.csv")
    message = fails(project)
    assert "unsupported scheme 'ftp'" in message and "download.train.url" in message


def test_bad_download_params_stop_before_fetching(project, http_server):
    serve(project, http_server)
    project.set_params(download={"timeout": "fast"})
    message = fails(project)
    assert "download.timeout" in message and "'fast'" in message
    assert http_server.requests == []
