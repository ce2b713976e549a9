"""How fast `charlm serve` answers (issue 17): first character on screen after Write, streaming rate against
`charlm generate`, a 2,000-character Read, a bounded load test on loopback, and (issue 24) a normal request
beside a load round while 300 idle connections are open.

    python -m bench.serve_speed [--model PATH] [--out FILE] [--rounds N]

The server is the real `charlm serve` in a child process (the bench's client threads and the in-process
`charlm generate` rounds must not share its interpreter lock), serving four copies of one model file from an
empty folder. Three run: one with torch's default intra-op threads (Write, Read, streaming, then a load test),
one with a single thread (streaming: both sides of the comparison get the same count), and a fresh one for a
load test before anything else. The browser figures come from Chromium driven by Playwright, each taken inside
the page with performance.now(). Compared cases run interleaved by bench.harness.measure (one unit per case per
round, rotating order); a ratio is the median of the per-round ratios. Prints a Markdown section for
BENCHMARKS.md (and writes it to --out).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import http.client
import io
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

from bench.harness import (
    PLAYGROUND_MARKER,
    ROOT,
    Case,
    Stat,
    load_line,
    machine_facts,
    measure,
    model_params,
    ratio_stat,
)
from charlm.base.io import write_text
from charlm.core import inspection
from charlm.core.model import CharRNN
from charlm.core.sampling import text_pieces, token_steps
from charlm.core.vocab import Vocab
from charlm.pipeline import artifact

CHROMIUM = os.environ.get("CHARLM_CHROMIUM", "/usr/bin/chromium")
N_MODELS = 4  # the most a request may name: the four-model figures use them all
TARGET_FIRST_MS, TARGET_RATE, TARGET_READ_MS, TARGET_IDLE_MS = 300, 0.80, 1000, 100
IDLE, IDLE_ROUNDS = 300, 3  # idle connections held open beside load rounds (issue 24), and how many rounds
LOAD_CLIENTS = 16  # the server's limit on concurrent generations: one more must be refused
LOAD_LENGTH = 300
LOAD_DROP_EVERY, LOAD_DROP_AFTER = 4, 40  # every 4th client goes away mid-stream after 40 pieces
RSS_BOUND_MB = 16  # growth over the measured load rounds that still counts as "back to the baseline"

# Our own English text for Read (not corpus text): one item per line, cut to READ_CHARS characters.
READ_CHARS = 2000
READ_TEXT = """\
The harbour town woke slowly on the first cold morning of autumn, and the fishing boats stayed in.
A baker on the corner had already sold most of his rye bread before the church clock struck seven.
Two children argued about whether the grey cat on the wall belonged to the postman or to the old teacher.
Nobody in the queue could remember when the ferry had last left on time, yet everyone still arrived early.
The council said on Tuesday that the new bridge would open in March, three years later than first promised.
Engineers blamed the delay on the soft clay under the river bed and on a shortage of steel in the spring.
Local shops expect more visitors once the road is finished, although some owners worry about the parking.
In the library, a small exhibition shows maps of the coast drawn by sailors more than two centuries ago.
One of them marks a sandbank that no longer exists, washed away by a storm that the town still talks about.
The football club won its third match in a row, and its young goalkeeper saved a penalty in the last minute.
Her coach said after the game that the team had finally learned to keep the ball when the wind was strong.
Prices at the weekly market rose again, with apples and potatoes costing almost a fifth more than last year.
Farmers said the dry summer had cut their harvest, while buyers hoped that imports would soon bring relief.
At night the lighthouse still turns its beam across the water, although the ships now steer by satellite.
The keeper retired long ago, but he walks to the end of the pier every evening to watch the light come on.
He says that a town by the sea should never forget how many of its people the water has fed and taken.
Next month the school will hold an open day, with a science fair, a choir and a short play about the ferry.
Tickets are free, but the head teacher asks families to bring a cake or a book for the charity table.
By the end of the week the first frost had settled on the fields, and the boats were finally back at sea.
"""[:READ_CHARS]


def default_model(path: Path) -> None:
    """params.yaml's model shape with an untrained printable-ASCII vocabulary: timing needs only the shape."""
    shape, vocab = model_params(), Vocab([chr(c) for c in range(32, 127)])
    torch.manual_seed(0)
    dims = {"hidden": shape.hidden, "layers": shape.layers, "embedding": shape.embedding}
    model = CharRNN(len(vocab), cell=shape.cell, dropout=0.0, **dims)
    artifact.save(path, artifact.model_record(model, vocab, {"steps": 0, "note": "untrained, for timing"}))


def describe(model, vocab, info: dict) -> str:
    c, steps = model.config, info.get("steps")
    trained = f"trained {steps:,} steps" if steps else "untrained"
    return f"{c['layers']}×{c['hidden']} {c['cell']}, embedding {c['embedding']}, vocabulary {len(vocab)}, {trained}"


class Served:
    """`charlm serve --port 0 --device cpu --model ...` in a child process, in an empty folder."""

    def __init__(self, cwd: Path, files: list[Path], threads: int | None = None):
        """Started; `wait()` until it serves."""
        cmd = [sys.executable, "-m", "charlm.apps.cli", "serve", "--port", "0", "--device", "cpu"]
        cmd += [arg for f in files for arg in ("--model", str(f))]
        env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=str(ROOT))
        for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):  # torch's intra-op threads: its default, or these
            env.pop(name, None)
            if threads is not None:
                env[name] = str(threads)
        self.proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.log: list[str] = []

    def wait(self) -> Served:
        assert self.proc.stdout is not None
        match = None
        for line in self.proc.stdout:  # until the URL (or the end: the server failed)
            self.log.append(line)
            if match := re.search(r"http://[^\s]+", line):
                break
        if match is None:
            self.close()
            raise SystemExit("charlm serve printed no URL:\n" + "".join(self.log))
        self.url, self.log = match.group(0), []
        # Drained, so that the pipe never fills; an error line of the server ends up in the report's notes.
        threading.Thread(target=self.log.extend, args=(self.proc.stdout,), daemon=True).start()
        self.host, port = self.url.split("/")[2].rsplit(":", 1)
        self.port = int(port)
        return self

    def status(self) -> dict[str, int]:
        """Threads and resident memory (kB) of the server process, from /proc."""
        lines = Path(f"/proc/{self.proc.pid}/status").read_text().splitlines()
        fields = (line.partition(":") for line in lines)
        return {k: int(v.split()[0]) for k, _, v in fields if k in ("Threads", "VmRSS")}

    def close(self) -> None:
        self.proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(10)
        self.proc.kill()
        self.proc.wait()

    def call(self, method: str, path: str, body: dict | None = None) -> tuple[int, dict]:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=60)
        try:
            headers = {"Content-Type": "application/json"} if body is not None else {}
            conn.request(method, path, body=None if body is None else json.dumps(body).encode(), headers=headers)
            response = conn.getresponse()
            return response.status, json.loads(response.read() or b"{}")
        finally:
            conn.close()

    def generate(self, ids: list[str], length: int, seed: int, stop_at_eos: bool) -> tuple[int, dict]:
        body = {"models": ids, "prompt": "", "temperature": 0.8, "top_k": 0, "top_p": 1.0, "length": length,
                "seed": seed, "stop_at_eos": stop_at_eos}  # fmt: skip
        return self.call("POST", "/api/generate", body)

    def idle(self, n: int) -> list[socket.socket]:
        """`n` connections that send nothing, opened in small bursts that the server's backlog holds."""
        socks = [socket.create_connection((self.host, self.port)) for _ in range(n)]
        time.sleep(0.5)  # accepted, each on its handler thread
        return socks

    def events(self, job: str, n_models: int, drop_after: int | None = None) -> dict[str, Any]:
        """A job's event stream, read to `done` or `error` (or closed after `drop_after` pieces):
        {"texts": [str per model] | None, "pieces": int, "reason": str | None}."""
        conn = http.client.HTTPConnection(self.host, self.port, timeout=60)
        texts: list[list[str]] = [[] for _ in range(n_models)]
        pieces, reason = 0, None
        try:
            conn.request("GET", f"/api/jobs/{job}/events")
            response = conn.getresponse()
            if response.status != 200:
                return {"texts": None, "pieces": 0, "reason": f"HTTP {response.status}"}
            event = None
            for raw in response:  # Server-Sent Events: "event: NAME", then "data: JSON"
                line = raw.decode("utf-8").rstrip("\n")
                if line.startswith("event: "):
                    event = line[len("event: ") :]
                if not line.startswith("data: "):
                    continue
                data = json.loads(line[len("data: ") :])
                if event == "piece":
                    for i, piece in enumerate(data["pieces"]):
                        if piece is not None:
                            texts[i].append(piece)
                    pieces += 1
                    if drop_after is not None and pieces >= drop_after:
                        reason = "dropped"
                        break
                elif event in ("done", "error"):
                    reason = data.get("reason") or "error: " + data.get("error", "")
                    break
        finally:
            conn.close()
        return {"texts": ["".join(t) for t in texts], "pieces": pieces, "reason": reason}


def local_text(model, vocab, length: int, seed: int, stop_at_eos: bool) -> str:
    """What `charlm generate --prompt '' --temperature 0.8 --length L --seed S` prints, without its newline: the
    library calls the command makes, writing and flushing each piece as it does."""
    out = io.StringIO()
    steps = token_steps(model, vocab, [""], [0.8], length, top_k=0, top_p=1.0, seed=seed, stop_at_eos=stop_at_eos)
    for (piece,) in text_pieces(steps, vocab, stop_at_eos):
        if piece is not None:
            out.write(piece)
            out.flush()
    return out.getvalue()


def streaming_rate(served: Served, ids: list[str], models: list, rounds: int, length: int, threads: int) -> dict:
    """Server chars/s (POST to `done`, read by an SSE client in this process) against the library calls of
    `charlm generate` in this process with `threads` torch threads: one model, and four models in one job against
    four runs in turn. One unit per case per round, seed 1000 + round; the warm-up (short, seed 7) lets the server
    load its models."""
    texts: dict[str, list[list[str]]] = {}

    def case(side: str, n: int) -> Case:
        name, done = f"{side} {n}", texts.setdefault(f"{side} {n}", [])

        def run(length: int, seed: int) -> list[str]:
            if side == "cli":
                return [local_text(m, v, length, seed, False) for m, v in models[:n]]
            status, answer = served.generate(ids[:n], length, seed, False)
            got: dict[str, Any] = served.events(answer["job"], n) if status == 200 else {"reason": f"HTTP {status}"}
            if got["reason"] != "finished":
                raise SystemExit(f"stream ended with {got['reason']!r}: {answer}")
            return got["texts"]

        def unit() -> float:
            done.append(run(length, 1000 + len(done)))
            return sum(len(t) for t in done[-1])

        return Case(name, unit, warm=lambda: run(20, 7))

    cases = [case(side, n) for n in (1, N_MODELS) for side in ("server", "cli")]
    before = torch.get_num_threads()
    torch.set_num_threads(threads)  # this process's: only the `charlm generate` side computes here
    try:
        rates = measure(cases, rounds, 0.0)  # a budget of 0: exactly one unit per case per round
    finally:
        torch.set_num_threads(before)
    ratio = {n: ratio_stat(rates[f"server {n}"], rates[f"cli {n}"]) for n in (1, N_MODELS)}
    same = all(texts[f"server {n}"] == texts[f"cli {n}"] for n in (1, N_MODELS))
    threads_at_rest = served.status()["Threads"]
    return {"rates": rates, "ratio": ratio, "same": same, "length": length, "server_threads": threads_at_rest}


# Installed once per page: the click on Write or Score starts a clock (capture phase, before the page's own
# handler); mutation observers stop it when the first character is in a column (every column, for the 4-model
# figure) or when every Read character carries its colour class. A requestAnimationFrame after that marks the
# frame that shows it: that is the "on screen" time.
PROBE = """() => {
  const b = window.__bench = {state: null, expect: 0};
  const start = (kind) => () => { b.state = {kind, t0: performance.now(), expect: b.expect}; };
  document.getElementById('write-go').addEventListener('click', start('write'), true);
  document.getElementById('read-go').addEventListener('click', start('read'), true);
  const frame = (s, key) => {
    s[key] = performance.now();
    requestAnimationFrame(() => { s[key + 'Frame'] = performance.now(); });
  };
  new MutationObserver(() => {
    const s = b.state;
    if (!s || s.kind !== 'write') return;
    const lens = [...document.querySelectorAll('#columns pre')].map((p) => p.textContent.length);
    if (s.first === undefined && lens.some((n) => n > 0)) frame(s, 'first');
    if (s.all === undefined && lens.length && lens.every((n) => n > 0)) frame(s, 'all');
  }).observe(document.getElementById('columns'), {subtree: true, childList: true, characterData: true});
  new MutationObserver(() => {
    const s = b.state;
    if (!s || s.kind !== 'read' || s.done !== undefined) return;
    const spans = document.querySelectorAll('#read-out .ch');
    if (spans.length < s.expect) return;
    for (const span of spans) if (span.classList.length < 2) return;
    frame(s, 'done');
  }).observe(document.getElementById('read-out'), {subtree: true, childList: true, attributes: true});
}"""


def open_page(browser, url: str, labels: list[str], expect: int):
    """A page in its own window (a background tab's frames would be held back), `labels` ticked, the probe in."""
    page = browser.new_context(viewport={"width": 1200, "height": 900}).new_page()
    page.set_default_timeout(60_000)
    page.goto(url)
    page.wait_for_selector("#models-table tbody tr")
    for label in labels:
        page.get_by_label("use " + label, exact=True).check()
    page.fill("#prompt", "")
    page.fill("#length", "40")  # short: the figure is the first character, and rounds must not overlap
    page.fill("#seed", "5")
    page.fill("#read-text", READ_TEXT)
    page.evaluate(PROBE)
    page.evaluate("(n) => { window.__bench.expect = n; }", expect)
    return page


def click(page, kind: str) -> tuple[dict, float]:
    """Click Write or Score; the probe's state once the last mark is on screen, and the ms from Python's side."""
    button, mark = ("#write-go", "allFrame") if kind == "write" else ("#read-go", "doneFrame")
    page.bring_to_front()
    if kind == "read":
        page.evaluate("() => document.getElementById('read-out').replaceChildren()")
    t0 = time.perf_counter()
    page.click(button)
    page.wait_for_function(f"() => window.__bench.state && window.__bench.state.{mark} !== undefined")
    wall = (time.perf_counter() - t0) * 1000
    page.wait_for_function(f"() => !document.querySelector('{button}').disabled")
    return page.evaluate("() => window.__bench.state"), wall


def browser_figures(url: str, labels: list[str], rounds: int) -> dict[str, list[float]]:
    """Write with 1 and 4 models and Read, interleaved; each case's warm-up is the cold figure (the first Write
    of a page loads its models into the server's cache) or, for Read, a warm-up of the scoring path."""
    from playwright.sync_api import sync_playwright

    expect = sum(len(item) for item in inspection.text_items(READ_TEXT))
    out: dict[str, list[float]] = defaultdict(list)

    def record(page, kind: str, marks: dict[str, str]) -> float:
        state, wall = click(page, kind)
        for name, mark in marks.items():
            out[name].append(wall if mark == "wall" else state[mark] - state["t0"])
        return 1.0

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM)
        try:
            one, four = (open_page(browser, url, labels[:n], expect) for n in (1, N_MODELS))
            write4 = {"write4": "firstFrame", "write4_all": "allFrame", "write4_wall": "wall"}
            cases = [
                Case("write1", lambda: record(one, "write", {"write1": "firstFrame", "write1_wall": "wall"}),
                     warm=lambda: record(one, "write", {"cold1": "firstFrame"})),
                Case("write4", lambda: record(four, "write", write4),
                     warm=lambda: record(four, "write", {"cold4": "allFrame"})),
                Case("read", lambda: record(one, "read", {"read": "doneFrame", "read_wall": "wall"}),
                     warm=lambda: record(one, "read", {})),
            ]  # fmt: skip
            measure(cases, rounds, 0.0)
            out["read_chars"] = [one.locator("#read-out .ch").count()]
        finally:
            browser.close()
    out["expect"] = [expect]
    return out


def load_client(served: Served, model_id: str, i: int, barriers: list[threading.Barrier]) -> dict[str, Any]:
    """Client `i` of a load round: POST, wait until all are admitted (and the 17th POST made), read its stream."""
    result: dict[str, Any] = {"error": None}
    try:
        status, answer = served.generate([model_id], LOAD_LENGTH, i, True)
        result["status"] = status
        if status != 200:
            result["error"] = f"POST answered {status}"
        for barrier in barriers:
            barrier.wait()
        if status == 200:
            drop = LOAD_DROP_AFTER if i % LOAD_DROP_EVERY == LOAD_DROP_EVERY - 1 else None
            got = served.events(answer["job"], 1, drop)
            result.update(reason=got["reason"], text=got["texts"][0] if got["texts"] else None)
    except Exception as e:  # a client's failure is a finding of the round, not the end of the bench
        result["error"] = f"{type(e).__name__}: {e}"
        for barrier in barriers:
            barrier.abort()
    return result


def load_round(served: Served, model_id: str, expected: dict[int, str], r: int) -> dict[str, Any]:
    posted, go = (threading.Barrier(LOAD_CLIENTS + 1, timeout=120) for _ in range(2))
    with concurrent.futures.ThreadPoolExecutor(LOAD_CLIENTS) as pool:
        t0 = time.perf_counter()
        futures = [pool.submit(load_client, served, model_id, i, [posted, go]) for i in range(LOAD_CLIENTS)]
        extra = None
        with contextlib.suppress(threading.BrokenBarrierError):  # a client failed: its error is in the results
            posted.wait()  # all 16 admitted and none read yet: every slot is taken
            extra, _ = served.generate([model_id], LOAD_LENGTH, 999, True)
            go.wait()
        results = [f.result() for f in futures]
    seconds = time.perf_counter() - t0
    reasons = [res.get("reason") for res in results]
    wrong = [i for i, res in enumerate(results) if res.get("reason") == "finished" and res["text"] != expected[i]]
    errors = [res["error"] or res.get("reason") for res in results
              if res["error"] or res.get("reason") not in ("finished", "dropped")]  # fmt: skip
    return {"round": r, "finished": reasons.count("finished"), "dropped": reasons.count("dropped"),
            "wrong": len(wrong), "errors": errors, "extra": extra, "seconds": seconds}  # fmt: skip


def settled(served: Served, baseline: int | None) -> dict[str, int]:
    """Handler threads end a moment after their last write: wait (bounded) until the count is back to the
    baseline or, for the baseline itself, has not moved for a second."""
    deadline, last, since = time.monotonic() + 10, None, time.monotonic()
    while time.monotonic() < deadline:
        threads = served.status()["Threads"]
        if baseline is not None and threads <= baseline:
            break
        if threads != last:
            last, since = threads, time.monotonic()
        elif baseline is None and time.monotonic() - since >= 1:
            break
        time.sleep(0.1)
    return served.status()


def load_test(served: Served, model_id: str, expected: dict[int, str], rounds: int) -> dict[str, Any]:
    """A warm-up round that sets the baseline (threads, RSS), then `rounds` measured ones."""
    rows: list[dict[str, Any]] = []
    base: dict[str, int] = {}
    for r in range(rounds + 1):
        row = load_round(served, model_id, expected, r)
        st = settled(served, base.get("Threads"))
        base = base or st
        rows.append(dict(row, threads=st["Threads"], rss_mb=st["VmRSS"] / 1024, warmup=r == 0))
    status, listing = served.call("GET", "/api/models")
    after = settled(served, base["Threads"])
    return {"rows": rows, "baseline_threads": base["Threads"], "baseline_rss_mb": base["VmRSS"] / 1024,
            "models_status": status, "models_listed": len(listing.get("models", [])),
            "final_threads": after["Threads"], "final_rss_mb": after["VmRSS"] / 1024}  # fmt: skip


def idle_test(served: Served, model_id: str, expected: dict[int, str]) -> dict[str, Any]:
    """A normal request (GET /api/models) every 0.05 s beside IDLE_ROUNDS load rounds, first with no idle connection
    and then with IDLE of them open (the rounds take a few seconds, within the server's 10 s for a whole request);
    then the server's threads once they have closed."""

    def probe(times: list[float], stop: threading.Event) -> None:
        while not stop.wait(0.05):
            t0 = time.perf_counter()
            served.call("GET", "/api/models")
            times.append((time.perf_counter() - t0) * 1000)

    out: dict[str, Any] = {"baseline_threads": settled(served, None)["Threads"]}
    for name, n in (("without", 0), ("with", IDLE)):
        times: list[float] = []
        socks, stop = served.idle(n), threading.Event()
        out[f"{name}_threads"] = served.status()["Threads"]
        prober = threading.Thread(target=probe, args=(times, stop))
        prober.start()
        rounds = [load_round(served, model_id, expected, r) for r in range(IDLE_ROUNDS)]
        out[f"{name}_round"] = {k: [r[k] for r in rounds] for k in ("finished", "wrong", "errors", "seconds")}
        stop.set()
        prober.join()
        out[name] = Stat(times)
        for sock in socks:
            sock.close()
    out["final_threads"] = settled(served, out["baseline_threads"])["Threads"]
    return out


def idle_ok(it: dict) -> bool:
    rounds_ok = not any(sum(r["wrong"]) or sum(r["errors"], []) for r in (it["with_round"], it["without_round"]))
    delay = it["with"].median - it["without"].median
    return rounds_ok and delay <= TARGET_IDLE_MS and it["final_threads"] <= it["baseline_threads"]


def ok(flag: bool) -> str:
    return "met" if flag else "**missed**"


def load_ok(lt: dict) -> bool:
    rows = [r for r in lt["rows"] if not r["warmup"]]
    return (
        all(r["wrong"] == 0 and not r["errors"] and r["extra"] == 429 for r in lt["rows"])
        and max(r["threads"] for r in rows) <= lt["baseline_threads"]
        and max(r["rss_mb"] for r in rows) - lt["baseline_rss_mb"] <= RSS_BOUND_MB
        and lt["models_status"] == 200
    )


def growth(lt: dict) -> str:
    rows = [r for r in lt["rows"] if not r["warmup"]]
    mid = rows[len(rows) // 2]
    return (
        f"RSS {max(r['rss_mb'] for r in rows) - lt['baseline_rss_mb']:+.1f} MB at most over the baseline, "
        f"{rows[-1]['rss_mb'] - mid['rss_mb']:+.1f} MB from round {mid['round']} to the last"
    )


def targets(ctx: dict) -> list[str]:
    b, (default, single), n, it = ctx["browser"], ctx["streams"], N_MODELS, ctx["idle"]

    def row(what: str, figure: str, met: bool) -> str:
        return f"| {what} | {figure} | {ok(met)} |"

    def ms(what: str, key: str, target: float) -> str:
        st = Stat(b[key])
        return row(f"{what} ≤ {target} ms", f"{st.fmt()} ms ({len(st.values)} tries)", st.median <= target)

    def rate(cfg: dict, k: int, what: str) -> str:
        r = cfg["ratio"][k]
        what = f"stream with scores (colours) ≥ {TARGET_RATE:.0%} of `charlm generate`'s chars/s, {what}"
        return row(what, f"{r.median:.0%} ({len(r.values)} rounds)", r.median >= TARGET_RATE)

    delay = it["with"].median - it["without"].median
    return [
        "| issue 17, 24 and 25 target | figure | |",
        "|---|---:|---|",
        ms("first character on screen after Write, 1 model", "write1", TARGET_FIRST_MS),
        ms(f"… {n} models (every column has its first character)", "write4_all", TARGET_FIRST_MS),
        rate(default, 1, f"1 model, torch's default threads ({ctx['threads']})"),
        rate(default, n, f"{n} models in one job against {n} runs in turn, default threads"),
        rate(single, 1, "1 model, 1 torch thread on both sides"),
        rate(single, n, f"{n} models, 1 torch thread on both sides"),
        ms(f"Read: {READ_CHARS:,} characters scored, coloured, with buckets and item bpc", "read", TARGET_READ_MS),
        row(f"load test: {LOAD_CLIENTS} clients, the 17th refused, streams correct, threads and memory back, "
            "still serving; a fresh server", growth(ctx["load_fresh"]), load_ok(ctx["load_fresh"])),
        row("… the server of the Write and Read rounds above", growth(ctx["load"]), load_ok(ctx["load"])),
        row(f"{IDLE} idle connections beside a load round delay a normal request ≤ {TARGET_IDLE_MS} ms; threads "
            "back to the baseline when they close", f"{delay:+.1f} ms (median); threads {it['final_threads']} "
            f"(baseline {it['baseline_threads']})", idle_ok(it)),
    ]  # fmt: skip


def stream_notes(ctx: dict) -> list[str]:
    b, (default, single), n, t = ctx["browser"], ctx["streams"], N_MODELS, ctx["threads"]
    rows = [(default, f"default threads ({t})"), (single, "1 thread")]
    return [
        "- Write (the server with torch's default threads): length 40, seed 5, empty prompt, models ticked "
        "beforehand. The clock starts at the click on Write (in the page, `performance.now()`) and stops at the "
        f"animation frame after the first character is in the column. First character in any of {n} columns: "
        f"{Stat(b['write4']).fmt()} ms (all {n} arrive in the same event). Measured from Python around Playwright's "
        f"click (its own overhead included): 1 model {Stat(b['write1_wall']).fmt()} ms, {n} models "
        f"{Stat(b['write4_wall']).fmt()} ms. The first Write of a page, while the server still loads the models "
        f"from disk: {b['cold1'][0]:.0f} ms (1 model), {b['cold4'][0]:.0f} ms ({n} models), once each.",
        "- Streaming, chars/s (characters of all models per second; no stop at end of item, T=0.8). Server: "
        "POST /api/generate to the `done` event, read by a Python SSE client in the bench process. `charlm "
        "generate`: the library calls it makes (`token_steps` + `text_pieces`, each piece written and flushed), in "
        "the bench process, model already loaded, with the same number of torch threads as that server. Two "
        f"servers ran: one with torch's default intra-op threads ({t} here; {default['server_threads']} "
        f"threads in its process at rest), one started with OMP_NUM_THREADS=1 ({single['server_threads']} at rest). "
        f"Default threads: length {default['length']:,}, {len(default['ratio'][1].values)} rounds; one thread: "
        f"length {single['length']:,}, {len(single['ratio'][1].values)} rounds. The server's and the library's "
        "texts were " + ("identical" if default["same"] and single["same"] else "**not identical**")
        + " for the same seed.",
        "",
        "| case | server chars/s | `charlm generate` chars/s | ratio |",
        "|---|---:|---:|---:|",
        *(f"| {name}, {label} | {cfg['rates'][f'server {k}'].fmt()} | {cfg['rates'][f'cli {k}'].fmt()} "
          f"| {cfg['ratio'][k].fmt('%', 0, 100.0)} |"
          for cfg, name in rows for k, label in ((1, "1 model"), (n, f"{n} models: one job / {n} runs in turn"))),
    ]  # fmt: skip


def load_notes(ctx: dict) -> list[str]:
    b, loads, it = ctx["browser"], {"fresh": ctx["load_fresh"], "after Read": ctx["load"]}, ctx["idle"]
    lines = [
        f"- Read (the default-threads server): {READ_CHARS:,} characters of our own English text in "
        f"{len(inspection.text_items(READ_TEXT))} lines, pasted, one model; the clock runs from the click on Score "
        f"to the animation frame after every one of the {b['expect'][0]:,} character spans has its colour class "
        f"({b['read_chars'][0]:,} on the page at the end). From Python around the click: "
        f"{Stat(b['read_wall']).fmt()} ms.",
        f"- Load test on 127.0.0.1, on two default-threads servers: a fresh one (before anything else ran) and the "
        f"one of the Write and Read rounds, after them; {len(ctx['load']['rows'])} rounds each, the first a warm-up "
        f"that sets the baseline (its threads and RSS): {LOAD_CLIENTS} threads each POST a generation (length "
        f"{LOAD_LENGTH}, seed = client number, stop at end of item) and wait until all are admitted; a 17th POST "
        f"is made then; then all read their streams, every {LOAD_DROP_EVERY}th closing its connection after "
        f"{LOAD_DROP_AFTER} pieces. A finished stream must equal `token_steps`/`text_pieces` for its seed, computed "
        "beforehand. Threads and RSS are the server process's (/proc), once its handler threads have ended.",
        "",
        "| server | round | finished (all correct?) | dropped | 17th POST | other failures | s | server threads "
        "| RSS MB |",
        "|---|---|---:|---:|---:|---|---:|---:|---:|",
    ]
    for server, lt in loads.items():
        for r in lt["rows"]:
            name = f"{r['round']} (warm-up, baseline)" if r["warmup"] else str(r["round"])
            correct = "yes" if r["wrong"] == 0 else f"**{r['wrong']} wrong**"
            failures = "; ".join(str(e) for e in r["errors"]) or "none"
            lines.append(f"| {server} | {name} | {r['finished']} ({correct}) | {r['dropped']} | {r['extra']} | "
                         f"{failures} | {r['seconds']:.1f} | {r['threads']} | {r['rss_mb']:.1f} |")  # fmt: skip
    lines.append("")
    for server, lt in loads.items():
        lines.append(
            f"- {server}, after the rounds: GET /api/models answered {lt['models_status']} with "
            f"{lt['models_listed']} models; server threads {lt['final_threads']} (baseline {lt['baseline_threads']}), "
            f"RSS {lt['final_rss_mb']:.1f} MB (baseline {lt['baseline_rss_mb']:.1f} MB; the bound on growth is "
            f"{RSS_BOUND_MB} MB)."
        )

    def during(name: str) -> str:
        r = it[f"{name}_round"]
        return (f"{it[name].fmt(digits=1)} ms ({len(it[name].values)} requests; rounds of "
                f"{', '.join(f'{x:.1f}' for x in r['seconds'])} s, {sum(r['finished'])} streams finished, "
                f"{sum(r['wrong'])} wrong, {len(sum(r['errors'], []))} failures)")  # fmt: skip

    lines.append(
        f"- Idle connections (the fresh server, after its load test): GET /api/models every 0.05 s from another "
        f"thread during {IDLE_ROUNDS} load rounds as above, with no idle connection: {during('without')}; with "
        f"{IDLE} connections open that send nothing: {during('with')}. Server threads {it['without_threads']} "
        f"before, {it['with_threads']} with the idle connections open, {it['final_threads']} once they closed "
        f"(baseline {it['baseline_threads']})."
    )
    if ctx["server_log"]:
        lines.append("- The servers printed: " + " / ".join(x.strip() for x in ctx["server_log"][:5]))
    return lines


def report(ctx: dict) -> str:
    m = ctx["machine"]
    head = (
        f"Run {m['date']} on {m['CPU']}, {os.cpu_count()} cores shared with other jobs (load average "
        f"{ctx['load_before']} before, {ctx['load_after']} after: 1, 5, 15 min), Python {m['python']}, "
        f"torch {m['torch']}, Chromium {ctx['chromium']}, device cpu. Model: {ctx['model']} (`{ctx['model_path']}`), "
        f"served as {N_MODELS} copies by `charlm serve --device cpu` in a child process. Command: "
        f"`{ctx['command']}` ({ctx['seconds']:.0f} s). Figures are medians (min–max); compared cases ran "
        "interleaved, and a ratio is the median of the per-round ratios. On a busy shared machine the absolute "
        "figures move from run to run; the ratios less so."
    )
    body = [PLAYGROUND_MARKER, "", "## Playground (charlm serve)", "", head, "", *targets(ctx), ""]
    return "\n".join([*body, *stream_notes(ctx), "", *load_notes(ctx)]) + "\n"


def say(what: str, since: float) -> None:
    print(f"serve_speed: {time.perf_counter() - since:.0f} s: {what}", file=sys.stderr, flush=True)


def measure_all(args, work: Path, files: list[Path], models: list, started: float) -> dict[str, Any]:
    model, vocab = models[0]
    expected = {i: local_text(model, vocab, LOAD_LENGTH, i, True) for i in range(LOAD_CLIENTS)}
    (work / "serve").mkdir()
    # The default-threads server, the one-thread one and a fresh default-threads one, started side by side.
    servers = [Served(work / "serve", files, threads) for threads in (None, 1, None)]
    try:
        served, single, fresh = (server.wait() for server in servers)
        by_file = {Path(e["label"]).name: e for e in served.call("GET", "/api/models")[1]["models"]}
        ids, labels = [by_file[f.name]["id"] for f in files], [by_file[f.name]["label"] for f in files]
        say("load test and idle connections, fresh server", started)
        ctx: dict[str, Any] = {"threads": torch.get_num_threads()}
        ctx["load_fresh"] = load_test(fresh, ids[0], expected, args.load_rounds)
        ctx["idle"] = idle_test(fresh, ids[0], expected)
        fresh.close()
        say("streaming rate, one thread", started)
        one = streaming_rate(single, ids, models, args.stream_rounds, args.length, 1)
        single.close()
        say("streaming rate, default threads", started)
        default = streaming_rate(served, ids, models, args.default_rounds, args.default_length, ctx["threads"])
        ctx["streams"] = [default, one]
        say("browser", started)
        ctx["browser"] = browser_figures(served.url, labels, args.rounds)
        say("load test", started)
        ctx["load"] = load_test(served, ids[0], expected, args.load_rounds)
    finally:
        for server in servers:
            server.close()
    ctx["server_log"] = [x for srv in servers for x in srv.log if x.strip()]
    return ctx


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--model", help="model file (default: an untrained model of params.yaml's shape)")
    parser.add_argument("--out", help="also write the Markdown section here")
    parser.add_argument("--rounds", type=int, default=10, help="browser rounds (each: Write with 1 and 4 models, Read)")
    parser.add_argument("--stream-rounds", type=int, default=9, help="streaming rounds with one torch thread")
    parser.add_argument("--length", type=int, default=2000, help="characters per model, streaming with one thread")
    # Long enough that a request's fixed cost (POST, job, event stream) is not what the rate measures.
    parser.add_argument("--default-rounds", type=int, default=9, help="streaming rounds with default threads")
    parser.add_argument("--default-length", type=int, default=2000, help="characters per model, default threads")
    parser.add_argument("--load-rounds", type=int, default=8, help="load-test rounds after the warm-up one")
    args = parser.parse_args(argv)
    if not Path(CHROMIUM).exists():
        raise SystemExit(f"Chromium not found at {CHROMIUM}: apt-get install chromium (or set CHARLM_CHROMIUM)")
    torch.set_grad_enabled(False)
    started, facts = time.perf_counter(), machine_facts()
    with tempfile.TemporaryDirectory(prefix="charlm-serve-speed-") as tmp:
        work = Path(tmp)
        source = Path(args.model) if args.model else work / "default.pt"
        if not args.model:
            default_model(source)
        # Copies, not one path four times: four models for the server's cache, as four experiments would be.
        files = [work / f"m{i}.pt" for i in range(N_MODELS)]
        for f in files:
            shutil.copyfile(source, f)
        loaded = [artifact.load_model(f, "cpu") for f in files]
        say(f"model {describe(*loaded[0])}; starting the servers", started)
        ctx = measure_all(args, work, files, [(m.eval(), v) for m, v, _ in loaded], started)
    chromium = subprocess.run([CHROMIUM, "--version"], capture_output=True, text=True).stdout.split()
    ctx.update(machine=facts, load_before=facts["load average at start (1/5/15 min)"], load_after=load_line(),
               chromium=chromium[1] if len(chromium) > 1 else "?", model=describe(*loaded[0]),
               model_path=args.model or "untrained, params.yaml's shape", seconds=time.perf_counter() - started,
               command="python -m bench.serve_speed" + (f" --model {args.model}" if args.model else ""))  # fmt: skip
    text = report(ctx)
    print(text)
    if args.out:
        write_text(Path(args.out), text)


if __name__ == "__main__":
    main()
