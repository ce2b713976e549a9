"""Fault injection: every stage is killed with SIGKILL at random points, several times, in a subprocess.

A kill lands mid-transfer (download), while the data stages write their outputs, between and during
training-checkpoint writes, or at a random moment (seeded) of evaluate and generate; some kills take down a
whole `dvc repro` (the stage and DVC itself, like a power cut), the others a stage run on its own. After each:

1. no corruption: every output of every stage is absent or complete and valid (byte-identical to an
   uninterrupted run), and no temp file ever sits inside a directory output for DVC to cache;
2. `dvc repro` afterwards completes and brings back exactly the uninterrupted run's results;
3. train resumes from its last complete checkpoint and ends with the uninterrupted run's weights and logs.

Ctrl-C of `dvc repro train` (SIGINT to the whole foreground process group, as a terminal sends it) saves a
checkpoint and resumes, whether DVC runs the stage under bash or under dash. The module prints
`faults: N kills, N healed` at the end of the session.
SIGKILL and Ctrl-C of a lone `python -m stages.train` are in test_train.py; here the kills go through every
stage and through DVC. A heal first deletes the killed stage's outputs from the DVC cache, so that `dvc repro`
really reruns the stage over what the kill left instead of checking the old outputs out of the cache.
"""
from __future__ import annotations

import http.server
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest
import torch
import yaml
from conftest import Project, ag_news_rows, assert_same_weights, copy_of, csv_bytes, git_project, md5, weights

pytestmark = pytest.mark.slow

ENV = {"OMP_NUM_THREADS": "1"}
DVC = str(Path(sys.executable).parent / "dvc")
RNG = random.Random(20240607)  # every delay and kill point comes from this seed

STAGES = ["download", "prepare", "vocab", "pack", "train", "evaluate", "generate"]
DATA_STAGES = STAGES[:4]
OUTS = {
    "download": ["data/raw/train.csv", "data/raw/test.csv"],
    "prepare": ["data/prepared/train.txt", "data/prepared/test.txt"],
    "vocab": ["data/vocab.json"],
    "pack": ["data/packed"],
    "train": ["models/model.pt", "reports/train_samples.md", "dvclive/plots", "dvclive/metrics.json"],
    "evaluate": ["metrics/eval.json"],
    "generate": ["reports/samples.md", "reports/samples.json", "metrics/generate.json"],
}
DIR_OUTS = ["data/packed", "dvclive/plots"]
WORK_DIRS = ["data", "models", "checkpoints", "metrics", "reports", "dvclive"]
TEMP = re.compile(r"^\..+\.(tmp|old)-(\d+)$")  # charlm.base.io's temp names: .NAME.tmp-PID, .NAME.old-PID

# Enough data that writes take milliseconds (1.2 MB of train CSV), a model whose checkpoint takes a moment
# to write, and checkpoints every 5 of 60 steps, so that kills fall between and during checkpoint writes.
TOTAL_STEPS, CHECKPOINT_EVERY = 60, 5
FAULT_PARAMS = {
    "pack": {"seq_len": 32, "val_fraction": 0.02, "seed": 0},
    "model": {"cell": "lstm", "hidden": 96, "layers": 2, "dropout": 0.1, "embedding": 16},
    "train": {"batch_size": 8, "epochs": 1, "max_steps": TOTAL_STEPS, "warmup_steps": 5, "eval_every": 20,
              "log_every": 5, "checkpoint_every": CHECKPOINT_EVERY, "sample_every": 30, "sample_length": 30,
              "device": "cpu"},
    "evaluate": {"batch_size": 16, "device": "cpu"},
    "generate": {"device": "cpu"},
}
TRAIN_CSV = csv_bytes(ag_news_rows(6000, seed=1))
TEST_CSV = csv_bytes(ag_news_rows(40, seed=2))


# --------------------------------------------------------------------------- the tally, printed at the end


@dataclass
class Tally:
    kills: int = 0
    healed: int = 0
    mid_write: int = 0
    interrupts: int = 0
    per_stage: dict = field(default_factory=dict)


@pytest.fixture(scope="session")
def tally(request):
    t = Tally()
    yield t
    line = (f"faults: {t.kills} kills, {t.healed} healed ({t.mid_write} of the kills left a half-written temp "
            f"file; per stage {t.per_stage}); Ctrl-C: {t.interrupts} clean exit(s) with a checkpoint")
    capman = request.config.pluginmanager.getplugin("capturemanager")
    with capman.global_and_fixture_disabled():
        sys.stdout.write(f"\n{line}\n")
        sys.stdout.flush()


# --------------------------------------------------------------------------- a slow loopback server


class SlowHandler(http.server.BaseHTTPRequestHandler):
    """Sends its file in 16 KiB pieces with a pause after each, so a transfer takes about half a second."""

    def log_message(self, *args):
        pass

    def do_GET(self):
        body = self.server.files.get(self.path)
        if body is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        try:
            for i in range(0, len(body), 1 << 14):
                self.wfile.write(body[i:i + (1 << 14)])
                self.wfile.flush()
                time.sleep(0.006)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client was killed


@pytest.fixture(scope="module")
def slow_server():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), SlowHandler)
    server.daemon_threads = True
    server.files = {"/train.csv": TRAIN_CSV, "/test.csv": TEST_CSV}
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


# --------------------------------------------------------------------------- the reference: one uninterrupted run


@dataclass
class Reference:
    project: Project
    files: dict[str, bytes]  # every output that is byte-for-byte reproducible
    eval: dict
    weights: dict
    rows: dict[str, list]
    lock: dict
    seconds: dict[str, float]


def new_project(root: Path) -> Project:
    p = git_project(root)
    p.set_params(**FAULT_PARAMS)
    return p


def tree_bytes(path: Path) -> dict[str, bytes]:
    return {str(f.relative_to(path)): f.read_bytes() for f in sorted(path.rglob("*")) if f.is_file()}


def reproducible_files(p: Project) -> dict[str, bytes]:
    files = {}
    for stage in DATA_STAGES + ["generate"]:
        for out in OUTS[stage]:
            path = p.path / out
            if path.is_dir():
                files.update({f"{out}/{k}": v for k, v in tree_bytes(path).items()})
            elif path.exists():
                files[out] = path.read_bytes()
    if (p.path / "reports/train_samples.md").exists():
        files["reports/train_samples.md"] = (p.path / "reports/train_samples.md").read_bytes()
    return files


def eval_metrics(p: Project) -> dict:
    metrics = json.loads((p.path / "metrics/eval.json").read_text())
    metrics.pop("eval_chars_per_s")  # a speed, not a result
    return metrics


def log_rows(p: Project, metric: str) -> list[list[str]]:
    """(step, value) of every row of a DVCLive plot file; the timestamp column is left out."""
    lines = (p.path / "dvclive/plots/metrics" / f"{metric}.tsv").read_text().splitlines()
    header = lines[0].split("\t")
    rows = [line.split("\t") for line in lines[1:]]
    assert all(len(r) == len(header) for r in rows), f"torn row in {metric}.tsv"
    return [[r[header.index("step")], r[header.index(metric.rsplit('/', 1)[-1])]] for r in rows]


LOGGED = ["train/loss", "val/bpc", "lr"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, slow_server) -> Reference:
    """The pipeline run once without faults (stage by stage, timed), committed to DVC with `dvc commit`."""
    p = new_project(tmp_path_factory.mktemp("faults") / "reference")
    p.set_params(download={"train": {"url": f"{slow_server}/train.csv", "md5": md5(TRAIN_CSV)},
                           "test": {"url": f"{slow_server}/test.csv", "md5": md5(TEST_CSV)},
                           "timeout": 10.0, "retries": 0})
    seconds = {}
    for stage in STAGES:
        t0 = time.monotonic()
        p.stage(stage, env=ENV)
        seconds[stage] = time.monotonic() - t0
    p.dvc("commit", "-f", env=ENV)
    return Reference(p, reproducible_files(p), eval_metrics(p), weights(p),
                     {m: log_rows(p, m) for m in LOGGED}, yaml.safe_load((p.path / "dvc.lock").read_text()),
                     seconds)


# --------------------------------------------------------------------------- killing


def env() -> dict:
    return {**os.environ, **ENV, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}


def launch(p: Project, stage: str, via_dvc: bool, log: Path, **extra_env: str) -> subprocess.Popen:
    """A stage on its own, or `dvc repro -f -s STAGE`; in a new session so a kill reaches all of it."""
    cmd = [DVC, "repro", "-f", "-s", stage] if via_dvc else [sys.executable, "-m", f"stages.{stage}"]
    with open(log, "ab") as out:
        return subprocess.Popen(cmd, cwd=p.path, stdout=out, stderr=subprocess.STDOUT,
                                env={**env(), **extra_env}, start_new_session=True)


def wait_for_group(proc: subprocess.Popen, timeout: float = 120) -> bool:
    """Wait until no process of proc's session is left: a stage may outlive the `dvc repro` that started it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False


def temp_entries(p: Project) -> list[str]:
    """Temp files and directories of charlm's atomic writes, anywhere in the workspace."""
    found = []
    for top in WORK_DIRS:
        for dirpath, dirnames, filenames in os.walk(p.path / top):
            for name in dirnames + filenames:
                if TEMP.match(name):
                    found.append(str(Path(dirpath, name).relative_to(p.path)))
            dirnames[:] = [d for d in dirnames if not TEMP.match(d)]
    return sorted(found)


def wait_until(proc: subprocess.Popen, ready, timeout: float = 180, pause: float = 0.0) -> bool:
    """Poll `ready()` until it is true (True) or the process has ended (False). A hang guard, no timing claim."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ready():
            return True
        if proc.poll() is not None:
            return False
        if pause:
            time.sleep(pause)
    kill(proc)
    pytest.fail("the stage neither reached the kill point nor ended")


def kill(proc: subprocess.Popen, sig=signal.SIGKILL) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass
    proc.wait(timeout=60)


def stage_started(proc: subprocess.Popen, stage: str, via_dvc: bool):
    """For `dvc repro`, the moment the stage's own python process exists (DVC's start-up takes seconds)."""
    if not via_dvc:
        return lambda: True

    def started():
        try:
            return any(f"stages.{stage}" in " ".join(c.cmdline()) or f"stages/{stage}.py" in " ".join(c.cmdline())
                       for c in psutil.Process(proc.pid).children(recursive=True))
        except psutil.Error:
            return False
    return started


def new_temps(p: Project, directory: str, pattern: str, old: set[str]) -> list[Path]:
    """Files matching `pattern` under `directory` that belong to a temp entry not in `old` (earlier debris)."""
    top = p.path / directory
    try:
        return [f for f in top.glob(pattern) if f"{directory}/{f.relative_to(top).parts[0]}" not in old]
    except OSError:
        return []


def size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return -1


def kill_point(p: Project, stage: str, point: str, ref: Reference, old: set[str], window: float | None = None):
    """`ready()` for a named kill point; the random parts are drawn from RNG. `old`: debris to disregard.
    `window`: how long an earlier attempt ran once armed, when it ended before its kill point."""
    if point == "transfer":  # part-way through the train CSV, at a random byte
        at = int(len(TRAIN_CSV) * RNG.uniform(0.05, 0.95))
        return (lambda: any(size(f) >= at for f in new_temps(p, "data/raw", ".train.csv.tmp-*", old)),
                f"at byte {at:,}")
    if point == "write":  # while an output's temp file (or a file in pack's temp directory) exists
        where = {"prepare": ("data/prepared", ".*.txt.tmp-*"), "vocab": ("data", ".vocab.json.tmp-*"),
                 "pack": ("data", ".packed.tmp-*/*")}[stage]
        return lambda: bool(new_temps(p, *where, old)), "while writing"
    if point == "checkpoint-write":  # between a later checkpoint's temp file and its rename over the last one
        return (lambda: (p.path / "checkpoints/train.pt").exists()
                and bool(new_temps(p, "checkpoints", ".train.pt.tmp-*", old)), "during a checkpoint write")
    if point == "between-checkpoints":  # a random moment after the first checkpoint
        delay = RNG.uniform(0.0, 1.2)
        state = {}

        def ready():
            if "t" not in state:
                if (p.path / "checkpoints/train.pt").exists():
                    state["t"] = time.monotonic() + delay
                return False
            return time.monotonic() >= state["t"]
        return ready, f"{delay:.2f}s after the first checkpoint"
    if point == "random":  # a random moment of a normal run's duration
        delay = RNG.uniform(0.05, 0.95) * (window or ref.seconds[stage])
        state = {}

        def ready():
            state.setdefault("t", time.monotonic() + delay)
            return time.monotonic() >= state["t"]
        return ready, f"{delay:.2f}s in"
    raise ValueError(point)


def checkpoint_step(p: Project) -> int | None:
    path = p.path / "checkpoints/train.pt"
    if not path.exists():
        return None
    return int(torch.load(path, weights_only=True)["step"])  # a broken checkpoint fails the test here


# --------------------------------------------------------------------------- the checks


def assert_no_corruption(p: Project, ref: Reference) -> None:
    """Every output of every stage is absent or complete and valid; no temp file inside a directory output."""
    for stage in STAGES:
        for out in OUTS[stage]:
            path = p.path / out
            if not path.exists():
                continue
            if stage in DATA_STAGES or stage == "generate":
                got = ({f"{out}/{k}": v for k, v in tree_bytes(path).items()} if path.is_dir()
                       else {out: path.read_bytes()})
                expected = {k: v for k, v in ref.files.items() if k == out or k.startswith(out + "/")}
                assert got.keys() == expected.keys(), f"{out}: files {sorted(got)} after the kill"
                for k in got:
                    assert got[k] == expected[k], f"{k} is not the complete output after the kill"
            elif out == "metrics/eval.json":
                assert eval_metrics(p) == ref.eval
            elif out == "models/model.pt":
                assert_same_weights(weights(p), ref.weights)
            elif out == "reports/train_samples.md":  # rewritten atomically as samples accrue: a prefix
                assert ref.files[out].startswith(path.read_bytes()), "train_samples.md is not a prefix"
            elif out == "dvclive/metrics.json":
                assert isinstance(json.loads(path.read_text()), dict)
            elif out == "dvclive/plots":
                for metric in LOGGED:
                    if (path / "metrics" / f"{metric}.tsv").exists():
                        rows = log_rows(p, metric)
                        assert rows == ref.rows[metric][:len(rows)], f"{metric} log is not a prefix of the run's"
    step = checkpoint_step(p)
    assert step is None or 0 < step <= TOTAL_STEPS
    for out in DIR_OUTS:
        inside = [e for e in temp_entries(p) if e.startswith(out + "/")]
        assert inside == [], f"temp files inside the directory output {out}: {inside}"


def forget(p: Project, stage: str) -> None:
    """Delete the killed stage's outputs from the DVC cache (and the run cache), so that `dvc repro` reruns
    the stage over whatever the kill left, instead of checking the outputs out of the cache."""
    shutil.rmtree(p.path / ".dvc/cache/runs", ignore_errors=True)
    objects = p.path / ".dvc/cache/files/md5"
    lock = yaml.safe_load((p.path / "dvc.lock").read_text())
    # dvc.lock can lack the killed stage (seen when dvc itself was killed): then there is nothing to forget
    for out in lock["stages"].get(stage, {}).get("outs", []):
        digest = out["md5"]
        obj = objects / digest[:2] / digest[2:]
        if digest.endswith(".dir") and obj.exists():
            for entry in json.loads(obj.read_text()):
                (objects / entry["md5"][:2] / entry["md5"][2:]).unlink(missing_ok=True)
        obj.unlink(missing_ok=True)


def heal(p: Project, ref: Reference, log: Path, stage: str, *targets: str) -> subprocess.CompletedProcess:
    """`dvc repro [TARGET]` must complete and restore exactly the uninterrupted run's results."""
    forget(p, stage)
    rwlock = p.path / ".dvc/tmp/rwlock"
    try:
        json.loads(rwlock.read_text() or "null")
    except json.JSONDecodeError:
        # DVC writes its own lock file in place; killed mid-write, it is left broken and DVC refuses to run until
        # it is deleted, as DVC's troubleshooting guide says. charlm's outputs are not involved.
        rwlock.unlink()
    except FileNotFoundError:
        pass
    proc = p.dvc("repro", *targets, env=ENV, timeout=300)
    assert f"Running stage '{stage}'" in proc.stdout
    with open(log, "a") as f:
        f.write(proc.stdout + proc.stderr)
    assert reproducible_files(p) == ref.files
    assert eval_metrics(p) == ref.eval
    assert_same_weights(weights(p), ref.weights)
    for metric in LOGGED:
        assert log_rows(p, metric) == ref.rows[metric], metric
    lock = yaml.safe_load((p.path / "dvc.lock").read_text())
    for stage in DATA_STAGES:
        assert lock["stages"][stage] == ref.lock["stages"][stage], stage
    assert_no_corruption(p, ref)
    return proc


def kill_and_heal(p: Project, ref: Reference, tally: Tally, stage: str, plan: list[tuple[str, str]],
                  tmp_path: Path, before_each=None, targets=()) -> list[dict]:
    """For each (mode, point) of `plan`: run the stage, SIGKILL it at that point, check, heal, check."""
    log = tmp_path / f"{stage}.log"
    record = []
    for i, (mode, point) in enumerate(plan):
        # A run that ends before its kill point (a write can be over in a millisecond) is retried with a
        # fresh draw; the last try kills at a random moment instead. A random moment is drawn within the
        # reference run's duration, or within the time the last missed attempt ran once armed: the reference
        # ran first, from a cold page cache, and a later run can be much shorter.
        window = None
        for attempt, at in enumerate([point] * 3 + ["random"]):
            if before_each:
                before_each(p)
            old = set(temp_entries(p))
            proc = launch(p, stage, mode == "dvc", log)
            started = wait_until(proc, stage_started(proc, stage, mode == "dvc"), pause=0.01)
            assert started or proc.returncode == 0, log.read_text()[-3000:]
            ready, where = kill_point(p, stage, at, ref, set(temp_entries(p)), window)
            armed = time.monotonic()
            if wait_until(proc, ready):
                kill(proc)
                # The stage under `dvc repro` can take a moment longer to die than dvc, and the heal's sweep leaves
                # a temp file alone while its writer lives (CI saw one left behind so, under load).
                wait_for_group(proc)
                if proc.returncode != 0:  # 0: the run ended between the kill point and the signal, a miss
                    break
            assert proc.returncode == 0, log.read_text()[-3000:]
            window = time.monotonic() - armed
        else:
            pytest.fail(f"{stage}: the run ended before the kill point {point} four times")
        assert proc.returncode == -signal.SIGKILL
        tally.kills += 1
        tally.per_stage[stage] = tally.per_stage.get(stage, 0) + 1
        temps = sorted(set(temp_entries(p)) - old)
        tally.mid_write += bool(temps)
        step = checkpoint_step(p)
        assert_no_corruption(p, ref)
        assert step is None or step % CHECKPOINT_EVERY == 0 or step == TOTAL_STEPS  # a kill cannot save one
        healed = heal(p, ref, log, stage, *targets)
        if stage == "train" and step is not None and step < TOTAL_STEPS:
            assert f"resuming at step {step:,}" in healed.stdout + healed.stderr, "train did not resume"
        tally.healed += 1
        record.append({"mode": mode, "point": where, "temps": temps, "checkpoint": step})
    # The heals' reruns swept what the killed writers left behind.
    assert temp_entries(p) == [], (record, log.read_text()[-3000:])
    return record


# --------------------------------------------------------------------------- the tests


def test_download_killed_mid_transfer(reference, tally, tmp_path):
    p = copy_of(reference.project, tmp_path / "repo")
    plan = [("direct", "transfer"), ("dvc", "transfer")] * 3
    record = kill_and_heal(p, reference, tally, "download", plan, tmp_path)
    assert all(r["temps"] for r in record)  # each kill left a partial download behind, which was not used


# Every kill point of a stage, through the stage alone and through `dvc repro`, several times each at seeded
# random moments: 50 kills in all, with train's 8 and the 2 Ctrl-Cs below.
DATA_PLAN = [("direct", "write"), ("dvc", "random"), ("direct", "random"), ("dvc", "write")]


@pytest.mark.parametrize("stage, plan", [
    ("prepare", DATA_PLAN + DATA_PLAN[:3]),
    ("vocab", DATA_PLAN + DATA_PLAN[:3]),
    ("pack", DATA_PLAN * 2),
])
def test_data_stage_killed_while_writing(reference, tally, tmp_path, stage, plan):
    p = copy_of(reference.project, tmp_path / "repo")
    kill_and_heal(p, reference, tally, stage, plan, tmp_path)


def test_train_killed_between_and_during_checkpoint_writes(reference, tally, tmp_path):
    p = copy_of(reference.project, tmp_path / "repo")

    def fresh_start(p):  # the reference's final checkpoint would make every run resume at the last step
        shutil.rmtree(p.path / "checkpoints", ignore_errors=True)

    plan = [("direct", "checkpoint-write"), ("dvc", "between-checkpoints")] * 4
    # `dvc repro train`: evaluate and generate would rerun only because model.pt records the training time;
    # the Ctrl-C test below heals with a plain `dvc repro`.
    record = kill_and_heal(p, reference, tally, "train", plan, tmp_path, before_each=fresh_start,
                           targets=("train",))
    assert all(r["checkpoint"] is not None for r in record), record  # each resumed from a checkpoint
    assert any(r["temps"] for r in record), record  # the first was killed mid-write of a checkpoint


@pytest.mark.parametrize("stage", ["evaluate", "generate"])
def test_model_stage_killed_at_random_points(reference, tally, tmp_path, stage):
    p = copy_of(reference.project, tmp_path / "repo")
    kill_and_heal(p, reference, tally, stage, [("direct", "random"), ("dvc", "random")] * 3 + [("dvc", "random")],
                  tmp_path)


@pytest.mark.parametrize("shell", ["/bin/bash", "/bin/sh"])
def test_ctrl_c_of_dvc_repro_saves_a_checkpoint_and_resumes(reference, tally, tmp_path, shell):
    """SIGINT to the whole process group of `dvc repro train`, as a terminal's Ctrl-C sends it.

    DVC runs a stage's cmd through `$SHELL -c` (/bin/sh when SHELL is unset). bash and zsh exec a lone
    command, so DVC sees the stage's own exit status 130. dash stays in between and dies of the SIGINT
    itself, so DVC reports -2 and returns while the stage is still saving its checkpoint. Either way the
    checkpoint must be saved and complete.
    """
    if not Path(shell).exists():
        pytest.skip(f"{shell} is not installed")
    p = copy_of(reference.project, tmp_path / "repo")
    shutil.rmtree(p.path / "checkpoints")
    log = tmp_path / "ctrl-c.log"
    proc = launch(p, "train", True, log, SHELL=shell)
    try:
        assert wait_until(proc, lambda: (p.path / "checkpoints/train.pt").exists(), pause=0.01)
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(timeout=120)
        assert wait_for_group(proc), "the train stage kept running after Ctrl-C"
    finally:
        kill(proc)  # the whole session, also a stage that outlived DVC; a no-op once everything has exited
    out = log.read_text()
    step = checkpoint_step(p)
    assert step is not None
    if step < TOTAL_STEPS:  # (on a very fast machine the run may have ended before the signal)
        assert proc.returncode != 0
        assert f"train: interrupted; checkpoint saved at step {step:,}; rerun to resume" in out, out
        status = re.search(r"failed to run: python -m stages\.train, exited with (-?\d+)", out)
        assert status, out
        allowed = {"130"} if shell == "/bin/bash" else {"130", "-2"}
        assert status.group(1) in allowed, out
        assert "Traceback" not in out
        tally.interrupts += 1
    assert_no_corruption(p, reference)
    healed = heal(p, reference, log, "train")
    if step < TOTAL_STEPS:
        assert f"resuming at step {step:,}" in healed.stdout + healed.stderr
