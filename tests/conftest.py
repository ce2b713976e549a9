"""Shared fixtures: AG-News-format CSV builders, a loopback HTTP server with fault modes, and throw-away
DVC projects (a temporary git repo holding a copy of the pipeline)."""
from __future__ import annotations

import csv
import http.server
import io
import os
import random
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
PIPELINE_FILES = ["dvc.yaml", "params.yaml", "stages", "charlm", "init", ".dvcignore"]

WORDS = ("market shares rose after the company said profit would beat forecasts as oil prices fell "
         "officials in the capital announced talks on trade and security with leaders of the region "
         "the team won its third straight game thanks to a late goal by the young striker "
         "scientists found that the new chip uses less power and runs faster than older designs").split()


def fake_item(rng: random.Random, n_words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n_words)).capitalize()


def ag_news_rows(n: int, seed: int = 0) -> list[tuple[str, str, str]]:
    """Synthetic AG-News-like rows (label, title, description), with some of the real escape debris."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        title = fake_item(rng, rng.randint(4, 9))
        desc = fake_item(rng, rng.randint(15, 40)) + "."
        if i % 5 == 0:
            desc = desc.replace(" the ", " the company #39;s ", 1)
        if i % 7 == 0:
            desc = "Reuters - " + desc + " \\" + fake_item(rng, 5) + "."
        rows.append((str(rng.randint(1, 4)), title, desc))
    return rows


def csv_bytes(rows) -> bytes:
    buf = io.StringIO()
    csv.writer(buf, quoting=csv.QUOTE_ALL, lineterminator="\n").writerows(rows)
    return buf.getvalue().encode("utf-8")


def md5(data: bytes) -> str:
    import hashlib
    return hashlib.md5(data).hexdigest()


# --------------------------------------------------------------------------- loopback HTTP server


class _Handler(http.server.BaseHTTPRequestHandler):
    server_version = "charlm-test"

    def log_message(self, *args):
        pass

    def do_GET(self):
        srv = self.server
        srv.requests.append((self.path, self.headers.get("Range")))
        mode = srv.modes.get(self.path, "ok")
        body = srv.files.get(self.path)
        if body is None or mode == "404":
            self.send_error(404, "Not Found")
            return
        if mode == "hang":
            time.sleep(srv.hang_seconds)
            return
        start = 0
        rng = self.headers.get("Range")
        if rng and mode != "no-range":
            start = int(rng.split("=")[1].split("-")[0])
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(body) - start))
        self.end_headers()
        payload = body[start:]
        if mode in ("die", "die-once", "no-range") and (mode == "die" or srv.deaths.get(self.path, 0) < 1):
            # Send part of the body, then drop the connection.
            srv.deaths[self.path] = srv.deaths.get(self.path, 0) + 1
            self.wfile.write(payload[: max(1, len(payload) // 3)])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(payload)


class LoopbackServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.files: dict[str, bytes] = {}
        self.modes: dict[str, str] = {}
        self.deaths: dict[str, int] = {}
        self.requests: list = []
        self.hang_seconds = 5.0

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}{path}"

    def serve(self, path: str, body: bytes, mode: str = "ok") -> str:
        """Serve `body` at `path`. Modes: ok, 404, die (always breaks mid-body), die-once (breaks once, then
        honours Range), no-range (breaks once, then ignores Range), hang (sends nothing)."""
        self.files[path], self.modes[path] = body, mode
        return self.url(path)


@pytest.fixture
def http_server():
    server = LoopbackServer()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


# --------------------------------------------------------------------------- throw-away DVC projects


class Project:
    """A temporary git repo holding a copy of the pipeline, with helpers to edit params and run commands."""

    def __init__(self, path: Path):
        self.path = path

    def params(self) -> dict:
        return yaml.safe_load((self.path / "params.yaml").read_text())

    def set_params(self, **sections) -> None:
        """set_params(train={"max_steps": 5}) merges keys into sections of params.yaml."""
        data = self.params()
        for section, values in sections.items():
            data.setdefault(section, {})
            _merge(data[section], values)
        (self.path / "params.yaml").write_text(yaml.safe_dump(data, sort_keys=False, allow_unicode=True))

    def run(self, *args, check: bool = True, timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
        # DVC runs each stage's `python` through PATH: put this interpreter's environment first.
        path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
        proc = subprocess.run(list(args), cwd=self.path, capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, "PATH": path, **(env or {})})
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(map(str, args))} exited {proc.returncode}\n"
                                 f"stdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}")
        return proc

    def stage(self, name: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
        """Run one stage script directly (no DVC), as `dvc repro` would."""
        return self.run(sys.executable, "-m", f"stages.{name}", check=check, **kw)

    def dvc(self, *args, check: bool = True, **kw) -> subprocess.CompletedProcess:
        return self.run(str(Path(sys.executable).parent / "dvc"), *args, check=check, **kw)

    def git(self, *args, check: bool = True) -> subprocess.CompletedProcess:
        return self.run("git", *args, check=check)


def _merge(target: dict, values: dict) -> None:
    for k, v in values.items():
        if isinstance(v, dict) and isinstance(target.get(k), dict):
            _merge(target[k], v)
        else:
            target[k] = v


# Small, fast settings: a tiny model that still exercises every code path.
TINY = {
    "vocab": {"min_count": 1},
    "pack": {"seq_len": 32, "val_fraction": 0.1, "seed": 0},
    "model": {"cell": "lstm", "hidden": 32, "layers": 2, "dropout": 0.0, "embedding": 16},
    "train": {"batch_size": 8, "epochs": 1, "max_steps": 30, "warmup_steps": 5, "eval_every": 10,
              "log_every": 5, "checkpoint_every": 10, "sample_every": 15, "sample_length": 40},
    "evaluate": {"batch_size": 16},
    "generate": {"prompts": ["The ", "A "], "temperatures": [0.0, 1.0], "length": 40},
}


def copy_pipeline(root: Path) -> None:
    root.mkdir(parents=True, exist_ok=True)
    for name in PIPELINE_FILES:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, root / name, ignore=shutil.ignore_patterns("__pycache__"))
        elif src.exists():
            shutil.copy2(src, root / name)


def raw_project(root: Path) -> Project:
    """The pipeline in `root` with TINY params and small raw CSVs already in place: no git, no download."""
    copy_pipeline(root)
    (root / "data" / "raw").mkdir(parents=True)
    (root / "data" / "raw" / "train.csv").write_bytes(csv_bytes(ag_news_rows(240, seed=1)))
    (root / "data" / "raw" / "test.csv").write_bytes(csv_bytes(ag_news_rows(40, seed=2)))
    project = Project(root)
    project.set_params(**TINY)
    return project


def git_project(root: Path) -> Project:
    """A fresh git + DVC repo at root with the pipeline and TINY params (download URLs still unset)."""
    copy_pipeline(root)
    (root / ".dvc").mkdir()
    shutil.copy2(ROOT / ".dvc" / "config", root / ".dvc" / "config")
    (root / ".gitignore").write_text("/checkpoints/\n__pycache__/\n")
    p = Project(root)
    p.git("init", "-q", "-b", "main")
    p.git("config", "user.email", "test@example.com")
    p.git("config", "user.name", "charlm tests")
    p.set_params(**TINY)
    return p


def copy_of(p: Project, path: Path) -> Project:
    """An independent copy of a project (its git repo, DVC cache and work files included)."""
    shutil.copytree(p.path, path, symlinks=True)
    return Project(path)


def weights(p: Project) -> dict:
    """The state dict of a project's models/model.pt."""
    import torch

    return torch.load(p.path / "models/model.pt", weights_only=True)["state_dict"]


def assert_same_weights(a: dict, b: dict) -> None:
    import torch

    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), f"{name} differs"


@pytest.fixture
def project(tmp_path) -> Project:
    return git_project(tmp_path / "repo")


def peaked_model(cell: str, vocab_size: int):
    """A small random two-layer model with a sharpened head, so that a wrong context shows in its score."""
    import torch

    from charlm.core.model import CharRNN

    torch.manual_seed(3)
    model = CharRNN(vocab_size, cell=cell, hidden=10, layers=2, dropout=0.5, embedding=4).eval()
    with torch.no_grad():
        model.head.weight.mul_(4)
    return model


def needs_native_bf16():
    """Skip where this CPU has no native bf16 (AMX or AVX512-BF16 that oneDNN uses): there, oneDNN has no bf16
    LSTM at all. The tests that train in bf16 still run wherever it is present."""
    import torch

    from charlm.core.precision import capabilities

    caps = capabilities(torch.device("cpu"))
    return pytest.mark.skipif(
        not caps.native_cpu_bf16, reason=f"needs a CPU with native bf16 (AMX or AVX512-BF16); this one: {caps.features()}"
    )


@pytest.fixture
def one_thread():
    """In-process torch work on one thread: two OpenMP threads on a 2-core machine shared with other jobs make
    tiny models crawl, and results do not depend on it."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def served_project(project, http_server) -> Project:
    """`project` whose download URLs point at small AG-News-format CSVs on the loopback server."""
    train, test = csv_bytes(ag_news_rows(240, seed=1)), csv_bytes(ag_news_rows(40, seed=2))
    project.set_params(download={
        "train": {"url": http_server.serve("/train.csv", train), "md5": md5(train)},
        "test": {"url": http_server.serve("/test.csv", test), "md5": md5(test)},
        "timeout": 5.0, "retries": 2})
    project.server = http_server
    return project
