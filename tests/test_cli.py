"""`charlm generate` on a small trained model.

The installed console script runs as a subprocess where the process boundary matters (help, exit status and
stderr of errors, one end-to-end generation). Each such start imports torch (seconds on this machine), so the
remaining behaviours call the same entry point, `charlm.apps.cli.main(argv)`, in-process.
"""
from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from charlm.apps.cli import main
from charlm.core.model import CharRNN
from charlm.core.vocab import Vocab
from charlm.pipeline import artifact

ITEM = "hello world! hello world!"
SCRIPT = Path(sys.executable).parent / "charlm"
FLAGS = ["--prompt", "--temperature", "--length", "--model", "--seed", "--top-k", "--top-p", "-n",
         "--no-stop-at-eos", "--device", "--rev", "--checkpoint"]


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> Path:
    """A model that has memorised the items `<eos>hello world! hello world!<eos>` and extra characters."""
    vocab = Vocab(sorted(set(ITEM + "abcxyz")))
    stream = np.concatenate([vocab.encode("\n" + ITEM) for _ in range(3)] + [vocab.encode("\n")]).astype(np.int64)
    x, y = torch.from_numpy(stream[None, :-1]), torch.from_numpy(stream[None, 1:])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = CharRNN(len(vocab), cell="lstm", hidden=32, layers=1, embedding=8)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(200):
        loss = model(x, targets=y)[0]
        opt.zero_grad()
        loss.backward()
        opt.step()
    torch.set_num_threads(threads)
    assert loss.item() < 0.05
    path = tmp_path_factory.mktemp("cli") / "model.pt"
    artifact.save(path, artifact.model_record(model, vocab, {"steps": 200}))
    return path


def charlm(*args, cwd=None) -> subprocess.CompletedProcess:
    command = [str(SCRIPT)] if SCRIPT.exists() else [sys.executable, "-m", "charlm.apps.cli"]
    return subprocess.run(command + [str(a) for a in args], capture_output=True, text=True, timeout=120, cwd=cwd,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str


@pytest.fixture
def cli(capsys):
    """Run `charlm ARGS` in-process through `charlm.apps.cli.main`; return its exit status and output."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)

    def run(*args) -> Result:
        capsys.readouterr()
        try:
            main([str(a) for a in args])
            code = 0
        except SystemExit as e:
            code = e.code
        out, err = capsys.readouterr()
        return Result(code, out, err)

    yield run
    torch.set_num_threads(threads)


@pytest.fixture
def generate(cli):
    def run(model_path, *args) -> Result:
        result = cli("generate", "--model", model_path, "--device", "cpu", *args)
        assert result.returncode == 0, result.stderr
        return result
    return run


def one_line_error(proc, prefix: str = "charlm: error: ") -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(prefix), proc.stderr
    assert "Traceback" not in proc.stderr
    return lines[0]


def test_help_documents_every_flag():
    proc = charlm("generate", "--help")
    assert proc.returncode == 0
    for flag in FLAGS:
        assert flag in proc.stdout, flag
    assert "greedy" in proc.stdout and "nucleus" in proc.stdout
    top = charlm("--help")
    assert top.returncode == 0 and "generate" in top.stdout


def test_console_script_generates_the_prompt_and_the_memorised_continuation(model_path):
    proc = charlm("generate", "--model", model_path, "--prompt", "hello", "--temperature", "0", "--length", "200")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == ITEM + "\n"  # stops at <eos>, which is not printed
    assert proc.stderr == ""


def test_no_stop_at_eos_prints_eos_as_a_newline_and_goes_on(model_path, generate):
    out = generate(model_path, "--prompt", "hello", "--temperature", "0", "--length", "30", "--no-stop-at-eos").stdout
    assert out == (ITEM + "\n" + ITEM)[:len("hello") + 30] + "\n"


def test_output_starts_with_the_prompt(model_path, generate):
    for prompt in ("hello", "xyz ", "a"):
        out = generate(model_path, "--prompt", prompt, "--temperature", "1.5", "--length", "20", "--seed", "3").stdout
        assert out.startswith(prompt)
        assert out.endswith("\n") and len(out) <= len(prompt) + 20 + 1


def test_empty_prompt_starts_a_new_item(model_path, generate):
    assert generate(model_path, "--temperature", "0", "--length", "100").stdout == ITEM + "\n"


def test_same_seed_same_output(model_path, generate):
    args = ("--prompt", "he", "--temperature", "4", "--length", "150", "--no-stop-at-eos")
    a = generate(model_path, *args, "--seed", "11").stdout
    b = generate(model_path, *args, "--seed", "11").stdout
    c = generate(model_path, *args, "--seed", "12").stdout
    assert a == b
    assert a != c


def test_count_prints_that_many_samples(model_path, generate):
    out = generate(model_path, "--prompt", "hel", "-n", "3", "--temperature", "0", "--length", "100").stdout
    assert out.splitlines() == [ITEM] * 3
    out = generate(model_path, "--prompt", "x", "-n", "3", "--temperature", "3", "--length", "40", "--seed", "1",
                   "--top-k", "5", "--top-p", "0.9").stdout
    lines = out.splitlines()
    assert len(lines) == 3 and all(line.startswith("x") and len(line) <= 41 for line in lines)
    assert len(set(lines)) > 1  # three samples, not one printed three times


@pytest.mark.parametrize("count", ["1", "2"])
def test_length_zero_prints_just_the_prompt(model_path, generate, count):
    assert generate(model_path, "--prompt", "hello", "--length", "0", "-n", count).stdout == "hello\n" * int(count)


@pytest.mark.parametrize("flag,value", [
    ("--temperature", "-1"), ("--temperature", "nan"), ("--temperature", "inf"), ("--temperature", "hot"),
    ("--top-p", "0"), ("--top-p", "1.5"), ("--top-p", "-0.5"), ("--top-k", "-1"), ("--top-k", "2.5"),
    ("--length", "-5"), ("-n", "0"), ("--seed", "-1"), ("--device", "tpu"),
])
def test_bad_flag_values_exit_2_naming_the_flag(model_path, flag, value):
    proc = charlm("generate", "--model", model_path, flag, value)
    assert proc.returncode == 2, proc.stdout
    assert proc.stdout == ""
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("charlm generate: error: argument ") and flag in last, proc.stderr
    assert "Traceback" not in proc.stderr


def test_missing_model(tmp_path, cli):
    line = one_line_error(cli("generate", "--model", tmp_path / "none.pt"))
    assert "none.pt: not found" in line and "--model" in line


def test_missing_default_model_in_an_empty_directory(tmp_path, cli, monkeypatch):
    monkeypatch.chdir(tmp_path)
    line = one_line_error(cli("generate"))
    assert "models/model.pt: not found" in line


def test_corrupt_model_from_the_console_script(tmp_path):
    path = tmp_path / "bad.pt"
    path.write_bytes(b"\x80\x04.")  # torch warns about the pickle protocol on stderr, then fails
    line = one_line_error(charlm("generate", "--model", path))
    assert str(path) in line


@pytest.mark.parametrize("content", ["random", "truncated", "empty", "directory"])
def test_corrupt_model(model_path, tmp_path, cli, content):
    path = tmp_path / "bad.pt"
    if content == "random":
        path.write_bytes(np.random.default_rng(0).bytes(500))
    elif content == "truncated":
        path.write_bytes(model_path.read_bytes()[:1000])
    elif content == "empty":
        path.write_bytes(b"")
    else:
        path.mkdir()
    line = one_line_error(cli("generate", "--model", path))
    assert str(path) in line


def test_cuda_device_on_a_machine_without_cuda(model_path, cli):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    line = one_line_error(cli("generate", "--model", model_path, "--device", "cuda"))
    assert "--device" in line


def test_unseen_prompt_characters_warn_and_still_generate(model_path, generate):
    result = generate(model_path, "--prompt", "hello ΩQ", "--temperature", "0.5", "--length", "20", "--seed", "0")
    assert result.stdout.startswith("hello ΩQ")
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("charlm: warning:") and "QΩ" in lines[0], result.stderr
