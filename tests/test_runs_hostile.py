"""Hostile review of the playground's Run part (issue 26): each test proves one weakness with real parts (a real
git + DVC repository built as tests/test_runs.py builds it, the real server, real `dvc` commands), and failed
before its fix. The review's other findings are open in issue 26 (their tests: branch review-26).

DVC stays offline (the repositories copy the project's .dvc/config; DVC_NO_ANALYTICS is set too), and no DVC
worker outlives a test: the `repo` fixture stops the queue with --kill and waits for its workers."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from test_runs import Server, make_repo, snapshot, states, stop_workers

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


def with_token(path: str, token: str | None) -> str:
    return path + ("&" if "?" in path else "?") + "token=" + token if token else path


def post(port: int, path: str, body: dict, timeout: float = 120, token: str | None = None) -> tuple[int, dict]:
    path = with_token(path, token)
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
            token=server.token,
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


# --------------------------------------------------------------------------- 3. the cap and the name under a race


def _concurrently(port: int, bodies: list[dict], token: str | None = None) -> list[tuple[int, dict]]:
    results: list = [None] * len(bodies)
    go = threading.Barrier(len(bodies))

    def one(i: int) -> None:
        go.wait()
        results[i] = post(port, "/api/runs/queue", bodies[i], timeout=300, token=token)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(320)
    return results


@pytest.mark.slow
def test_concurrent_requests_cannot_reuse_a_name(repo):
    """queue() checks 'name already used' against exp_show, then queues in a separate locked call: two requests
    at once both pass the check, and DVC itself queues a second experiment under a name already queued. The
    queue then holds two experiments called `twin`, which kill/remove/logs (by name) cannot tell apart."""
    before = snapshot(repo)
    server = Server()
    try:
        results = _concurrently(server.port, [{"name": "twin", "values": {"train.seed": str(10 + i)}}
                                              for i in range(4)], server.token)  # fmt: skip
    finally:
        server.close()
    names = [r["name"] for r in queue.experiments()]
    assert snapshot(repo) == before
    assert [s for s, _ in results].count(200) == 1, results
    assert names.count("twin") == 1, names


@pytest.mark.slow
def test_concurrent_requests_cannot_pass_the_queue_cap(repo, monkeypatch):
    """The global cap (MAX_QUEUED) is read and acted on in two separate locked calls: requests at once each see
    room for themselves. With a cap of 2 and 4 concurrent requests of one experiment each, at most 2 may wait."""
    monkeypatch.setattr(queue, "MAX_QUEUED", 2)
    server = Server()
    try:
        bodies = [{"name": f"cap{i}", "values": {"train.seed": str(20 + i)}} for i in range(4)]
        _concurrently(server.port, bodies, server.token)
    finally:
        server.close()
    waiting = [n for n, s in states().items() if s == "Queued"]
    assert len(waiting) <= 2, f"{len(waiting)} experiments wait in a queue capped at 2: {waiting}"


# --------------------------------------------------------------------------- 6. reads while DVC rewrites params.yaml


def _get(port: int, path: str, token: str | None = None) -> tuple[int, dict]:
    path = with_token(path, token)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    conn.request("GET", path, headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    out = resp.status, json.loads(resp.read().decode())
    conn.close()
    return out


@pytest.mark.slow
def test_the_form_read_while_another_request_queues_shows_the_workspace(repo):
    """`dvc exp run --queue` rewrites params.yaml in the workspace for a moment (the queue lock serialises DVC
    commands, but params.yaml is read OUTSIDE that lock: GET /api/runs/form, form.check's copy, experiments()'s
    'params that differ', the Models list). A page that reads the form while another request queues gets the
    queued experiment's values as the workspace's, or a params.yaml that DVC has just truncated (an error). Every
    answer must be the workspace's: model.hidden = 32."""
    server = Server()
    seen: list = []
    stop = threading.Event()

    def reader() -> None:
        while not stop.is_set():
            status, answer = _get(server.port, "/api/runs/form", server.token)
            hidden = next((f["value"] for f in answer.get("fields", []) if f["key"] == "model.hidden"), None)
            seen.append((status, hidden, answer.get("error")))

    t = threading.Thread(target=reader)
    try:
        t.start()
        for i in range(3):
            status, answer = post(
                server.port,
                "/api/runs/queue",
                {"name": f"w{i}", "values": {"model.hidden": "8,9,10,11", "train.seed": str(i)}},
                token=server.token,
            )
            assert status == 200, answer
    finally:
        stop.set()
        t.join(60)
        server.close()
    wrong = [s for s in seen if s[:2] != (200, "32")]
    kinds = list(dict.fromkeys(wrong))[:6]
    assert not wrong, f"{len(wrong)} of {len(seen)} form reads while queueing were not the workspace's: {kinds}"


# --------------------------------------------------------------------------- 7. the page at 420 px, hostile text


@pytest.mark.slow
def test_the_run_part_keeps_hostile_text_as_text_and_fits_420_px(repo):
    """HTML in a help comment of params.yaml, in a queued experiment's params and in a refused value's message
    stays text; long unbroken text in them scrolls inside its own box, not the page (420 px); no console error."""
    from test_browser import _browser_or_skip, start_server, stop_server

    executable = _browser_or_skip()
    long = "W" * 300
    text = (repo / "params.yaml").read_text(encoding="utf-8")
    text = text.replace("  sample_prompt:", f"  # <img src=x id=pwn-help> {long}\n  sample_prompt:", 1)
    (repo / "params.yaml").write_text(text, encoding="utf-8")
    proc, info = start_server(repo, [], "--run")
    try:
        port = int(info["origin"].rsplit(":", 1)[1])
        status, answer = post(port, "/api/runs/queue", {"name": "html", "values": {
            "train.sample_prompt": f"'<img src=x id=pwn-param>{long}'"}}, token=info["token"])  # fmt: skip
        assert status == 200, answer
        from playwright.sync_api import expect, sync_playwright

        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=executable)
            try:
                context = browser.new_context(viewport={"width": 420, "height": 900})
                page = context.new_page()
                problems: list[str] = []
                page.on("console", lambda m: m.type == "error" and problems.append(m.text))
                page.on("pageerror", lambda e: problems.append(str(e)))
                page.set_default_timeout(120_000)
                page.goto(info["url"])
                expect(page.locator("#run-table td.name", has_text="html")).to_be_visible()
                page.fill("#run-name", "bad")
                page.locator("#run-fields input[data-key='train.lr']").fill("<img src=x id=pwn-error>" + long)
                page.click("#run-queue")
                expect(page.locator("#run-error")).to_be_visible()
                assert page.locator("img#pwn-help, img#pwn-param, img#pwn-error").count() == 0
                page.locator("details.run-section", has_text="train").first.evaluate("d => d.open = true")
                sizes = page.evaluate("[document.documentElement.scrollWidth, document.documentElement.clientWidth]")
                wide = page.evaluate(
                    "[...document.querySelectorAll('#run *')].filter(e => e.getBoundingClientRect().right > 421"
                    " && !e.closest('.table-box') && !e.closest('pre')).slice(0, 4)"
                    ".map(e => e.tagName + '#' + e.id + '.' + e.className + ' '"
                    " + Math.round(e.getBoundingClientRect().right))"
                )
                # the one 400 is the refused value's answer
                assert not [m for m in problems if "status of 400" not in m], problems
                assert sizes[0] <= sizes[1] == 420, (sizes, wide)
            finally:
                browser.close()
    finally:
        stop_server(proc)


# --------------------------------------------------------------------------- 4. event streams without a bound


@pytest.mark.slow
def test_event_streams_are_bounded(repo):
    """A job's event stream is read once (jobs.claim) and generations are capped (Limits.generations); the Run
    part's stream id is neither: one POST /api/runs/watch gives an id that any number of connections may open at
    once, each holding a server thread for as long as it stays open. 40 connections on one id: at most 16 (the
    server's own bound on streams of work) may be admitted."""
    server = Server()
    socks = []
    try:
        stream = post(server.port, "/api/runs/watch", {}, token=server.token)[1]["stream"]
        admitted = 0
        for _ in range(40):
            s = socket.create_connection(("127.0.0.1", server.port), timeout=60)
            s.sendall(f"GET /api/runs/streams/{stream}/events?token={server.token} HTTP/1.1\r\n"
                      f"Host: 127.0.0.1:{server.port}\r\n\r\n"
                      .encode())  # fmt: skip
            socks.append(s)
        for s in socks:
            head = s.recv(64)
            admitted += head.startswith(b"HTTP/1.0 200") or head.startswith(b"HTTP/1.1 200")
        threads = sum(t.name.startswith("Thread-") or "process_request" in t.name for t in threading.enumerate())
    finally:
        for s in socks:
            with contextlib.suppress(OSError):
                s.close()
        server.close()
    assert admitted <= 16, f"{admitted} event streams admitted on one watch id ({threads} request threads)"


# --------------------------------------------------------------------------- 5. live curves read without a bound


def _info_file(dvc_dir: Path, name: str, root_dir: Path) -> None:
    from dvc.repo.experiments.executor.base import ExecutorInfo, TaskStatus

    info = ExecutorInfo(git_url="", baseline_rev="0" * 40, location="dvc-task", root_dir=str(root_dir),
                        dvc_dir=".dvc", name=name, status=TaskStatus.RUNNING)  # fmt: skip
    path = dvc_dir / "tmp" / "exps" / "run" / ("a" * 40) / (("a" * 40) + ".run")
    path.parent.mkdir(parents=True)
    info.dump_json(str(path))


def test_live_does_not_hang_on_a_fifo_in_the_run_folder(tmp_path):
    """live() opens dvclive/plots/metrics/<split>/bpc.tsv and reports/train_samples.md in the running copy with a
    plain read_text: a FIFO there (or a symlink to /dev/zero, a huge file) blocks the poller thread for good (or
    fills memory). The poller is then never replaced (_poller stays set), and no page sees the queue again until a
    restart. It must return within seconds."""
    run_dir = tmp_path / "copy"
    metrics = run_dir / "dvclive/plots/metrics/train"
    metrics.mkdir(parents=True)
    fifo = metrics / "bpc.tsv"
    os.mkfifo(fifo)
    _info_file(tmp_path / ".dvc", "stuck", run_dir)
    done = threading.Event()
    threading.Thread(target=lambda: (queue.live("stuck", tmp_path / ".dvc"), done.set()), daemon=True).start()
    returned = done.wait(5)
    if not returned:  # let the reader go: open the FIFO's other end and close it
        fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        os.close(fd)
        done.wait(5)
    assert returned, "queue.live() blocked on a FIFO in the run's dvclive folder"


def test_a_live_curve_pushed_to_the_page_is_bounded(tmp_path):
    """The whole curve is read, parsed and pushed to every watcher on every change (every 3 s while it runs), and
    the page draws it with Math.min(...points), which throws a RangeError past about 10**5 arguments in Chromium.
    A 400 000-row log (a long run with log_every: 1) gives one state event of several MB: live() should thin or
    cap it."""
    run_dir = tmp_path / "copy"
    metrics = run_dir / "dvclive/plots/metrics/train"
    metrics.mkdir(parents=True)
    rows = "".join(f"{i}\t{i}\t{4 - i / 1e6:.6f}\n" for i in range(400_000))
    (metrics / "bpc.tsv").write_text("timestamp\tstep\tbpc\n" + rows)
    _info_file(tmp_path / ".dvc", "long", run_dir)
    got = queue.live("long", tmp_path / ".dvc")
    assert got is not None
    size = len(json.dumps(got))
    assert len(got["train"]) <= 20_000 and size < 1_000_000, f"{len(got['train'])} points, {size:,} bytes a push"


# --------------------------------------------------------------------------- 8. names that git resolves first


@pytest.mark.slow
def test_a_name_that_git_resolves_is_refused_or_resolved_as_the_experiment(repo):
    """check_name() takes any [A-Za-z0-9][A-Za-z0-9_-]* name, and DVC queues `main`, `HEAD`, a tag or a sha prefix
    as an experiment name; but every later look-up by revision (dvc.scm.resolve_rev: params_show for 'start from',
    the Models list's and /api/curves' rev:<name>, Write, Read, Inside) tries git first. Starting a run from the
    finished experiment `main` silently starts it from the branch main's params instead."""
    dvc_bin = str(Path(sys.executable).parent / "dvc")
    subprocess.run(
        [dvc_bin, "exp", "run", "--temp", "-q", "-n", "main", "-S", "train.seed=1", "-S", "train.max_steps=5"],
        check=True, env=queue.env(), capture_output=True, timeout=600,
    )  # fmt: skip
    assert states().get("main") == "Success"  # the Run part lists it as a finished experiment named main
    problems = []
    got = queue.base_values("main")
    if got != {"train.seed": "1", "train.max_steps": "5"}:
        problems.append(f"starting from experiment 'main' applies {got}, the branch main's params")
    for name in ("main", "HEAD"):
        with contextlib.suppress(Exception):
            queue.check_new_name(name)
            problems.append(f"{name!r} is accepted as a new experiment's name")
    assert not problems, problems


# --------------------------------------------------------------------------- 9. loopback: no credential at all


@pytest.mark.slow
def test_a_local_process_without_any_secret_cannot_make_the_server_read_its_user_s_files(repo, tmp_path):
    """On loopback there is no token: any process of any local account that sends JSON with Host 127.0.0.1:<port>
    (no browser, so no Origin) may queue and start experiments, which run as the server's user with the params it
    chose. download.train.url is a form field that takes any local path: the run copies a file that only the
    server's user may read into the experiment (and trains on it: Write then recites it). Before the Run part the
    loopback API only read the repository; now it needs a secret that only the page knows (as the token, or a
    per-server header baked into the page)."""
    secret = tmp_path / "private" / "notes.txt"
    secret.parent.mkdir()
    secret.write_text("the password is hunter2, said nobody\n" * 400)
    secret.chmod(0o600)
    server = Server()
    try:
        status, answer = post(server.port, "/api/runs/queue", {"name": "exfil", "values": {
            "download.train.url": f"'{secret}'", "download.train.md5": "null", "prepare.format": "lines",
            "train.max_steps": "5"}})  # fmt: skip
        started = post(server.port, "/api/runs/start", {"jobs": 1}) if status == 200 else (None, None)
        deadline = time.monotonic() + 400
        while status == 200 and states().get("exfil") in ("Queued", "Running") and time.monotonic() < deadline:
            time.sleep(2)
    finally:
        server.close()
    import dvc.api

    copied = None
    with contextlib.suppress(Exception):
        copied = dvc.api.read("data/raw/train.csv", rev="exfil")
    assert status == 403, (status, answer, started, states().get("exfil"), (copied or "")[:40])


# --------------------------------------------------------------------------- 10. outputs read whole (noted, not proven)


def test_a_dvc_commands_output_is_read_from_its_end_within_a_bound():
    """`dvc queue logs` of a long run (a progress bar in it) can be any size: what a command printed is read
    from its end, at most OUTPUT_BYTES, so the last lines, which the page shows, are there."""
    import tempfile

    with tempfile.TemporaryFile() as f:
        f.write(b"x" * (3 * queue.OUTPUT_BYTES) + b"\nthe last line\n")
        text = queue._text(f)
    assert len(text) <= queue.OUTPUT_BYTES and text.endswith("the last line\n")
