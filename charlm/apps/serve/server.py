"""`charlm serve`: a local web page to generate from, read with and look inside the models of a repository.

Python's ThreadingHTTPServer and Server-Sent Events; no other runtime dependency. The maths lives in
`charlm.core.sampling` and `charlm.core.inspection`, the list of models in `charlm.pipeline.experiments`.

HTTP API (all JSON; an error is 4xx with {"error": "<one line>"}, and the server keeps serving). A POST body is
sent as Content-Type: application/json (else 415), at most 1 MB (else 413). So is every GET that runs git, DVC or a
model (all but the page, its files and the model list as computed; else 403), which no cross-site page can send
without a CORS preflight that this server never grants; the event stream, which EventSource opens without headers,
is named by a job id that only the POST's reader knows. A browser's Sec-Fetch-Site, when sent, must be same-origin.
A request must arrive whole within 10 s of the connection (or of the previous answer), or the connection closes.

When the server has a token (a non-loopback --host), every request carries `?token=<t>`, `/` and `/page/*` too.

GET  /                      the page (page/index.html); GET /page/<index.html|app.js|style.css|icon.svg> its files
GET  /api/models[?refresh=1]
     -> {"repo": bool, "hint": str|null, "models": [{"id", "label", "kind", "val_bpc", "test_bpc", "params",
        "precision", "cli"}]}; cli: the `charlm generate` arguments that load the model
     kind: workspace | checkpoint | experiment | branch | tag | commit | file. ids: "workspace" (models/model.pt),
     "checkpoint" (checkpoints/train.pt, read again when it changes), "checkpoint:<stem>" (a queued or temp
     experiment's checkpoint), "rev:<name>" (a DVC experiment, branch or tag with a model; any other revision
     may be asked for as "rev:<name>" too), "file:<k>" (the k-th --model). params: the params that differ
     from the workspace's, as dotted keys. The list is computed once, and again on refresh=1. A checkpoint's label
     names its run (an experiment, or `dvc repro`) and step; one that does not name its run is left out.
GET  /api/model?id=<id>     -> that model's row, once it has loaded (404 when it cannot): how the page adds a revision
POST /api/generate  {"models": [id, ...] (1..4), "prompt": str, "temperature": float >= 0, "top_k": int >= 0,
                     "top_p": float in (0, 1], "length": int 1..5000, "seed": int >= 0 | null, "stop_at_eos": bool}
     -> {"job": "<hex>"}; 400 names the bad field, 404 for a model that cannot be found or loaded,
     429 when 16 generations are already admitted.
GET  /api/jobs/<job>/events -> text/event-stream, read once; one stream for every model of the job:
     event: start {"seed": int, "models": [ids]}; per position event: piece {"pieces": [str|null per model],
     "scores": [{"bits", "top", "rank"}|null per model]} (null: that model has stopped; a score is Read's for the
     character, at temperature 1: inspection.step_scores); last event: done {"reason": "finished"|"stopped"}, or
     event: error {"error": str}. The client shows prompt + pieces. Closing the stream cancels the generation.
POST /api/jobs/<job>/stop   -> {"stopped": true}; the stream ends with done {"reason": "stopped"}
POST /api/score     {"models": [ids 1..4], "text": str}
     -> {"items": [str], "models": [{"id", "bpc", "chars", "buckets": [[name, share] x4], "item_bpc": [float per
        item], "scores": [[{"bits", "top": [[char, p] x5], "rank"} per char] per item]}]}
GET  /api/hardest?model=<id> -> {"items": [{"index", "bpc", "chars", "text"}], "searched": int, "total": int}: the
     20 items of the workspace's packed test split (its first 2,000) the model finds hardest, by bpc
GET  /api/test-item[?seed=N] -> {"text": str}: an item of the workspace's packed test split (404 without one)
POST /api/activations {"model": id, "text": str, "layer": int, "kind": "cell"|"output", "unit": int}
     -> {"items": [str], "layers": int, "units": int, "kinds": [str], "values": [[float per char] per item]}
POST /api/span-units {"model": id, "text": str, "layer": int, "kind": str, "spans": [[item, start, end], ...]}
     -> {"items": [str], "units": [{"unit", "score", "inside", "outside"}] (10), "values": [[[float per unit
        listed] per char] per item]}: the units that set the spans apart (inspection.span_units)
POST /api/units     {"model": id, "layer": int, "kind": str}
     -> {"features": [{"feature", "units": [{"unit", "r"}]}], "unexplained": [str], "constant": [str],
        "explained": float, "note": str|null}, ranked on the workspace's validation items (inspection.rank_units)
GET  /api/curves?models=id,id -> {"curves": [{"id", "label", "train": [[step, bpc]], "val": [[step, bpc]]}]}

Safety: binds 127.0.0.1 unless told otherwise; another address needs the random token printed in the URL. The
Host header must name the served address (a loopback server answers to its address, 127.0.0.1 and localhost
only), which defeats DNS rebinding; an Origin header must be the served origin, which refuses cross-site
requests. Text, length, models per request, concurrent generations and body size are bounded, and at most 6
models stay loaded. Responses are JSON with nosniff, and the page carries a strict Content-Security-Policy.
Nothing is written to the workspace.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hmac
import ipaddress
import json
import math
import random
import re
import secrets
import socket
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from charlm.apps.serve import runs
from charlm.apps.serve.jobs import Jobs, Request, TooMany, run
from charlm.base.errors import CharlmError
from charlm.core.device import pick_device
from charlm.pipeline import experiments, paths

PAGE = Path(__file__).resolve().parent / "page"
PAGE_FILES = {
    "index.html": "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
    "icon.svg": "image/svg+xml",
    "run.js": "text/javascript; charset=utf-8",  # the Run part (runs.py)
}
UNITS_KEPT = 64  # rankings of (model, layer, kind) and hardest-item lists kept; each is short
NOT_FINITE = (
    "the model's outputs are not finite numbers (NaN or infinity): its weights overflow in float32; "
    "retrain it, or choose another model"
)
SURROGATE = re.compile("[\ud800-\udfff]")  # JSON can carry one alone; it cannot be encoded as UTF-8
CSP = "default-src 'self'; connect-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'"


@dataclass(frozen=True)
class Limits:
    text: int = 20_000  # characters of a prompt or a text to read
    length: int = 5_000  # characters generated per model
    models: int = 4  # models per request
    generations: int = 16  # generation jobs admitted at once
    analyses: int = 4  # score / activations / units requests computed at once
    body: int = 1 << 20  # bytes of a request body
    loaded: int = 6  # models kept loaded
    val_items: int = 200  # validation items that units are ranked on
    test_items: int = 2_000  # test items searched for the hardest ones (evaluate scores ~50k chars/s on 2 cores)
    test_chars: int = 1_000_000  # and their characters at most: the search holds an analysis slot until done
    hardest: int = 20  # hardest items listed
    span_units: int = 10  # units a span search lists, and the heatmap shows
    request_s: float = 10.0  # to send a whole request (line, headers, body), and the socket timeout


class HTTPError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def _one_line(text: str, limit: int = 300) -> str:
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# --------------------------------------------------------------------------- request fields


def _field(body: dict, name: str, check: Callable[[Any], bool], what: str, default: Any = ...) -> Any:
    if name not in body:
        if default is ...:
            raise HTTPError(400, f"{name} is missing: it must be {what}")
        return default
    value = body[name]
    if not check(value):
        raise HTTPError(400, f"{name} must be {what}")
    return value


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return False
    try:
        return math.isfinite(v)
    except OverflowError:  # an integer too large for a float
        return False


def _refresh(query: dict) -> bool:
    return query.get("refresh", ["0"])[-1] not in ("", "0")


def _only(body: dict, allowed: set[str]) -> None:
    extra = sorted(set(body) - allowed)
    if extra:
        raise HTTPError(400, f"unknown field {extra[0]!r}; expected {', '.join(sorted(allowed))}")


class App:
    """What the handlers share: the catalog of models, the loaded ones, jobs and caches of inspection results."""

    def __init__(
        self, files: list[str], device, limits: Limits = Limits(), token: str | None = None, read_only: bool = True
    ):
        self.limits, self.token, self.device = limits, token, device
        self.runs = runs.Runs(read_only)  # the Run part (runs.py): refuses every request when read-only
        self.catalog = experiments.Catalog(files)
        self.models = experiments.ModelCache(device, limits.loaded)
        self.jobs = Jobs(limits.generations)
        self.analyses = threading.BoundedSemaphore(limits.analyses)
        self._cache_lock = threading.Lock()
        self._last_acts: tuple[tuple, Any] | None = None
        self._kept_results: dict[tuple, dict] = {}
        self.allowed_hosts: set[str] = set()  # Host header values; empty: any (a wildcard bind with a token)

    # ---------------------------------------------------------------- models

    def _models_field(self, body: dict) -> list[str]:
        n = self.limits.models
        ids = _field(
            body,
            "models",
            lambda v: (
                isinstance(v, list) and 1 <= len(v) <= n and all(isinstance(i, str) and 0 < len(i) <= 300 for i in v)
            ),
            f"a list of 1 to {n} model ids",
        )
        return ids

    def load(self, model_id: str) -> tuple:
        try:
            source = self.catalog.resolve(model_id)
        except CharlmError as e:
            raise HTTPError(404, f"unknown model {model_id!r}: {e}") from None
        try:
            return self.models.get(source)
        except CharlmError as e:
            prefix = "unknown model" if source.rev is not None else "model"
            raise HTTPError(404, f"{prefix} {model_id!r}: {e}") from None

    def _text(self, body: dict, name: str, required: bool = True) -> str:
        n = self.limits.text
        what = f"a string of at most {n:,} characters"
        text = _field(body, name, lambda v: isinstance(v, str) and len(v) <= n, what, ... if required else "")
        if SURROGATE.search(text):
            raise HTTPError(400, f"{name} holds a lone surrogate (a \\ud800-\\udfff escape): it is not Unicode text")
        return text

    # ---------------------------------------------------------------- endpoints

    def list_models(self, query: dict) -> dict:
        refresh = _refresh(query)
        listing = self.catalog.listing(refresh=refresh)
        if refresh:
            self.models.forget_names()  # a branch, tag or experiment may point to another commit now
        return listing

    def model_row(self, query: dict) -> dict:
        model_id = query.get("id", [""])[-1]
        if not 0 < len(model_id) <= 300:
            raise HTTPError(400, "id must name a model, such as rev:main")
        _, _, info = self.load(model_id)
        row = self.catalog.resolve(model_id).row()
        # A model file records the val bpc of its weights; the file may come from anywhere, so its info may not
        # be a dict, nor the number a finite one (JSON has no NaN).
        val: Any = info.get("val_bpc") if isinstance(info, dict) else None
        if row["val_bpc"] is None and _is_number(val):
            row["val_bpc"] = float(val)
        return row

    def generate(self, body: dict) -> dict:
        _only(body, {"models", "prompt", "temperature", "top_k", "top_p", "length", "seed", "stop_at_eos"})
        ids = self._models_field(body)
        r = Request(
            prompt=self._text(body, "prompt", required=False),
            temperature=float(_field(body, "temperature", lambda v: _is_number(v) and v >= 0, "a number >= 0", 0.8)),
            top_k=_field(body, "top_k", lambda v: _is_int(v) and v >= 0, "a whole number >= 0", 0),
            top_p=float(_field(body, "top_p", lambda v: _is_number(v) and 0 < v <= 1, "a number in (0, 1]", 1.0)),
            length=_field(
                body,
                "length",
                lambda v: _is_int(v) and 1 <= v <= self.limits.length,
                f"a whole number from 1 to {self.limits.length:,}",
                300,
            ),
            seed=0,
            stop_at_eos=_field(body, "stop_at_eos", lambda v: isinstance(v, bool), "true or false", True),
        )
        seed = _field(
            body,
            "seed",
            lambda v: v is None or (_is_int(v) and 0 <= v < 2**63),
            "a whole number from 0 to 2^63 - 1, or null",
            None,
        )
        r.seed = seed if seed is not None else random.SystemRandom().randrange(2**31)  # as `charlm generate`
        loaded = [self.load(i) for i in ids]
        try:
            job = self.jobs.add(ids, loaded, r)
        except TooMany as e:
            raise HTTPError(429, str(e)) from None
        return {"job": job.id}

    def stop(self, job_id: str) -> dict:
        job = self.jobs.get(job_id)
        if job is None:
            raise HTTPError(404, f"unknown job {job_id!r} (finished, or never started)")
        job.stop.set()
        return {"stopped": True}

    def _analysis(self, compute: Callable[[], dict]) -> dict:
        if not self.analyses.acquire(blocking=False):
            raise HTTPError(429, f"too many analyses running ({self.limits.analyses}); retry in a moment")
        try:
            return compute()
        except CharlmError as e:
            raise HTTPError(400, str(e)) from None
        finally:
            self.analyses.release()

    def _kept(self, key: tuple, compute: Callable[[], dict]) -> dict:
        """An analysis that depends only on its model and key (ranked units, hardest items): computed once, the
        last UNITS_KEPT answers kept."""
        with self._cache_lock:
            if key in self._kept_results:
                return self._kept_results[key]
        result = self._analysis(compute)
        with self._cache_lock:
            self._kept_results[key] = result
            while len(self._kept_results) > UNITS_KEPT:
                del self._kept_results[next(iter(self._kept_results))]
        return result

    def _items(self, body: dict) -> list[str]:
        from charlm.core import inspection

        items = inspection.text_items(self._text(body, "text"))
        if not items:
            raise HTTPError(400, "text holds no item: every line is empty")
        return items

    def score(self, body: dict) -> dict:
        from charlm.core import inspection

        _only(body, {"models", "text"})
        ids = self._models_field(body)
        items = self._items(body)
        loaded = [self.load(i) for i in ids]

        def compute() -> dict:
            out = []
            for model_id, (model, vocab, _) in zip(ids, loaded, strict=True):
                scores = inspection.char_scores(model, vocab, items, top=5)
                out.append(
                    {
                        "id": model_id,
                        "bpc": inspection.bits_per_char(scores),
                        "chars": sum(len(s) for s in scores),
                        "buckets": inspection.rank_buckets(scores),
                        "item_bpc": inspection.item_bpc(scores),
                        "scores": scores,
                    }
                )
            return {"items": items, "models": out}

        return self._analysis(compute)

    def _layer_kind(self, body: dict, model) -> tuple[int, str]:
        from charlm.core import inspection

        layers, kinds = model.rnn.num_layers, inspection.unit_kinds(model)
        layer = _field(
            body, "layer", lambda v: _is_int(v) and 0 <= v < layers, f"a whole number from 0 to {layers - 1}"
        )
        kind = _field(body, "kind", lambda v: v in kinds, " or ".join(repr(k) for k in kinds))
        return layer, kind

    def activations(self, body: dict) -> dict:
        from charlm.core import inspection

        _only(body, {"model", "text", "layer", "kind", "unit"})
        model_id = _field(body, "model", lambda v: isinstance(v, str) and 0 < len(v) <= 300, "a model id")
        items = self._items(body)
        model, vocab, _ = self.load(model_id)
        layer, kind = self._layer_kind(body, model)
        units = model.rnn.hidden_size
        unit = _field(body, "unit", lambda v: _is_int(v) and 0 <= v < units, f"a whole number from 0 to {units - 1}")

        def compute() -> dict:
            acts = self._states(model_id, model, vocab, items, layer, kind)
            return {
                "items": items,
                "layers": model.rnn.num_layers,
                "units": units,
                "kinds": inspection.unit_kinds(model),
                "values": [[float(v) for v in a[:, unit]] for a in acts],
            }

        return self._analysis(compute)

    def _states(self, model_id: str, model, vocab, items: list[str], layer: int, kind: str) -> list:
        """Every unit's states over the items; the last ones are kept, as stepping units reads them again."""
        from charlm.core import inspection

        key = (model_id, id(model), tuple(items), layer, kind)
        with self._cache_lock:
            cached = self._last_acts
        if cached is not None and cached[0] == key:
            return cached[1]
        acts = inspection.layer_states(model, vocab, items, layer, kind)
        with self._cache_lock:
            self._last_acts = (key, acts)
        return acts

    def span_units(self, body: dict) -> dict:
        """The units that set a chosen span of the text apart (`inspection.span_units`), with each one's states
        over the whole text for the heatmap."""
        import numpy as np

        from charlm.core import inspection

        _only(body, {"model", "text", "layer", "kind", "spans"})
        model_id = _field(body, "model", lambda v: isinstance(v, str) and 0 < len(v) <= 300, "a model id")
        items = self._items(body)
        spans = _field(
            body,
            "spans",
            lambda v: (
                isinstance(v, list)
                and 0 < len(v) <= self.limits.text
                and all(isinstance(x, list) and len(x) == 3 and all(_is_int(i) for i in x) for x in v)
            ),
            f"a list of 1 to {self.limits.text:,} [item, start, end] character ranges",
        )
        masks = [np.zeros(len(item), dtype=bool) for item in items]
        for item, start, end in spans:
            if not (0 <= item < len(items) and 0 <= start < end <= len(items[item])):
                raise HTTPError(400, f"span {[item, start, end]} is not a range of characters of the text")
            masks[item][start:end] = True
        model, vocab, _ = self.load(model_id)
        layer, kind = self._layer_kind(body, model)

        def compute() -> dict:
            acts = self._states(model_id, model, vocab, items, layer, kind)
            found = inspection.span_units(acts, masks, top=self.limits.span_units)
            chosen = [u["unit"] for u in found]
            return {
                "items": items,
                "units": found,
                # 4 decimals: a heatmap cell shows one of 7 shades, and 20,000 characters x 10 units is a big answer
                "values": [[[round(float(v), 4) for v in row] for row in a[:, chosen]] for a in acts],
            }

        return self._analysis(compute)

    def _val_items(self) -> list[str] | None:
        """The first `Limits.val_items` validation items no longer than Read takes, or None without packed data."""
        from charlm.core.data import item_bounds
        from charlm.core.vocab import EOS_ID

        try:
            stream, vocab = self._split("val")
        except HTTPError:
            return None
        starts, lengths = item_bounds(stream, EOS_ID)
        keep = lengths <= self.limits.text
        starts, lengths = starts[keep][: self.limits.val_items], lengths[keep][: self.limits.val_items]
        return [vocab.decode(stream[s : s + n_].tolist()) for s, n_ in zip(starts, lengths, strict=True)]

    def units(self, body: dict) -> dict:
        from charlm.core import inspection

        _only(body, {"model", "layer", "kind"})
        model_id = _field(body, "model", lambda v: isinstance(v, str) and 0 < len(v) <= 300, "a model id")
        model, vocab, _ = self.load(model_id)
        layer, kind = self._layer_kind(body, model)
        key = (model_id, id(model), layer, kind, self._split_stamp())

        def compute() -> dict:
            items = self._val_items()
            if not items:
                return {
                    "features": [],
                    "unexplained": [],
                    "constant": [],
                    "explained": inspection.EXPLAINED_R,
                    "note": f"no validation data here ({paths.PACKED} and {paths.VOCAB}; run `dvc repro pack`); "
                    "the other views work on pasted text",
                }
            ranked = inspection.rank_units(model, vocab, items, layer, kind)
            return {**ranked, "explained": inspection.EXPLAINED_R, "note": None}

        return self._kept(key, compute)

    def _split(self, name: str):
        """(a packed split of the workspace, the vocabulary), or a 404 that says how to make them. The files may
        come from a shared remote: every id must name a symbol of the vocabulary before any model reads it (on
        CUDA an id past the embedding is a device-side assert, which breaks every model of the process)."""
        import numpy as np

        from charlm.core.data import load_packed
        from charlm.core.vocab import Vocab

        fix = "run `dvc repro pack`"
        missing = f"no packed data here; {fix} (it writes {paths.PACKED} and {paths.VOCAB})"
        if not (paths.PACKED / "meta.json").is_file() or not paths.VOCAB.is_file():
            raise HTTPError(404, missing)
        try:
            stream, vocab = load_packed(paths.PACKED).streams[name], Vocab.load(paths.VOCAB)
        except CharlmError as e:
            raise HTTPError(404, f"{e}") from None
        if not np.issubdtype(stream.dtype, np.integer) or (
            len(stream) and not 0 <= int(stream.min()) <= int(stream.max()) < len(vocab)
        ):
            raise HTTPError(
                409, f"{paths.PACKED / name}.npy holds ids outside the vocabulary of {paths.VOCAB}; {fix} again"
            )
        return stream, vocab

    def _split_stamp(self) -> tuple:
        """What the packed data is now: a cached answer about it is stale once `dvc repro pack` or `dvc checkout`
        rewrites it."""
        stamp: list[tuple[int, int] | None] = []
        for path in (paths.VOCAB, *(paths.PACKED / f for f in ("meta.json", "val.npy", "test.npy"))):
            try:
                st = path.stat()
                stamp.append((st.st_mtime_ns, st.st_size))
            except OSError:
                stamp.append(None)
        return tuple(stamp)

    def hardest(self, query: dict) -> dict:
        """The workspace's test items that a model finds most surprising, by the evaluation protocol. Items longer
        than Read takes are left out (a click on one could not show it), and the search stops after
        `Limits.test_items` items or `Limits.test_chars` characters."""
        import numpy as np

        from charlm.core import inspection
        from charlm.core.data import item_bounds
        from charlm.core.vocab import EOS_ID

        model_id = query.get("model", [""])[-1]
        if not 0 < len(model_id) <= 300:
            raise HTTPError(400, "model must name a model, such as workspace")
        model, model_vocab, _ = self.load(model_id)
        stream, vocab = self._split("test")
        if list(vocab.itos) != list(model_vocab.itos):
            raise HTTPError(
                409, f"model {model_id!r} was trained on another vocabulary than the workspace's test split"
            )
        limits = self.limits

        def compute() -> dict:
            starts, lengths = item_bounds(stream, EOS_ID)
            shown = np.flatnonzero(lengths <= limits.text)
            within = np.cumsum(lengths[shown]) <= limits.test_chars
            which = shown[: min(limits.test_items, int(within.sum()))]
            ranked = inspection.hardest_items(model, stream, 64, self.device, which=which)[: limits.hardest]
            return {
                "items": [
                    {**h, "text": vocab.decode(stream[starts[h["index"]] : starts[h["index"]] + h["chars"]].tolist())}
                    for h in ranked
                ],
                "searched": len(which),
                "total": len(starts),
            }

        return self._kept(("hardest", model_id, id(model), self._split_stamp()), compute)

    def test_item(self, query: dict) -> dict:
        from charlm.core.data import item_bounds
        from charlm.core.vocab import EOS_ID

        seed_text = query.get("seed", [None])[-1]
        # ASCII digits only: str.isdigit() also takes '²' and other digits that int() refuses.
        if seed_text is not None and not re.fullmatch(r"[0-9]{1,18}", seed_text):
            raise HTTPError(400, "seed must be a whole number >= 0")
        stream, vocab = self._split("test")
        starts, lengths = item_bounds(stream, EOS_ID)
        if not len(starts):
            raise HTTPError(404, f"the packed test split in {paths.PACKED} holds no item; run `dvc repro pack`")
        rng = random.Random(int(seed_text)) if seed_text is not None else random.SystemRandom()
        k = rng.randrange(len(starts))
        return {"text": vocab.decode(stream[starts[k] : starts[k] + lengths[k]].tolist())}

    def curves(self, query: dict) -> dict:
        ids = [i for i in ",".join(query.get("models", [])).split(",") if i]
        if not 1 <= len(ids) <= self.limits.models:
            raise HTTPError(400, f"models must name 1 to {self.limits.models} model ids, comma-separated")
        out = []
        for model_id in ids:
            try:
                source = self.catalog.resolve(model_id)
            except CharlmError as e:
                raise HTTPError(404, f"unknown model {model_id!r}: {e}") from None
            out.append({"id": model_id, "label": source.label, **experiments.curves(source)})
        return {"curves": out}


# --------------------------------------------------------------------------- HTTP


class Handler(BaseHTTPRequestHandler):
    server_version = "charlm"
    server: Server

    def version_string(self) -> str:
        return self.server_version  # no Python version on the wire

    def setup(self) -> None:
        super().setup()
        # Each socket operation waits at most this long: a client that stops reading its stream lets go of its
        # thread and generation slot.
        self.connection.settimeout(self.server.app.limits.request_s)

    def handle_one_request(self) -> None:
        deadlines = self.server.deadlines
        deadlines.start(self.connection)
        try:
            super().handle_one_request()
        finally:
            deadlines.done(self.connection)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002  # the base class's name
        pass  # a request log line per streamed character's client would drown the URL the user needs

    # ---------------------------------------------------------------- responses

    def _headers(self, status: int, content_type: str, length: int | None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        if length is not None:
            self.send_header("Content-Length", str(length))
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Content-Security-Policy", CSP)
        self.send_header("X-Frame-Options", "DENY")
        self.send_header("Referrer-Policy", "no-referrer")  # the URL may carry the token
        self.send_header("Cache-Control", "no-store")
        self.end_headers()

    def _json(self, status: int, obj: Any) -> None:
        try:
            data = json.dumps(obj, ensure_ascii=False, allow_nan=False).encode("utf-8")
        except ValueError:  # JSON has no NaN: a model's numbers overflowed, though its file holds finite ones
            raise HTTPError(422, NOT_FINITE) from None
        self._headers(status, "application/json", len(data))
        if self.command != "HEAD":
            self.wfile.write(data)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        # The base class answers a bad request line, an unknown method or oversized headers with an HTML page.
        self._error(code, message or HTTPStatus(code).phrase)

    def _error(self, status: int, message: str) -> None:
        self.close_connection = True
        self._json(status, {"error": _one_line(message)})

    # ---------------------------------------------------------------- checks

    def _checked(self) -> tuple[str, dict]:
        """(path, query) of an allowed request; an HTTPError otherwise."""
        app = self.server.app
        for name in ("Host", "Content-Length"):
            # Two of them may be read differently by a proxy in front: which one was meant is not for us to guess.
            if len(self.headers.get_all(name, [])) > 1:
                raise HTTPError(400, f"more than one {name} header")
        host = self.headers.get("Host", "")
        if app.allowed_hosts and host.lower() not in app.allowed_hosts:
            raise HTTPError(403, f"Host {host!r} is not served here; open the URL that `charlm serve` printed")
        origin = self.headers.get("Origin")
        if origin is not None and origin.lower() != f"http://{host.lower()}":
            raise HTTPError(403, "cross-site request refused: the Origin is not this server")
        url = urlsplit(self.path)
        query = parse_qs(url.query, keep_blank_values=True)
        if app.token is not None:
            given = query.get("token", [""])[-1]
            if not hmac.compare_digest(given.encode(), app.token.encode()):
                raise HTTPError(403, "missing or wrong token: open the URL that `charlm serve` printed, with ?token=")
        return url.path, query

    def _same_origin(self, stream: bool) -> None:
        """A POST's defence, for every request that runs git, DVC or a model: a page on another site can make a
        browser send a GET (an <img>, with no Origin header) or a form POST, but not one with Content-Type:
        application/json, which needs a CORS preflight that this server never grants. EventSource cannot set it:
        its job id is the secret. Sec-Fetch-Site, which browsers add, refuses the rest early."""
        if self.headers.get("Sec-Fetch-Site", "same-origin") != "same-origin":
            raise HTTPError(403, "cross-site request refused: it did not come from this server's page")
        if not stream and self.headers.get_content_type() != "application/json":
            status = 415 if self.command == "POST" else 403
            raise HTTPError(status, "this request must be sent as Content-Type: application/json (as the page does)")

    def _body(self) -> dict:
        length_text = self.headers.get("Content-Length")
        if self.headers.get("Transfer-Encoding") is not None or length_text is None:
            raise HTTPError(411, "a request body needs a Content-Length (chunked bodies are not read)")
        # ASCII digits and nothing else: int() also reads "+48", "48_0" and "١٢", which a proxy in front may read
        # otherwise (or not at all).
        if not re.fullmatch(r"[0-9]{1,18}", length_text.strip(" \t")):
            raise HTTPError(400, "Content-Length is not a whole number of bytes in ASCII digits")
        length = int(length_text)
        limit = self.server.app.limits.body
        if length > limit:
            # A client that is still sending would see the connection reset before the answer: a body of up to
            # a few times the limit is read and dropped first, a larger one is not read at all.
            left = length if length <= 8 * limit else 0
            while left > 0 and (chunk := self.rfile.read(min(left, 1 << 16))):
                left -= len(chunk)
            raise HTTPError(413, f"request body over {limit:,} bytes")
        raw = self.rfile.read(length)
        if len(raw) < length:
            raise HTTPError(400, f"request body ended after {len(raw):,} of its {length:,} bytes")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise HTTPError(400, "request body is not UTF-8") from None
        try:
            body = json.loads(text, parse_constant=lambda c: _bad_constant(c))
        except ValueError as e:
            raise HTTPError(400, f"request body is not valid JSON ({_one_line(str(e), 120)})") from None
        except RecursionError:
            raise HTTPError(400, "request body is not valid JSON here (nested too deeply)") from None
        if not isinstance(body, dict):
            raise HTTPError(400, "request body must be a JSON object")
        return body

    # ---------------------------------------------------------------- routes

    def do_GET(self) -> None:
        self._handle("GET")

    def do_POST(self) -> None:
        self._handle("POST")

    def _route(self, method: str, path: str, query: dict) -> Callable[[dict], Any]:
        """The handler of a route: given the body (an empty dict for a GET), it returns the JSON answer, or None
        once it has answered itself (an event stream)."""
        app = self.server.app
        parts = path.split("/")
        job = parts[3] if len(parts) == 5 and parts[:3] == ["", "api", "jobs"] else None
        routes: dict[tuple[str, str], Callable[[dict], Any]] = {
            ("GET", "/api/models"): lambda _: app.list_models(query),
            ("GET", "/api/model"): lambda _: app.model_row(query),
            ("GET", "/api/test-item"): lambda _: app.test_item(query),
            ("GET", "/api/curves"): lambda _: app.curves(query),
            ("GET", "/api/hardest"): lambda _: app.hardest(query),
            ("POST", "/api/generate"): app.generate,
            ("POST", "/api/score"): app.score,
            ("POST", "/api/activations"): app.activations,
            ("POST", "/api/units"): app.units,
            ("POST", "/api/span-units"): app.span_units,
        }
        routes.update(runs.routes(app.runs, self, path, query))  # the Run part: charlm/apps/serve/runs.py
        if job is not None:
            routes[("GET", f"/api/jobs/{job}/events")] = lambda _: self._events(job)
            routes[("POST", f"/api/jobs/{job}/stop")] = lambda _: app.stop(job)
        handler = routes.get((method, path))
        if handler is None:
            allowed = [m for m, p in routes if p == path]
            if allowed:
                raise HTTPError(405, f"{path} takes {allowed[0]}, not {method}")
            raise HTTPError(404, f"no such page or API: {path}")
        return handler

    def _handle(self, method: str) -> None:
        path = urlsplit(self.path).path
        try:
            path, query = self._checked()
            if path in ("/", "/favicon.ico") or path.startswith("/page/"):
                if method != "GET":
                    raise HTTPError(405, f"{path} takes GET, not {method}")
                return self._page({"/": "index.html", "/favicon.ico": "icon.svg"}.get(path, path[len("/page/") :]))
            handler = self._route(method, path, query)
            # The model list as computed costs nothing; in a repository, computing it runs git and DVC.
            if not (path == "/api/models" and not _refresh(query) and self.server.app.catalog.free()):
                self._same_origin(stream=path.endswith("/events"))
            body = self._body() if method == "POST" else {}
            self.server.deadlines.done(self.connection)  # the request is in: what follows may take its time
            answer = handler(body)
            if answer is not None:
                self._json(200, answer)
        except HTTPError as e:
            with contextlib.suppress(OSError):  # the client may be gone already: nothing to tell it
                self._error(e.status, str(e))
        except (ConnectionError, TimeoutError):
            pass  # the client went away, or sent or read nothing for request_s
        except Exception as e:  # a bug must cost one request, not the server; the line says what broke
            print(
                f"charlm serve: error: {method} {path}: {type(e).__name__}: {_one_line(str(e), 200)}", file=sys.stderr
            )
            with contextlib.suppress(OSError):
                self._error(500, f"internal error ({type(e).__name__}: {_one_line(str(e), 200)})")

    def _page(self, name: str) -> None:
        content_type = PAGE_FILES.get(name)
        if content_type is None:
            raise HTTPError(404, f"no such page file: {name!r}")
        try:
            data = (PAGE / name).read_bytes()
        except OSError:
            raise HTTPError(404, f"the page is not installed here (charlm/apps/serve/page/{name} is missing)") from None
        token = self.server.app.token
        if name == "index.html" and token:
            # The page's own script and style are requests too, and CSP allows no inline script that could add the
            # token to them: it goes into their URLs here (a URL-safe string, so safe in an attribute).
            for asset in (f"/page/{file}" for file in PAGE_FILES):
                data = data.replace(f'"{asset}"'.encode(), f'"{asset}?token={token}"'.encode())
        self._headers(200, content_type, len(data))
        self.wfile.write(data)

    def _events(self, job_id: str) -> None:
        app = self.server.app
        job = app.jobs.claim(job_id)
        if job is None:
            raise HTTPError(404, f"unknown job {job_id!r}, or its events were already read")
        try:
            self.close_connection = True
            self._headers(200, "text/event-stream; charset=utf-8", None)

            writer = EventWriter(self.wfile)
            try:
                run(job, writer.send, writer.flush)
            except OSError:
                return  # the client went away: the generation ends here, and `finally` frees its slot
            except Exception as e:
                with contextlib.suppress(OSError):
                    writer.send("error", {"error": _one_line(f"generation failed: {type(e).__name__}: {e}")})
        finally:
            app.jobs.finish(job)
            if app.jobs.running() == 0:
                give_back_memory()


class EventWriter:
    """Server-Sent Events onto a connection. A write per generated position would cost a system call and a wake-up
    of the reader per character: pieces wait for `flush()`, which `jobs.run` calls after each batch (the first
    character alone), while every other event goes out at once."""

    def __init__(self, out):
        self.out, self.pending = out, []

    def send(self, event: str, data: dict) -> None:
        payload = json.dumps(data, ensure_ascii=False, allow_nan=False)
        self.pending.append(f"event: {event}\ndata: {payload}\n\n".encode())
        if event != "piece":
            self.flush()

    def flush(self) -> None:
        if self.pending:
            self.out.write(b"".join(self.pending))
            self.out.flush()
            self.pending.clear()


def _bad_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


class Deadlines:
    """Closes a connection that has not sent a whole request within `seconds`. The socket timeout bounds each read,
    not the request: a client that sends a byte every few seconds would otherwise hold its thread for ever."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self._due: dict[socket.socket, float] = {}
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        threading.Thread(target=self._run, name="charlm-deadlines", daemon=True).start()

    def start(self, sock: socket.socket) -> None:
        with self._lock:
            self._due[sock] = time.monotonic() + self.seconds

    def done(self, sock: socket.socket) -> None:
        with self._lock:
            self._due.pop(sock, None)

    def stop(self) -> None:
        self._stopped.set()

    def _run(self) -> None:
        while not self._stopped.wait(min(0.5, self.seconds / 4)):
            now = time.monotonic()
            with self._lock:
                late = [sock for sock, due in self._due.items() if due <= now]
                for sock in late:
                    del self._due[sock]
            for sock in late:  # its handler's read returns at once, with nothing: the handler ends
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)


class Server(ThreadingHTTPServer):
    daemon_threads = True  # a stream still open at Ctrl-C must not keep the process alive
    request_queue_size = 64  # the default backlog of 5 would refuse a burst of page loads and streams
    # A restart must not wait for the last run's connections in TIME_WAIT. On Linux this still refuses a port that
    # another socket listens on (that would take SO_REUSEPORT), so two servers never share one.
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], app: App):
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        self.app, self.deadlines = app, Deadlines(app.limits.request_s)  # before binding: a failed bind closes it
        super().__init__(address, Handler)
        host, port = str(self.server_address[0]), self.server_address[1]
        shown = f"[{host}]" if ":" in host else host
        if is_loopback(address[0]):  # any 127.0.0.0/8 address, and the names a browser uses for loopback
            app.allowed_hosts = {f"{name}:{port}" for name in (shown, "127.0.0.1", "localhost", "[::1]")}
        elif address[0] in ("0.0.0.0", "::", ""):
            app.allowed_hosts = set()  # any name may reach a wildcard bind; the token is what admits a request
        else:
            app.allowed_hosts = {f"{shown.lower()}:{port}"}
        if port == 80:  # a browser leaves the default port out of Host and Origin
            app.allowed_hosts |= {h.rsplit(":", 1)[0] for h in app.allowed_hosts}

    def get_request(self):
        try:
            return super().get_request()
        except OSError as e:
            # Out of file descriptors, the listening socket stays readable: retrying at once would spin a core
            # until a connection closes (the deadlines close idle ones).
            if e.errno in (errno.EMFILE, errno.ENFILE):
                time.sleep(0.05)
            raise

    def handle_error(self, request, client_address) -> None:
        # socketserver prints a traceback per failed connection: a client that went away is no error, and
        # anything else gets one line.
        e = sys.exc_info()[1]
        if not isinstance(e, (ConnectionError, TimeoutError)):
            print(f"charlm serve: error: {type(e).__name__}: {_one_line(str(e), 200)}", file=sys.stderr)

    def server_close(self) -> None:
        super().server_close()
        self.deadlines.stop()

    def url(self) -> str:
        host, port = str(self.server_address[0]), self.server_address[1]
        shown = f"[{host}]" if ":" in host else host
        token = f"?token={self.app.token}" if self.app.token else ""
        return f"http://{shown}:{port}/{token}"


def make_server(
    files: list[str],
    host: str = "127.0.0.1",
    port: int = 8000,
    device: str = "auto",
    limits: Limits = Limits(),
    read_only: bool = True,
) -> Server:
    """Bind the server (not yet serving); a port in use, or a --model file that is not there, is a CharlmError.

    A token guards every request beyond loopback, and on loopback too once the Run part is on: it starts work as
    this user, which any local process could otherwise ask for (a page's own checks stop only browsers)."""
    for name in files:
        if not Path(name).exists():
            raise CharlmError(f"--model {name}: no such file")
        if not Path(name).is_file():  # a folder, or a pipe that would block the first request for ever
            raise CharlmError(f"--model {name}: not a regular file (a folder, a pipe or a device)")
    # Beyond loopback the Run part is always read-only: there the token guards reading, not queueing work here.
    read_only = read_only or not is_loopback(host)
    token = None if is_loopback(host) and read_only else secrets.token_urlsafe(24)
    app = App(files, pick_device(device, "--device"), limits, token, read_only)
    try:
        return Server((host, port), app)
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            raise CharlmError(f"port {port} is in use; pick another with --port (or --port 0)") from None
        raise CharlmError(f"cannot listen on {host}:{port} ({e.strerror or e}); check --host and --port") from None


@functools.cache
def _glibc() -> Any:
    """The C library, loaded once, for its malloc calls (glibc's; elsewhere they are missing)."""
    import ctypes

    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def give_back_memory() -> None:
    """Return the malloc arenas' free pages to the system once no generation runs: their high-water mark, set while
    16 generations allocated at once, otherwise stays in the server's memory. glibc only; elsewhere a no-op."""
    with contextlib.suppress(AttributeError):
        _glibc().malloc_trim(0)


def few_malloc_arenas() -> None:
    """Each request runs on its own thread, and glibc gives each new thread that allocates its own malloc arena
    (up to 8 per core), which keeps the memory it once held: after a load test of 16 clients the server's memory
    stayed tens of MB above where it started (bench/serve_speed.py). Two arenas serve a few threads as fast.
    Linux with glibc only; elsewhere a no-op."""
    with contextlib.suppress(AttributeError):
        _glibc().mallopt(-8, 2)  # M_ARENA_MAX, before the first request thread starts


def serve(files: list[str], host: str, port: int, device: str, read_only: bool = True) -> None:
    """`charlm serve`: print the URL, serve until Ctrl-C."""
    import warnings

    # A prompt's unseen characters read as <unk>, which the page can show; the warning would only fill the log.
    warnings.filterwarnings("ignore", message=r"prompt .* not in the vocabulary")
    few_malloc_arenas()
    server = make_server(files, host, port, device, read_only=read_only)
    if server.app.token and not is_loopback(host):
        print(
            f"charlm: warning: serving on {host}, reachable from other machines; every request needs the token "
            "in the URL below",
            file=sys.stderr,
        )
    elif server.app.token:
        print("charlm: --run: every request needs the token in the URL below (open that URL)", file=sys.stderr)
    print(f"charlm: serving {server.url()} (Ctrl-C to stop)", flush=True)
    try:
        server.serve_forever()
    finally:
        server.server_close()
