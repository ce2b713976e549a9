"""Generation jobs: admitted with a bounded number of slots, run by the thread that streams their events.

A job is created by POST /api/generate (its models already loaded, so a bad id fails there) and runs when its
event stream is read: that thread steps the models of the job in turns (Job.turns) and writes each position
(every model's piece and score) as one event, so a client that goes away stops the generation at its next write
and frees the slot at once. A job whose events are never read gives its slot back after `unclaimed_s`.
"""

from __future__ import annotations

import collections
import contextlib
import math
import secrets
import threading
import time
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass, field

import torch

from charlm.core.inspection import step_scores
from charlm.core.sampling import text_pieces, token_steps


@dataclass
class Request:
    prompt: str
    temperature: float
    top_k: int
    top_p: float
    length: int
    seed: int
    stop_at_eos: bool


@dataclass
class Job:
    id: str
    model_ids: list[str]
    loaded: list[tuple]  # (model, vocab, info) per model
    request: Request
    created: float = field(default_factory=time.monotonic)
    stop: threading.Event = field(default_factory=threading.Event)
    claimed: bool = False
    sent: int = 0  # positions streamed so far
    names: list[list[str]] = field(init=False)  # each model's symbols, for its scores' top 5

    def __post_init__(self) -> None:
        self.names = [list(vocab.itos) for _, vocab, _ in self.loaded]

    def turns(self) -> Generator[list[tuple[list[str | None], list[tuple | None]]], None, None]:
        """The positions generated, a turn at a time. A position is the text each model adds (None once it has
        stopped) and what that model's score of it is made of: (its next-character logits, the token drawn), None
        where it adds none; `scored` turns a batch of them into `inspection.step_scores`. The decoding is the one
        `charlm generate` prints, one model at a time with the same seed, so a model's text matches the CLI's byte
        for byte.

        The models take turns instead of stepping in lockstep, where each step of one model would evict the
        others' weights from the caches (10-30% of the rate with four models on a CPU; the longer the turns, the
        less). The first model still generating makes up to CHUNK positions, fewer once its share of ROUND_S has
        passed, and each other one as many, so that a round of turns lasts about ROUND_S and what it made goes out
        then. The first turn is one position: the first character is sent at once."""
        streams = [self._stream(model, vocab) for model, vocab, _ in self.loaded]
        made: list[collections.deque] = [collections.deque() for _ in streams]  # made, not yet yielded
        ended = [False] * len(streams)
        most, seconds = 1, ROUND_S / len(streams)
        while not all(ended) or any(made):
            size = None  # the turn's length, set by the first model still generating
            for m, stream in enumerate(streams):
                if not ended[m]:
                    cells, ended[m] = _take(stream, size or most, None if size else seconds)
                    made[m].extend(cells)
                    if size is None and not ended[m]:
                        size = len(cells)
            # Models still generating have made `size` positions each; one that ended may have made more, kept
            # for the next turn, or fewer, the rest of its column None.
            count = size if size is not None else max(map(len, made))
            turn = []
            for _ in range(count):
                cells = [column.popleft() if column else (None, None) for column in made]
                turn.append(([piece for piece, _ in cells], [drawn for _, drawn in cells]))
            if turn:  # empty when the last model's stream ended with its last position already made
                yield turn
            most = CHUNK

    def _stream(self, model, vocab) -> Iterator[tuple[str | None, tuple | None]]:
        """One model's (piece, (logits, token drawn)) per position; (None, None) for the <eos> that stops it."""
        r, box = self.request, []

        def observe(logits, tokens) -> None:
            # A copy: the model may write its next logits into the same buffer. Kept where the model made it (on
            # CUDA, one copy to the host per batch in `scored`, not one per character).
            box.append((logits[:1].clone(), tokens[0]))

        steps = token_steps(
            model, vocab, [r.prompt], [r.temperature], r.length, r.top_k, r.top_p, r.seed, r.stop_at_eos, observe
        )
        for (piece,) in text_pieces(steps, vocab, r.stop_at_eos):
            drawn = box.pop()
            yield piece, None if piece is None else drawn
            if self.stop.is_set():  # a stop ends the turn too, so it costs at most one step per model
                return

    def scored(self, batch: list[tuple[list[str | None], list[tuple | None]]]) -> list[list[dict | None]]:
        """The scores of a batch of positions from `turns`, per position and model: one `step_scores` call per
        model for the whole batch."""
        out: list[list[dict | None]] = [[None] * len(self.loaded) for _ in batch]
        for m, names in enumerate(self.names):
            rows = [(i, d) for i, (_, drawn) in enumerate(batch) if (d := drawn[m]) is not None]
            if not rows:
                continue
            logits = torch.cat([d[0] for _, d in rows]).to("cpu", torch.float32).numpy()
            for (i, _), score in zip(rows, step_scores(logits, [d[1] for _, d in rows], names), strict=True):
                out[i][m] = score
        return out


# A round of turns, every model's, lasts about ROUND_S: the page shows what it made 25 times a second. A turn is at
# most CHUNK positions (a fast model's bursts stay short).
ROUND_S, CHUNK = 0.04, 64
BATCH_S = 0.02  # positions generated within this are scored and sent together


def _take(stream: Iterator, most: int, seconds: float | None) -> tuple[list, bool]:
    """Up to `most` items of `stream` (at least one, unless it has ended), fewer once `seconds` have passed; and
    whether it has ended."""
    cells: list = []
    end = None if seconds is None else time.monotonic() + seconds
    for cell in stream:
        cells.append(cell)
        if len(cells) >= most or (end is not None and time.monotonic() >= end):
            return cells, False
    return cells, True


class TooMany(Exception):
    pass


class Jobs:
    """The jobs admitted and not yet finished; at most `slots` at a time."""

    def __init__(self, slots: int = 16, unclaimed_s: float = 60.0):
        self.slots, self.unclaimed_s = slots, unclaimed_s
        self._jobs: dict[str, Job] = {}
        self._lock = threading.Lock()

    def _expire(self) -> None:
        now = time.monotonic()
        full = len(self._jobs) >= self.slots
        for job_id, job in list(self._jobs.items()):
            # A job stopped before its stream was opened only keeps its slot while no other job needs it.
            if not job.claimed and (now - job.created > self.unclaimed_s or (full and job.stop.is_set())):
                del self._jobs[job_id]

    def add(self, model_ids: list[str], loaded: list[tuple], request: Request) -> Job:
        with self._lock:
            self._expire()
            if len(self._jobs) >= self.slots:
                raise TooMany(
                    f"too many generations running ({self.slots}); wait for one to finish or stop one, then retry"
                )
            job = Job(secrets.token_hex(16), model_ids, loaded, request)
            self._jobs[job.id] = job
            return job

    def claim(self, job_id: str) -> Job | None:
        """The job, once: its events can be read by one client only."""
        with self._lock:
            job = self._jobs.get(job_id)
            if job is None or job.claimed:
                return None
            job.claimed = True
            return job

    def get(self, job_id: str) -> Job | None:
        with self._lock:
            return self._jobs.get(job_id)

    def finish(self, job: Job) -> None:
        with self._lock:
            self._jobs.pop(job.id, None)

    def running(self) -> int:
        with self._lock:
            return len(self._jobs)


def run(job: Job, send: Callable[[str, dict], None], flush: Callable[[], None] = lambda: None) -> str:
    """Stream a job through `send(event, data)`; return how it ended. `flush()` follows each batch of pieces: a
    sender may hold pieces until then (one write and one wake-up of the reader per batch, not per character). An
    OSError from either (the client went away) ends it at once; the caller frees the slot."""
    send("start", {"seed": job.request.seed, "models": job.model_ids})
    batch: list = []
    last = -math.inf  # so the first turn, one position, goes out at once

    def send_batch() -> None:
        # Scored together: one numpy pass per model for the positions of a BATCH_S window, not one per character.
        for (pieces, _), scores in zip(batch, job.scored(batch), strict=True):
            send("piece", {"pieces": pieces, "scores": scores})
        batch.clear()
        flush()

    with contextlib.closing(job.turns()) as turns:  # closed at once, also when `send` raises
        try:
            for turn in turns:
                if job.stop.is_set():  # a turn cut short by the stop is not sent: its stopped columns read None
                    break
                batch.extend(turn)
                job.sent += len(turn)
                now = time.monotonic()
                if now - last >= BATCH_S:
                    send_batch()
                    last = now
        except OSError:
            raise
        except Exception:
            send_batch()  # what was made before a model failed still goes out, then the error
            raise
    send_batch()
    reason = "stopped" if job.stop.is_set() else "finished"
    send("done", {"reason": reason})
    return reason
