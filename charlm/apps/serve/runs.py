"""The playground's Run part on the server: the experiment form, the queue and its actions, the live state pushed
as Server-Sent Events, and a comparison of finished experiments. The work is `charlm.pipeline.form` and
`charlm.pipeline.queue`; this module only carries it over HTTP.

GET  /api/runs/form[?base=<experiment>] -> {"read_only", "fields": [...], "base", "max_queued", "cores"}; no
     fields outside a DVC repository with a params.yaml (the page then hides the Run part, as when read-only)
POST /api/runs/queue   {"name": str, "values": {key: -S text}, "base": experiment|null} -> {"queued": [names]}
POST /api/runs/start   {"jobs": int} -> {"jobs": int}
POST /api/runs/kill    {"name": str} -> {"killed": name};  POST /api/runs/remove {"name": str} -> {"removed": name}
POST /api/runs/logs    {"name": str} -> {"log": str}
POST /api/runs/compare {"names": [2..4 names]} -> {"names", "rows": [{"key", "kind", "values", "differs"}]}
POST /api/runs/watch   {} -> {"stream": id};  GET /api/runs/streams/<id>/events -> text/event-stream of
     event: state {"experiments": [...], "live": {name: {"train", "val", "sample", "step"}}}, when it changes

Every request here is refused (403) by a read-only server: one started without `--run`, or any beyond loopback.
They pass the server's cross-site checks (Host, Origin, token, and Content-Type: application/json on the POSTs).
"""

from __future__ import annotations

import json
import os
import secrets
import threading
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from charlm.base.errors import CharlmError
from charlm.pipeline import form, params, queue

POLL_S = 3.0  # how often the state is read while a page watches (exp_show takes about a second)
KEEPALIVE_S = 15.0  # a stream with no news sends a comment this often, which finds a closed page
STREAMS = 32  # watch ids kept; an old one is forgotten
WATCHERS = 16  # pages watching at once: each holds a server thread while its stream is open
META = {"Experiment", "rev", "typ", "Created", "parent", "State", "Executor"}
READ_ONLY = (
    "this playground is read-only (started without --run, or listening beyond loopback): queue experiments from a "
    "terminal with `dvc exp run --queue`"
)


def _error(status: int, message: str) -> Exception:
    from charlm.apps.serve.server import HTTPError  # the server imports this module: imported when first needed

    return HTTPError(status, message)


def _name(body: dict, field: str = "name") -> str:
    value = body.get(field)
    if not isinstance(value, str):
        raise _error(400, f"{field} must name an experiment")
    return value


class Runs:
    """The Run part's state: whether it may act, and the watched state of the queue, read by one thread while at
    least one page watches it."""

    def __init__(self, read_only: bool):
        self.read_only = read_only
        self._streams: OrderedDict[str, bool] = OrderedDict()  # watch id -> a connection reads it now
        self._cond = threading.Condition()
        self._state: dict | None = None
        self._version = 0
        self._watchers = 0
        self._wake = threading.Event()
        self._poller: threading.Thread | None = None

    def _writable(self) -> None:
        if self.read_only:
            raise _error(403, READ_ONLY)

    def _act(self, fn: Callable[[], Any]) -> Any:
        self._writable()
        try:
            out = fn()
        except CharlmError as e:
            raise _error(400, str(e)) from None
        self._wake.set()  # the watchers see the change at once, not at the next poll
        return out

    # ---------------------------------------------------------------- handlers

    def form(self, query: dict) -> dict:
        if self.read_only:
            return {"read_only": True, "fields": [], "base": None, "max_queued": queue.MAX_QUEUED, "cores": 0}
        if not (Path(".dvc").is_dir() and Path(params.PARAMS_FILE).is_file()):
            # Model files served outside a charlm repository: there is nothing to queue, and nothing is wrong.
            return {"read_only": False, "fields": [], "base": None, "max_queued": queue.MAX_QUEUED, "cores": 0}
        base = query.get("base", [""])[-1] or None

        def build() -> dict:
            with queue.QUEUEING:  # not while a queueing rewrites params.yaml
                fields, values = form.schema(), queue.base_values(base)
            for key, text in values.items():
                for f in fields:
                    if f["key"] == key:
                        f["value"] = text
            return {
                "read_only": False,
                "fields": fields,
                "base": base,
                "max_queued": queue.MAX_QUEUED,
                "cores": os.cpu_count() or 1,
            }

        return self._act(build)

    def queue(self, body: dict) -> dict:
        values = body.get("values", {})
        if not isinstance(values, dict) or not all(isinstance(v, str) for v in values.values()):
            raise _error(400, 'values must map keys to -S text, such as {"model.hidden": "16,32"}')
        base = body.get("base")
        if base is not None and not isinstance(base, str):
            raise _error(400, "base must name an experiment, or be null for the workspace")
        return {"queued": self._act(lambda: queue.queue(body.get("name"), values, base))}

    def start(self, body: dict) -> dict:
        return {"jobs": self._act(lambda: queue.start(body.get("jobs")))}

    def kill(self, body: dict) -> dict:
        name = _name(body)
        self._act(lambda: queue.kill(name))
        return {"killed": name}

    def remove(self, body: dict) -> dict:
        name = _name(body)
        self._act(lambda: queue.remove(name))
        return {"removed": name}

    def logs(self, body: dict) -> dict:
        name = _name(body)
        return {"log": self._act(lambda: queue.logs(name))}

    def compare(self, body: dict) -> dict:
        names = body.get("names")
        if not isinstance(names, list) or not 2 <= len(names) <= 4 or not all(isinstance(n, str) for n in names):
            raise _error(400, "names must list 2 to 4 experiments")
        return self._act(lambda: compare(names))

    def watch(self, body: dict) -> dict:
        self._writable()
        stream = secrets.token_hex(16)
        with self._cond:
            self._streams[stream] = False
            while len(self._streams) > STREAMS:
                self._streams.popitem(last=False)
        return {"stream": stream}

    # ---------------------------------------------------------------- the pushed state

    def snapshot(self) -> dict:
        rows = queue.experiments()
        live = {r["name"]: queue.live(r["name"]) for r in rows if r["state"] == "Running"}
        return {"experiments": rows, "live": live}

    def _poll(self) -> None:
        while True:
            with self._cond:
                if self._watchers == 0:
                    self._poller = None
                    return
            try:
                state = self.snapshot()
            except Exception as e:  # DVC busy or a repository mid-change: said in the stream, tried again later
                state = {"error": f"the queue could not be read ({type(e).__name__}: {str(e)[:200]})"}
            with self._cond:
                if state != self._state:
                    self._state, self._version = state, self._version + 1
                    self._cond.notify_all()
            self._wake.wait(POLL_S)
            self._wake.clear()

    def events(self, stream: str, handler) -> None:
        """Send the state whenever it changes, until the page goes away."""
        self._writable()
        with self._cond:
            # One connection per id at a time (the browser's own reconnection opens it again once the old one has
            # ended), and WATCHERS in all: an id does not buy any number of threads.
            if self._streams.get(stream, True):
                raise _error(404, f"unknown stream {stream!r}, or one being read; POST /api/runs/watch for one")
            if self._watchers >= WATCHERS:
                raise _error(429, f"{WATCHERS} pages already watch the queue; close one, or retry in a moment")
            self._streams[stream] = True
            self._watchers += 1
            if self._poller is None:
                self._poller = threading.Thread(target=self._poll, name="charlm-runs", daemon=True)
                self._poller.start()
            seen = -1
        try:
            handler.close_connection = True
            handler._headers(200, "text/event-stream; charset=utf-8", None)
            while True:
                with self._cond:
                    if self._version == seen or self._state is None:  # nothing new, or not read yet
                        self._cond.wait(KEEPALIVE_S)
                    version, state = self._version, self._state
                if version != seen and state is not None:
                    data = json.dumps(state, ensure_ascii=False, allow_nan=False)
                    handler.wfile.write(f"event: state\ndata: {data}\n\n".encode())
                    seen = version
                else:
                    handler.wfile.write(b": still here\n\n")
                handler.wfile.flush()
        except OSError:
            pass  # the page went away
        finally:
            with self._cond:
                self._watchers -= 1
                if stream in self._streams:
                    self._streams[stream] = False


def compare(names: list[str]) -> dict:
    """Params and metrics of experiments side by side, as `dvc exp diff` shows them, each row marked when the
    experiments differ on it; deps' hashes are left out."""
    for name in names:
        queue.check_name(name)
    rows = queue.exp_show()
    by_name = {r.get("Experiment"): r for r in rows if r.get("Experiment")}
    missing = [n for n in names if n not in by_name]
    if missing:
        raise CharlmError(f"no experiment named {missing[0]!r} here; the queue's list shows the names")
    keys = set(form.flat(params.read_yaml()))
    columns = [c for c in by_name[names[0]] if c not in META]
    out = []
    for column in columns:
        key = column.split(":", 1)[-1]
        kind = "param" if key in keys else "metric"
        if kind == "metric" and "/" in column and ":" not in column:
            continue  # a dependency's hash
        values = [queue._plain(by_name[n].get(column)) for n in names]
        if kind == "metric" and all(v is None for v in values):
            continue
        out.append({"key": key, "kind": kind, "values": values, "differs": len({json.dumps(v) for v in values}) > 1})
    out.sort(key=lambda r: (r["kind"] != "param", not r["differs"]))
    return {"names": names, "rows": out}


def routes(runs: Runs, handler, path: str, query: dict) -> dict[tuple[str, str], Callable[[dict], Any]]:
    """The Run part's routes, for the server's table: each takes the request body and returns the JSON answer,
    or None once it has answered itself (the event stream)."""
    table: dict[tuple[str, str], Callable[[dict], Any]] = {
        ("GET", "/api/runs/form"): lambda _: runs.form(query),
        ("POST", "/api/runs/queue"): runs.queue,
        ("POST", "/api/runs/start"): runs.start,
        ("POST", "/api/runs/kill"): runs.kill,
        ("POST", "/api/runs/remove"): runs.remove,
        ("POST", "/api/runs/logs"): runs.logs,
        ("POST", "/api/runs/compare"): runs.compare,
        ("POST", "/api/runs/watch"): runs.watch,
    }
    parts = path.split("/")
    if len(parts) == 6 and parts[:4] == ["", "api", "runs", "streams"] and parts[5] == "events":
        stream = parts[4]
        table[("GET", path)] = lambda _: runs.events(stream, handler)
    return table
