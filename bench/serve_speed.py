"""How fast `charlm serve` answers (issue 17): first character on screen after Write, streaming rate against
`charlm generate`, a 2,000-character Read, and a bounded load test on loopback.

    python -m bench.serve_speed [--model PATH] [--out FILE] [--rounds N]
    python bench/serve_speed.py ...            (the same, without the bench package)

The server is the real `charlm serve` in a child process (the bench's own client threads and the in-process
`charlm generate` rounds must not share its interpreter lock), serving four copies of one model file from an
empty folder, so that the model list is those files only. Three run: one with torch's default intra-op threads
(Write, Read, streaming, and a load test after those), one with a single thread (streaming: on a shared machine
the second thread mostly waits for a core, and both sides of the comparison get the same count), and a fresh
one for a load test before anything else (memory after a Read is not memory after generations alone).
The browser figures come from Debian's Chromium driven by Playwright; each is taken inside the page with
performance.now(). Cases that are compared run interleaved, round by round, in an order that rotates, so that
a busy machine's drift hits both sides alike; a ratio is the median of the per-round ratios. Prints a
Markdown section for BENCHMARKS.md (and writes it to --out).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import datetime
import http.client
import io
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if __package__ in (None, ""):  # run as a file: the repository's charlm, not another one on the path
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from charlm.core import inspection  # noqa: E402
from charlm.core.model import CharRNN  # noqa: E402
from charlm.core.sampling import text_pieces, token_steps  # noqa: E402
from charlm.core.vocab import Vocab  # noqa: E402
from charlm.pipeline import artifact  # noqa: E402
from charlm.pipeline.params import load as load_params  # noqa: E402
from charlm.pipeline.sections.model import ModelParams  # noqa: E402

CHROMIUM = os.environ.get("CHARLM_CHROMIUM", "/usr/bin/chromium")
N_MODELS = 4  # the most a request may name: the four-model figures use them all
TARGET_FIRST_MS = 300
TARGET_RATE = 0.80
TARGET_READ_MS = 1000
LOAD_CLIENTS = 16  # the server's limit on concurrent generations: one more must be refused
LOAD_LENGTH = 300
LOAD_DROP_EVERY = 4  # every 4th client goes away mid-stream
LOAD_DROP_AFTER = 40  # pieces read before it does
RSS_BOUND_MB = 16  # growth over the measured load rounds that still counts as "back to the baseline"

# Our own English text for Read (not corpus text): one item per line, cut to READ_CHARS characters.
READ_CHARS = 2000
READ_TEXT = "\n".join(
    [
        "The harbour town woke slowly on the first cold morning of autumn, and the fishing boats stayed in.",
        "A baker on the corner had already sold most of his rye bread before the church clock struck seven.",
        "Two children argued about whether the grey cat on the wall belonged to the postman or to the old teacher.",
        "Nobody in the queue could remember when the ferry had last left on time, yet everyone still arrived early.",
        "The council said on Tuesday that the new bridge would open in March, three years later than first promised.",
        "Engineers blamed the delay on the soft clay under the river bed and on a shortage of steel in the spring.",
        "Local shops expect more visitors once the road is finished, although some owners worry about the parking.",
        "In the library, a small exhibition shows maps of the coast drawn by sailors more than two centuries ago.",
        "One of them marks a sandbank that no longer exists, washed away by a storm that the town still talks about.",
        "The football club won its third match in a row, and its young goalkeeper saved a penalty in the last minute.",
        "Her coach said after the game that the team had finally learned to keep the ball when the wind was strong.",
        "Prices at the weekly market rose again, with apples and potatoes costing almost a fifth more than last year.",
        "Farmers said the dry summer had cut their harvest, while buyers hoped that imports would soon bring relief.",
        "At night the lighthouse still turns its beam across the water, although the ships now steer by satellite.",
        "The keeper retired long ago, but he walks to the end of the pier every evening to watch the light come on.",
        "He says that a town by the sea should never forget how many of its people the water has fed and taken.",
        "Next month the school will hold an open day, with a science fair, a choir and a short play about the ferry.",
        "Tickets are free, but the head teacher asks families to bring a cake or a book for the charity table.",
        "By the end of the week the first frost had settled on the fields, and the boats were finally back at sea.",
    ]
)[:READ_CHARS]

# --------------------------------------------------------------------------- small helpers


def median(values: list[float]) -> float:
    return statistics.median(values)


def spread(values: list[float], digits: int = 0) -> str:
    return f"{median(values):,.{digits}f} ({min(values):,.{digits}f}–{max(values):,.{digits}f})"


def rotated(cases: list, k: int) -> list:
    k %= len(cases)
    return cases[k:] + cases[:k]


def proc_status(pid: int) -> dict[str, int]:
    """Threads and resident memory (kB) of a process, from /proc."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("Threads", "VmRSS"):
            out[key] = int(value.split()[0])
    return out


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
    }


def load_text(loads: tuple[float, float, float]) -> str:
    return " / ".join(f"{x:.2f}" for x in loads)


# --------------------------------------------------------------------------- the model


def default_model(path: Path) -> None:
    """The defaults' shape (params.yaml's model section) with an untrained printable-ASCII vocabulary: timing does
    not need trained weights, only the shape and a realistic vocabulary size."""
    shape = load_params(ModelParams, ROOT / "params.yaml")
    vocab = Vocab([chr(c) for c in range(32, 127)])
    torch.manual_seed(0)
    model = CharRNN(
        len(vocab), cell=shape.cell, hidden=shape.hidden, layers=shape.layers, embedding=shape.embedding, dropout=0.0
    )
    artifact.save(path, artifact.model_record(model, vocab, {"steps": 0, "note": "untrained, for timing"}))


def describe(model, vocab, info: dict) -> str:
    c = model.config
    steps = info.get("steps")
    trained = f"trained {steps:,} steps" if steps else "untrained"
    return f"{c['layers']}×{c['hidden']} {c['cell']}, embedding {c['embedding']}, vocabulary {len(vocab)}, {trained}"


# --------------------------------------------------------------------------- the server and its HTTP API


class Served:
    """`charlm serve --port 0 --device cpu --model ...` in a child process, in an empty folder."""

    def __init__(self, cwd: Path, files: list[Path], threads: int | None = None):
        cmd = [sys.executable, "-m", "charlm.apps.cli", "serve", "--port", "0", "--device", "cpu"]
        for f in files:
            cmd += ["--model", str(f)]
        env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=str(ROOT))
        for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):  # torch's intra-op threads: its default, or these
            env.pop(name, None)
            if threads is not None:
                env[name] = str(threads)
        self.proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.url, seen, deadline = None, [], time.monotonic() + 120
        while self.url is None and time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                break
            seen.append(line)
            match = re.search(r"http://[^\s]+", line)
            if match:
                self.url = match.group(0)
        if self.url is None:
            self.close()
            raise SystemExit("charlm serve printed no URL:\n" + "".join(seen))
        self.log: list[str] = []
        # Drained, so that the pipe never fills; an error line of the server ends up in the report's notes.
        threading.Thread(target=lambda: self.log.extend(self.proc.stdout), daemon=True).start()
        hostport = self.url.split("/")[2]
        self.host, self.port = hostport.rsplit(":", 1)[0], int(hostport.rsplit(":", 1)[1])

    def status(self) -> dict[str, int]:
        return proc_status(self.proc.pid)

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def connection(self, timeout: float = 60) -> http.client.HTTPConnection:
        return http.client.HTTPConnection(self.host, self.port, timeout=timeout)

    def call(self, method: str, path: str, body: dict | None = None) -> tuple[int, dict]:
        conn = self.connection()
        try:
            data = None if body is None else json.dumps(body).encode()
            headers = {"Content-Type": "application/json"} if body is not None else {}
            conn.request(method, path, body=data, headers=headers)
            response = conn.getresponse()
            return response.status, json.loads(response.read() or b"{}")
        finally:
            conn.close()

    def generate(self, body: dict) -> tuple[int, dict]:
        return self.call("POST", "/api/generate", body)

    def events(self, job: str, n_models: int, drop_after: int | None = None) -> dict:
        """Read a job's event stream; with drop_after, close the connection after that many pieces.
        Returns {"texts": [str per model], "pieces": int, "reason": str | None}."""
        conn = self.connection()
        texts: list[list[str]] = [[] for _ in range(n_models)]
        pieces, reason, event = 0, None, None
        try:
            conn.request("GET", f"/api/jobs/{job}/events")
            response = conn.getresponse()
            if response.status != 200:
                return {"texts": None, "pieces": 0, "reason": f"HTTP {response.status}"}
            while True:
                line = response.readline()
                if not line:
                    break
                line = line.decode("utf-8").rstrip("\n")
                if line.startswith("event: "):
                    event = line[len("event: ") :]
                elif line.startswith("data: "):
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


def local_text(model, vocab, length: int, seed: int, stop_at_eos: bool, out: io.StringIO | None = None) -> str:
    """What `charlm generate --prompt '' --temperature 0.8 --length L --seed S` prints, without its newline: the
    library calls the command makes, writing and flushing each piece as it does."""
    out = out if out is not None else io.StringIO()
    steps = token_steps(model, vocab, [""], [0.8], length, top_k=0, top_p=1.0, seed=seed, stop_at_eos=stop_at_eos)
    for (piece,) in text_pieces(steps, vocab, stop_at_eos):
        if piece is not None:
            out.write(piece)
            out.flush()
    return out.getvalue()


def gen_body(ids: list[str], length: int, seed: int, stop_at_eos: bool) -> dict:
    return {"models": ids, "prompt": "", "temperature": 0.8, "top_k": 0, "top_p": 1.0, "length": length,
            "seed": seed, "stop_at_eos": stop_at_eos}  # fmt: skip


# --------------------------------------------------------------------------- 2. streaming rate


def streaming_rate(served: Served, ids: list[str], models: list, rounds: int, length: int, threads: int) -> dict:
    """Server chars/s (POST to `done`, read by an SSE client in this process) against the library calls of
    `charlm generate` in this process with `threads` torch threads (the server's own count is set when it
    starts): one model, and four models in one job against four runs in turn."""

    def server(n: int, seed: int, length: int = length) -> tuple[float, list[str]]:
        t0 = time.perf_counter()
        status, answer = served.generate(gen_body(ids[:n], length, seed, False))
        if status != 200:
            raise SystemExit(f"POST /api/generate answered {status}: {answer}")
        got = served.events(answer["job"], n)
        dt = time.perf_counter() - t0
        if got["reason"] != "finished":
            raise SystemExit(f"stream ended with {got['reason']!r}")
        return sum(len(t) for t in got["texts"]) / dt, got["texts"]

    def cli(n: int, seed: int, length: int = length) -> tuple[float, list[str]]:
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            t0 = time.perf_counter()
            texts = [local_text(m, v, length, seed, False) for m, v in models[:n]]
            dt = time.perf_counter() - t0
        finally:
            torch.set_num_threads(before)
        return sum(len(t) for t in texts) / dt, texts

    cases = [("server", 1), ("cli", 1), ("server", N_MODELS), ("cli", N_MODELS)]
    rates: dict[tuple, list[float]] = {c: [] for c in cases}
    same = True
    for side, n in cases:  # warm-up, short: the server loads its models on the first request
        (server if side == "server" else cli)(n, 7, 20)
    for r in range(rounds):
        seed = 1000 + r
        texts = {}
        for side, n in rotated(cases, r):
            rate, texts[(side, n)] = (server if side == "server" else cli)(n, seed)
            rates[(side, n)].append(rate)
        same &= texts[("server", 1)] == texts[("cli", 1)] and texts[("server", N_MODELS)] == texts[("cli", N_MODELS)]
    ratio = {n: [s / c for s, c in zip(rates[("server", n)], rates[("cli", n)], strict=True)] for n in (1, N_MODELS)}
    return {"rates": rates, "ratio": ratio, "same": same, "length": length, "threads": threads,
            "server_threads": served.status()["Threads"]}  # fmt: skip


# --------------------------------------------------------------------------- 1 and 3. in the browser

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


def browser_figures(served: Served, labels: list[str], rounds: int, read_rounds: int) -> dict:
    from playwright.sync_api import sync_playwright

    expect = sum(len(item) for item in inspection.text_items(READ_TEXT))
    out: dict[str, list[float]] = {k: [] for k in ("write1", "write1_wall", "write4", "write4_all", "write4_wall",
                                                   "read", "read_wall", "cold1", "cold4")}  # fmt: skip
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM)
        try:
            pages = {}
            for name, n in (("one", 1), ("four", N_MODELS)):
                # One window each, so that neither is a background tab whose frames the browser holds back.
                context = browser.new_context(viewport={"width": 1200, "height": 900})
                page = context.new_page()
                page.set_default_timeout(60_000)
                page.goto(served.url)
                page.wait_for_selector("#models-table tbody tr")
                for label in labels[:n]:
                    page.get_by_label("use " + label, exact=True).check()
                page.fill("#prompt", "")
                page.fill("#length", "40")  # short: the figure is the first character, and rounds must not overlap
                page.fill("#seed", "5")
                page.fill("#read-text", READ_TEXT)
                page.evaluate(PROBE)
                page.evaluate("(n) => { window.__bench.expect = n; }", expect)
                pages[name] = page

            def write(page) -> tuple[dict, float]:
                page.bring_to_front()
                t0 = time.perf_counter()
                page.click("#write-go")
                page.wait_for_function("() => window.__bench.state && window.__bench.state.allFrame !== undefined")
                wall = (time.perf_counter() - t0) * 1000
                page.wait_for_function("() => !document.getElementById('write-go').disabled")
                return page.evaluate("() => window.__bench.state"), wall

            def read(page) -> tuple[dict, float]:
                page.bring_to_front()
                page.evaluate("() => document.getElementById('read-out').replaceChildren()")
                t0 = time.perf_counter()
                page.click("#read-go")
                page.wait_for_function("() => window.__bench.state && window.__bench.state.doneFrame !== undefined")
                wall = (time.perf_counter() - t0) * 1000
                page.wait_for_function("() => !document.getElementById('read-go').disabled")
                return page.evaluate("() => window.__bench.state"), wall

            # The first Write of each page loads its models into the server's cache: a cold figure, apart.
            s, _ = write(pages["one"])
            out["cold1"].append(s["firstFrame"] - s["t0"])
            s, _ = write(pages["four"])
            out["cold4"].append(s["allFrame"] - s["t0"])
            read(pages["one"])  # warm-up of the scoring path
            cases = ["write1", "write4", "read"]
            for r in range(rounds):
                for case in rotated(cases, r):
                    if case == "write1":
                        s, wall = write(pages["one"])
                        out["write1"].append(s["firstFrame"] - s["t0"])
                        out["write1_wall"].append(wall)
                    elif case == "write4":
                        s, wall = write(pages["four"])
                        out["write4"].append(s["firstFrame"] - s["t0"])
                        out["write4_all"].append(s["allFrame"] - s["t0"])
                        out["write4_wall"].append(wall)
                    elif r < read_rounds:
                        s, wall = read(pages["one"])
                        out["read"].append(s["doneFrame"] - s["t0"])
                        out["read_wall"].append(wall)
            out["read_chars"] = [pages["one"].locator("#read-out .ch").count()]
        finally:
            browser.close()
    out["expect"] = [expect]
    return out


# --------------------------------------------------------------------------- 4. load test


def load_test(served: Served, model_id: str, expected: dict[int, str], rounds: int) -> dict:
    """Rounds of 16 concurrent clients; returns per round: wrong streams, the 17th's status, threads and RSS."""

    def one_round(r: int) -> dict:
        posted = threading.Barrier(LOAD_CLIENTS + 1, timeout=120)
        go = threading.Barrier(LOAD_CLIENTS + 1, timeout=120)
        results: list[dict | None] = [None] * LOAD_CLIENTS

        def client(i: int) -> None:
            result = {"error": None}
            try:
                status, answer = served.generate(gen_body([model_id], LOAD_LENGTH, i, True))
                result["status"] = status
                if status != 200:
                    result["error"] = f"POST answered {status}"
                posted.wait()
                go.wait()
                if status == 200:
                    drop = LOAD_DROP_AFTER if i % LOAD_DROP_EVERY == LOAD_DROP_EVERY - 1 else None
                    got = served.events(answer["job"], 1, drop)
                    result.update(reason=got["reason"], text=got["texts"][0] if got["texts"] else None)
            except Exception as e:  # a client's failure is a finding of the round, not the end of the bench
                result["error"] = f"{type(e).__name__}: {e}"
                with contextlib.suppress(threading.BrokenBarrierError):
                    posted.abort()
                    go.abort()
            results[i] = result

        threads = [threading.Thread(target=client, args=(i,)) for i in range(LOAD_CLIENTS)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        extra = None
        with contextlib.suppress(threading.BrokenBarrierError):  # a client failed: its error is in the results
            posted.wait()  # all 16 admitted and none read yet: every slot is taken
            extra, _ = served.generate(gen_body([model_id], LOAD_LENGTH, 999, True))
            go.wait()
        for t in threads:
            t.join(120)
        seconds = time.perf_counter() - t0
        finished = [(i, res) for i, res in enumerate(results) if res and res.get("reason") == "finished"]
        dropped = [res for res in results if res and res.get("reason") == "dropped"]
        wrong = [i for i, res in finished if res["text"] != expected[i]]
        errors = [res["error"] or res.get("reason") for res in results
                  if not res or res["error"] or res.get("reason") not in ("finished", "dropped")]  # fmt: skip
        return {"round": r, "finished": len(finished), "dropped": len(dropped), "wrong": len(wrong),
                "errors": errors, "extra": extra, "seconds": seconds}  # fmt: skip

    def settled(baseline: int | None) -> dict[str, int]:
        # Handler threads end a moment after their last write: wait (bounded) until the count is back to the
        # baseline or, for the baseline itself, has not moved for a second.
        deadline, last, since = time.monotonic() + 10, None, time.monotonic()
        while time.monotonic() < deadline:
            st = served.status()
            if baseline is not None and st["Threads"] <= baseline:
                break
            if st["Threads"] != last:
                last, since = st["Threads"], time.monotonic()
            elif baseline is None and time.monotonic() - since >= 1:
                break
            time.sleep(0.1)
        return served.status()

    warm = one_round(0)
    base = settled(None)
    rows = [dict(warm, threads=base["Threads"], rss_mb=base["VmRSS"] / 1024, warmup=True)]
    for r in range(1, rounds + 1):
        row = one_round(r)
        st = settled(base["Threads"])
        rows.append(dict(row, threads=st["Threads"], rss_mb=st["VmRSS"] / 1024, warmup=False))
    status, listing = served.call("GET", "/api/models")
    after = settled(base["Threads"])
    return {"rows": rows, "baseline_threads": base["Threads"], "baseline_rss_mb": base["VmRSS"] / 1024,
            "models_status": status, "models_listed": len(listing.get("models", [])),
            "final_threads": after["Threads"], "final_rss_mb": after["VmRSS"] / 1024}  # fmt: skip


# --------------------------------------------------------------------------- the report


def ok(flag: bool) -> str:
    return "met" if flag else "**missed**"


def rate_rows(cfg: dict, name: str) -> list[str]:
    rates, ratio, n = cfg["rates"], cfg["ratio"], N_MODELS
    return [
        f"| {name}, 1 model | {spread(rates[('server', 1)])} | {spread(rates[('cli', 1)])} "
        f"| {median(ratio[1]):.0%} ({min(ratio[1]):.0%}–{max(ratio[1]):.0%}) |",
        f"| {name}, {n} models: one job / {n} runs in turn | {spread(rates[('server', n)])} "
        f"| {spread(rates[('cli', n)])} | {median(ratio[n]):.0%} ({min(ratio[n]):.0%}–{max(ratio[n]):.0%}) |",
    ]


def report(ctx: dict) -> str:
    m, b = ctx["machine"], ctx["browser"]
    loads = {"fresh": ctx["load_fresh"], "after Read": ctx["load"]}
    default, single = ctx["streams"]
    n = N_MODELS
    w1, w4all, rd = median(b["write1"]), median(b["write4_all"]), median(b["read"])

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
            f"{max(r['rss_mb'] for r in rows) - lt['baseline_rss_mb']:+.1f} MB at most over the baseline, "
            f"{rows[-1]['rss_mb'] - mid['rss_mb']:+.1f} MB from round {mid['round']} to the last"
        )

    def rate_target(cfg: dict, k: int, what: str) -> str:
        r = median(cfg["ratio"][k])
        return (f"| stream ≥ {TARGET_RATE:.0%} of `charlm generate`'s chars/s, {what} | {r:.0%} "
                f"({len(cfg['ratio'][k])} rounds) | {ok(r >= TARGET_RATE)} |")  # fmt: skip

    threads_default = default["threads"]
    lines = [
        "## Playground (charlm serve)",
        "",
        f"Run {ctx['date']} on {m['cpu']}, {m['cores']} cores shared with other jobs (load average "
        f"{ctx['load_before']} before, {ctx['load_after']} after: 1, 5, 15 min), Python {m['python']}, "
        f"torch {m['torch']}, Chromium {ctx['chromium']}, device cpu. "
        f"Model: {ctx['model']} (`{ctx['model_path']}`), served as {n} copies by `charlm serve --device cpu` "
        f"in a child process. Command: `{ctx['command']}` ({ctx['seconds']:.0f} s). "
        "Figures are medians (min–max); compared cases ran interleaved, and a ratio is the median of the per-round "
        "ratios. On a busy shared machine the absolute figures move from run to run; the ratios less so.",
        "",
        "| issue 17 target | figure | |",
        "|---|---:|---|",
        f"| first character on screen ≤ {TARGET_FIRST_MS} ms after Write, 1 model | {spread(b['write1'])} ms "
        f"({len(b['write1'])} tries) | {ok(w1 <= TARGET_FIRST_MS)} |",
        f"| … {n} models (every column has its first character) | {spread(b['write4_all'])} ms "
        f"({len(b['write4_all'])} tries) | {ok(w4all <= TARGET_FIRST_MS)} |",
        rate_target(default, 1, f"1 model, torch's default threads ({threads_default})"),
        rate_target(default, n, f"{n} models in one job against {n} runs in turn, default threads"),
        rate_target(single, 1, "1 model, 1 torch thread on both sides"),
        rate_target(single, n, f"{n} models, 1 torch thread on both sides"),
        f"| Read: {READ_CHARS:,} characters scored and coloured ≤ {TARGET_READ_MS} ms | {spread(b['read'])} ms "
        f"({len(b['read'])} tries) | {ok(rd <= TARGET_READ_MS)} |",
        f"| load test: {LOAD_CLIENTS} clients, the 17th refused, streams correct, threads and memory back, "
        f"still serving; a fresh server | RSS {growth(loads['fresh'])} | {ok(load_ok(loads['fresh']))} |",
        f"| … the server of the Write and Read rounds above | RSS {growth(loads['after Read'])} "
        f"| {ok(load_ok(loads['after Read']))} |",
        "",
        f"- Write (the server with torch's default threads): length 40, seed 5, empty prompt, models ticked "
        "beforehand. The clock starts at the click on Write (in the page, `performance.now()`) and stops at the "
        f"animation frame after the first character is in the column. First character in any of {n} columns: "
        f"{spread(b['write4'])} ms (all {n} arrive in the same event). Measured from Python around Playwright's "
        f"click (its own overhead included): 1 model {spread(b['write1_wall'])} ms, {n} models "
        f"{spread(b['write4_wall'])} ms. The first Write of a page, while the server still loads the models from "
        f"disk: {b['cold1'][0]:.0f} ms (1 model), {b['cold4'][0]:.0f} ms ({n} models), once each.",
        "- Streaming, chars/s (characters of all models per second; no stop at end of item, T=0.8). Server: "
        "POST /api/generate to the `done` event, read by a Python SSE client in the bench process. `charlm "
        "generate`: the library calls it makes (`token_steps` + `text_pieces`, each piece written and flushed), in "
        "the bench process, model already loaded, with the same number of torch threads as that server. Two "
        f"servers ran: one with torch's default intra-op threads ({threads_default} here; {default['server_threads']} "
        f"threads in its process at rest), one started with OMP_NUM_THREADS=1 ({single['server_threads']} at rest). "
        f"Default threads: length {default['length']:,}, {len(default['ratio'][1])} rounds; one thread: length "
        f"{single['length']:,}, {len(single['ratio'][1])} rounds. The server's and the library's texts were "
        + ("identical" if default["same"] and single["same"] else "**not identical**")
        + " for the same seed.",
        "",
        "| case | server chars/s | `charlm generate` chars/s | ratio |",
        "|---|---:|---:|---:|",
        *rate_rows(default, f"default threads ({threads_default})"),
        *rate_rows(single, "1 thread"),
        "",
        f"- Read (the default-threads server): {READ_CHARS:,} characters of our own English text in "
        f"{len(inspection.text_items(READ_TEXT))} lines, pasted, one model; the clock runs from the click on Score "
        f"to the animation frame after every one of the {b['expect'][0]:,} character spans has its colour class "
        f"({b['read_chars'][0]:,} on the page at the end). From Python around the click: {spread(b['read_wall'])} ms.",
        f"- Load test on 127.0.0.1, on two default-threads servers: a fresh one (before anything else ran) and the "
        f"one of the Write and Read rounds, after them; {len(ctx['load']['rows'])} rounds each, the first a warm-up "
        f"that sets the baseline (its threads and RSS): {LOAD_CLIENTS} threads each POST a generation (length "
        f"{LOAD_LENGTH}, seed = "
        "client number, stop at end of item) and wait until all are admitted; a 17th POST is made then; then all "
        f"read their streams, every {LOAD_DROP_EVERY}th closing its connection after {LOAD_DROP_AFTER} pieces. A "
        "finished stream must equal `token_steps`/`text_pieces` for its seed, computed beforehand. Threads and "
        "RSS are the server process's (/proc), once its handler threads have ended.",
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
            lines.append(
                f"| {server} | {name} | {r['finished']} ({correct}) | {r['dropped']} | {r['extra']} | {failures} | "
                f"{r['seconds']:.1f} | {r['threads']} | {r['rss_mb']:.1f} |"
            )
    lines.append("")
    for server, lt in loads.items():
        lines.append(
            f"- {server}, after the rounds: GET /api/models answered {lt['models_status']} with "
            f"{lt['models_listed']} models; server threads {lt['final_threads']} (baseline {lt['baseline_threads']}), "
            f"RSS {lt['final_rss_mb']:.1f} MB (baseline {lt['baseline_rss_mb']:.1f} MB; the bound on growth is "
            f"{RSS_BOUND_MB} MB)."
        )
    if ctx["server_log"]:
        lines.append("- The servers printed: " + " / ".join(x.strip() for x in ctx["server_log"][:5]))
    return "\n".join(lines) + "\n"


def say(what: str, since: float) -> None:
    print(f"serve_speed: {time.perf_counter() - since:.0f} s: {what}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="model file (default: an untrained model of params.yaml's shape)")
    parser.add_argument("--out", help="also write the Markdown section here")
    parser.add_argument("--rounds", type=int, default=10, help="browser rounds (each: Write with 1 and 4 models, Read)")
    parser.add_argument("--stream-rounds", type=int, default=5, help="streaming rounds with one torch thread")
    parser.add_argument("--length", type=int, default=2000, help="characters per model, streaming with one thread")
    # With torch's default threads on a shared machine a stream can be slow: fewer, shorter rounds keep the
    # bench within minutes.
    parser.add_argument("--default-rounds", type=int, default=3, help="streaming rounds with default threads")
    parser.add_argument("--default-length", type=int, default=100, help="characters per model, default threads")
    parser.add_argument("--load-rounds", type=int, default=8, help="load-test rounds after the warm-up one")
    args = parser.parse_args(argv)
    if not Path(CHROMIUM).exists():
        raise SystemExit(f"Chromium not found at {CHROMIUM}: apt-get install chromium (or set CHARLM_CHROMIUM)")
    torch.set_grad_enabled(False)
    default_threads = torch.get_num_threads()
    started, load_before = time.perf_counter(), os.getloadavg()
    servers: list[Served] = []
    with tempfile.TemporaryDirectory(prefix="charlm-serve-speed-") as tmp:
        work = Path(tmp)
        source = Path(args.model) if args.model else work / "default.pt"
        if not args.model:
            default_model(source)
        # Copies, not one path four times: four models for the server's cache, as four experiments would be.
        files = []
        for i in range(N_MODELS):
            files.append(work / f"m{i}.pt")
            shutil.copyfile(source, files[-1])
        loaded = [artifact.load_model(f, "cpu") for f in files]
        models = [(m.eval(), v) for m, v, _ in loaded]
        model_text = describe(loaded[0][0], loaded[0][1], loaded[0][2])
        say(f"model {model_text}; starting the servers", started)
        expected = {i: local_text(*models[0], LOAD_LENGTH, i, True) for i in range(LOAD_CLIENTS)}
        (work / "serve").mkdir()
        try:
            with concurrent.futures.ThreadPoolExecutor(3) as pool:  # each start-up takes seconds: side by side
                starts = [
                    pool.submit(Served, work / "serve", files),
                    pool.submit(Served, work / "serve", files, 1),
                    pool.submit(Served, work / "serve", files),
                ]
                failed = None
                for start in starts:
                    try:
                        servers.append(start.result())
                    except BaseException as e:  # noqa: BLE001  # the others still have to be closed
                        failed = e
                if failed is not None:
                    raise failed
            served, single, fresh = servers
            status, listing = served.call("GET", "/api/models")
            by_file = {Path(e["label"]).name: e for e in listing["models"]}
            entries = [by_file[f.name] for f in files]
            ids, labels = [e["id"] for e in entries], [e["label"] for e in entries]
            say("load test, fresh server", started)
            load_fresh = load_test(fresh, ids[0], expected, args.load_rounds)
            fresh.close()
            say("streaming rate, one thread", started)
            stream_single = streaming_rate(single, ids, models, args.stream_rounds, args.length, 1)
            single.close()
            say("streaming rate, default threads", started)
            stream_default = streaming_rate(
                served, ids, models, args.default_rounds, args.default_length, default_threads
            )
            say("browser", started)
            browser = browser_figures(served, labels, args.rounds, args.rounds)
            say("load test", started)
            load = load_test(served, ids[0], expected, args.load_rounds)
        finally:
            for server in servers:
                server.close()
    chromium = subprocess.run([CHROMIUM, "--version"], capture_output=True, text=True).stdout.strip()
    command = "python -m bench.serve_speed" + (f" --model {args.model}" if args.model else "")
    ctx = {
        "date": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        "machine": machine(),
        "load_before": load_text(load_before),
        "load_after": load_text(os.getloadavg()),
        "chromium": chromium.split()[1] if len(chromium.split()) > 1 else "?",
        "model": model_text,
        "model_path": args.model or "untrained, params.yaml's shape",
        "command": command,
        "seconds": time.perf_counter() - started,
        "browser": browser,
        "streams": [stream_default, stream_single],
        "load": load,
        "load_fresh": load_fresh,
        "server_log": [x for srv in servers for x in srv.log if x.strip()],
    }
    text = report(ctx)
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
