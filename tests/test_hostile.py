"""Hostile and unusual input through the real stage scripts and the `charlm` command (subprocesses).

Every bad input gives exit status 2, exactly one stderr line `<stage>: error: ...` naming the file or key and
the fix, no traceback, and none of the stage's outputs (no temp file either). Unusual input simply works.

Already covered elsewhere, and not repeated here: empty and 2-column CSVs, non-UTF-8 AG News, BOM and CRLF in
the `lines` format, seq_len longer than the corpus and a damaged vocab.json for pack (test_stage_errors.py);
garbage, BOM, CRLF and column counts for the CSV parser (test_corpus.py); every params range check in-process
(test_params.py); batch larger than the windows, `train.device: cuda`, SIGINT (test_train.py); bad
`charlm generate` flags, unseen and empty prompts, `--length 0` (test_cli.py); malicious and damaged model
files in-process (test_artifact.py). Here the same kinds of input go through the stages end to end.
"""
from __future__ import annotations

import builtins
import concurrent.futures
import gzip
import json
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY, WORDS, Project, ag_news_rows, assert_same_weights, copy_of, copy_pipeline, csv_bytes, weights
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

ENV = {"OMP_NUM_THREADS": "1"}
CHARLM = Path(sys.executable).parent / "charlm"
OUTPUTS = {
    "download": ["data/raw/train.csv", "data/raw/test.csv"],
    "prepare": ["data/prepared/train.txt", "data/prepared/test.txt"],
    "vocab": ["data/vocab.json"],
    "pack": ["data/packed"],
    "train": ["models/model.pt"],
    "evaluate": ["metrics/eval.json"],
    "generate": ["reports/samples.md", "reports/samples.json", "metrics/generate.json"],
}
MiB = 1 << 20

# What this module tried: printed at the end, as "hostile: N bad inputs refused ..., M unusual inputs worked".
REFUSED: set[str] = set()
WORKED: set[str] = set()


def _print(config, line: str) -> None:
    capman = config.pluginmanager.getplugin("capturemanager")
    with capman.global_and_fixture_disabled():
        sys.stdout.write(f"\n{line}\n")
        sys.stdout.flush()


@pytest.fixture(scope="module", autouse=True)
def tally(request):
    yield
    _print(request.config, f"hostile: {len(REFUSED)} distinct bad inputs refused with a one-line error, exit 2 and "
                           f"no output; {len(WORKED)} unusual inputs worked")


@pytest.fixture
def say(request):
    return lambda line: _print(request.config, line)


# --------------------------------------------------------------------------- projects and runs


def new_project(root: Path, train: bytes | None = None, test: bytes | None = None) -> Project:
    """The pipeline in `root` (no git, no DVC: stages run on their own) with TINY params and raw CSVs."""
    copy_pipeline(root)
    raw = root / "data" / "raw"
    raw.mkdir(parents=True)
    (raw / "train.csv").write_bytes(csv_bytes(ag_news_rows(240, seed=1)) if train is None else train)
    (raw / "test.csv").write_bytes(csv_bytes(ag_news_rows(40, seed=2)) if test is None else test)
    p = Project(root)
    p.set_params(**TINY)
    p.set_params(train={"device": "cpu"}, evaluate={"device": "cpu"}, generate={"device": "cpu"})
    return p


def stage(p: Project, name: str, **kw) -> subprocess.CompletedProcess:
    return p.stage(name, check=False, env={**ENV, **kw.pop("env", {})}, **kw)


def clear(p: Project, name: str) -> None:
    """Remove a stage's outputs, so that "no output after a failure" can be checked."""
    for out in OUTPUTS[name]:
        path = p.path / out
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def temp_files(p: Project) -> list[str]:
    return sorted(str(f.relative_to(p.path)) for top in ("data", "models", "checkpoints", "metrics", "reports")
                  for f in (p.path / top).rglob(".*") if ".tmp-" in f.name or ".old-" in f.name)


def refused(proc: subprocess.CompletedProcess, p: Project, name: str, case: str, *parts: str) -> str:
    """Exit 2, one `<stage>: error:` line holding `parts`, no traceback, none of the stage's outputs."""
    where = f"{case}: exit {proc.returncode}\nstdout:\n{proc.stdout[-2000:]}\nstderr:\n{proc.stderr[-3000:]}"
    assert proc.returncode == 2, where
    assert "Traceback" not in proc.stderr, where
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{name}: error: "), where
    for part in parts:
        assert part in lines[0], (part, lines[0])
    for out in OUTPUTS[name]:
        assert not (p.path / out).exists(), f"{case}: {out} left behind"
    assert temp_files(p) == [], case
    REFUSED.add(case)
    return lines[0]


def ok(proc: subprocess.CompletedProcess, case: str) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, f"{case}\nstdout:\n{proc.stdout[-2000:]}\nstderr:\n{proc.stderr[-3000:]}"
    WORKED.add(case)
    return proc


def in_parallel(jobs: dict[str, callable]) -> dict:
    """Run independent subprocess jobs three at a time: most of each is importing torch."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=3) as pool:
        futures = {name: pool.submit(job) for name, job in jobs.items()}
        return {name: f.result() for name, f in futures.items()}


# Measures a command's peak RSS from a small parent of its own. (A child of this big test process would
# inherit its high-water mark across exec: Linux carries ru_maxrss over from the image that vfork shared.)
PEAK_RSS = """import os, sys
pid = os.fork()
if pid == 0:
    os.execv(sys.executable, [sys.executable] + sys.argv[2:])
_, status, usage = os.wait4(pid, 0)
with open(sys.argv[1], "w") as f:
    f.write(str(usage.ru_maxrss * 1024))
code = os.waitstatus_to_exitcode(status)
os._exit(code if code >= 0 else 128 - code)
"""


def measured(p: Project, name: str, preexec_fn=None) -> tuple[subprocess.CompletedProcess, int]:
    """Run a stage; return its result and its peak resident set size in bytes."""
    peak = p.path / f".{name}.peak"
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    proc = subprocess.run([sys.executable, "-c", PEAK_RSS, str(peak), "-m", f"stages.{name}"], cwd=p.path,
                          capture_output=True, text=True, env={**os.environ, **ENV, "PATH": path},
                          preexec_fn=preexec_fn, timeout=600)
    size = int(peak.read_text())
    peak.unlink()
    return proc, size


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Project:
    """Data stages and a short training run, done once; tests work in copies."""
    p = new_project(tmp_path_factory.mktemp("hostile") / "trained")
    p.set_params(train={"max_steps": 12, "eval_every": 6, "checkpoint_every": 6, "sample_every": 0})
    for name in ("prepare", "vocab", "pack", "train"):
        p.stage(name, env=ENV)
    return p


# --------------------------------------------------------------------------- raw input through prepare

GARBAGE = {
    "random bytes": random.Random(0).randbytes(4096),
    "a gzip file": gzip.compress(csv_bytes(ag_news_rows(20, seed=3)), mtime=0),
    "a PNG image": b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)) * 4,
    "UTF-16 text": '"1","Title","Description"\n"2","T","D"\n'.encode("utf-16"),
    "Latin-1 text": "caf\u00e9 cr\u00e8me\nna\u00efve\n".encode("latin-1"),
    "text with NUL bytes": b"first line\nsecond\x00line\n",
}


@pytest.mark.parametrize("fmt", ["ag_news", "lines"])
@pytest.mark.parametrize("kind", GARBAGE)
def test_binary_garbage_and_non_utf8_as_input(tmp_path, kind, fmt):
    p = new_project(tmp_path / "repo", train=GARBAGE[kind])
    p.set_params(prepare={"format": fmt})
    line = refused(stage(p, "prepare"), p, "prepare", f"{kind} as a {fmt} corpus", "data/raw/train.csv")
    assert ("not UTF-8" in line and "convert the file to UTF-8" in line) or "NUL byte" in line, line


def test_garbage_test_split_names_it_and_writes_no_train_output(tmp_path):
    p = new_project(tmp_path / "repo", test=GARBAGE["random bytes"])
    refused(stage(p, "prepare"), p, "prepare", "garbage as the test split", "data/raw/test.csv", "UTF-8")


def test_empty_test_split_with_a_good_train_split(tmp_path):
    p = new_project(tmp_path / "repo", test=b"\r\n  \n")
    refused(stage(p, "prepare"), p, "prepare", "a blank test split", "data/raw/test.csv", "empty")


@pytest.mark.parametrize("data, parts", [
    (b'"1","T1","D1","extra"\n"2","T2","D2","extra"\n', ["line 1", "4 columns", "expected 3"]),
    (b'"3","T1","D1"\n"2","T2","D2","x","y"\n', ["line 2", "5 columns"]),
    (b"Just some plain text\nAnother item\n", ["1 columns", "prepare.format: lines"]),
])
def test_csv_with_the_wrong_number_of_columns(tmp_path, data, parts):
    p = new_project(tmp_path / "repo", train=data)
    refused(stage(p, "prepare"), p, "prepare", f"CSV: {parts[1]}", "data/raw/train.csv", *parts)


def test_bom_crlf_and_cr_line_endings_give_the_same_prepared_text(tmp_path):
    """An AG News CSV saved by Excel on Windows (BOM, CRLF) or an old Mac (CR) prepares like the plain one."""
    plain = csv_bytes(ag_news_rows(60, seed=5))
    variants = {
        "plain": plain,
        "BOM + CRLF": b"\xef\xbb\xbf" + plain.replace(b"\n", b"\r\n"),
        "CR only": plain.replace(b"\n", b"\r"),
        "BOM + mixed endings": b"\xef\xbb\xbf" + b"".join(
            line + (b"\r\n" if i % 2 else b"\n") for i, line in enumerate(plain.splitlines())),
    }
    outputs = {}
    for name, data in variants.items():
        p = new_project(tmp_path / name.replace(" ", "_").replace("+", ""), train=data, test=data)
        ok(stage(p, "prepare"), f"AG News CSV with {name}")
        outputs[name] = [(p.path / f"data/prepared/{s}.txt").read_bytes() for s in ("train", "test")]
    assert all(out == outputs["plain"] for out in outputs.values())
    assert b"\r" not in outputs["plain"][0] and not outputs["plain"][0].startswith(b"\xef\xbb\xbf")


# --------------------------------------------------------------------------- unusual input that must work


def test_short_non_ascii_items_through_the_whole_pipeline(tmp_path):
    """Every item shorter than seq_len, over 255 symbols (accents, CJK, emoji): the streams widen to uint16,
    and train, evaluate, generate and `charlm generate` work."""
    rng = random.Random(7)
    symbols = [chr(0x4E00 + i) for i in range(260)] + list("\u00e9\u00e8\u00fc\u00f1\u00e7\u00df") + \
        ["\U0001F600", "\U0001F680", "\U0001F44D"] + list("abcdefghij ")

    def corpus(n):
        return "\n".join("".join(rng.choice(symbols) for _ in range(rng.randint(1, 20))).strip() or "x"
                         for _ in range(n)).encode("utf-8") + b"\n"

    p = new_project(tmp_path / "repo", train=corpus(1500), test=corpus(60))
    p.set_params(prepare={"format": "lines"}, pack={"seq_len": 32, "val_fraction": 0.1},
                 train={"max_steps": 10, "eval_every": 5, "sample_every": 5, "sample_prompt": "\u4e00 "},
                 generate={"prompts": ["\u4e01\u4e02", "\U0001F600", ""], "temperatures": [0.0, 1.0], "length": 30})
    for name in ("prepare", "vocab", "pack", "train", "evaluate", "generate"):
        ok(stage(p, name), "short non-ASCII items")
    items = (p.path / "data/prepared/train.txt").read_text(encoding="utf-8").splitlines()
    assert max(map(len, items)) < 32
    meta = json.loads((p.path / "data/packed/meta.json").read_text())
    assert meta["dtype"] == "uint16" and meta["vocab_size"] > 256
    assert np.load(p.path / "data/packed/train.npy").max() > 255
    metrics = json.loads((p.path / "metrics/eval.json").read_text())
    assert metrics["test_items"] == 60 and 0 < metrics["test_bpc"] < 20
    samples = json.loads((p.path / "reports/samples.json").read_text(encoding="utf-8"))["samples"]
    assert len(samples) == 6 and all(text.startswith(key.split("'")[1]) for key, text in samples.items())
    proc = subprocess.run([str(CHARLM), "generate", "--model", "models/model.pt", "--prompt", "\u4e01\U0001F600",
                           "--length", "20", "--seed", "1", "--device", "cpu"], cwd=p.path, capture_output=True,
                          text=True, timeout=120, env={**os.environ, **ENV})
    assert proc.returncode == 0 and proc.stdout.startswith("\u4e01\U0001F600"), proc.stderr
    WORKED.add("`charlm generate` with a CJK and emoji prompt")


@pytest.mark.slow
def test_a_single_50_mb_line(tmp_path, say):
    """One 50 MB item in the `lines` format: works, in memory bounded by a small multiple of the input; the
    default validation split cannot be carved out of one item, which is a clear error."""
    rng = random.Random(3)
    block = " ".join(rng.choice(WORDS + ["caf\u00e9", "na\u00efve"]) for _ in range(170_000))
    line = (block + " ") * (50 * MiB // (len(block) + 1))
    p = new_project(tmp_path / "repo", train=line.encode("utf-8") + b"\n", test=b"the market rose\nshares fell\n")
    del block, line
    size = (p.path / "data/raw/train.csv").stat().st_size
    assert size > 45 * MiB
    p.set_params(prepare={"format": "lines"}, pack={"seq_len": 64, "val_fraction": 0.1})
    peaks = {}
    for name in ("prepare", "vocab", "pack"):
        proc, peaks[name] = measured(p, name)
        if name == "pack":
            refused(proc, p, "pack", "one item and pack.val_fraction > 0", "pack.val_fraction=0.1",
                    "1 train item", "pack.val_fraction: 0")
            p.set_params(pack={"val_fraction": 0.0})
            proc, peaks[name] = measured(p, name)
        ok(proc, "a single 50 MB line")
    say("50 MB single line, peak RSS: " + ", ".join(f"{k} {v / MiB:.0f} MiB" for k, v in peaks.items())
        + f" (input {size / MiB:.0f} MiB)")
    meta = json.loads((p.path / "data/packed/meta.json").read_text())
    assert meta["splits"]["train"]["items"] == 1 and meta["splits"]["train"]["tokens"] > 45 * MiB
    for name, peak in peaks.items():
        assert peak < 8 * size + 150 * MiB, (name, peak)


# --------------------------------------------------------------------------- params


FUZZ_KEYS = [("prepare", "format"), ("prepare", "fields"), ("prepare", "clean"), ("prepare", "separator"),
             ("vocab", "min_count"), ("pack", "seq_len"), ("pack", "val_fraction"), ("pack", "seed")]
PLAUSIBLE = [0, 1, 2, 16, 5000, -1, 0.0, 0.05, 0.5, 1.0, True, False, None, "", " ", "lines", "ag_news",
             ["title"], ["description", "title"], ["title", "title"], [], "1e-3", {"a": 1}]
VALUES = st.one_of(
    st.sampled_from(PLAUSIBLE),
    st.integers(min_value=-(10 ** 20), max_value=10 ** 20),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.lists(st.one_of(st.sampled_from(["title", "description", "body"]), st.integers(), st.none()), max_size=4),
)


@pytest.fixture(scope="module")
def fuzz_project(trained, tmp_path_factory) -> Project:
    return copy_of(trained, tmp_path_factory.mktemp("fuzz") / "repo")


@settings(max_examples=15, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(key=st.sampled_from(FUZZ_KEYS), value=VALUES)
def test_fuzzed_params_through_a_real_stage(trained, fuzz_project, key, value):
    """Any value for a data stage's key: the stage works (and its outputs are complete), or stops with one line."""
    p, (section, name) = fuzz_project, key
    shutil.copy2(trained.path / "params.yaml", p.path / "params.yaml")
    for d in ("prepared", "packed"):  # the stage's inputs as the reference run left them
        shutil.rmtree(p.path / "data" / d, ignore_errors=True)
        shutil.copytree(trained.path / "data" / d, p.path / "data" / d)
    shutil.copy2(trained.path / "data/vocab.json", p.path / "data/vocab.json")
    p.set_params(**{section: {name: value}})
    clear(p, section)
    proc = stage(p, section)
    case = f"{section}.{name} = {value!r}"
    if proc.returncode == 0:
        ok(proc, f"fuzzed {case}")
        assert all((p.path / out).exists() for out in OUTPUTS[section]), case
        assert temp_files(p) == []
    else:
        refused(proc, p, section, f"fuzzed {case}")


PARAM_CASES = {  # case: (stage, params, parts of the message); every message starts "params.yaml: KEY = VALUE"
    "negative pack.seq_len": ("pack", {"pack": {"seq_len": -1}}, ["pack.seq_len = -1", ">= 1"]),
    "negative pack.val_fraction": ("pack", {"pack": {"val_fraction": -0.1}}, ["pack.val_fraction = -0.1"]),
    "negative vocab.min_count": ("vocab", {"vocab": {"min_count": -3}}, ["vocab.min_count = -3"]),
    "negative download.retries": ("download", {"download": {"retries": -1}}, ["download.retries = -1"]),
    "negative train.batch_size": ("train", {"train": {"batch_size": -8}}, ["train.batch_size = -8", ">= 1"]),
    "unknown model.cell": ("train", {"model": {"cell": "transformer"}},
                           ["model.cell = 'transformer'", "lstm, gru, rnn"]),
    "zero evaluate.batch_size": ("evaluate", {"evaluate": {"batch_size": 0}}, ["evaluate.batch_size = 0"]),
    "negative generate.length": ("generate", {"generate": {"length": -5}}, ["generate.length = -5"]),
    "negative temperature": ("generate", {"generate": {"temperatures": [0.8, -0.5]}},
                             ["generate.temperatures[1] = -0.5", ">= 0.0"]),
    "NaN temperature": ("generate", {"generate": {"temperatures": [float("nan")]}},
                        ["generate.temperatures[0] = nan", "finite"]),
    "top_p 0": ("generate", {"generate": {"top_p": 0.0}}, ["generate.top_p = 0.0", "> 0.0"]),
    "top_p 1.5": ("generate", {"generate": {"top_p": 1.5}}, ["generate.top_p = 1.5", "<= 1.0"]),
}
CUDA_CASES = {  # on a machine without CUDA: the device key, and the fix
    "evaluate.device: cuda": ("evaluate", {"evaluate": {"device": "cuda"}}, ["evaluate.device", "auto or cpu"]),
    "generate.device: cuda": ("generate", {"generate": {"device": "cuda"}}, ["generate.device", "auto or cpu"]),
}


def test_bad_params_stop_every_stage_with_one_line(trained, tmp_path):
    cases = {case: (name, values, ["params.yaml: " + parts[0], *parts[1:]])
             for case, (name, values, parts) in PARAM_CASES.items()}
    if not torch.cuda.is_available():
        cases.update(CUDA_CASES)
    projects = {}
    for i, (case, (name, values, _)) in enumerate(cases.items()):
        p = projects[case] = copy_of(trained, tmp_path / f"case{i}")
        p.set_params(**values)
        clear(p, name)
        if name == "train":
            shutil.rmtree(p.path / "checkpoints")
    results = in_parallel({case: (lambda c=case: stage(projects[c], cases[c][0])) for case in cases})
    for case, (name, _, parts) in cases.items():
        refused(results[case], projects[case], name, case, *parts)
        if name == "train":
            assert not (projects[case].path / "checkpoints").exists()


# --------------------------------------------------------------------------- artifacts


class Payload:
    """Unpickling this creates `marker`: what a hostile model file could do if it were loaded unsafely."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return builtins.open, (self.marker, "w")


def evil_file(path: Path, marker: Path, like: Path | None = None) -> None:
    """A file shaped like a real model or checkpoint (`like`), with the payload hidden among its entries."""
    obj = torch.load(like, weights_only=True) if like else {}
    obj["note"] = Payload(marker)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(obj, path)


def test_malicious_model_file_is_refused_by_evaluate_generate_and_charlm(trained, tmp_path):
    marker = tmp_path / "PWNED"
    projects = {name: copy_of(trained, tmp_path / name) for name in ("evaluate", "generate", "charlm")}
    for p in projects.values():
        evil_file(p.path / "models/model.pt", marker, like=trained.path / "models/model.pt")
    charlm = [str(CHARLM), "generate", "--prompt", "The ", "--length", "20", "--device", "cpu"]
    results = in_parallel({
        "evaluate": lambda: stage(projects["evaluate"], "evaluate"),
        "generate": lambda: stage(projects["generate"], "generate"),
        "charlm": lambda: subprocess.run(charlm, cwd=projects["charlm"].path, capture_output=True, text=True,
                                         timeout=120, env={**os.environ, **ENV}),
    })
    for name in ("evaluate", "generate"):
        refused(results[name], projects[name], name, f"a malicious models/model.pt for {name}",
                "models/model.pt", "refused to load", "Unsupported global")
    proc = results["charlm"]
    assert proc.returncode == 2 and proc.stdout == "" and "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("charlm: error: models/model.pt: refused to load"), lines
    REFUSED.add("a malicious models/model.pt for `charlm generate`")
    assert not marker.exists()
    # The payload is live: an unsafe load runs it. (Proves the checks above can fail.)
    control = tmp_path / "control"
    evil_file(tmp_path / "control.pt", control)
    torch.load(tmp_path / "control.pt", weights_only=False)
    assert control.exists()


def reference_checkpoint(trained: Project) -> dict:
    return torch.load(trained.path / "checkpoints/train.pt", weights_only=True)


def test_train_ignores_a_malicious_a_foreign_and_a_truncated_checkpoint(trained, tmp_path):
    """A checkpoint that would run code, one from another model shape and vocabulary, and a truncated one are
    all ignored: train starts over, ends with the uninterrupted run's weights, and replaces the checkpoint."""
    marker = tmp_path / "PWNED"
    ref = reference_checkpoint(trained)
    projects = {name: copy_of(trained, tmp_path / name) for name in ("malicious", "foreign", "truncated")}
    for p in projects.values():
        (p.path / "models/model.pt").unlink()
    ck = {name: p.path / "checkpoints/train.pt" for name, p in projects.items()}
    evil_file(ck["malicious"], marker, like=trained.path / "checkpoints/train.pt")
    from charlm.core.model import CharRNN
    other = CharRNN(ref["model"]["embed.weight"].shape[0] + 7, cell="gru", hidden=24, layers=1, embedding=8)
    torch.save({**ref, "run_id": "0" * 64, "model": other.state_dict(), "step": 6}, ck["foreign"])
    ck["truncated"].write_bytes(ck["truncated"].read_bytes()[:5000])
    results = in_parallel({name: (lambda p=p: stage(p, "train")) for name, p in projects.items()})
    expected = {"malicious": "ignoring unusable checkpoint: checkpoints/train.pt: refused to load",
                "foreign": "belongs to other params or data; starting from scratch",
                "truncated": "ignoring unusable checkpoint: checkpoints/train.pt: corrupt or truncated"}
    for name, p in projects.items():
        out = ok(results[name], f"a {name} checkpoint at checkpoints/train.pt").stdout
        assert expected[name] in out and "resuming" not in out, out
        assert_same_weights(weights(p), weights(trained))
        assert torch.load(ck[name], weights_only=True)["step"] == ref["step"]
    assert not marker.exists()


def test_a_tampered_checkpoint_of_this_run_that_does_not_fit_is_a_clear_error(trained, tmp_path):
    """Same run id, other shapes (a hand-edited checkpoint): train cannot resume it and says to delete it."""
    p = copy_of(trained, tmp_path / "repo")
    ref = reference_checkpoint(trained)
    from charlm.core.model import CharRNN
    other = CharRNN(ref["model"]["embed.weight"].shape[0], cell="lstm", hidden=8, layers=1, embedding=4)
    torch.save({**ref, "model": other.state_dict(), "step": 6}, p.path / "checkpoints/train.pt")
    clear(p, "train")
    refused(stage(p, "train"), p, "train", "a checkpoint of this run with other shapes", "checkpoints/train.pt",
            "does not fit this model", "delete it to start over")


def edited_vocab(trained: Project, how: str) -> bytes:
    raw = (trained.path / "data/vocab.json").read_bytes()
    if how == "truncated":
        return raw[: len(raw) // 2]
    data = json.loads(raw)
    if how == "a symbol removed":
        data["tokens"] = data["tokens"][:-1]
        data["size"] -= 1
    elif how == "a duplicated character":
        data["tokens"][-1]["char"] = data["tokens"][-2]["char"]
    return json.dumps(data).encode()


ARTIFACT_CASES = {  # case: (stage, file, new bytes or a function of the reference bytes, message parts)
    "truncated vocab.json": ("train", "data/vocab.json", lambda t: edited_vocab(t, "truncated"),
                             ["data/vocab.json", "not valid JSON", "dvc repro vocab"]),
    "vocab.json with a symbol removed": ("train", "data/vocab.json", lambda t: edited_vocab(t, "a symbol removed"),
                                         ["symbols", "rerun `dvc repro pack`"]),
    "vocab.json with a duplicated character": ("train", "data/vocab.json",
                                               lambda t: edited_vocab(t, "a duplicated character"),
                                               ["data/vocab.json", "not a valid charlm vocabulary"]),
    "truncated train.npy": ("train", "data/packed/train.npy",
                            lambda t: (t.path / "data/packed/train.npy").read_bytes()[:1000],
                            ["data/packed/train.npy", "dvc repro pack"]),
    "truncated test.npy": ("evaluate", "data/packed/test.npy",
                           lambda t: (t.path / "data/packed/test.npy").read_bytes()[:200],
                           ["data/packed/test.npy", "dvc repro pack"]),
    "truncated model.pt for evaluate": ("evaluate", "models/model.pt",
                                        lambda t: (t.path / "models/model.pt").read_bytes()[:3000],
                                        ["models/model.pt", "corrupt or truncated"]),
}


def test_damaged_and_hand_edited_artifacts(trained, tmp_path):
    projects = {}
    for i, (case, (name, path, make, _)) in enumerate(ARTIFACT_CASES.items()):
        p = projects[case] = copy_of(trained, tmp_path / f"case{i}")
        (p.path / path).write_bytes(make(trained))
        if name == "train":
            shutil.rmtree(p.path / "checkpoints")
        clear(p, name)
    results = in_parallel({case: (lambda c=case: stage(projects[c], ARTIFACT_CASES[c][0])) for case in projects})
    for case, (name, _, _, parts) in ARTIFACT_CASES.items():
        refused(results[case], projects[case], name, case, *parts)


# --------------------------------------------------------------------------- generation


def test_generate_stage_with_awkward_prompts_and_length_zero(trained, tmp_path):
    long_prompt = "the market " * 500  # far longer than any training window
    prompts = ["", "\u03a9\u00df\u6f22\U0001F600 unseen", long_prompt]
    a, b = copy_of(trained, tmp_path / "a"), copy_of(trained, tmp_path / "b")
    a.set_params(generate={"prompts": prompts, "temperatures": [0.0, 1.0], "length": 30})
    b.set_params(generate={"prompts": prompts, "temperatures": [0.0, 1.3], "length": 0})
    results = in_parallel({"a": lambda: stage(a, "generate"), "b": lambda: stage(b, "generate")})
    out = ok(results["a"], "empty, unseen-character and 5,500-character prompts").stdout
    warnings = [line for line in out.splitlines() if line.startswith("generate: warning:")]
    assert len(warnings) == 1 and "\u03a9\u00df\u6f22\U0001F600" in warnings[0], out[-2000:]
    samples = json.loads((a.path / "reports/samples.json").read_text(encoding="utf-8"))["samples"]
    assert len(samples) == 6
    for prompt in prompts:
        for t in ("0", "1"):
            text = samples[f"{prompt!r} @ T={t}"]
            assert text.startswith(prompt) and len(text) <= len(prompt) + 30
    ok(results["b"], "generate.length: 0")
    samples = json.loads((b.path / "reports/samples.json").read_text(encoding="utf-8"))["samples"]
    assert sorted(samples.values()) == sorted(prompts * 2)
    assert (b.path / "reports/samples.md").exists()


def rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


@pytest.mark.slow
def test_huge_length_streams_in_bounded_memory(trained, say):
    """`charlm generate --length 2000000 --no-stop-at-eos`, killed after a few seconds: output keeps flowing and
    the resident set does not grow."""
    proc = subprocess.Popen([str(CHARLM), "generate", "--model", str(trained.path / "models/model.pt"),
                             "--length", "2000000", "--no-stop-at-eos", "--seed", "0", "--device", "cpu"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, **ENV})
    received = [0]

    def drain():
        while chunk := proc.stdout.read1(1 << 16):
            received[0] += len(chunk)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 120  # hang guard: torch's import on a busy machine
        while received[0] < 200 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
        assert proc.poll() is None and received[0] >= 200, proc.stderr.read().decode()[-2000:]
        time.sleep(1.0)
        first, got_first = rss(proc.pid), received[0]
        time.sleep(4.0)
        second, got_second = rss(proc.pid), received[0]
        assert proc.poll() is None
    finally:
        proc.kill()
        proc.wait(timeout=30)
        reader.join(timeout=30)
    say(f"charlm generate --length 2000000: RSS {first / MiB:.1f} MiB, then {second / MiB:.1f} MiB 4 s and "
        f"{got_second - got_first:,} characters later")
    assert got_second > got_first
    assert second - first < 50 * MiB
    WORKED.add("`charlm generate --length 2000000`")


# --------------------------------------------------------------------------- resources


@pytest.mark.slow
def test_peak_memory_of_pack_and_train_on_a_30_mb_corpus(tmp_path, say):
    rng = np.random.default_rng(0)
    words = np.array(WORDS + ["caf\u00e9", "Z\u00fcrich", "na\u00efve"])
    lines, size = [], 0
    while size < 30 * MiB:
        n = rng.integers(5, 60, size=2000)
        idx = rng.integers(0, len(words), size=int(n.sum()))
        chunk = [" ".join(words[idx[a:b]]) for a, b in zip(np.r_[0, np.cumsum(n)[:-1]], np.cumsum(n))]
        lines += chunk
        size += sum(len(c) + 1 for c in chunk)
    p = new_project(tmp_path / "repo", train=("\n".join(lines) + "\n").encode("utf-8"),
                    test=("\n".join(lines[:200]) + "\n").encode("utf-8"))
    del lines
    corpus = (p.path / "data/raw/train.csv").stat().st_size
    p.set_params(prepare={"format": "lines"}, pack={"seq_len": 64, "val_fraction": 0.0005},
                 train={"max_steps": 4, "eval_every": 4, "log_every": 2, "checkpoint_every": 4, "sample_every": 0})
    peaks = {}
    for name in ("prepare", "vocab", "pack", "train"):
        proc, peaks[name] = measured(p, name)
        ok(proc, "a 30 MB corpus")
    say(f"30 MB corpus ({corpus / MiB:.1f} MiB), peak RSS: "
        + ", ".join(f"{k} {v / MiB:.0f} MiB ({v / corpus:.1f}x)" for k, v in peaks.items()))
    # The data stages stream (prepare, vocab) or hold only the encoded streams (pack): at most 3x the corpus, the
    # interpreter and numpy included (it was 9x when they read whole files).
    for name in ("prepare", "vocab", "pack"):
        assert peaks[name] < 3 * corpus, (name, peaks[name] / corpus)
    # train memory-maps the stream and gathers one minibatch at a time: torch itself, plus the stream at most.
    assert peaks["train"] < 2 * corpus + 700 * MiB


def ignore_xfsz_and_limit(limit: int):
    def preexec():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # so that writes past the limit fail with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return preexec


@pytest.fixture
def tmpfs():
    """mount(path, size): a small tmpfs at `path`, unmounted afterwards; skips the test where mount is refused."""
    mounted = []

    def mount(path: Path, size: str) -> None:
        path.mkdir(parents=True, exist_ok=True)
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
        mounted.append(path)

    yield mount
    for path in reversed(mounted):
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def full_disk_project(tmp_path: Path, name: str) -> Project:
    """Inputs sized so that the stage's first output fits in 40 KiB and its second does not."""
    train = csv_bytes(ag_news_rows(150, seed=8))  # ~30 KiB of prepared text
    test = csv_bytes(ag_news_rows(260, seed=9))   # ~55 KiB
    p = new_project(tmp_path / "repo", train=train, test=test)
    for s in {"pack": ["prepare", "vocab"], "train": ["prepare", "vocab", "pack"]}.get(name, []):
        p.stage(s, env=ENV)
    return p


FULL_DISK = {  # stage: (directory that fills up, output named in the message)
    "download": ("data/raw", "data/raw/"),
    "prepare": ("data/prepared", "data/prepared/test.txt"),
    "pack": ("data", "data/packed"),
    "train": ("checkpoints", "checkpoints/train.pt"),
}


@pytest.mark.parametrize("how", ["tmpfs", "RLIMIT_FSIZE"])
@pytest.mark.parametrize("name", list(FULL_DISK))
def test_full_disk_while_writing(tmp_path, tmpfs, name, how):
    if name == "train" and how == "tmpfs":
        pytest.skip("train is run once, under RLIMIT_FSIZE (the same code path, and seconds saved)")
    p = full_disk_project(tmp_path, name)
    directory, named = FULL_DISK[name]
    if name == "download":  # a local source, so that nothing but the disk can fail
        shutil.move(p.path / "data/raw", tmp_path / "source")
        p.set_params(download={"train": {"url": str(tmp_path / "source/train.csv"), "md5": None},
                               "test": {"url": str(tmp_path / "source/test.csv"), "md5": None}})
    clear(p, name)
    if how == "tmpfs":
        keep = tmp_path / "keep"
        if name == "pack":  # the tmpfs replaces data/: pack's inputs go back in, then 24 KiB are left
            shutil.move(p.path / "data", keep)
            used = sum(-(-f.stat().st_size // 4096) * 4 for f in keep.rglob("*") if f.is_file())
            tmpfs(p.path / "data", f"{used + 24}k")
            for item in keep.iterdir():
                shutil.copytree(item, p.path / "data" / item.name) if item.is_dir() else \
                    shutil.copy2(item, p.path / "data" / item.name)
        else:
            tmpfs(p.path / directory, "40k")
        expected = ["no space left on device while writing", named, "free disk space"]
        proc = stage(p, name)
    else:
        limit = 40 * 1024 if name != "pack" else 24 * 1024
        proc, _ = measured(p, name, preexec_fn=ignore_xfsz_and_limit(limit))
        expected = ["file too large while writing", named, "ulimit -f"]
    refused(proc, p, name, f"a full disk ({how}) under {name}", *expected)
    if name == "train":
        assert not (p.path / "checkpoints/train.pt").exists()
