"""`charlm serve`: the real server on a free loopback port, spoken to over real HTTP.

Two servers per module: one outside any repository, serving tiny model files given with --model, and (slow)
one in a throw-away git + DVC repository with a trained workspace model and a `dvc exp run --temp` experiment.
"""

from __future__ import annotations

import contextlib
import http.client
import io
import json
import os
import resource
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import Project, ag_news_rows, csv_bytes, git_project, md5

from charlm.apps.cli import main
from charlm.apps.serve import server as srv
from charlm.base.errors import CharlmError
from charlm.core import inspection
from charlm.core.model import CharRNN
from charlm.core.data import item_bounds
from charlm.core.vocab import EOS_ID, Vocab
from charlm.pipeline import artifact

VOCAB = Vocab(list("abcdefghijklmnopqrstuvwxyz .,!T"))
SCRIPT = Path(sys.executable).parent / "charlm"


def tiny_model(path: Path, seed: int, hidden: int = 16, layers: int = 1, cell: str = "lstm") -> Path:
    torch.manual_seed(seed)
    model = CharRNN(len(VOCAB), cell=cell, hidden=hidden, layers=layers, embedding=8)
    artifact.save(path, artifact.model_record(model, VOCAB, {"steps": 0}))
    return path


class Running:
    """A server serving in a thread, from `cwd` (the server reads the repository it runs in, as `charlm` does)."""

    def __init__(self, cwd: Path, files: list[str], host: str = "127.0.0.1", limits=srv.Limits()):
        self.cwd = cwd
        before = os.getcwd()
        os.chdir(cwd)
        try:
            self.server = srv.make_server(files, host=host, port=0, device="cpu", limits=limits)
        finally:
            os.chdir(before)
        self.port = self.server.server_address[1]
        self.address = "127.0.0.1" if host == "0.0.0.0" else host  # where a client connects
        self.app = self.server.app
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def request(self, method: str, path: str, body=None, headers: dict | None = None, raw: bytes | None = None):
        """(status, headers, parsed JSON or text)."""
        conn = http.client.HTTPConnection(self.address, self.port, timeout=60)
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        all_headers = {"Content-Type": "application/json", **(headers or {})}
        conn.request(method, path, body=data, headers=all_headers)
        resp = conn.getresponse()
        text = resp.read().decode("utf-8")
        conn.close()
        ctype = resp.getheader("Content-Type", "")
        return resp.status, resp, json.loads(text) if ctype.startswith("application/json") else text

    def get(self, path: str, **kw):
        return self.request("GET", path, **kw)

    def post(self, path: str, body=None, **kw):
        return self.request("POST", path, body, **kw)

    def job(self, **fields) -> str:
        status, _, out = self.post("/api/generate", fields)
        assert status == 200, out
        return out["job"]

    def events(self, job: str) -> list[tuple[str, dict]]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        conn.request("GET", f"/api/jobs/{job}/events")
        resp = conn.getresponse()
        assert resp.status == 200, resp.read()
        assert resp.getheader("Content-Type").startswith("text/event-stream")
        events = parse_events(resp.read().decode("utf-8"))
        conn.close()
        return events


def parse_events(text: str) -> list[tuple[str, dict]]:
    out = []
    for block in text.split("\n\n"):
        if not block.strip():
            continue
        fields = dict(line.split(": ", 1) for line in block.splitlines())
        out.append((fields["event"], json.loads(fields["data"])))
    return out


def texts(events: list[tuple[str, dict]], prompt: str, n: int) -> list[str]:
    rows = [[prompt] for _ in range(n)]
    for name, data in events:
        if name == "piece":
            for row, piece in zip(rows, data["pieces"], strict=True):
                if piece is not None:
                    row.append(piece)
    return ["".join(r) for r in rows]


def cli_text(capsys, *args) -> str:
    capsys.readouterr()
    main(["generate", *map(str, args)])
    return capsys.readouterr().out


@pytest.fixture(scope="module", autouse=True)
def one_thread_module():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    """A server outside any repository, with 7 model files: more than the 6 it keeps loaded."""
    root = tmp_path_factory.mktemp("plain")
    files = [str(tiny_model(root / f"m{k}.pt", seed=k)) for k in range(6)]
    files.append(str(tiny_model(root / "big.pt", seed=9, hidden=192, layers=2)))  # slow enough to cancel
    server = Running(root, files)
    yield server
    server.close()


@pytest.fixture
def in_plain(plain, monkeypatch):
    monkeypatch.chdir(plain.cwd)
    return plain


GEN = {"prompt": "The ", "temperature": 0.9, "top_k": 5, "top_p": 0.95, "length": 60, "seed": 7, "stop_at_eos": True}


# --------------------------------------------------------------------------- generation


def test_one_stream_carries_two_models_each_equal_to_charlm_generate(in_plain, capsys):
    s = in_plain
    files = [m["label"] for m in s.get("/api/models")[2]["models"]]
    events = s.events(s.job(models=["file:0", "file:1"], **GEN))
    assert events[0] == ("start", {"seed": 7, "models": ["file:0", "file:1"]})
    assert events[-1] == ("done", {"reason": "finished"})
    assert all(len(d["pieces"]) == 2 for e, d in events if e == "piece")
    served = texts(events, GEN["prompt"], 2)
    flags = ["--prompt", "The ", "--temperature", 0.9, "--top-k", 5, "--top-p", 0.95, "--length", 60, "--seed", 7]
    rows = {m["id"]: m for m in s.get("/api/models")[2]["models"]}
    for text, path, model_id in zip(served, files[:2], ["file:0", "file:1"], strict=True):
        assert rows[model_id]["cli"] == [f"--model={path}"]
        assert text + "\n" == cli_text(capsys, *flags, *rows[model_id]["cli"])
    assert served[0] != served[1]


def test_each_streamed_character_comes_with_the_score_read_gives_it(in_plain):
    # Write's colours are Read's bits: the score streamed with each character is what Read computes for the
    # prompt and the text as one item, in the same model.
    s = in_plain
    for request in ({**GEN, "length": 80}, {**GEN, "temperature": 1.5, "top_k": 0, "top_p": 1.0, "seed": 3}):
        events = s.events(s.job(models=["file:0", "file:2"], **request))
        pieces = [d for e, d in events if e == "piece"]
        for column, model_id in enumerate(["file:0", "file:2"]):
            model, vocab, _ = s.app.load(model_id)
            text = "".join(d["pieces"][column] for d in pieces if d["pieces"][column] is not None)
            scores = [d["scores"][column] for d in pieces if d["pieces"][column] is not None]
            assert all(d["scores"][column] is None for d in pieces if d["pieces"][column] is None)
            assert len(scores) == len(text) > 10
            read = inspection.char_scores(model, vocab, [request["prompt"] + text], top=5)[0][len(request["prompt"]) :]
            for streamed, scored in zip(scores, read, strict=True):
                assert streamed["bits"] == pytest.approx(scored["bits"], abs=1e-4)
                assert streamed["rank"] == scored["rank"]
                assert [n for n, _ in streamed["top"]] == [n for n, _ in scored["top"]]
                assert [p for _, p in streamed["top"]] == pytest.approx([p for _, p in scored["top"]], abs=1e-5)


@pytest.mark.parametrize("round_s", [0.0, 0.001, None])
def test_models_taking_turns_give_each_position_of_every_model_in_order(tmp_path, monkeypatch, round_s):
    # Job.turns steps each model up to CHUNK positions (fewer after its share of ROUND_S) before the next one's turn
    # (cache locality); what it yields must still be the lockstep: position by position, each model's piece, None
    # once that model has stopped, however long the turns were (ROUND_S 0: one position a turn).
    from charlm.apps.serve import jobs
    from charlm.core.sampling import text_pieces, token_steps

    if round_s is not None:
        monkeypatch.setattr(jobs, "ROUND_S", round_s)
    shapes = [(8, -30.0), (64, 0.0), (16, 2.5)]  # (hidden, <eos> bias): never, sometimes, soon at <eos>
    loaded = []
    for i, (hidden, eos_bias) in enumerate(shapes):
        model, vocab, _ = artifact.load_model(tiny_model(tmp_path / f"m{i}.pt", seed=i, hidden=hidden), "cpu")
        with torch.no_grad():
            model.head.bias[EOS_ID] = eos_bias
        loaded.append((model.eval(), vocab, {}))
    length = 2 * jobs.CHUNK + 5
    for order in ([0, 1, 2], [2, 1, 0]):  # reversed: the model that sets the turn's length ends first
        models = [loaded[i] for i in order]
        for stop_at_eos in (True, False):
            job = jobs.Job("j", ["a", "b", "c"], models, jobs.Request("ab", 1.5, 0, 1.0, length, 4, stop_at_eos))
            turns = list(job.turns())
            assert len(turns[0]) == 1 and all(1 <= len(turn) <= jobs.CHUNK for turn in turns)  # the first alone
            if round_s == 0.0 and not stop_at_eos:  # no time for a second position in any turn
                assert all(len(turn) == 1 for turn in turns)
            got = [position for turn in turns for position in turn]
            rows = []
            for model, vocab, _ in models:
                steps = token_steps(model, vocab, ["ab"], [1.5], length, 0, 1.0, 4, stop_at_eos)
                rows.append([piece for (piece,) in text_pieces(steps, vocab, stop_at_eos)])
            expected = [[row[i] if i < len(row) else None for row in rows] for i in range(max(map(len, rows)))]
            assert [pieces for pieces, _ in got] == expected
            assert all((d is None) == (p is None) for pieces, drawn in got for p, d in zip(pieces, drawn, strict=True))
            if stop_at_eos:  # rows of different lengths, over a chunk's edge: the case the padding is for
                assert len({len(row) for row in rows}) > 1 and max(map(len, rows)) > jobs.CHUNK
            else:
                assert len(got) == length


def test_a_model_whose_logits_are_not_float32_is_scored_as_read_scores_it(tmp_path):
    # A job keeps each step's logits where and as the model makes them (bf16 here; on CUDA, on the device) and
    # brings a batch to the host as float32 at once: the path a CUDA model's scores take, run on a CPU.
    from charlm.apps.serve import jobs

    model, vocab, _ = artifact.load_model(tiny_model(tmp_path / "m.pt", seed=1), "cpu")
    with torch.no_grad():
        model.head.bias[EOS_ID] = -30.0  # one item of 40 characters, as Read scores it
    model = model.to(torch.bfloat16).eval()
    job = jobs.Job("j", ["a"], [(model, vocab, {})], jobs.Request("ab", 1.0, 0, 1.0, 40, 3, True))
    batch = [position for turn in job.turns() for position in turn]
    assert all(logits.dtype == torch.bfloat16 for _, ((logits, _),) in batch)
    streamed = [score for (score,) in job.scored(batch)]
    text = "".join(piece for (piece,), _ in batch)
    read = inspection.char_scores(model, vocab, ["ab" + text], top=5)[0][2:]
    assert len(streamed) == len(read) == 40
    for got, want in zip(streamed, read, strict=True):
        assert got["bits"] == pytest.approx(want["bits"], abs=0.05) and isinstance(got["bits"], float)
        assert [name for name, _ in got["top"]][:1] == [name for name, _ in want["top"]][:1]


def test_greedy_without_stop_at_eos_and_a_random_seed_reported(in_plain, capsys):
    s = in_plain
    events = s.events(s.job(models=["file:2"], prompt="ab", temperature=0, length=30, stop_at_eos=False))
    seed = events[0][1]["seed"]
    assert isinstance(seed, int) and seed >= 0
    assert len([e for e, _ in events if e == "piece"]) == 30
    expected = cli_text(
        capsys,
        "--prompt",
        "ab",
        "--temperature",
        0,
        "--length",
        30,
        "--no-stop-at-eos",
        "--seed",
        seed,
        "--model",
        s.app.catalog.resolve("file:2").path,
    )
    assert texts(events, "ab", 1)[0] + "\n" == expected


def test_stop_ends_the_stream_with_done_stopped(in_plain):
    s = in_plain
    job = s.job(models=["file:6"], prompt="a", temperature=1.0, length=5000, seed=1, stop_at_eos=False)
    conn = http.client.HTTPConnection("127.0.0.1", s.port, timeout=60)
    conn.request("GET", f"/api/jobs/{job}/events")
    resp = conn.getresponse()
    first = resp.readline()
    assert first == b"event: start\n"
    assert s.post(f"/api/jobs/{job}/stop", {})[2] == {"stopped": True}
    events = parse_events(first.decode() + resp.read().decode())
    conn.close()
    assert events[-1] == ("done", {"reason": "stopped"})
    assert len(events) - 2 < 5000
    # Events are read once.
    assert s.get(f"/api/jobs/{job}/events")[0] == 404


def test_sixteen_generations_are_admitted_the_seventeenth_429_and_a_disconnect_frees_a_slot(in_plain):
    s = in_plain
    long = s.job(models=["file:6"], prompt="a", temperature=1.0, length=5000, seed=1, stop_at_eos=False)
    short = [s.job(models=["file:0"], prompt="a", length=3, seed=k) for k in range(15)]
    status, resp, out = s.post("/api/generate", {"models": ["file:0"], "length": 3})
    assert status == 429 and "too many generations" in out["error"]
    job = s.app.jobs.get(long)
    sock = socket.create_connection(("127.0.0.1", s.port))
    sock.sendall(f"GET /api/jobs/{long}/events HTTP/1.1\r\nHost: 127.0.0.1:{s.port}\r\n\r\n".encode())
    received = b""
    while received.count(b"event: piece") < 2:
        received += sock.recv(4096)
    sock.close()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        status, _, out = s.post("/api/generate", {"models": ["file:0"], "length": 3, "seed": 1})
        if status == 200:
            break
        time.sleep(0.05)
    assert status == 200, out
    assert job.sent < 5000  # the generation was cancelled, not run to its end
    for j in [*short, out["job"]]:
        assert s.events(j)[-1] == ("done", {"reason": "finished"})
    assert s.app.jobs.running() == 0


def test_loaded_models_are_bounded(in_plain):
    s = in_plain
    for k in range(7):
        s.events(s.job(models=[f"file:{k}"], length=2, seed=0))
    assert len(s.app.models) <= 6


# --------------------------------------------------------------------------- the other views on model files


def test_models_outside_a_repository_are_the_files(in_plain):
    status, resp, out = in_plain.get("/api/models")
    assert status == 200 and out["repo"] is False and out["hint"] is None
    assert [m["id"] for m in out["models"]] == [f"file:{k}" for k in range(7)]
    assert {m["kind"] for m in out["models"]} == {"file"}


def test_score_activations_units_and_curves_on_files(in_plain):
    s = in_plain
    status, _, out = s.post("/api/score", {"models": ["file:0", "file:1"], "text": "abc de\n\nfgh"})
    assert status == 200, out
    assert out["items"] == ["abc de", "fgh"]
    m = out["models"][0]
    assert m["id"] == "file:0" and m["chars"] == 9 and m["bpc"] > 0
    assert [len(item) for item in m["scores"]] == [6, 3]
    assert len(m["scores"][0][0]["top"]) == 5 and m["scores"][0][0]["rank"] >= 1
    body = {"model": "file:0", "text": "abc\nde", "layer": 0, "kind": "cell", "unit": 3}
    status, _, out = s.post("/api/activations", body)
    assert status == 200, out
    assert out["layers"] == 1 and out["units"] == 16 and out["kinds"] == ["cell", "output"]
    assert [len(v) for v in out["values"]] == [3, 2]
    again = s.post("/api/activations", {**body, "unit": 4})[2]
    assert again["values"] != out["values"]
    status, _, out = s.post("/api/units", {"model": "file:0", "layer": 0, "kind": "output"})
    assert status == 200 and out["features"] == [] and "no validation data" in out["note"]
    assert s.get("/api/curves?models=file:0")[2] == {
        "curves": [{"id": "file:0", "label": s.app.catalog.resolve("file:0").label, "train": [], "val": []}]
    }
    status, _, out = s.get("/api/test-item")
    assert status == 404 and "no packed data" in out["error"]


def test_span_units_name_the_units_that_set_a_span_apart_with_their_states_for_the_heatmap(in_plain):
    s = in_plain
    text = "the Cat sat\non THE mat"
    body = {"model": "file:0", "text": text, "layer": 0, "kind": "output", "spans": [[0, 4, 7], [1, 3, 7]]}
    status, _, out = s.post("/api/span-units", body)
    assert status == 200, out
    assert out["items"] == ["the Cat sat", "on THE mat"] and 0 < len(out["units"]) <= 10
    model, vocab, _ = s.app.load("file:0")
    states = inspection.layer_states(model, vocab, out["items"], 0, "output")
    masks = [np.zeros(11, bool), np.zeros(10, bool)]
    masks[0][4:7] = masks[1][3:7] = True
    expected = inspection.span_units(states, masks, top=10)
    assert [u["unit"] for u in out["units"]] == [u["unit"] for u in expected]
    chosen = [u["unit"] for u in expected]
    np.testing.assert_allclose(np.array(out["values"][1]), states[1][:, chosen], atol=1e-4)
    for spans in ([[0, 5, 4]], [[2, 0, 1]], [[0, 0, 12]], [], [[0, 1]], [[0, 1, 2.5]], "0-3"):
        status, _, out = s.post("/api/span-units", {**body, "spans": spans})
        assert status == 400 and "\n" not in out["error"], (spans, out)
    status, _, out = s.post("/api/span-units", {**body, "spans": [[0, 0, 11], [1, 0, 10]]})
    assert status == 400 and "span" in out["error"]


# --------------------------------------------------------------------------- hostile requests


@pytest.mark.parametrize("body, field", [
    ({"models": ["file:0"], "temperature": -1}, "temperature must be a number >= 0"),
    ({"models": ["file:0"], "temperature": "hot"}, "temperature"),
    ({"models": ["file:0"], "length": 10**9}, "length must be a whole number from 1 to 5,000"),
    ({"models": ["file:0"], "length": 0}, "length"),
    ({"models": ["file:0"], "length": 2.5}, "length"),
    ({"models": ["file:0"], "top_p": 0}, "top_p"),
    ({"models": ["file:0"], "top_k": True}, "top_k"),
    ({"models": ["file:0"], "seed": -3}, "seed"),
    ({"models": ["file:0"], "stop_at_eos": "yes"}, "stop_at_eos"),
    ({"models": ["file:0"], "prompt": "x" * 20_001}, "prompt must be a string of at most 20,000"),
    ({"models": ["file:0"] * 5}, "models must be a list of 1 to 4"),
    ({"models": []}, "models"),
    ({"models": "file:0"}, "models"),
    ({"prompt": "a"}, "models is missing"),
    ({"models": ["file:0"], "colour": "red"}, "unknown field 'colour'"),
])  # fmt: skip
def test_bad_generate_fields_are_400_naming_the_field(in_plain, body, field):
    status, resp, out = in_plain.post("/api/generate", body)
    assert status == 400 and field in out["error"] and "\n" not in out["error"]
    assert resp.getheader("Content-Type") == "application/json"


@pytest.mark.parametrize("raw, status, words", [
    (b"{not json", 400, "not valid JSON"),
    (b"\xff\xfe{}", 400, "not UTF-8"),
    (b"[1, 2]", 400, "JSON object"),
    (b'{"models": ["file:0"], "temperature": NaN}', 400, "not valid JSON"),
    (b"{" + b" " * (1 << 20) + b"}", 413, "over 1,048,576 bytes"),
    (b"[" * 100_000, 400, "not valid JSON"),
    (b'{"models": ["file:0"], "temperature": 1' + b"0" * 400 + b"}", 400, "temperature must be a number >= 0"),
])  # fmt: skip
def test_malformed_bodies_are_refused_and_the_server_keeps_serving(in_plain, raw, status, words):
    got, _, out = in_plain.post("/api/generate", raw=raw)
    assert got == status and words in out["error"], out
    assert in_plain.get("/api/models")[0] == 200


def test_score_limits_and_unknown_models(in_plain):
    s = in_plain
    status, _, out = s.post("/api/score", {"models": ["file:0"], "text": "a" * 20_001})
    assert status == 400 and "text must be" in out["error"]
    status, _, out = s.post("/api/score", {"models": ["nope"], "text": "abc"})
    assert status == 404 and out["error"].startswith("unknown model 'nope'")
    status, _, out = s.post("/api/generate", {"models": ["rev:main"]})  # no repository here: no revisions
    assert status == 404 and "unknown model 'rev:main'" in out["error"]
    status, _, out = s.post("/api/activations", {"model": "file:0", "text": "ab", "layer": 1, "kind": "cell",
                                                  "unit": 0})  # fmt: skip
    assert status == 400 and "layer must be a whole number from 0 to 0" in out["error"]
    assert s.get("/api/jobs/0123/events")[0] == 404
    assert s.post("/api/jobs/0123/stop", {})[0] == 404
    assert s.get("/api/nothing")[0] == 404
    assert s.post("/api/models", {})[0] == 405


def test_host_and_origin_headers_are_checked(in_plain):
    s = in_plain
    status, _, out = s.post("/api/generate", {"models": ["file:0"]}, headers={"Content-Type": "text/plain"})
    assert status == 415 and "application/json" in out["error"]
    status, _, out = s.get("/api/models", headers={"Host": f"evil.example:{s.port}"})
    assert status == 403 and "Host" in out["error"]
    status, _, out = s.get("/api/models", headers={"Host": f"localhost:{s.port}"})
    assert status == 200
    status, _, out = s.post("/api/generate", {"models": ["file:0"], "length": 2},
                            headers={"Origin": "http://evil.example"})  # fmt: skip
    assert status == 403 and "cross-site" in out["error"]
    status, _, out = s.post("/api/generate", {"models": ["file:0"], "length": 2},
                            headers={"Origin": f"http://127.0.0.1:{s.port}"})  # fmt: skip
    assert status == 200
    s.events(out["job"])


def test_page_files_only_with_their_types_and_a_strict_csp(in_plain):
    s = in_plain
    for path in ("/page/../server.py", "/page/server.py", "/page/%2e%2e/server.py", "/server.py", "/page/"):
        assert s.get(path)[0] == 404, path
    status, resp, _ = s.get("/api/models")
    assert resp.getheader("X-Content-Type-Options") == "nosniff"
    if not (srv.PAGE / "index.html").exists():
        pytest.skip("the page is not there yet")
    status, resp, text = s.get("/")
    assert status == 200 and resp.getheader("Content-Type") == "text/html; charset=utf-8"
    assert resp.getheader("Content-Security-Policy") == srv.CSP
    assert "script-src 'self'" in srv.CSP and "unsafe" not in srv.CSP
    for name, ctype in srv.PAGE_FILES.items():
        if (srv.PAGE / name).exists():
            status, resp, _ = s.get(f"/page/{name}")
            assert status == 200 and resp.getheader("Content-Type") == ctype


def test_a_non_loopback_host_needs_the_token(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    tiny_model(tmp_path / "m.pt", seed=0)
    s = Running(tmp_path, [str(tmp_path / "m.pt")], host="0.0.0.0")
    try:
        token = s.app.token
        assert token and len(token) >= 24 and s.server.url().endswith(f"/?token={token}")
        assert s.get("/api/models")[0] == 403
        assert s.get("/api/models?token=wrong")[0] == 403
        assert s.get("/")[0] == 403
        assert s.get("/page/app.js")[0] == 403
        # The page asks for its own script and style with the token, or it would load neither.
        page = s.get(f"/?token={token}")[2]
        assert f'"/page/app.js?token={token}"' in page and f'"/page/style.css?token={token}"' in page
        assert s.get(f"/page/app.js?token={token}")[0] == 200
        status, _, out = s.get(f"/api/models?token={token}")
        assert status == 200 and out["models"][0]["id"] == "file:0"
        assert s.post(f"/api/generate?token={token}", {"models": ["file:0"], "length": 1})[0] == 200
    finally:
        s.close()


def test_port_in_use_is_one_line_exit_2(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(SystemExit) as exit_:
            main(["serve", "--port", str(port), "--device", "cpu"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err == f"charlm: error: port {port} is in use; pick another with --port (or --port 0)\n"


def test_the_command_prints_its_url_and_ctrl_c_exits_cleanly(tmp_path):
    tiny_model(tmp_path / "m.pt", seed=0)
    command = [str(SCRIPT)] if SCRIPT.exists() else [sys.executable, "-m", "charlm.apps.cli"]
    proc = subprocess.Popen(command + ["serve", "--port", "0", "--host", "0.0.0.0", "--device", "cpu",
                                       "--model", "m.pt"], cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                            # as from a terminal: a shell's background job (CI started with `&`) passes SIGINT
                            # down ignored, and Python then installs no KeyboardInterrupt handler
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # fmt: skip
    try:
        line = proc.stdout.readline()
        assert line.startswith("charlm: serving http://0.0.0.0:"), line
        url = line.split()[2]
        port, token = int(url.split(":")[2].split("/")[0]), url.split("?token=")[1]
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.request("GET", f"/api/models?token={token}")
        assert json.loads(conn.getresponse().read())["models"][0]["label"] == "m.pt"
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode in (0, 130)
    assert "warning: serving on 0.0.0.0" in err and "Traceback" not in err


# --------------------------------------------------------------------------- a DVC repository


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    """A trained workspace model, committed, and an experiment run with --temp (the workspace stays as it was)."""
    root = tmp_path_factory.mktemp("repo")
    p = git_project(root / "repo")
    train, test = csv_bytes(ag_news_rows(240, seed=1)), csv_bytes(ag_news_rows(40, seed=2))
    (root / "train.csv").write_bytes(train)
    (root / "test.csv").write_bytes(test)
    p.set_params(download={"train": {"url": str(root / "train.csv"), "md5": md5(train)},
                           "test": {"url": str(root / "test.csv"), "md5": md5(test)}},
                 model={"hidden": 24, "layers": 1},
                 train={"max_steps": 10, "eval_every": 5, "log_every": 5, "checkpoint_every": 10,
                        "sample_every": 0})  # fmt: skip
    env = {"OMP_NUM_THREADS": "1"}
    p.dvc("repro", env=env)
    p.git("add", "-A")
    p.git("commit", "-qm", "baseline")
    p.dvc("exp", "run", "--temp", "-n", "wide", "-S", "model.hidden=40", env=env)
    server = Running(p.path, [])
    yield p, server
    server.close()


@pytest.fixture
def in_repo(repo, monkeypatch):
    monkeypatch.chdir(repo[0].path)
    return repo


@pytest.mark.slow
def test_repo_models_experiment_params_metrics_generation_curves_and_a_clean_workspace(in_repo, capsys):
    p, s = in_repo
    before = p.git("status", "--porcelain").stdout
    status, _, out = s.get("/api/models?refresh=1")
    assert status == 200 and out["repo"] is True and out["hint"] is None
    by_id = {m["id"]: m for m in out["models"]}
    assert {"workspace", "rev:wide", "rev:main"} <= by_id.keys(), by_id.keys()
    ws, wide = by_id["workspace"], by_id["rev:wide"]
    assert ws["kind"] == "workspace" and ws["params"] == {}
    assert wide["kind"] == "experiment" and wide["params"] == {"model.hidden": 40}
    assert by_id["rev:main"]["kind"] == "branch" and by_id["rev:main"]["params"] == {}
    metrics = json.loads((p.path / "metrics/eval.json").read_text())
    assert ws["test_bpc"] == pytest.approx(metrics["test_bpc"])
    assert ws["val_bpc"] == pytest.approx(json.loads((p.path / "dvclive/metrics.json").read_text())["val"]["bpc"])
    assert wide["test_bpc"] is not None and wide["val_bpc"] is not None and wide["test_bpc"] != ws["test_bpc"]
    # the precision each was trained in, as the train stage logged it (train.amp resolved on this machine)
    trained_in = json.loads((p.path / "dvclive/metrics.json").read_text())["precision"]
    assert ws["precision"] == wide["precision"] == trained_in and trained_in in ("fp32", "bf16")

    events = s.events(s.job(models=["workspace", "rev:wide"], **GEN))
    served = texts(events, GEN["prompt"], 2)
    flags = ["--prompt", "The ", "--temperature", 0.9, "--top-k", 5, "--top-p", 0.95, "--length", 60, "--seed", 7]
    # The page's command line: the flags and each model's own `cli` arguments write what the server wrote.
    assert ws["cli"] == [] and wide["cli"] == ["--rev=wide"]
    assert served[0] + "\n" == cli_text(capsys, *flags, *ws["cli"])
    assert served[1] + "\n" == cli_text(capsys, *flags, *wide["cli"])

    status, _, out = s.post("/api/generate", {"models": ["rev:nope"]})
    assert status == 404 and out["error"].startswith("unknown model 'rev:nope': ")
    status, _, out = s.post("/api/generate", {"models": ["rev:--output=x"]})
    assert status == 404 and "not a revision name" in out["error"]

    curves = {c["id"]: c for c in s.get("/api/curves?models=workspace,rev:wide")[2]["curves"]}
    for c in curves.values():
        assert [step for step, _ in c["train"]] == [5, 10] and [step for step, _ in c["val"]] == [5, 10]
    assert curves["workspace"]["val"] != curves["rev:wide"]["val"]

    status, _, first = s.get("/api/test-item?seed=3")
    assert status == 200 and first["text"] and s.get("/api/test-item?seed=3")[2] == first
    status, _, out = s.post("/api/units", {"model": "rev:wide", "layer": 0, "kind": "cell"})
    assert status == 200 and out["note"] is None
    named = [f["feature"] for f in out["features"]] + out["unexplained"] + out["constant"]
    assert sorted(named) == sorted(inspection.FEATURES)
    assert all(1 <= len(f["units"]) <= 3 and {"unit", "r"} == set(f["units"][0]) for f in out["features"])

    # The hardest test items: ordered by bpc, each scored by Read as listed, and the split's top 20 by Read's bpc.
    status, _, out = s.get("/api/hardest?model=workspace")
    assert status == 200 and out["searched"] == out["total"] > len(out["items"]) == 20, out
    bpcs = [h["bpc"] for h in out["items"]]
    assert bpcs == sorted(bpcs, reverse=True)
    for h in out["items"][:3]:
        read = s.post("/api/score", {"models": ["workspace"], "text": h["text"]})[2]["models"][0]
        assert read["item_bpc"] == [pytest.approx(h["bpc"], abs=1e-4)] and read["chars"] == h["chars"]
    stream = np.load(p.path / "data/packed/test.npy")
    vocab = Vocab.load(p.path / "data/vocab.json")
    every = [vocab.decode(stream[a : a + n].tolist()) for a, n in zip(*item_bounds(stream, EOS_ID), strict=True)]
    read = s.post("/api/score", {"models": ["workspace"], "text": "\n".join(every)})[2]["models"][0]["item_bpc"]
    assert len(read) == out["total"]
    top = sorted(range(len(read)), key=lambda i: -read[i])[:20]
    assert [h["index"] for h in out["items"]] == top and [every[i] for i in top] == [h["text"] for h in out["items"]]
    assert s.get("/api/hardest?model=rev:nope")[0] == 404
    status, _, out = s.post("/api/score", {"models": ["workspace", "rev:wide"], "text": first["text"]})
    assert status == 200 and len(out["models"]) == 2
    assert p.git("status", "--porcelain").stdout == before


def checkpoint_record(seed: int, **run) -> dict:
    """A checkpoint as the train stage writes it: `run` holds exp_name (None under `dvc repro`) and the logs; a
    record without them is one written before checkpoints named their run."""
    torch.manual_seed(seed)
    model = CharRNN(len(VOCAB), cell="gru", hidden=12, layers=1, embedding=4)
    record = artifact.model_record(model, VOCAB, {})
    return {"format": artifact.CHECKPOINT_FORMAT, "config": record["config"], "vocab": record["vocab"],
            "model": record["state_dict"], "step": 3, **run}  # fmt: skip


def named(seed: int, exp_name: str | None, val: float = 2.25) -> dict:
    metrics = {"val": {"bpc": val}, "precision": "bf16"}
    return checkpoint_record(seed, exp_name=exp_name, live={"metrics.json": json.dumps(metrics)})


def test_checkpoints_are_listed_and_read_again_when_rewritten(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".dvc").mkdir()
    s = Running(tmp_path, [])
    try:
        status, _, out = s.get("/api/models")
        assert out["models"] == [] and out["hint"].startswith("No model yet: run `dvc repro`")
        tiny_model(tmp_path / "models" / "model.pt", seed=0)
        artifact.save(tmp_path / "checkpoints" / "train.pt", named(1, None))
        artifact.save(tmp_path / ".dvc/tmp/charlm-checkpoints/abc123.pt", named(2, "wide", 3.5))
        artifact.save(tmp_path / ".dvc/tmp/charlm-checkpoints/old456.pt", checkpoint_record(3))  # whose run?
        assert s.get("/api/models")[2]["models"] == []  # the list is kept until a refresh
        out = s.get("/api/models?refresh=1")[2]
        assert out["repo"] is True and out["hint"] is None
        assert [(m["id"], m["kind"], m["label"], m["val_bpc"], m["precision"]) for m in out["models"]] == [
            ("workspace", "workspace", "workspace (models/model.pt)", None, None),
            ("checkpoint", "checkpoint", "checkpoint of dvc repro, step 3", 2.25, "bf16"),
            ("checkpoint:abc123", "checkpoint", "queued/temp checkpoint abc123 of experiment wide, step 3", 3.5,
             "bf16")]  # fmt: skip

        def sample() -> str:
            return texts(s.events(s.job(models=["checkpoint"], prompt="a", temperature=0, length=20,
                                        stop_at_eos=False)), "a", 1)[0]  # fmt: skip

        first = sample()
        artifact.save(tmp_path / "checkpoints" / "train.pt", named(5, None))
        os.utime(tmp_path / "checkpoints" / "train.pt", ns=(time.time_ns() + 10**9,) * 2)
        assert sample() != first
        assert s.events(s.job(models=["checkpoint:abc123", "workspace"], length=5))[-1][0] == "done"
    finally:
        s.close()


def test_any_loopback_address_is_served_under_its_own_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    s = Running(tmp_path, [str(tiny_model(tmp_path / "m.pt", seed=0))], host="127.0.0.2")
    try:
        assert s.server.url() == f"http://127.0.0.2:{s.port}/" and s.app.token is None
        assert s.get("/api/models")[0] == 200  # Host: 127.0.0.2:<port>, as a browser sends for the printed URL
        assert s.get("/api/models", headers={"Host": f"localhost:{s.port}"})[0] == 200
        assert s.get("/api/models", headers={"Host": f"127.0.0.3:{s.port}"})[0] == 403
    finally:
        s.close()


def test_the_default_host_is_loopback_without_a_token(in_plain):
    from charlm.apps.cli import build_parser

    args = build_parser().parse_args(["serve"])
    assert (args.host, args.port, args.model) == ("127.0.0.1", 8000, [])
    assert in_plain.server.server_address[0] == "127.0.0.1" and in_plain.app.token is None


def test_requests_the_base_server_refuses_are_answered_in_json(in_plain):
    s = in_plain
    status, resp, out = s.request("PUT", "/api/models", {})
    assert status == 501 and resp.getheader("Content-Type") == "application/json" and out["error"]
    status, resp, out = s.request("DELETE", "/api/models")
    assert status == 501 and resp.getheader("X-Content-Type-Options") == "nosniff" and "DELETE" in out["error"]


def test_pieces_wait_for_a_flush_and_every_other_event_goes_out_at_once():
    class Counting(io.BytesIO):
        writes = 0

        def write(self, data):
            Counting.writes += 1
            return super().write(data)

    out = Counting()
    writer = srv.EventWriter(out)
    writer.send("start", {"seed": 1, "models": ["a"]})
    assert Counting.writes == 1
    for _ in range(50):
        writer.send("piece", {"pieces": ["y"]})
    assert Counting.writes == 1, "pieces share a write"
    writer.flush()
    writer.flush()
    assert Counting.writes == 2, "a flush writes what waits, once"
    writer.send("piece", {"pieces": ["z"]})
    writer.send("done", {"reason": "finished"})
    assert Counting.writes == 3, "the end goes out at once, with the piece before it"
    events = parse_events(out.getvalue().decode())
    assert [e for e, _ in events] == ["start"] + ["piece"] * 51 + ["done"]
    assert "".join(d["pieces"][0] for e, d in events if e == "piece") == "y" * 50 + "z"


def test_a_job_sends_its_first_character_alone_and_then_a_batch_at_a_time(tmp_path):
    from charlm.apps.serve import jobs

    loaded = [artifact.load_model(tiny_model(tmp_path / f"m{i}.pt", seed=i), "cpu") for i in range(2)]
    job = jobs.Job("j", ["a", "b"], loaded, jobs.Request("a", 1.0, 0, 1.0, 300, 1, False))
    log: list = []
    assert jobs.run(job, lambda event, data: log.append(event), lambda: log.append("flush")) == "finished"
    assert log[:4] == ["start", "piece", "flush", "piece"]
    batches = "".join("p" if e == "piece" else "|" if e == "flush" else "" for e in log).strip("|").split("|")
    assert sum(map(len, batches)) == 300 and len(batches) < 300 / 2, "positions go out in batches"
    assert log[-2:] == ["flush", "done"]


def counting_steps(model, steps: list, fail_at: int | None = None) -> None:
    """Count a model's generation steps in `steps`; raise at step `fail_at` (as a CUDA out-of-memory would)."""
    real = model.stepper

    def stepper():
        step = real()

        def counted(token, state):
            steps.append(model)
            if fail_at is not None and sum(m is model for m in steps) == fail_at:
                raise RuntimeError("out of memory (a test's)")
            return step(token, state)

        return counted

    model.stepper = stepper


def test_a_stop_costs_at_most_one_step_of_each_model(tmp_path):
    # Models take turns of up to CHUNK positions; a stop must not wait for the turn to end (hostile review).
    from charlm.apps.serve import jobs

    loaded = [artifact.load_model(tiny_model(tmp_path / f"m{i}.pt", seed=i), "cpu") for i in range(4)]
    steps: list = []
    for model, _, _ in loaded:
        counting_steps(model, steps)
    job = jobs.Job("j", list("abcd"), loaded, jobs.Request("a", 1.0, 0, 1.0, 5000, 1, False))
    at_stop: list[int] = []

    def send(event: str, data: dict) -> None:
        if event == "piece" and job.sent > 40 and not at_stop:  # the user presses Stop mid-stream
            at_stop.append(len(steps))
            job.stop.set()

    assert jobs.run(job, send) == "stopped"
    assert len(steps) - at_stop[0] <= 4, f"{len(steps) - at_stop[0]} model steps after the stop"


def test_what_was_made_before_a_model_fails_is_sent_before_the_error(tmp_path, monkeypatch):
    # Every turn made before the one that failed goes out, then the error (hostile review: they were dropped).
    from charlm.apps.serve import jobs

    monkeypatch.setattr(jobs, "BATCH_S", 3600.0)  # nothing goes out on time after the first character

    loaded = [artifact.load_model(tiny_model(tmp_path / f"m{i}.pt", seed=i), "cpu") for i in range(2)]
    steps: list = []
    counting_steps(loaded[1][0], steps, fail_at=150)  # in the fourth turn: 1 + 64 + 64 positions came before
    job = jobs.Job("j", ["a", "b"], loaded, jobs.Request("a", 1.0, 0, 1.0, 300, 1, False))
    yielded: list = []
    real_turns = job.turns
    job.turns = lambda: (yielded.extend(turn) or turn for turn in real_turns())  # type: ignore[method-assign]
    sent: list = []
    with pytest.raises(RuntimeError, match="out of memory"):
        jobs.run(job, lambda event, data: sent.append(data["pieces"]) if event == "piece" else None)
    assert sent == [pieces for pieces, _ in yielded] and len(sent) > 1


# --------------------------------------------------------------------------- connections and cross-site requests


def child_server(cwd: Path, *args: str, files: int = 1024, stderr=subprocess.PIPE) -> tuple[subprocess.Popen, int]:
    """`charlm serve --port 0` in a child process limited to `files` open files; (process, port) once it listens."""
    command = [sys.executable, "-m", "charlm.apps.cli", "serve", "--port", "0", "--device", "cpu", *args]
    proc = subprocess.Popen(command, cwd=cwd, stdout=subprocess.PIPE, stderr=stderr, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"},
                            preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (files, files)))  # fmt: skip
    line = proc.stdout.readline()
    assert "serving http://" in line, line
    threading.Thread(target=proc.stdout.read, daemon=True).start()  # drained, so the pipe never fills
    return proc, int(line.split("http://")[1].split("/")[0].rsplit(":", 1)[1])


def threads_of(proc: subprocess.Popen) -> int:
    status = Path(f"/proc/{proc.pid}/status").read_text()
    return int(status.split("Threads:")[1].split()[0])


def get_json(port: int, path: str, timeout: float) -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


def closed_within(sock: socket.socket, seconds: float) -> bool:
    """Whether the server closes `sock` (after any answer) within `seconds`."""
    sock.settimeout(seconds)
    try:
        while sock.recv(4096):
            pass
        return True
    except TimeoutError:
        return False


def test_a_request_not_sent_whole_in_time_is_closed(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    s = Running(tmp_path, [str(tiny_model(tmp_path / "m.pt", seed=0))], limits=srv.Limits(request_s=1.0))
    try:
        idle = socket.create_connection(("127.0.0.1", s.port))
        short = socket.create_connection(("127.0.0.1", s.port))  # a body shorter than its Content-Length
        short.sendall(f"POST /api/score HTTP/1.1\r\nHost: 127.0.0.1:{s.port}\r\nContent-Type: application/json\r\n"
                      "Content-Length: 100\r\n\r\n{\"models\"".encode())  # fmt: skip
        trickle = socket.create_connection(("127.0.0.1", s.port))  # a byte now and then: each read is in time
        started = time.monotonic()
        for byte in f"GET /api/models HTTP/1.1\r\nHost: 127.0.0.1:{s.port}\r\nX-Slow: {'x' * 50}".encode():
            if select.select([trickle], [], [], 0.2)[0]:  # readable: the server has closed it
                break
            trickle.sendall(bytes([byte]))
        assert closed_within(trickle, 3) and 0.9 < time.monotonic() - started < 3
        assert closed_within(idle, 3) and closed_within(short, 3)
        assert s.get("/api/models")[0] == 200
    finally:
        for sock in (idle, short, trickle):
            sock.close()
        s.close()


@pytest.mark.slow
def test_1100_idle_connections_neither_stop_the_server_nor_keep_its_threads(tmp_path):
    tiny_model(tmp_path / "m.pt", seed=0)
    proc, port = child_server(tmp_path, "--model", "m.pt", files=1024)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 4096)), hard))
    idle: list[socket.socket] = []
    try:
        assert get_json(port, "/api/models", 30)[0] == 200
        time.sleep(1)
        baseline = threads_of(proc)
        for k in range(1100):
            sock = socket.socket()
            sock.setblocking(False)  # past the backlog a connect waits: hold it open without waiting
            sock.connect_ex(("127.0.0.1", port))
            idle.append(sock)
            if k % 50 == 49:
                time.sleep(0.05)  # a burst would overflow the backlog, and the server would never see most of them
        deadline = time.monotonic() + 8  # a busy machine accepts them more slowly
        while threads_of(proc) <= 900 and time.monotonic() < deadline:
            time.sleep(0.25)
        assert threads_of(proc) > 900  # a thread per connection, up to the limit on open files
        time.sleep(18)
        started = time.monotonic()
        status, _ = get_json(port, "/api/models", 5)
        assert status == 200 and time.monotonic() - started < 5
        for sock in idle:
            sock.close()
        deadline = time.monotonic() + 15
        while threads_of(proc) > baseline and time.monotonic() < deadline:
            time.sleep(0.2)
        assert threads_of(proc) <= baseline
    finally:
        for sock in idle:
            sock.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        proc.kill()
        proc.wait()


def test_clients_that_leave_before_a_refusal_leave_no_traceback(tmp_path):
    proc, port = child_server(tmp_path)
    try:
        for _ in range(50):
            sock = socket.create_connection(("127.0.0.1", port))
            sock.sendall(f"GET /api/models HTTP/1.1\r\nHost: evil.example:{port}\r\n\r\n".encode())
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # a reset, not a close
            sock.close()
        assert get_json(port, "/api/models", 30)[0] == 200
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=30)
    assert err == ""


def test_a_missing_model_file_is_a_one_line_error_at_start_up(tmp_path):
    command = [sys.executable, "-m", "charlm.apps.cli", "serve", "--port", "0", "--model", "gone.pt"]
    proc = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr == "charlm: error: --model gone.pt: no such file\n"


def test_a_restart_on_the_same_port_works_and_a_live_server_still_holds_its_port(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    first = Running(tmp_path, [])
    port = first.port
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(f"GET /api/models HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())
    assert closed_within(sock, 30)  # the server closed first: its side of the connection is in TIME_WAIT
    sock.close()
    first.close()
    again = srv.make_server([], port=port, device="cpu")
    try:
        with pytest.raises(CharlmError, match=f"port {port} is in use"):
            srv.make_server([], port=port, device="cpu")
    finally:
        again.server_close()


def test_requests_that_cost_need_what_a_cross_site_page_cannot_send(in_plain):
    s = in_plain
    plain = {"Content-Type": "text/plain"}  # what an <img> or a link sends: no Origin, no JSON
    for path in ("/api/models?refresh=1", "/api/curves?models=file:0", "/api/test-item", "/api/model?id=file:0"):
        status, _, out = s.get(path, headers=plain)
        assert status == 403 and "application/json" in out["error"], path
        status, _, out = s.get(path, headers={"Sec-Fetch-Site": "cross-site"})
        assert status == 403 and "cross-site" in out["error"], path
    status, _, out = s.post("/api/score", {"models": ["file:0"], "text": "ab"}, headers={"Sec-Fetch-Site": "same-site"})
    assert status == 403 and "cross-site" in out["error"]
    job = s.job(models=["file:0"], length=2, seed=0)
    assert s.get(f"/api/jobs/{job}/events", headers={"Sec-Fetch-Site": "cross-site"})[0] == 403
    # What the page asks for, as the page asks: the list as computed, and (JSON) the rest; its stream and files.
    assert s.get("/api/models", headers={**plain, "Sec-Fetch-Site": "cross-site"})[0] == 200
    assert s.get("/api/models?refresh=1", headers={"Sec-Fetch-Site": "same-origin"})[0] == 200
    assert s.get("/api/curves?models=file:0")[0] == 200
    assert s.get("/api/model?id=file:0")[2]["id"] == "file:0"
    assert s.get("/favicon.ico", headers=plain)[0] == 200


def test_a_lone_surrogate_in_a_text_is_400(in_plain):
    s = in_plain
    for path, body in (("/api/score", b'{"models": ["file:0"], "text": "ab\\ud800"}'),
                       ("/api/activations", b'{"model": "file:0", "text": "\\ud800", "layer": 0, "kind": "cell", '
                                            b'"unit": 0}'),
                       ("/api/generate", b'{"models": ["file:0"], "prompt": "\\udfff"}')):  # fmt: skip
        status, _, out = s.post(path, raw=body)
        assert status == 400 and "lone surrogate" in out["error"], (path, out)


@pytest.fixture(scope="module")
def committed(tmp_path_factory):
    """A git + DVC repository with one commit and no model, served."""
    p = Project(tmp_path_factory.mktemp("committed"))
    p.git("init", "-q", "-b", "main")
    p.git("config", "user.email", "test@example.com")
    p.git("config", "user.name", "charlm tests")
    p.dvc("init", "-q")
    (p.path / "params.yaml").write_text("model: {hidden: 8}\n")
    p.git("add", "-A")
    p.git("commit", "-qm", "first")
    server = Running(p.path, [])
    yield server
    server.close()


@pytest.mark.parametrize("rev", ["HEAD^{tree}", "main:params.yaml", "main^{blob}", "nope", "main~3"])
def test_a_revision_that_names_no_commit_is_404_everywhere(committed, monkeypatch, rev):
    s = committed
    monkeypatch.chdir(s.cwd)
    model = f"rev:{rev}"
    for path, body in (("/api/score", {"models": [model], "text": "abc"}),
                       ("/api/units", {"model": model, "layer": 0, "kind": "cell"}),
                       ("/api/generate", {"models": [model]})):  # fmt: skip
        status, _, out = s.post(path, body)
        assert status == 404 and out["error"].startswith(f"unknown model {model!r}"), (path, out)
    for path in (f"/api/curves?models={model}", f"/api/model?id={model}"):
        status, _, out = s.get(path.replace("^", "%5E"))
        assert status == 404 and model in out["error"], (path, out)
    status, _, out = s.post("/api/score", {"models": ["rev:main"], "text": "abc"})  # a commit, without a model
    assert status == 404 and "models/model.pt at revision" in out["error"]


# --------------------------------------------------------------------------- what the hostile review found


def test_a_bad_checkpoint_is_left_out_and_the_other_models_keep_working(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".dvc").mkdir()
    tiny_model(tmp_path / "models" / "model.pt", seed=0)
    keyed = tmp_path / ".dvc/tmp/charlm-checkpoints"
    artifact.save(keyed / "aaa.pt", named(1, None) | {"exp_name": ["x"]})  # a name that is no string
    nan = checkpoint_record(2, exp_name=None, live={"metrics.json": '{"val": {"bpc": NaN}}'})
    artifact.save(keyed / "bbb.pt", nan)  # a val bpc that JSON cannot carry
    s = Running(tmp_path, [])
    try:
        status, _, out = s.get("/api/models?refresh=1")
        assert status == 200, out
        rows = {m["id"]: m for m in out["models"]}
        assert rows.keys() == {"workspace", "checkpoint:bbb"} and rows["checkpoint:bbb"]["val_bpc"] is None
        for model in ("workspace", "checkpoint:bbb"):
            status, _, out = s.post("/api/score", {"models": [model], "text": "abc"})
            assert status == 200, out
    finally:
        s.close()


def test_the_list_is_free_to_ask_for_cross_site_only_once_computed(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".dvc").mkdir()  # a repository: computing the list runs DVC
    s = Running(tmp_path, [])
    img = {"Content-Type": "", "Sec-Fetch-Site": "cross-site"}  # what an <img> on another site sends
    try:
        status, _, out = s.get("/api/models", headers=img)
        assert status == 403 and "cross-site" in out["error"]
        assert s.app.catalog.free() is False  # DVC did not run for it
        assert s.get("/api/models")[0] == 200
        assert s.get("/api/models", headers=img)[0] == 200  # now it costs nothing
    finally:
        s.close()


def test_a_model_files_info_a_seed_and_a_curve_row_are_never_a_500(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".dvc").mkdir()
    tiny_model(tmp_path / "models" / "model.pt", seed=0)
    files = []
    for k, info in enumerate(({"val_bpc": float("nan")}, "str", {"val_bpc": 10**400}, {"val_bpc": 1.5})):
        torch.manual_seed(k)
        model = CharRNN(len(VOCAB), cell="gru", hidden=8, layers=1, embedding=4)
        files.append(str(tmp_path / f"m{k}.pt"))
        artifact.save(files[-1], {**artifact.model_record(model, VOCAB, {}), "info": info})
    curve = tmp_path / "dvclive/plots/metrics/train/bpc.tsv"
    curve.parent.mkdir(parents=True)
    curve.write_text("step\tbpc\n1e400\t4.0\n10\t3.5\n")
    s = Running(tmp_path, files)
    try:
        for k, val in enumerate((None, None, None, 1.5)):
            status, _, out = s.get(f"/api/model?id=file:{k}")
            assert status == 200 and out["val_bpc"] == val, out
        status, _, out = s.get("/api/curves?models=workspace")
        assert status == 200 and out["curves"][0]["train"] == [[10, 3.5]], out
        for seed in ("%C2%B2", "%D9%A1", "-1", "1e3"):  # '²' and Arabic-Indic one pass str.isdigit()
            status, _, out = s.get(f"/api/test-item?seed={seed}")
            assert status == 400 and "seed" in out["error"], (seed, out)
    finally:
        s.close()


def raw_status(port: int, request: bytes) -> int | None:
    """The status a raw request gets, or None when the server closes without an answer within 5 s."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(request)
        received = b""
        with contextlib.suppress(TimeoutError):
            while b"\r\n" not in received and (chunk := sock.recv(4096)):
                received += chunk
    return int(received.split()[1]) if received.startswith(b"HTTP/") else None


def test_content_length_is_ascii_digits_and_host_and_content_length_come_once(in_plain):
    s = in_plain
    body = b'{"models": ["file:0"], "text": "ab"}'
    host = f"Host: 127.0.0.1:{s.port}\r\n"

    def post(headers: str) -> bytes:
        return f"POST /api/score HTTP/1.1\r\n{headers}Content-Type: application/json\r\n\r\n".encode() + body

    assert raw_status(s.port, post(f"{host}Content-Length: {len(body)}\r\n")) == 200
    for length in (f"+{len(body)}", f"{len(body)}_0", "".join(chr(0x660 + int(d)) for d in str(len(body)))):
        assert raw_status(s.port, post(f"{host}Content-Length: {length}\r\n")) == 400, length
    twice = f"{host}Content-Length: {len(body)}\r\nContent-Length: {len(body)}\r\n"
    assert raw_status(s.port, post(twice)) == 400
    assert raw_status(s.port, post(f"{host}Host: evil.example\r\nContent-Length: {len(body)}\r\n")) == 400
    assert raw_status(s.port, f"GET /api/models HTTP/1.1\r\n{host}Host: evil.example\r\n\r\n".encode()) == 400


def test_a_model_that_is_a_folder_or_a_pipe_is_named_so_at_start_up(tmp_path):
    (tmp_path / "folder.pt").mkdir()
    os.mkfifo(tmp_path / "pipe.pt")
    for name in ("folder.pt", "pipe.pt"):
        command = [sys.executable, "-m", "charlm.apps.cli", "serve", "--port", "0", "--model", name]
        proc = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2 and proc.stdout == ""
        assert proc.stderr == f"charlm: error: --model {name}: not a regular file (a folder, a pipe or a device)\n"


def test_a_slow_load_holds_up_only_the_requests_for_that_model(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    files = [str(tiny_model(tmp_path / f"{name}.pt", seed=k)) for k, name in enumerate(("m", "slow", "other"))]
    started, release = threading.Event(), threading.Event()
    load_model = artifact.load_model

    def slow_load(path, *args, **kw):  # a load that takes its time, as a big model or a slow disk does
        if Path(path).name == "slow.pt":
            started.set()
            release.wait(20)  # without a per-model lock, every request waits this long
        return load_model(path, *args, **kw)

    monkeypatch.setattr(artifact, "load_model", slow_load)
    s = Running(tmp_path, files)
    slow: list = []
    waiting = threading.Thread(target=lambda: slow.append(s.post("/api/score", {"models": ["file:1"], "text": "a"})))
    try:
        assert s.post("/api/score", {"models": ["file:0"], "text": "abc"})[0] == 200  # loaded
        waiting.start()
        assert started.wait(30)
        began = time.monotonic()
        assert s.post("/api/score", {"models": ["file:0"], "text": "abc"})[0] == 200  # a loaded model answers
        assert s.post("/api/score", {"models": ["file:2"], "text": "abc"})[0] == 200  # another model loads
        assert time.monotonic() - began < 5 and not slow
        release.set()
        waiting.join(30)
        assert slow[0][0] == 200, slow
        # A pipe put where a model file was would block its reader for ever: refused at once.
        os.remove(files[2])
        os.mkfifo(files[2])
        os.utime(files[2], ns=(time.time_ns() + 10**9,) * 2)
        status, _, out = s.post("/api/score", {"models": ["file:2"], "text": "abc"})
        assert status == 404 and "not a regular file" in out["error"]
    finally:
        release.set()
        s.close()


def test_after_a_refresh_a_branch_serves_the_commit_it_points_to(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    p = Project(tmp_path)
    p.git("init", "-q", "-b", "main")
    p.git("config", "user.email", "test@example.com")
    p.git("config", "user.name", "charlm tests")
    p.dvc("init", "-q")
    # The smallest pipeline with a model that DVC lists for a branch: a stage writes it, another reads it.
    (tmp_path / "models").mkdir()
    (tmp_path / "dvc.yaml").write_text(
        "stages:\n  train: {cmd: cp src.pt models/model.pt, deps: [src.pt], outs: [models/model.pt]}\n"
        "  evaluate: {cmd: 'true', deps: [models/model.pt]}\n"
    )

    def commit(seed: int) -> None:
        tiny_model(tmp_path / "src.pt", seed=seed)
        p.dvc("repro", "-q")
        p.git("add", "-A")
        p.git("commit", "-qm", f"model {seed}")

    def bpc(model: str) -> float:
        status, _, out = s.post("/api/score", {"models": [model], "text": "the cat sat"})
        assert status == 200, out
        return out["models"][0]["bpc"]

    commit(1)
    s = Running(tmp_path, [])
    try:
        listed = {m["id"]: m["kind"] for m in s.get("/api/models?refresh=1")[2]["models"]}
        assert listed.get("rev:main") == "branch", listed
        first = bpc("rev:main")
        commit(2)
        assert s.get("/api/models?refresh=1")[0] == 200
        assert bpc("rev:main") == bpc("rev:HEAD") != first
    finally:
        s.close()
