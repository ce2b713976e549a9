"""Hostile review of the playground's Run part (issue 26): each test proves one weakness with real parts (a real
git + DVC repository built as tests/test_runs.py builds it, the real server, real `dvc` commands), and failed
before its fix. The review's other findings are open in issue 26 (their tests: branch review-26).

DVC stays offline (the repositories copy the project's .dvc/config; DVC_NO_ANALYTICS is set too), and no DVC
worker outlives a test: the `repo` fixture stops the queue with --kill and waits for its workers."""

from __future__ import annotations

import http.client
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from test_runs import Server, make_repo, snapshot, stop_workers

from charlm.pipeline import queue

os.environ.setdefault("DVC_NO_ANALYTICS", "1")


@pytest.fixture(scope="module")
def baseline(tmp_path_factory) -> Path:
    return make_repo(tmp_path_factory.mktemp("hostile"))


@pytest.fixture
def repo(baseline, tmp_path, monkeypatch) -> Path:
    path = tmp_path / "repo"
    shutil.copytree(baseline, path, symlinks=True)
    monkeypatch.chdir(path)
    yield path
    stop_workers(path)


def post(port: int, path: str, body: dict, timeout: float = 120) -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    conn.request("POST", path, body=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    out = resp.status, json.loads(resp.read().decode())
    conn.close()
    return out


# --------------------------------------------------------------------------- 1. a sweep expanded before it is counted


def test_a_huge_sweep_is_refused_without_expanding_it():
    """form.sweeps() (what POST /api/runs/queue runs first) hands the overrides to DVC's get_hydra_sweeps, which
    materialises every combination with itertools.product BEFORE MAX_SWEEP is compared: two values of 20
    characters each, `range(0,100000)`, make 10**10 combinations, and the request thread allocates until the
    machine runs out of memory. Here in a child limited to 1.5 GB of address space and 60 s: the refusal must be
    the 'at most 16' one, quickly; today it is a MemoryError (or the child is killed)."""
    code = textwrap.dedent(
        """
        import resource, time
        resource.setrlimit(resource.RLIMIT_AS, (1536 << 20, 1536 << 20))
        from charlm.base.errors import CharlmError
        from charlm.pipeline import form
        t = time.monotonic()
        try:
            form.sweeps(["train.seed=range(0,100000)", "train.max_steps=range(0,100000)"])
            print("ACCEPTED")
        except CharlmError as e:
            print(f"REFUSED {time.monotonic() - t:.1f}s {e}")
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    out = proc.stdout.strip() or proc.stderr.strip()[-300:]
    assert proc.returncode == 0 and "at most 16" in out, out
    assert float(out.split()[1].rstrip("s")) < 5, out


# --------------------------------------------------------------------------- 2. interpolation reads the environment


@pytest.mark.slow
def test_a_value_cannot_read_the_server_s_environment(repo, monkeypatch):
    """DVC applies -S values with OmegaConf.to_object, which RESOLVES interpolations: a string field set to
    `${oc.env:NAME}` becomes the value of the server's environment variable NAME, in the queued experiment's
    params.yaml, its git commit, and the queue table that every watcher of the page is pushed. A request must not
    read the server's environment (nor other keys' values through ${...}); form.check() accepts it today."""
    monkeypatch.setenv("CHARLM_HOSTILE_SECRET", "s3cr3t-token-value")
    before = snapshot(repo)
    server = Server()
    try:
        status, answer = post(
            server.port,
            "/api/runs/queue",
            {"name": "leak", "values": {"train.sample_prompt": "${oc.env:CHARLM_HOSTILE_SECRET}"}},
        )
        rows = queue.experiments() if status == 200 else []
    finally:
        server.close()
    leaked = [r["params"] for r in rows if "s3cr3t-token-value" in json.dumps(r["params"])]
    assert snapshot(repo) == before
    assert not leaked, f"the server's environment variable is in the queued experiment's params: {leaked}"
    assert status == 400, answer


@pytest.mark.parametrize("value", ["${oc.env:CHARLM_HOSTILE_SECRET}", "cost ${x}", "a \\${b}", ["${oc.env:HOME}"]])
def test_a_string_with_an_interpolation_reads_back_the_same_through_dvc(tmp_path, monkeypatch, value):
    """override_text() is how a base experiment's params (queue.base_values) and the form's initial values become
    -S text; Hydra's quoted strings still resolve ${...}: a prompt holding `${oc.env:X}` comes back as the server's
    environment variable, `cost ${x}` cannot be queued at all, and `\\${b}` loses its backslash. (_quote must
    escape `${` as `\\${`.)"""
    from dvc.utils.hydra import apply_overrides

    from charlm.pipeline import form, params

    monkeypatch.setenv("CHARLM_HOSTILE_SECRET", "s3cr3t")
    path = tmp_path / "params.yaml"
    path.write_text("train:\n  key: 1\n", encoding="utf-8")
    try:
        apply_overrides(path, [f"train.key={form.override_text(value)}"])
    except Exception as e:
        pytest.fail(f"{value!r} as {form.override_text(value)!r} cannot be applied: {type(e.__cause__ or e).__name__}")
    assert params.read_yaml(path)["train"]["key"] == value
