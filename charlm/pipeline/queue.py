"""DVC's experiment queue for the playground: queue, start, kill, remove, logs, states, and the live curves of a
running experiment. Everything acts through the `dvc` command, as a user at a terminal would (`dvc.api` has no
queue API), in the current directory, the repository root.

`dvc exp run --queue` briefly rewrites params.yaml and moves HEAD, and DVC's own lock refuses a second DVC command
meanwhile: every command here runs under one lock, and `git status` is the same after queueing as before (tests).
The workers that `dvc queue start` spawns run the `dvc` (and the stages' `python`) found on PATH, so PATH starts
with this interpreter's folder; each job gets its share of the cores as OMP_NUM_THREADS, which torch reads.
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import re
import stat
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from charlm.base.errors import CharlmError
from charlm.pipeline import form, params, paths
from charlm.pipeline.experiments import DVC_LOCK, check_rev

MAX_QUEUED = 16  # experiments waiting in the queue at once, all requests together
LOG_LINES = 40  # last lines of a log shown
LOG_LINE_CHARS = 1_000  # of each (a progress bar's carriage returns make one line of a whole run)
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,62}")
PREPARING_STATUS, RUNNING_STATUS = 1, 2  # DVC's TaskStatus in an executor's info file (private layout: live())
STATES = ("Queued", "Running", "Success", "Failed")
# One queueing at a time, from its checks (the name unused, room under MAX_QUEUED) to `dvc exp run --queue`: two
# requests at once would both pass them. Readers of params.yaml take it too: queueing rewrites the file meanwhile.
QUEUEING = threading.Lock()
_BIN = Path(sys.executable).parent


def env(jobs: int | None = None) -> dict[str, str]:
    """The environment of a `dvc` command: this interpreter's folder first on PATH (the workers run `dvc`, the
    stages `python`, from PATH), and with `jobs` given, each job's share of the cores as its thread count."""
    out = {**os.environ, "PATH": f"{_BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    if jobs is not None:
        out["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // jobs))
    return out


def _first_error(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("ERROR")]
    line = (errors or lines or ["no output"])[-1]
    return line.removeprefix("ERROR:").strip()[:300]


def dvc(*args: str, timeout: float = 120, jobs: int | None = None) -> str:
    """Run `dvc ARGS` under the lock and return its output; a CharlmError with DVC's own line when it fails. DVC's
    repository lock, held a moment by a worker saving its result, is waited for."""
    command = [str(_BIN / "dvc"), *args]
    with DVC_LOCK:
        for attempt in range(20):
            # Files, not pipes: the workers that `dvc queue start` leaves running inherit its output, and reading
            # a pipe would wait for them to end.
            with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
                try:
                    code = subprocess.run(command, stdout=out, stderr=err, timeout=timeout, env=env(jobs)).returncode
                except subprocess.TimeoutExpired:
                    raise CharlmError(f"`dvc {' '.join(args[:3])}` took over {timeout:.0f} s; try again") from None
                stdout, stderr = (_text(f) for f in (out, err))
            if code == 0:
                return stdout
            if "Unable to acquire lock" not in stderr + stdout or attempt == 19:
                raise CharlmError(f"dvc {args[0]} {args[1] if len(args) > 1 else ''}: {_first_error(stderr)}")
            time.sleep(0.5)
    raise AssertionError("unreachable")


OUTPUT_BYTES = 1 << 20  # of a dvc command's output kept, from its end: a run's log can be any size


def _text(f) -> str:
    size = f.seek(0, os.SEEK_END)
    f.seek(max(0, size - OUTPUT_BYTES))
    return f.read().decode("utf-8", errors="replace")


def git_status() -> str:
    return subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True, check=True).stdout


# --------------------------------------------------------------------------- states


def _plain(value: Any) -> Any:
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


# dvc.api.exp_show() in a child process: in-process, it hung for good once (reading a git blob of a run that was
# ending), and a hung call here would hold the lock and freeze the Run part; a child can be given up on.
_EXP_SHOW = "import dvc.api, json, sys; json.dump(dvc.api.exp_show(force=True), sys.stdout, default=str)"


def exp_show(timeout: float = 60) -> list[dict]:
    """`dvc.api.exp_show()`: one flat row per revision and experiment, DVC's documented table."""
    with DVC_LOCK:
        for attempt in range(2):
            try:
                proc = subprocess.run([sys.executable, "-c", _EXP_SHOW], capture_output=True, text=True,
                                      timeout=timeout, env=env())  # fmt: skip
            except subprocess.TimeoutExpired:
                if attempt == 1:
                    raise CharlmError(f"reading the experiments took over {timeout:.0f} s twice; try again") from None
                continue
            if proc.returncode == 0:
                return json.loads(proc.stdout)
            if attempt == 1:
                raise CharlmError(f"the experiments could not be read ({_first_error(proc.stderr)})")
            # Read again once: DVC fails on its own lock, or on the temporary folder of a run that ended meanwhile
            # ("directory '.dvc/tmp/exps/tmp…/.dvc' does not exist"); the next read sees the run ended.
            time.sleep(0.5)
    raise AssertionError("unreachable")


def experiments() -> list[dict]:
    """Every experiment of `dvc.api.exp_show()` (queued, running, failed or finished) as {name, rev, state,
    executor, created, val_bpc, test_bpc, params}: state from its State column (a finished one has none: Success),
    params those that differ from the workspace's (as exp_show gives them)."""
    rows = exp_show()
    workspace: dict = next((r for r in rows if r.get("rev") == "workspace"), {})
    # exp_show names a column by its key alone unless two files share it: params.yaml's keys, in either spelling
    ours = form.flat(params.read_yaml())
    param_keys = {k: c for k in ours for c in (k, f"{params.PARAMS_FILE}:{k}") if c in workspace}
    out = []
    for row in rows:
        name = row.get("Experiment")
        if not name:
            continue
        state = row.get("State") or "Success"
        out.append(
            {
                "name": name,
                "rev": row.get("rev"),
                "state": state if state in STATES else str(state),
                "executor": row.get("Executor"),
                "created": row.get("Created"),
                # A running experiment's row holds its live val bpc but the baseline's test bpc: that one is left out.
                "val_bpc": _number(row, "val.bpc") if state in ("Running", "Success") else None,
                "test_bpc": _number(row, "test_bpc") if state == "Success" else None,
                "params": {k: _plain(row.get(c)) for k, c in param_keys.items() if row.get(c) != workspace.get(c)},
            }
        )
    return out


def _number(row: dict, key: str) -> float | None:
    for k, v in row.items():
        if (k == key or k.endswith(":" + key)) and isinstance(v, (int, float)) and math.isfinite(v):
            return float(v)
    return None


def _find(name: str, rows: list[dict]) -> dict:
    for row in rows:
        if row["name"] == name:
            return row
    raise CharlmError(f"no experiment named {name!r} here; the queue's list shows the names")


def check_name(name: Any) -> str:
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise CharlmError("the name must be 1 to 63 letters, digits, '-' or '_', starting with a letter or digit")
    return name


def check_new_name(name: Any) -> str:
    """A name for a new experiment: also none that git resolves (a branch, a tag, HEAD, a commit's prefix), which
    every look-up by revision would find before the experiment."""
    check_name(name)
    found = subprocess.run(["git", "rev-parse", "--verify", "--quiet", f"{name}^{{commit}}"], capture_output=True)
    if found.returncode == 0:
        raise CharlmError(f"{name!r} already names a git revision (a branch, tag or commit); choose another name")
    return name


# --------------------------------------------------------------------------- acting


def base_values(rev: str | None) -> dict[str, str]:
    """The -S text of every key whose value at experiment or revision `rev` differs from the workspace's: what makes
    a queued run start from that experiment's params over HEAD's code. None: the workspace itself, no key."""
    if rev is None:
        return {}
    import dvc.api

    # An experiment by its own commit: git would resolve a name such as `main` to the branch first.
    rev = next((r["rev"] for r in experiments() if r["name"] == rev and r.get("rev")), rev)

    try:
        with DVC_LOCK:
            theirs = form.flat(dvc.api.params_show(rev=check_rev(rev)))
    except CharlmError:
        raise
    except Exception as e:  # DVC names the problem in its own exception types
        raise CharlmError(f"cannot read the params of {rev!r} ({_first_error(str(e) or type(e).__name__)})") from None
    ours = form.flat(params.read_yaml())
    return {k: form.override_text(v) for k, v in theirs.items() if k in ours and v != ours[k]}


def queue(name: Any, values: dict[str, str], base: str | None = None) -> list[str]:
    """Queue the experiments that `values` ({key: -S text}, over `base`'s params) make, under `name` (`name-1`,
    `name-2`, ... for a sweep, as DVC names them); the names queued. Every experiment is checked first, a name in
    use and more than MAX_QUEUED waiting are refused: nothing is queued then."""
    with QUEUEING:
        return _queue(name, values, base)


def _queue(name: str, values: dict[str, str], base: str | None) -> list[str]:
    check_new_name(name)
    merged = {**base_values(base), **values}
    if not merged:
        raise CharlmError("nothing differs from the workspace's params; change a value first")
    experiments_ = form.check(merged)
    names = [name] if len(experiments_) == 1 else [f"{name}-{i + 1}" for i in range(len(experiments_))]
    rows = experiments()
    used = {r["name"] for r in rows} & set(names)
    if used:
        raise CharlmError(f"the name {sorted(used)[0]!r} is already used; choose another")
    waiting = sum(r["state"] == "Queued" for r in rows)
    if waiting + len(names) > MAX_QUEUED:
        raise CharlmError(
            f"the queue holds {waiting} waiting experiments and takes at most {MAX_QUEUED}; start it or remove some"
        )
    sets = [arg for text in form.overrides_of(merged, set(merged)) for arg in ("-S", text)]
    dvc("exp", "run", "--queue", "-n", name, *sets)
    return names


def start(jobs: Any) -> int:
    """`dvc queue start -j jobs`, each job's stages with cores // jobs threads; the number of jobs."""
    cores = os.cpu_count() or 1
    if not isinstance(jobs, int) or isinstance(jobs, bool) or not 1 <= jobs <= cores:
        raise CharlmError(f"jobs must be a whole number from 1 to {cores} (the cores here)")
    dvc("queue", "start", "-j", str(jobs), jobs=jobs)
    return jobs


def kill(name: str) -> None:
    """Interrupt a running experiment (train saves its checkpoint first, so queueing it again resumes)."""
    row = _find(check_name(name), experiments())
    if row["state"] != "Running":
        raise CharlmError(f"{name!r} is {row['state'].lower()}, not running; only a running experiment is killed")
    dvc("queue", "kill", name)


def remove(name: str) -> None:
    """Remove a queued, failed or finished experiment (a running one is killed first)."""
    row = _find(check_name(name), experiments())
    if row["state"] == "Running":
        raise CharlmError(f"{name!r} is running; kill it first")
    if row["state"] == "Success":
        dvc("exp", "remove", name)
    else:
        dvc("queue", "remove", name)


def logs(name: str) -> str:
    """The last LOG_LINES lines of an experiment's output in the queue."""
    _find(check_name(name), experiments())
    text = dvc("queue", "logs", name)
    return "\n".join(line[:LOG_LINE_CHARS] for line in text.splitlines()[-LOG_LINES:])


def stop(kill_running: bool = False) -> None:
    """`dvc queue stop` once the running experiments end, or at once with `kill_running`."""
    dvc("queue", "stop", *(["--kill"] if kill_running else []))


def worker_pids(root: Path | str = ".") -> list[int]:
    """Processes of DVC's queue (its workers and the runs they execute) working in `root` or below (Linux)."""
    root = Path(root).resolve()
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            args = (proc / "cmdline").read_bytes().split(b"\0")
            if not any(a in (b"queue-worker", b"exec-run") for a in args):
                continue
            cwd = Path(os.readlink(proc / "cwd"))
            if cwd == root or root in cwd.parents:
                found.append(int(proc.name))
    return found


# --------------------------------------------------------------------------- live curves


LIVE_BYTES = 1 << 20  # of a run's log file read, from its end: a page needs the curve's shape, not every row
LIVE_POINTS = 2_000  # points of a live curve pushed to the page; a longer one is thinned, its last point kept


def _tail(path: Path, limit: int = LIVE_BYTES) -> tuple[str, str]:
    """(the first line, the last `limit` bytes after it) of a regular file, as text: a FIFO would block the reader,
    a link could lead anywhere (/dev/zero, another user's file), and the run's folder is written by the run.
    OSError otherwise."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0))
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(f"{path} is not a regular file")
        first = f.readline(4096)
        start = max(f.tell(), os.fstat(fd).st_size - limit)
        f.seek(start)
        rest = f.read(limit)
    if start > len(first):
        rest = rest.partition(b"\n")[2]  # the first line of the tail is cut
    return first.decode("utf-8", errors="replace").rstrip("\n"), rest.decode("utf-8", errors="replace")


def _read_tsv(header: str, rows: str, column: str) -> list[list[float]]:
    points = []
    for row in csv.DictReader([header, *rows.splitlines()], delimiter="\t"):
        with contextlib.suppress(KeyError, TypeError, ValueError, OverflowError):
            step, value = int(float(row["step"])), float(row[column])
            if math.isfinite(value):
                points.append([step, value])
    if len(points) > LIVE_POINTS:  # thinned evenly, the last point kept
        every = math.ceil(len(points) / LIVE_POINTS)
        points = points[::every] + ([points[-1]] if (len(points) - 1) % every else [])
    return points


def live(name: str, dvc_dir: Path | str = ".dvc") -> dict | None:
    """The train and val bpc curves, and the latest training sample, of experiment `name` while it runs: None when
    no run of that name is under way.

    This reads DVC's private layout, the one place that does (tests/test_runs.py holds it to the DVC installed): a
    queued run's executor writes `<dvc_dir>/tmp/exps/run/<stash rev>/<stash rev>.run`, JSON whose `name` is the
    experiment and `root_dir` the temporary copy it runs in, where DVCLive writes as in the workspace."""
    for info_file in Path(dvc_dir, "tmp", "exps", "run").glob("*/*.run"):
        try:
            info = json.loads("\n".join(_tail(info_file)))
        except (OSError, ValueError):  # written as we read, or removed at the run's end
            continue
        if not isinstance(info, dict) or info.get("name") != name or not isinstance(info.get("root_dir"), str):
            continue
        if info.get("status") not in (RUNNING_STATUS, PREPARING_STATUS):  # a finished run's file stays a while
            continue
        root = Path(info["root_dir"])
        out: dict[str, Any] = {"train": [], "val": [], "sample": None, "step": None}
        for split in ("train", "val"):
            with contextlib.suppress(OSError, UnicodeDecodeError):
                out[split] = _read_tsv(*_tail(root / paths.LIVE / "plots/metrics" / split / "bpc.tsv"), "bpc")
        with contextlib.suppress(OSError, UnicodeDecodeError):
            samples = "\n".join(_tail(root / paths.TRAIN_SAMPLES))
            if "\n## step " in samples:
                head, _, body = samples.rpartition("\n## step ")[2].partition("\n")
                out["step"], out["sample"] = int(head) if head.strip().isdigit() else None, body.strip()
        return out
    return None
