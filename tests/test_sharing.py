"""Team sharing through DVC remotes, with real servers on loopback: a shared folder and an S3-compatible
server (moto). A pushes; B clones, pulls, and reproduces nothing that A already computed."""
from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import Project

pytestmark = pytest.mark.slow

ALL_STAGES = ["download", "prepare", "vocab", "pack", "train", "evaluate", "generate"]


def ran(proc) -> list[str]:
    return [line.split("'")[1] for line in proc.stdout.splitlines() if line.startswith("Running stage")]


def restored(proc) -> list[str]:
    """Stages DVC restored from the run-cache instead of running them."""
    return [line.split("'")[1] for line in proc.stdout.splitlines()
            if line.startswith("Stage '") and "is cached - skipping run" in line]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def commit_all(p: Project, message: str) -> None:
    p.git("add", "-A")
    p.git("commit", "-qm", message)


def clone(a: Project, path) -> Project:
    subprocess.run(["git", "clone", "-q", str(a.path), str(path)], check=True)
    return Project(path)


def s3_baseline(a: Project, endpoint: str, creds: dict, *push_args: str) -> None:
    """A's pipeline run and committed, with the moto S3 bucket as its default remote, pushed."""
    a.dvc("remote", "add", "-d", "s3", "s3://charlm/store")
    a.dvc("remote", "modify", "s3", "endpointurl", endpoint)
    a.dvc("repro", env=creds)
    commit_all(a, "baseline")
    a.dvc("push", *push_args, env=creds)


@pytest.fixture
def s3(tmp_path):
    """A real S3-compatible server (moto) on 127.0.0.1 with a fresh bucket; stopped by its own handle."""
    import boto3
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    creds = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
             "AWS_EC2_METADATA_DISABLED": "true", "AWS_CONFIG_FILE": str(tmp_path / "none"),
             "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none")}
    boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="testing", aws_secret_access_key="testing",
                 region_name="us-east-1").create_bucket(Bucket="charlm")
    yield endpoint, creds
    server.stop()


def test_shared_folder_remote_fresh_clone_restores_everything(served_project, tmp_path):
    a = served_project
    a.dvc("remote", "add", "-d", "team", str(tmp_path / "shared-remote"))
    assert ran(a.dvc("repro")) == ALL_STAGES
    commit_all(a, "trained")
    a.dvc("push", "--run-cache")

    b = clone(a, tmp_path / "b")
    b.dvc("pull")
    # Every output came back, metrics and plots included.
    for path in ["models/model.pt", "metrics/eval.json", "dvclive/metrics.json", "dvclive/plots/metrics/val/bpc.tsv",
                 "reports/samples.json", "metrics/generate.json", "data/packed/meta.json"]:
        assert (b.path / path).is_file(), path
    assert "up to date" in b.dvc("status").stdout
    assert ran(b.dvc("repro")) == []
    assert "test_bpc" in b.dvc("metrics", "show").stdout


def test_s3_push_pull_and_run_cache_restore_of_an_experiment(served_project, s3, tmp_path):
    endpoint, creds = s3
    a = served_project
    s3_baseline(a, endpoint, creds, "--run-cache")

    # A runs an experiment and shares its results, run-cache included.
    a.dvc("exp", "run", "-S", "train.seed=7", "-S", "generate.length=25", env=creds)
    a_bpc = (a.path / "metrics/eval.json").read_text()
    a.dvc("push", "--run-cache", env=creds)

    # B: a fresh clone of the baseline pulls it and is up to date without running anything.
    b = clone(a, tmp_path / "b")
    b.dvc("pull", env=creds)
    assert ran(b.dvc("repro", env=creds)) == []

    # B asks for the same experiment: every changed stage is restored from the run-cache, none re-executed.
    proc = b.dvc("exp", "run", "--pull", "-S", "train.seed=7", "-S", "generate.length=25", env=creds)
    assert ran(proc) == [], proc.stdout
    assert set(restored(proc)) == {"train", "evaluate", "generate"}, proc.stdout
    assert (b.path / "metrics/eval.json").read_text() == a_bpc


def test_s3_missing_credentials_and_wrong_endpoint_fail_fast(served_project, s3, tmp_path):
    endpoint, creds = s3
    p = served_project
    p.stage("download")  # any tracked output will do; commit something to push
    p.dvc("remote", "add", "-d", "s3", "s3://charlm/store")
    p.dvc("remote", "modify", "s3", "endpointurl", endpoint)
    p.dvc("repro", "vocab", env=creds)

    no_creds = {k: v for k, v in creds.items() if not k.startswith("AWS_ACCESS") and k != "AWS_SECRET_ACCESS_KEY"}
    no_creds |= {"AWS_ACCESS_KEY_ID": "", "AWS_SECRET_ACCESS_KEY": ""}
    t0 = time.monotonic()
    proc = p.dvc("push", check=False, env=no_creds, timeout=120)
    assert proc.returncode != 0
    assert "credentials" in (proc.stdout + proc.stderr).lower()
    assert time.monotonic() - t0 < 60

    closed = f"http://127.0.0.1:{free_port()}"
    p.dvc("remote", "modify", "s3", "endpointurl", closed)
    p.dvc("remote", "modify", "s3", "connect_timeout", "3")
    t0 = time.monotonic()
    proc = p.dvc("push", check=False, env=creds, timeout=120)
    assert proc.returncode != 0
    assert "127.0.0.1" in proc.stdout + proc.stderr or "connect" in (proc.stdout + proc.stderr).lower()
    assert time.monotonic() - t0 < 90


CHARLM = str(Path(sys.executable).parent / "charlm")
SAMPLE = ["generate", "--prompt", "The ", "--temperature", "1.0", "--seed", "5", "--length", "80", "--device", "cpu"]


def sample(p: Project, *args, env=None) -> str:
    return p.run(CHARLM, *SAMPLE, *args, env={"OMP_NUM_THREADS": "1", **(env or {})}).stdout


def test_generate_from_any_experiment_or_revision_through_a_shared_folder(served_project, tmp_path):
    """`charlm generate --rev` samples from an experiment's model without `dvc exp apply`, and from a commit's
    model in a fresh clone that has only the remote to get it from."""
    a = served_project
    a.dvc("remote", "add", "-d", "team", str(tmp_path / "shared-remote"))
    a.dvc("repro")
    commit_all(a, "baseline")
    a.dvc("push")
    baseline = sample(a)

    a.dvc("exp", "run", "-n", "seed7", "-S", "train.seed=7")
    shutil.copy(a.path / "models/model.pt", tmp_path / "seed7.pt")
    a.git("checkout", "--", "params.yaml", "dvc.lock")
    a.dvc("checkout")  # the workspace is the baseline again
    assert sample(a) == baseline
    from_exp = sample(a, "--rev", "seed7")
    assert from_exp == sample(a, "--model", str(tmp_path / "seed7.pt")) != baseline
    assert (a.path / "params.yaml").read_text() == a.run("git", "show", "HEAD:params.yaml").stdout  # nothing applied

    b = clone(a, tmp_path / "b")
    assert not (b.path / "models/model.pt").exists()
    assert sample(b, "--rev", "HEAD") == baseline  # pulled from the shared folder
    bad = b.run(CHARLM, *SAMPLE, "--rev", "no-such-exp", check=False)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "no-such-exp" in bad.stderr, bad.stderr


def test_generate_from_a_revision_through_s3(served_project, s3, tmp_path):
    endpoint, creds = s3
    a = served_project
    s3_baseline(a, endpoint, creds)
    b = clone(a, tmp_path / "b")
    assert sample(b, "--rev", "main", env=creds) == sample(a)
