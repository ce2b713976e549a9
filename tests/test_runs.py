"""The playground's Run part: the experiment form (charlm/pipeline/form.py), DVC's queue (charlm/pipeline/queue.py)
and their HTTP side (charlm/apps/serve/runs.py), on real `dvc` commands in throw-away git repositories.

No DVC worker outlives a test: every test that starts the queue stops it with --kill and waits until no worker of
its repository is left."""
from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import urllib.parse
from pathlib import Path

import pytest
from conftest import ROOT, ag_news_rows, copy_pipeline, csv_bytes, git_project, md5

from charlm.base.errors import CharlmError
from charlm.pipeline import form, queue

# --------------------------------------------------------------------------- the form


def test_help_comes_from_params_yaml_comments():
    helps = form.help_texts(ROOT / "params.yaml")
    assert helps["model.hidden"] == "units per recurrent layer"
    # A comment continued on the next lines, indented past the key, is the key's own.
    assert helps["model.weight_drop"].endswith("one mask per minibatch, so the fused LSTM kernel is kept")
    # The comment lines above a key are its help too, and they do not leak into the key before them.
    assert helps["download.train.url"] == "http(s):// or file:// URL, or a local path"
    assert helps["evaluate.cache_order"].startswith("Adaptive evaluation (charlm/core/adaptive.py)")
    assert helps["evaluate.device"] == "auto | cpu | cuda"
    assert helps["download.train.md5"] == "null skips the check"


@pytest.mark.parametrize(
    "value",
    [0, 7, 1e-05, 0.016, 2.5, True, False, None, "The ", "it's", "a\\'b", "back\\", "x,y", "[1]", "null", "1e3",
     "λ · ü", ["The ", "A, b"], [0.3, 1.0], []],
)  # fmt: skip
def test_a_value_written_as_override_text_reads_back_the_same_through_dvc(tmp_path, value):
    """What the form shows is -S text: DVC's own override code must read it back as the value it came from."""
    from dvc.utils.hydra import apply_overrides

    from charlm.pipeline import params

    path = tmp_path / "params.yaml"
    path.write_text("train:\n  key: 1\n", encoding="utf-8")
    apply_overrides(path, [f"train.key={form.override_text(value)}"])
    got = params.read_yaml(path)["train"]["key"]
    assert got == value and type(got) is type(value)


def declare(root: Path, section: str, line: str) -> None:
    module = root / "charlm" / "pipeline" / "sections" / f"{section}.py"
    anchor = f'    section: ClassVar[str] = "{section}"\n'
    text = module.read_text(encoding="utf-8")
    assert anchor in text
    module.write_text(text.replace(anchor, anchor + line + "\n"), encoding="utf-8")


def test_the_form_follows_the_declarations_and_their_help(tmp_path, monkeypatch):
    """A key added to a section's declaration and to params.yaml, with a comment, is a field of the form with its
    type, range and help; nothing else is edited."""
    copy_pipeline(tmp_path)
    declare(tmp_path, "train", "    clip_every: int = spec(ge=1, le=9)")
    text = (tmp_path / "params.yaml").read_text(encoding="utf-8")
    text = text.replace("\ntrain:\n", "\ntrain:\n  clip_every: 3     # steps between two clips of the norm\n", 1)
    (tmp_path / "params.yaml").write_text(text, encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    fields = {f["key"]: f for f in form.schema()}
    assert fields["train.clip_every"] == {
        "key": "train.clip_every", "section": "train", "type": "int", "nullable": False, "choices": None,
        "ge": 1, "gt": None, "le": 9, "lt": None, "help": "steps between two clips of the norm", "value": "3",
    }  # fmt: skip
    assert fields["model.cell"]["choices"] == ["lstm", "gru", "rnn"]
    assert fields["train.init_from"]["nullable"] and fields["generate.prompts"]["type"] == "list of str"
    # ... and the new key is checked by its declaration's rules.
    with pytest.raises(CharlmError, match=r"^train: error: params.yaml: train.clip_every = 10 \(an integer\)"):
        form.check({"train.clip_every": "10"})
    assert form.check({"train.clip_every": "4,5"}) == [["train.clip_every=4"], ["train.clip_every=5"]]


def stage_error(root: Path, stage: str) -> str:
    proc = subprocess.run([sys.executable, "-m", f"stages.{stage}"], cwd=root, capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    return proc.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize(
    ("key", "text", "stage"),
    [("train.lr", "yes", "train"), ("model.hidden", "0", "train"), ("generate.prompts", "['A', 3]", "generate"),
     ("model.cell", "lstm,xyz", "train"), ("pack.align", "tiles", "pack")],
)  # fmt: skip
def test_a_bad_value_gets_the_stage_s_own_message(tmp_path, monkeypatch, key, text, stage):
    """The form's refusal is the line the stage itself prints when it reads the same params.yaml (a sweep is
    refused for its bad value)."""
    from dvc.utils.hydra import apply_overrides

    copy_pipeline(tmp_path)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CharlmError) as refused:
        form.check({key: text})
    apply_overrides(tmp_path / "params.yaml", [f"{key}={text.split(',')[-1] if key == 'model.cell' else text}"])
    assert str(refused.value) == stage_error(tmp_path, stage)


def test_values_that_are_not_a_field_or_not_one_line_are_refused(monkeypatch):
    monkeypatch.chdir(ROOT)
    for values, message in [
        ({"train.nope": "1"}, "unknown key train.nope"),
        ({"+train.lr": "1"}, "unknown key"),
        ({"train.lr": "0.1\n"}, "one line"),
        ({"train.lr": ""}, "one line"),
        ({"train.lr": "(("}, "cannot read the values as -S takes them"),
        ({"train.seed": "range(0,40)"}, "at most 16"),
    ]:
        with pytest.raises(CharlmError, match=re.escape(message)):
            form.check(values)


# --------------------------------------------------------------------------- a real repository and its queue


def make_repo(root: Path) -> Path:
    """A git + DVC repository of the pipeline with TINY params and a committed baseline; its corpus is read from
    a folder beside it (a path any temporary copy of the repository also reaches)."""
    p = git_project(root / "repo")
    src = root / "src"
    src.mkdir()
    train, test = csv_bytes(ag_news_rows(240, seed=1)), csv_bytes(ag_news_rows(40, seed=2))
    (src / "train.csv").write_bytes(train)
    (src / "test.csv").write_bytes(test)
    p.set_params(download={"train": {"url": str(src / "train.csv"), "md5": md5(train)},
                           "test": {"url": str(src / "test.csv"), "md5": md5(test)}})  # fmt: skip
    p.dvc("repro", "-q", timeout=600)
    p.git("add", "-A")
    p.git("commit", "-qm", "baseline")
    return p.path


@pytest.fixture(scope="module")
def baseline(tmp_path_factory) -> Path:
    return make_repo(tmp_path_factory.mktemp("runs"))


@pytest.fixture
def repo(baseline, tmp_path, monkeypatch) -> Path:
    """A fresh copy of the baseline repository, the current directory; its queue is stopped (with --kill) after
    the test, which then fails if a worker is left."""
    path = tmp_path / "repo"
    shutil.copytree(baseline, path, symlinks=True)
    monkeypatch.chdir(path)
    yield path
    stop_workers(path)


def stop_workers(path: Path) -> None:
    with contextlib.chdir(path), contextlib.suppress(CharlmError):
        queue.stop(kill_running=True)
    deadline = time.monotonic() + 60
    while queue.worker_pids(path) and time.monotonic() < deadline:
        time.sleep(0.5)
    left = queue.worker_pids(path)
    for pid in left:  # the test fails below; its processes still must not outlive it
        with contextlib.suppress(OSError):
            os.kill(pid, 9)
    assert left == [], f"DVC workers outlived the test: {left}"


def snapshot(path: Path) -> tuple[str, bytes, bytes]:
    status = subprocess.run(["git", "status", "--porcelain"], cwd=path, capture_output=True, text=True).stdout
    return status, (path / "params.yaml").read_bytes(), (path / "dvc.lock").read_bytes()


def states() -> dict[str, str]:
    return {r["name"]: r["state"] for r in queue.experiments()}


@pytest.mark.slow
def test_queueing_leaves_the_repository_as_it_was(repo):
    """A sweep and a single experiment are queued with the params asked for, under their names, while git status,
    params.yaml and dvc.lock stay as they were; a queued experiment can be removed."""
    (repo / "notes.txt").write_text("an untracked file\n")
    before = snapshot(repo)
    assert queue.queue("wide", {"model.hidden": "16,24", "train.max_steps": "5"}) == ["wide-1", "wide-2"]
    assert queue.queue("prompt", {"train.sample_prompt": "'it\\'s, \"quoted\" '"}) == ["prompt"]
    assert snapshot(repo) == before
    rows = {r["name"]: r for r in queue.experiments()}
    assert {n: rows[n]["state"] for n in ("wide-1", "wide-2", "prompt")} == dict.fromkeys(
        ("wide-1", "wide-2", "prompt"), "Queued")  # fmt: skip
    assert rows["wide-1"]["params"] == {"model.hidden": 16, "train.max_steps": 5}
    assert rows["wide-2"]["params"] == {"model.hidden": 24, "train.max_steps": 5}
    import dvc.api

    # A queued experiment is a commit of DVC's stash, named by its sha until it has run.
    assert dvc.api.params_show(rev=rows["prompt"]["rev"])["train"]["sample_prompt"] == "it's, \"quoted\" "
    queue.remove("wide-1")
    assert "wide-1" not in states()
    assert snapshot(repo) == before


@pytest.mark.slow
def test_a_bad_value_a_used_name_and_a_full_queue_queue_nothing(repo, monkeypatch):
    queue.queue("one", {"train.seed": "1"})
    before = (snapshot(repo), states())
    for name, values, message in [
        ("bad", {"train.lr": "yes"}, "train: error: params.yaml: train.lr = 'yes' (a string): expected a number"),
        ("bad", {"model.hidden": "8,0"}, "model.hidden = 0 (an integer): expected a value >= 1"),
        ("one", {"train.seed": "2"}, "the name 'one' is already used"),
        ("-x", {"train.seed": "2"}, "the name must be"),
        ("same", {}, "nothing differs"),
    ]:
        with pytest.raises(CharlmError, match=re.escape(message)):
            queue.queue(name, values)
    monkeypatch.setattr(queue, "MAX_QUEUED", 2)
    with pytest.raises(CharlmError, match="the queue holds 1 waiting experiments and takes at most 2"):
        queue.queue("sweep", {"train.seed": "2,3"})
    assert (snapshot(repo), states()) == before


@pytest.mark.slow
def test_the_queue_runs_with_threads_shared_is_watched_live_and_killed(repo):
    """Two jobs: one long experiment is killed while its curve grows in DVC's temporary folder, the other finishes
    with the test bpc that `dvc exp show` gives; each job's stage runs with its share of the cores as threads and
    the `dvc` and `python` of this environment."""
    queue.queue("long", {"train.max_steps": "20000", "train.epochs": "1000", "train.eval_every": "40",
                         "train.log_every": "10", "train.sample_every": "20"})  # fmt: skip
    queue.queue("short", {"train.max_steps": "20", "train.seed": "3"})
    assert queue.start(2) == 2
    seen: list[int] = []
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        now = queue.live("long")
        if now is not None and now["train"] and (not seen or len(now["train"]) > seen[-1]):
            seen.append(len(now["train"]))
        if len(seen) >= 3:
            break
        time.sleep(0.5)
    assert len(seen) >= 3, f"the running experiment's curve did not grow: {seen}"
    assert now["val"] and now["sample"] and now["step"] >= 20
    stages = [pid for pid in train_pids(repo)]
    assert stages, "no train stage running"
    for pid in stages:
        environ = dict(v.split("=", 1) for v in Path(f"/proc/{pid}/environ").read_text().split("\0") if "=" in v)
        assert environ["OMP_NUM_THREADS"] == str(max(1, (os.cpu_count() or 1) // 2))
        assert environ["PATH"].split(os.pathsep)[0] == str(Path(sys.executable).parent)

    queue.kill("long")
    deadline = time.monotonic() + 300
    while (now_states := states()).get("long") == "Running" or now_states.get("short") != "Success":
        assert time.monotonic() < deadline, now_states
        time.sleep(1)
    assert now_states["long"] == "Failed"
    assert queue.live("long") is None
    assert "train: interrupted; checkpoint saved" in queue.logs("long")
    row = next(r for r in queue.experiments() if r["name"] == "short")
    shown = json.loads(subprocess.run([str(Path(sys.executable).parent / "dvc"), "exp", "show", "--json"],
                                      capture_output=True, text=True, check=True).stdout)  # fmt: skip
    assert row["test_bpc"] == pytest.approx(exp_show_test_bpc(shown, "short"), abs=1e-9)
    queue.remove("long")
    queue.remove("short")
    assert not {"long", "short"} & set(states())


def train_pids(root: Path) -> list[int]:
    found = []
    for proc in Path("/proc").iterdir():
        with contextlib.suppress(OSError):
            if proc.name.isdigit() and b"stages.train" in (proc / "cmdline").read_bytes():
                if root.resolve() in Path(os.readlink(proc / "cwd")).parents:
                    found.append(int(proc.name))
    return found


def exp_show_test_bpc(shown, name: str) -> float:
    """The test bpc of an experiment in `dvc exp show --json`."""
    for baseline in shown:
        for exp in baseline.get("experiments") or []:
            if exp.get("name") == name:
                data = exp["revs"][0]["data"]
                return data["metrics"]["metrics/eval.json"]["data"]["test_bpc"]
    raise AssertionError(f"{name} not in dvc exp show")




def test_live_reads_the_layout_of_the_installed_dvc(tmp_path):
    """live() reads DVC's private layout, and only it does: the executor info file that this DVC writes for a
    running queued experiment must be one it understands. A DVC upgrade that changes it fails here."""
    from dvc.repo.experiments.executor.base import ExecutorInfo, TaskStatus

    assert (TaskStatus.PREPARING, TaskStatus.RUNNING) == (queue.PREPARING_STATUS, queue.RUNNING_STATUS)
    run_dir = tmp_path / "copy"
    (run_dir / "dvclive/plots/metrics/train").mkdir(parents=True)
    (run_dir / "dvclive/plots/metrics/val").mkdir(parents=True)
    (run_dir / "dvclive/plots/metrics/train/bpc.tsv").write_text("timestamp\tstep\tbpc\n1\t5\t4.5\n2\t10\t4.25\n")
    (run_dir / "dvclive/plots/metrics/val/bpc.tsv").write_text("timestamp\tstep\tbpc\n1\t10\t4.4\n")
    (run_dir / "reports").mkdir()
    (run_dir / "reports/train_samples.md").write_text("# t\n\n## step 5\n\nold\n## step 10\n\n- T=0.8: 'new'\n")
    info = ExecutorInfo(git_url="", baseline_rev="0" * 40, location="dvc-task", root_dir=str(run_dir),
                        dvc_dir=".dvc", name="exp-a", status=TaskStatus.RUNNING)  # fmt: skip
    from dvc.repo import Repo

    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    with Repo.init(str(tmp_path)) as dvc_repo:  # where this DVC's queue puts a run's info file
        info_file = dvc_repo.experiments.celery_queue.get_infofile_path("a" * 40)
    info.dump_json(info_file)
    assert queue.live("exp-a", tmp_path / ".dvc") == {
        "train": [[5, 4.5], [10, 4.25]], "val": [[10, 4.4]], "sample": "- T=0.8: 'new'", "step": 10}  # fmt: skip
    assert queue.live("exp-b", tmp_path / ".dvc") is None
    info.status = TaskStatus.SUCCESS
    info.dump_json(info_file)
    assert queue.live("exp-a", tmp_path / ".dvc") is None


# --------------------------------------------------------------------------- over HTTP


class Server:
    """`charlm serve` in a thread, in the current directory (the repository)."""

    def __init__(self, host: str = "127.0.0.1", read_only: bool = False):
        from charlm.apps.serve import server as srv

        self.server = srv.make_server([], host=host, port=0, device="cpu", read_only=read_only)
        self.port = self.server.server_address[1]
        self.token = self.server.app.token
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def request(self, method: str, path: str, body=None, headers: dict | None = None, token: str | None = None):
        token = self.token if token is None else token
        if token:
            path += ("&" if "?" in path else "?") + "token=" + urllib.parse.quote(token)
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
        all_headers = {"Content-Type": "application/json", **(headers or {})}
        conn.request(method, path, body=None if body is None else json.dumps(body).encode(), headers=all_headers)
        resp = conn.getresponse()
        data = json.loads(resp.read().decode())
        conn.close()
        return resp.status, data


ACTIONS = [
    ("/api/runs/queue", {"name": "x", "values": {"train.seed": "7"}}),
    ("/api/runs/start", {"jobs": 1}),
    ("/api/runs/kill", {"name": "x"}),
    ("/api/runs/remove", {"name": "x"}),
    ("/api/runs/logs", {"name": "x"}),
    ("/api/runs/compare", {"names": ["x", "y"]}),
    ("/api/runs/watch", {}),
]


@pytest.mark.slow
@pytest.mark.parametrize("how", ["without --run", "beyond loopback"])
def test_a_read_only_server_refuses_every_run_request(repo, how):
    """A server started without `--run`, and any server listening beyond loopback (with its token), refuse every
    request of the Run part, and the form says it is read-only (the page hides the part); nothing is queued."""
    queue.queue("waiting", {"train.seed": "1"})
    before = (snapshot(repo), states())
    server = Server(read_only=True) if how == "without --run" else Server(host="0.0.0.0")
    try:
        assert server.request("GET", "/api/runs/form") == (
            200, {"read_only": True, "fields": [], "base": None, "max_queued": queue.MAX_QUEUED, "cores": 0})
        for path, body in ACTIONS + [("/api/runs/kill", {"name": "waiting"}), ("/api/runs/remove",
                                                                              {"name": "waiting"})]:  # fmt: skip
            status, answer = server.request("POST", path, body)
            assert (status, answer["error"].split(" (")[0]) == (403, "this playground is read-only"), path
        assert server.request("GET", "/api/runs/streams/0123/events")[0] == 403
    finally:
        server.close()
    assert (snapshot(repo), states()) == before


@pytest.mark.slow
def test_run_requests_pass_the_server_s_cross_site_checks(repo):
    """A queueing request without JSON, from another origin, from a cross-site page, for another host, or without
    the token is refused, and queues nothing; the same request from the page queues."""
    before = (snapshot(repo), states())
    server = Server()
    body = {"name": "ok", "values": {"train.seed": "7"}}
    try:
        for headers, status in [
            ({"Content-Type": "text/plain"}, 415),
            ({"Origin": "http://evil.example"}, 403),
            ({"Sec-Fetch-Site": "cross-site"}, 403),
            ({"Host": "evil.example"}, 403),
        ]:
            assert server.request("POST", "/api/runs/queue", body, headers=headers)[0] == status, headers
        assert server.request("GET", "/api/runs/form", headers={"Content-Type": "text/plain"})[0] == 403
        assert (snapshot(repo), states()) == before
        origin = {"Origin": f"http://127.0.0.1:{server.port}"}
        status, answer = server.request("POST", "/api/runs/queue", body, headers=origin)
        assert (status, answer) == (200, {"queued": ["ok"]})
    finally:
        server.close()
    tokened = Server(host="0.0.0.0")
    try:
        status, answer = tokened.request("GET", "/api/runs/form", token="wrong")
        assert status == 403 and "token" in answer["error"]
    finally:
        tokened.close()


@pytest.mark.slow
def test_the_form_queue_and_stream_over_http(repo):
    """The form holds every declared key with params.yaml's value, a bad value is the stage's own line with
    nothing queued, a sweep queues one experiment per value, and the watched stream pushes the new state."""
    server = Server()
    try:
        status, answer = server.request("GET", "/api/runs/form")
        assert status == 200 and not answer["read_only"]
        fields = {f["key"]: f for f in answer["fields"]}
        assert fields["model.hidden"]["value"] == "32" and fields["model.hidden"]["ge"] == 1
        status, answer = server.request("POST", "/api/runs/queue", {"name": "b", "values": {"train.lr": "yes"}})
        assert (status, answer["error"]) == (400, "train: error: params.yaml: train.lr = 'yes' (a string): "
                                                  "expected a number")  # fmt: skip
        assert "b" not in states()
        status, answer = server.request("POST", "/api/runs/queue", {"name": "s", "values": {"model.hidden": "8,12"}})
        assert (status, answer) == (200, {"queued": ["s-1", "s-2"]})
        status, answer = server.request("POST", "/api/runs/queue", {"name": "s-1", "values": {"train.seed": "3"}})
        assert status == 400 and "already used" in answer["error"]
        stream = server.request("POST", "/api/runs/watch", {})[1]["stream"]
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
        conn.request("GET", f"/api/runs/streams/{stream}/events?token={server.token}")  # --run: a token on loopback too
        resp = conn.getresponse()
        assert resp.status == 200 and resp.getheader("Content-Type").startswith("text/event-stream")
        event = resp.fp.readline().decode() + resp.fp.readline().decode()
        conn.close()
        assert event.startswith("event: state\ndata: ")
        rows = {r["name"]: r for r in json.loads(event.split("data: ", 1)[1])["experiments"]}
        assert rows["s-1"]["state"] == rows["s-2"]["state"] == "Queued"
        assert rows["s-2"]["params"] == {"model.hidden": 12}
    finally:
        server.close()


@pytest.mark.slow
def test_compare_marks_what_differs(repo):
    from charlm.apps.serve import runs

    for name, seed in (("a", "1"), ("b", "2")):
        subprocess.run([str(Path(sys.executable).parent / "dvc"), "exp", "run", "-q", "-n", name, "-S",
                        f"train.seed={seed}", "-S", "train.max_steps=5"], check=True, env=queue.env(),
                       capture_output=True, timeout=600)  # fmt: skip
    out = runs.compare(["a", "b"])
    rows = {r["key"]: r for r in out["rows"]}
    assert rows["train.seed"] == {"key": "train.seed", "kind": "param", "values": [1, 2], "differs": True}
    assert rows["model.hidden"]["differs"] is False
    assert rows["test_bpc"]["kind"] == "metric" and rows["test_bpc"]["differs"]
    shown = json.loads(subprocess.run([str(Path(sys.executable).parent / "dvc"), "exp", "show", "--json"],
                                      capture_output=True, text=True, check=True).stdout)  # fmt: skip
    assert rows["test_bpc"]["values"] == [pytest.approx(exp_show_test_bpc(shown, n), abs=1e-9) for n in ("a", "b")]
    assert out["rows"][0]["differs"] and out["rows"][0]["kind"] == "param"  # what differs comes first
    assert not any("/" in r["key"] and r["kind"] == "metric" and ":" not in r["key"] for r in out["rows"])


@pytest.mark.slow
def test_a_run_can_start_from_a_finished_experiment_s_params(repo):
    """Starting from an experiment: its params that differ from the workspace's are applied with -S over HEAD's
    code, and the form's changes on top of them."""
    # --temp: a plain `dvc exp run` would leave its params in the workspace, and then nothing would differ.
    subprocess.run([str(Path(sys.executable).parent / "dvc"), "exp", "run", "--temp", "-q", "-n", "a", "-S",
                    "train.seed=1", "-S", "train.max_steps=5"], check=True, env=queue.env(), capture_output=True,
                   timeout=600)  # fmt: skip
    assert queue.base_values("a") == {"train.seed": "1", "train.max_steps": "5"}
    assert queue.base_values(None) == {}
    before = snapshot(repo)
    assert queue.queue("from-a", {"train.max_steps": "7", "model.hidden": "8"}, base="a") == ["from-a"]
    row = next(r for r in queue.experiments() if r["name"] == "from-a")
    assert row["params"] == {"train.seed": 1, "train.max_steps": 7, "model.hidden": 8}
    assert snapshot(repo) == before
    with pytest.raises(CharlmError, match="cannot read the params of 'nope'"):
        queue.base_values("nope")


def test_outside_a_repository_the_form_is_empty_and_not_an_error(tmp_path, monkeypatch):
    """Model files served from a folder that is no charlm repository: nothing to queue, so the page hides the part
    without an error."""
    monkeypatch.chdir(tmp_path)
    server = Server()
    try:
        assert server.request("GET", "/api/runs/form") == (
            200, {"read_only": False, "fields": [], "base": None, "max_queued": queue.MAX_QUEUED, "cores": 0})
    finally:
        server.close()


def test_reading_the_experiments_is_tried_again_once_after_a_failure(tmp_path, monkeypatch):
    # DVC fails now and then on the temporary folder of a run that ended while it read (CI saw
    # "directory '.dvc/tmp/exps/tmp…/.dvc' does not exist"): one more read sees the run ended. Twice is an error.
    marker = tmp_path / "failed-once"
    flaky = (
        "import pathlib, sys; m = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else %r)\n"
        "if not m.exists():\n"
        "    m.touch(); sys.exit(\"dvc.exceptions.NotDvcRepoError: directory '.dvc/tmp/exps/tmp1/.dvc' does not exist\")\n"
        "print('[{\"rev\": \"workspace\"}]')" % str(marker)
    )
    monkeypatch.setattr(queue, "_EXP_SHOW", flaky)
    assert queue.exp_show(timeout=30) == [{"rev": "workspace"}] and marker.exists()
    monkeypatch.setattr(queue, "_EXP_SHOW", "import sys; sys.exit('dvc.exceptions.DvcException: broken for good')")
    with pytest.raises(CharlmError, match="could not be read.*broken for good"):
        queue.exp_show(timeout=30)
