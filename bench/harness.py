"""Shared pieces of the benchmarks: interleaved time-bounded measurement, statistics, Markdown tables,
machine facts, params, and the real data stages run in a throw-away folder.

Every throughput figure is the median of several repeats with its min-max range. Cases that are compared
with each other are measured in the same run, interleaved round by round (the order rotates every round),
so slow drift of a busy machine hits all of them alike; a ratio is the median of the per-round ratios.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import yaml

from charlm.core.data import Packed, load_packed, split_items
from charlm.core.vocab import Vocab
from charlm.pipeline import paths
from charlm.pipeline.params import load

# The one import of params.yaml's section classes in bench/: everything else goes through params_of.
from charlm.pipeline.sections.model import ModelParams
from charlm.pipeline.sections.pack import PackParams
from charlm.pipeline.sections.train import TrainParams

ROOT = Path(__file__).resolve().parent.parent
TRAIN_ROWS, TEST_ROWS = 6600, 1000  # the bench split of the AG News test file
CUDA = "cuda"  # the device of the CUDA columns and tables, which appear only when torch.cuda.is_available()

# bench/serve_speed.py's part of BENCHMARKS.md starts here and runs to the end of the file; `make bench` and
# bench/quality.py keep it as it is when they rewrite theirs.
PLAYGROUND_MARKER = "<!-- playground: written by bench/serve_speed.py; the other benchmarks keep this part -->"


def params_of(cls, path: Path = ROOT / "params.yaml", **overrides):
    """A section of `path` (the repository's params.yaml by default), as the stages load it, with overrides."""
    return dataclasses.replace(load(cls, path), **overrides)


def model_params(**overrides) -> ModelParams:
    return params_of(ModelParams, **overrides)


def train_params(**overrides) -> TrainParams:
    return params_of(TrainParams, **overrides)


def shape_name(layers: int, hidden: int, embedding: int) -> str:
    return f"{layers}×{hidden} " + ("one-hot" if embedding == 0 else f"emb {embedding}")


@dataclass
class Stat:
    values: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.values)

    def fmt(self, unit: str = "", digits: int = 0, scale: float = 1.0) -> str:
        def f(v: float) -> str:
            return f"{v * scale:,.{digits}f}"

        if len(self.values) == 1:
            return f"{f(self.median)}{unit}"
        return f"{f(self.median)}{unit} ({f(min(self.values))}–{f(max(self.values))})"

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
        torch.backends.mkldnn.enabled = enabled  # type: ignore[assignment]  # torch's stub types the descriptor
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
    warm: Callable[[], object] | None = None  # the warm-up before the first round (default: one unit)
    rates: list[float] = field(default_factory=list)
    amounts: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)

    @property
    def stat(self) -> Stat:
        return Stat(self.rates)

    def warm_up(self) -> None:
        with onednn(self.mkldnn):
            (self.warm or self.unit)()
            sync(self.device)

    def run(self, budget_s: float) -> None:
        """Whole units until `budget_s` has passed (at least one)."""
        with onednn(self.mkldnn):
            sync(self.device)
            done, t0 = 0.0, time.perf_counter()
            while True:
                done += self.unit()
                if time.perf_counter() - t0 >= budget_s:
                    break
            sync(self.device)
            elapsed = time.perf_counter() - t0
        self.rates.append(done / elapsed)
        self.amounts.append(done)
        self.seconds.append(elapsed)


def measure(cases: list[Case], repeats: int, budget_s: float, log=None, cap_s: float | None = None) -> dict[str, Stat]:
    """Time every case `repeats` times, round-robin with a rotating order; `budget_s` per case per round.
    With `cap_s`, no new round starts once the rounds so far took that long (at least one round runs)."""
    t_start = time.perf_counter()
    for case in cases:
        case.warm_up()
    for r in range(repeats):
        if r and cap_s is not None and time.perf_counter() - t_start >= cap_s:
            break
        for case in cases[r % len(cases) :] + cases[: r % len(cases)]:
            case.run(budget_s)
        if log:
            log(f"    round {r + 1}/{repeats}: " + ", ".join(f"{c.name} {c.rates[-1]:,.0f}" for c in cases))
    return {c.name: c.stat for c in cases}


def time_calls(fn: Callable[[], object], budget_s: float, repeats: int = 5, device: str = "cpu") -> Stat:
    """Seconds per call of a function: `repeats` means, each over as many calls as fit in budget_s / repeats
    (at least 2), after one warm-up call."""
    fn()
    sync(device)
    out = []
    for _ in range(repeats):
        n, t0 = 0, time.perf_counter()
        while n < 2 or time.perf_counter() - t0 < budget_s / repeats:
            fn()
            n += 1
        sync(device)
        out.append((time.perf_counter() - t0) / n)
    return Stat(out)


class Table:
    """A Markdown table; `header` is its column names joined by " | "."""

    def __init__(self, title: str, header: str):
        self.title, self.header = title, header.split(" | ")
        self.rows: list[list[str]] = []
        self.notes: list[str] = []

    def add(self, *cells) -> None:
        self.rows.append([str(c) for c in cells])

    def markdown(self) -> str:
        rule = "|" + "|".join("---" if i == 0 else "---:" for i in range(len(self.header))) + "|"
        out = [f"#### {self.title}", "", "| " + " | ".join(self.header) + " |", rule]
        out += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in self.rows]
        if self.notes:
            out += [""] + [f"- {n}" for n in self.notes]
        return "\n".join(out) + "\n"


def best_of(cells: dict[str, Stat]) -> str:
    """The name of the case with the highest median."""
    return max(cells, key=lambda k: cells[k].median)


def load_line() -> str:
    return " / ".join(f"{x:.2f}" for x in os.getloadavg())


def cpu_info(key: str) -> str | None:
    """The first /proc/cpuinfo line that starts with `key`, after its colon."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(key):
                return line.split(":", 1)[1].strip()
    return None


def git_revision() -> str:
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10).stdout.strip()

    try:
        dirty = git("status", "--porcelain", "--untracked-files=no")
        return (git("rev-parse", "--short", "HEAD") or "unknown") + (" (with uncommitted changes)" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def machine_facts() -> dict[str, str]:
    flags = (cpu_info("flags") or "").split()
    wanted = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16")
    facts = {
        "CPU": cpu_info("model name") or platform.processor() or "unknown",
        "CPU flags (relevant)": " ".join(f for f in wanted if f in flags)
        or ("none of avx2/avx512/amx" if flags else "unknown"),
        "cores (os.cpu_count / usable)": f"{os.cpu_count()} / {len(os.sched_getaffinity(0))}",
        "torch threads (intra-op)": str(torch.get_num_threads()),
        "torch": torch.__version__,
        "oneDNN available": str(torch.backends.mkldnn.is_available()),
        "numpy": np.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "git revision": git_revision(),
        "date": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        "load average at start (1/5/15 min)": load_line(),
    }
    if torch.cuda.is_available():
        facts["CUDA device"] = torch.cuda.get_device_name(0)
        facts["CUDA"] = str(torch.version.cuda)
    return facts


@dataclass
class StageRun:
    seconds: float
    maxrss_bytes: int


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
    env = dict(os.environ)  # stages import `charlm` from the repository, whatever the current folder
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    launch = [sys.executable, "-S", "-c", _LAUNCHER, *cmd]
    proc = subprocess.run(launch, cwd=cwd, capture_output=True, text=True, errors="replace", env=env)
    lines = proc.stderr.strip().splitlines()
    try:
        seconds, maxrss_kib, code = json.loads(lines[-1])
    except (IndexError, ValueError):
        raise RuntimeError(f"{' '.join(cmd)}: the launcher failed in {cwd}:\n" + "\n".join(lines)) from None
    if code != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed in {cwd} (exit {code}):\n{proc.stdout}\n" + "\n".join(lines[:-1]))
    return StageRun(seconds, maxrss_kib * 1024)  # ru_maxrss is in KiB on Linux


def write_params(folder: Path, overrides: dict[str, object] | None = None) -> None:
    """The repository's params.yaml, with `section.key` overrides, as ./params.yaml of `folder`."""
    if not overrides:
        shutil.copyfile(ROOT / "params.yaml", folder / "params.yaml")
        return
    data = yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))
    for key, value in overrides.items():
        section, name = key.split(".")
        data[section][name] = value
    (folder / "params.yaml").write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")


def add_ag_news_argument(parser: argparse.ArgumentParser, required: bool = True) -> None:
    def csv_file(value: str) -> Path:
        if not Path(value).is_file():
            raise argparse.ArgumentTypeError(f"{value} is not a file; give a local copy of the AG News test split")
        return Path(value)

    help = "a local copy of the AG News test split (test.csv: label,title,description)"
    parser.add_argument("--ag-news", type=csv_file, required=required, metavar="PATH", help=help)


def split_rows(csv: Path, train_rows: int = TRAIN_ROWS, test_rows: int | None = None) -> tuple[bytes, bytes]:
    """The first `train_rows` rows of an AG News CSV as train, and the last `test_rows` (default: the rest) as test."""
    lines = csv.read_bytes().splitlines(keepends=True)
    return b"".join(lines[:train_rows]), b"".join(lines[-test_rows:] if test_rows else lines[train_rows:])


@dataclass
class Prepared:
    """The AG News benchmark data after the real prepare, vocab and pack stages."""

    folder: Path
    seconds: dict[str, float]

    def vocab(self) -> Vocab:
        return Vocab.load(self.folder / paths.VOCAB)

    def packed(self) -> Packed:
        return load_packed(self.folder / paths.PACKED)

    def items(self, split: str) -> list[str]:
        return (self.folder / paths.PREPARED / f"{split}.txt").read_text(encoding="utf-8").splitlines()

    def train_items(self) -> list[str]:
        """The train items that pack kept for training (validation items carved out exactly as pack does)."""
        p: PackParams = params_of(PackParams, self.folder / "params.yaml")
        return split_items(self.items("train"), p.val_fraction, p.seed)[0]


def prepare_ag_news(root: Path, csv: Path) -> Prepared:
    """The bench split of the AG News CSV (split_rows) as data/raw/, the repository's params.yaml, then the
    real stages with cwd = `root`. The text stays in `root`."""
    raw = root / paths.RAW
    raw.mkdir(parents=True, exist_ok=True)
    train, test = split_rows(csv, TRAIN_ROWS, TEST_ROWS)
    (raw / "train.csv").write_bytes(train)
    (raw / "test.csv").write_bytes(test)
    write_params(root)
    seconds = {s: run_stage(s, root).seconds for s in ("prepare", "vocab", "pack")}
    return Prepared(root, seconds)
