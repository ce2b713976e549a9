"""Shared pieces of the benchmarks: interleaved time-bounded measurement, statistics, Markdown tables,
machine facts, and the real data stages run in a throw-away folder.

Every throughput figure is the median of several repeats with its min-max range. Cases that are compared
with each other are measured in the same run, interleaved round by round (the order rotates every round),
so slow drift of a busy machine hits all of them alike; a ratio is the median of the per-round ratios.
"""
from __future__ import annotations

import contextlib
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import yaml

ROOT = Path(__file__).resolve().parent.parent
AG_NEWS_CSV = ROOT.parent / "shared" / "data" / "ag_news" / "test.csv"
TRAIN_ROWS = 6600
CUDA = "cuda"  # the device of the CUDA columns and tables, which appear only when torch.cuda.is_available()


def shape_name(layers: int, hidden: int, embedding: int) -> str:
    return f"{layers}×{hidden} " + ("one-hot" if embedding == 0 else f"emb {embedding}")


# ----------------------------------------------------------------------------------- statistics


@dataclass
class Stat:
    values: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.values)

    @property
    def lo(self) -> float:
        return min(self.values)

    @property
    def hi(self) -> float:
        return max(self.values)

    def fmt(self, unit: str = "", digits: int = 0, scale: float = 1.0) -> str:
        def f(v: float) -> str:
            return f"{v * scale:,.{digits}f}"

        if len(self.values) == 1:
            return f"{f(self.median)}{unit}"
        return f"{f(self.median)}{unit} ({f(self.lo)}–{f(self.hi)})"

    def pct(self) -> str:
        return self.fmt("%", 1, 100.0)


def ratio_stat(a: Stat, b: Stat) -> Stat:
    """Per-round ratios a/b (the rounds were interleaved, so round i of each belongs together)."""
    return Stat([x / y for x, y in zip(a.values, b.values, strict=True)])


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


@contextlib.contextmanager
def onednn(enabled: bool | None):
    """Set torch.backends.mkldnn.enabled for the block (None: leave the default alone)."""
    previous = torch.backends.mkldnn.enabled
    if enabled is not None:
        torch.backends.mkldnn.enabled = enabled
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = previous


@dataclass
class Case:
    """One thing to time. `unit()` does one indivisible piece of work and returns how many items it did
    (characters); the case's rate is items / seconds over as many units as fit in the budget."""
    name: str
    unit: Callable[[], float]
    device: str = "cpu"
    mkldnn: bool | None = None
    warmup_units: int = 1
    warm: Callable[[], object] | None = None   # extra warm-up, run before the first round
    rates: list[float] = field(default_factory=list)
    amounts: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)

    @property
    def stat(self) -> Stat:
        return Stat(self.rates)


def measure(cases: list[Case], repeats: int, budget_s: float, log=None, cap_s: float | None = None) -> dict[str, Stat]:
    """Time every case `repeats` times, round-robin with a rotating order; `budget_s` per case per round.

    A measurement runs whole units until `budget_s` has passed (at least one unit). With `cap_s`,
    no new round starts once the rounds so far took that long (at least one round runs)."""
    t_start = time.perf_counter()
    for case in cases:
        with onednn(case.mkldnn):
            if case.warm is not None:
                case.warm()
            for _ in range(case.warmup_units):
                case.unit()
            sync(case.device)
    for r in range(repeats):
        if r and cap_s is not None and time.perf_counter() - t_start >= cap_s:
            break
        order = cases[r % len(cases):] + cases[:r % len(cases)]
        for case in order:
            with onednn(case.mkldnn):
                sync(case.device)
                done = 0.0
                t0 = time.perf_counter()
                while True:
                    done += case.unit()
                    if time.perf_counter() - t0 >= budget_s:
                        break
                sync(case.device)
                elapsed = time.perf_counter() - t0
            case.rates.append(done / elapsed)
            case.amounts.append(done)
            case.seconds.append(elapsed)
        if log:
            log(f"    round {r + 1}/{repeats}: " + ", ".join(f"{c.name} {c.rates[-1]:,.0f}" for c in cases))
    return {c.name: c.stat for c in cases}


def time_calls(fn: Callable[[], object], budget_s: float, repeats: int = 5, device: str = "cpu",
               min_calls: int = 2) -> Stat:
    """Seconds per call of a function: `repeats` means, each over as many calls as fit in budget_s / repeats
    (at least `min_calls`), after one warm-up call."""
    fn()
    sync(device)
    out = []
    for _ in range(repeats):
        n = 0
        t0 = time.perf_counter()
        while n < min_calls or time.perf_counter() - t0 < budget_s / repeats:
            fn()
            n += 1
        sync(device)
        out.append((time.perf_counter() - t0) / n)
    return Stat(out)


# ----------------------------------------------------------------------------------- tables


@dataclass
class Table:
    title: str
    header: list[str]
    rows: list[list[str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, *cells) -> None:
        self.rows.append([str(c) for c in cells])

    def markdown(self) -> str:
        def esc(cell: str) -> str:
            return cell.replace("|", "\\|")

        out = [f"#### {self.title}", "", "| " + " | ".join(self.header) + " |",
               "|" + "|".join("---" if i == 0 else "---:" for i in range(len(self.header))) + "|"]
        out += ["| " + " | ".join(esc(c) for c in row) + " |" for row in self.rows]
        if self.notes:
            out += [""] + [f"- {n}" for n in self.notes]
        return "\n".join(out) + "\n"


def best_of(cells: dict[str, Stat]) -> str:
    """The name of the case with the highest median."""
    return max(cells, key=lambda k: cells[k].median)


# ----------------------------------------------------------------------------------- machine facts


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                keep = [f for f in ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16")
                        if f in flags]
                return " ".join(keep) or "none of avx2/avx512/amx"
    except OSError:
        pass
    return "unknown"


def git_revision() -> str:
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return (rev or "unknown") + (" (with uncommitted changes)" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def machine_facts() -> dict[str, str]:
    facts = {
        "CPU": cpu_model(),
        "CPU flags (relevant)": cpu_flags(),
        "cores (os.cpu_count / usable)": f"{os.cpu_count()} / {len(os.sched_getaffinity(0))}",
        "torch threads (intra-op)": str(torch.get_num_threads()),
        "torch": torch.__version__,
        "oneDNN available": str(torch.backends.mkldnn.is_available()),
        "numpy": np.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "git revision": git_revision(),
        "date": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        "load average at start (1/5/15 min)": " / ".join(f"{x:.2f}" for x in os.getloadavg()),
    }
    if torch.cuda.is_available():
        facts["CUDA device"] = torch.cuda.get_device_name(0)
        facts["CUDA"] = str(torch.version.cuda)
    return facts


# ----------------------------------------------------------------------------------- data and stages


def stage_env() -> dict[str, str]:
    """Stages import `charlm` from the repository, whatever the current folder."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


@dataclass
class StageRun:
    seconds: float
    maxrss_bytes: int
    output: str


# A child's ru_maxrss starts from the RSS of the process it was forked from (Linux keeps the pre-exec
# high-water mark), so a stage forked straight from this big process would report this process's RSS.
# A minimal launcher (no imports beyond os/sys/time/json) forks the stage instead and reports its rusage.
_LAUNCHER = """
import json, os, sys, time
t0 = time.perf_counter()
pid = os.fork()
if pid == 0:
    os.execv(sys.argv[1], sys.argv[1:])
_, status, usage = os.wait4(pid, 0)
print(json.dumps([time.perf_counter() - t0, usage.ru_maxrss, os.waitstatus_to_exitcode(status)]), file=sys.stderr)
"""


def run_stage(name: str, cwd: Path, args: list[str] | None = None) -> StageRun:
    """Run `python stages/<name>.py` (or `python *args`) as a fresh child in `cwd`: its own wall time and peak
    RSS, via a minimal launcher process (see _LAUNCHER)."""
    cmd = [sys.executable, str(ROOT / "stages" / f"{name}.py")] if args is None else [sys.executable, *args]
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as report:
        subprocess.run([sys.executable, "-S", "-c", _LAUNCHER, *cmd], cwd=cwd, stdout=out, stderr=report,
                       env=stage_env(), check=False)
        out.seek(0)
        report.seek(0)
        text = out.read().decode("utf-8", "replace")
        lines = report.read().decode("utf-8", "replace").strip().splitlines()
    try:
        seconds, maxrss_kib, code = json.loads(lines[-1])
    except (IndexError, ValueError):
        raise RuntimeError(f"{' '.join(cmd)}: the launcher failed in {cwd}:\n" + "\n".join(lines)) from None
    if code != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed in {cwd} (exit {code}):\n{text}\n" + "\n".join(lines[:-1]))
    return StageRun(seconds, maxrss_kib * 1024, text + "\n".join(lines[:-1]))  # ru_maxrss is in KiB on Linux


def write_params(folder: Path, **overrides) -> None:
    """The repository's params.yaml, with `section.key` overrides, as ./params.yaml of `folder`."""
    if not overrides:
        shutil.copyfile(ROOT / "params.yaml", folder / "params.yaml")
        return
    data = yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))
    for key, value in overrides.items():
        section, name = key.split("__")
        data[section][name] = value
    (folder / "params.yaml").write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")


@dataclass
class Prepared:
    """The AG News benchmark data after the real prepare, vocab and pack stages."""
    folder: Path
    seconds: dict[str, float]

    @property
    def data(self) -> Path:
        return self.folder / "data"

    def vocab(self):
        from charlm.core.vocab import Vocab
        return Vocab.load(self.data / "vocab.json")

    def packed(self):
        from charlm.core.data import load_packed
        return load_packed(self.data / "packed")

    def train_items(self) -> list[str]:
        """The train items that pack kept for training (validation items carved out exactly as pack does)."""
        from charlm.pipeline import params
        from charlm.core.data import split_items
        p = params.load(params.PackParams, self.folder / "params.yaml")
        items = (self.data / "prepared" / "train.txt").read_text(encoding="utf-8").splitlines()
        return split_items(items, p.val_fraction, p.seed)[0]


def prepare_ag_news(root: Path, csv: Path = AG_NEWS_CSV, train_rows: int = TRAIN_ROWS,
                    test_rows: int = 1000) -> Prepared:
    """First `train_rows` rows of the AG News CSV as data/raw/train.csv, the last `test_rows` as test.csv,
    the repository's params.yaml, then the real stages with cwd = `root`. The text stays in `root`."""
    if not csv.is_file():
        raise SystemExit(f"bench: {csv} not found; the benchmark needs the local AG News CSV")
    lines = csv.read_bytes().splitlines(keepends=True)
    raw = root / "data" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    (raw / "train.csv").write_bytes(b"".join(lines[:train_rows]))
    (raw / "test.csv").write_bytes(b"".join(lines[-test_rows:]))
    write_params(root)
    seconds = {s: run_stage(s, root).seconds for s in ("prepare", "vocab", "pack")}
    return Prepared(root, seconds)
