"""Stateful, batched text generation: feed each prompt once, then one step per character.

Every row of the batch (one sample) has its own temperature (0 = greedy). Logits are shifted by their max before
scaling, so any temperature is numerically safe. <pad> and <unk> are never emitted.
"""

from __future__ import annotations

import contextlib
import functools
import re
import threading
import warnings
from collections.abc import Callable, Iterable, Iterator

import torch

from charlm.core.model import CharRNN
from charlm.core.vocab import EOS_ID, PAD_ID, UNK_ID, Vocab


def filter_top(z: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Set logits outside the top-k and outside the top-p nucleus to -inf (at least one token survives)."""
    if 0 < top_k < z.size(-1):
        kth = torch.topk(z, top_k, dim=-1).values[..., -1:]
        z = z.masked_fill(z < kth, float("-inf"))
    if top_p < 1.0:
        sorted_z, order = torch.sort(z, dim=-1, descending=True)
        probs = torch.softmax(sorted_z, dim=-1)
        # Drop a token when the tokens ranked above it already hold top_p of the mass.
        drop_sorted = (probs.cumsum(-1) - probs) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        z = z.masked_fill(drop, float("-inf"))
    return z


@functools.cache
def _never(device: torch.device) -> torch.Tensor:
    return torch.tensor([PAD_ID, UNK_ID], device=device)


class Sampler:
    """Draws one token per row from next-token logits. Built once per generation, called once per character:
    what depends only on the temperatures is worked out here, so a call launches as few kernels as it can.

    temperature (batch,): 0 means argmax. Logits are shifted by their max before scaling, so any temperature is
    numerically safe. <pad> and <unk> are never drawn.
    """

    def __init__(
        self, temperature: torch.Tensor, top_k: int = 0, top_p: float = 1.0, generator: torch.Generator | None = None
    ):
        self.top_k, self.top_p, self.generator = top_k, top_p, generator
        self.inverse_t = 1.0 / temperature.float().clamp_min(1e-6)[:, None]
        self.drawn_rows = temperature > 0
        self.any_greedy, self.any_drawn = (not bool(self.drawn_rows.all())), bool(self.drawn_rows.any())

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        logits = logits.float().index_fill(-1, _never(logits.device), float("-inf"))
        if not self.any_drawn:
            return logits.argmax(-1)
        z = (logits - logits.max(-1, keepdim=True).values).mul_(self.inverse_t)  # max is 0: exp() cannot overflow
        z = filter_top(z, self.top_k, self.top_p)
        # Inverse-CDF draw, one uniform per row: torch.multinomial draws one exponential per vocabulary entry and
        # checks its input, which was most of the sampling time at 64 rows. The CDF is in float64 so that the
        # uniform, scaled by the row's total, lands past its last entry only with odds of about 1e-16 (clamped).
        cdf = torch.softmax(z, dim=-1, dtype=torch.float64).cumsum_(-1)
        u = torch.rand(cdf.size(0), 1, dtype=torch.float64, device=cdf.device, generator=self.generator)
        drawn = torch.searchsorted(cdf, u.mul_(cdf[:, -1:]), right=True)[:, 0].clamp_max_(cdf.size(-1) - 1)
        return torch.where(self.drawn_rows, drawn, logits.argmax(-1)) if self.any_greedy else drawn


def encode_prompt(vocab: Vocab, prompt: str) -> list[int]:
    """<eos> then the prompt: generation starts where an item starts. Unseen characters become <unk>."""
    unseen = vocab.unknown(prompt)
    if unseen:
        shown = prompt if len(prompt) <= 60 else prompt[:50] + "..."  # a 5,000-character prompt is not echoed
        listed = "".join(unseen) if len(unseen) <= 60 else "".join(unseen[:50]) + "..."
        warnings.warn(
            f"prompt {shown!r}: characters {listed!r} are not in the vocabulary; they are read as <unk>", stacklevel=2
        )
    return [EOS_ID] + vocab.ids(prompt)


# Up to this many CPU rows (samples generated at once), one-character steps are dominated by per-call
# overhead: an LSTM steps through its written-out cell (CharRNN.stepper), and nn's other cells and priming run
# with oneDNN off. Above it, an LSTM steps through nn.LSTM with oneDNN on. The crossover was measured
# (BENCHMARKS.md, generation section): the written-out step wins at few rows and neither wins clearly at many;
# for a GRU the switch hardly matters.
FEW_ROWS = 32


def few_cpu_rows(device: torch.device, batch: int) -> bool:
    return device.type == "cpu" and batch <= FEW_ROWS


# oneDNN's switch is process-wide, and generations can overlap (the playground's jobs, a job's several models
# stepped in turn): they share one hold on it, and the last to finish puts it back, so none restores it under
# another one that is still stepping.
_backend_lock = threading.Lock()
_holders = 0
_saved_onednn = True


@contextlib.contextmanager
def few_rows_backend(device: torch.device, batch: int):
    """Turn oneDNN off while generating a few rows on CPU, and restore the setting afterwards."""
    global _holders, _saved_onednn
    if not few_cpu_rows(device, batch):
        yield
        return
    with _backend_lock:
        if _holders == 0:
            _saved_onednn = bool(torch.backends.mkldnn.enabled)
            torch.backends.mkldnn.enabled = False  # type: ignore[assignment]  # torch's switch; its stub types the descriptor
        _holders += 1
    try:
        yield
    finally:
        with _backend_lock:
            _holders -= 1
            if _holders == 0:
                torch.backends.mkldnn.enabled = _saved_onednn  # type: ignore[assignment]


@torch.no_grad()
def token_steps(
    model: CharRNN,
    vocab: Vocab,
    prompts: list[str],
    temperatures: list[float],
    length: int,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    stop_at_eos: bool = True,
    observe: Callable[[torch.Tensor, list[int]], None] | None = None,
) -> Iterator[list[int | None]]:
    """Yield, for each generated position, one token id per row (None once a row has stopped).

    Rows are the pairs prompt x temperature, in that order. Memory is O(batch), whatever the length.
    observe(logits, tokens), if given, sees each position's next-token logits (the model's own, before any
    temperature or filter) and the tokens drawn from them, just before they are yielded: the playground colours
    what it streams by them.
    """
    device = model.head.weight.device
    pairs = [(p, t) for p in prompts for t in temperatures]
    if not pairs or length <= 0:
        return
    encoded = {p: encode_prompt(vocab, p) for p in dict.fromkeys(prompts)}
    temps = torch.tensor([t for _, t in pairs], dtype=torch.float32, device=device)
    draw = Sampler(temps, top_k, top_p, torch.Generator(device=device).manual_seed(seed))
    alive = [True] * len(pairs)
    with few_rows_backend(device, len(pairs)):
        logits, state = model.prime([encoded[p] for p, _ in pairs])
        step = model.stepper() if few_cpu_rows(device, len(pairs)) else model.step
        for _ in range(length):
            token = draw(logits)
            # The stopped rows are tracked on the host, from the one copy of the tokens that is made anyway:
            # on CUDA each device-side check would be one more sync per character.
            drawn = token.tolist()
            if observe is not None:
                observe(logits, drawn)
            yield [t if on else None for t, on in zip(drawn, alive, strict=True)]
            if stop_at_eos:
                alive = [on and t != EOS_ID for t, on in zip(drawn, alive, strict=True)]
                if not any(alive):
                    return
            logits, state = step(token, state)


# A word is a run of letters (any script); digits, punctuation and spaces separate words.
WORD = re.compile(r"[^\W\d_]+")


def words_in(lines: Iterable[str]) -> set[str]:
    """Every distinct word of a text given line by line (case kept: "apple" is not "Apple")."""
    known: set[str] = set()
    for line in lines:
        known.update(WORD.findall(line))
    return known


def generated_words(record: dict) -> list[str]:
    """The words of a sample that hold generated characters: words wholly inside the prompt are not the model's,
    and a last word cut off by the length limit (not by <eos>) is not a whole word."""
    text, start = record["text"], len(record["prompt"])
    words = [m for m in WORD.finditer(text) if m.end() > start]
    if words and not record["stopped_at_eos"] and words[-1].end() == len(text):
        words.pop()
    return [m.group() for m in words]


def known_word_share(records: Iterable[dict], known: set[str]) -> tuple[float | None, int]:
    """(share of the samples' generated words found in `known`, their number); None when there are none."""
    words = [w for r in records for w in generated_words(r)]
    return (sum(w in known for w in words) / len(words) if words else None), len(words)


def text_pieces(
    steps: Iterable[list[int | None]], vocab: Vocab, stop_at_eos: bool = True
) -> Iterator[list[str | None]]:
    """The one decoding of generated tokens, for the stages, the CLI and the server: for each step of
    `token_steps`, the text it adds to each row, or None once the row has stopped (the <eos> that stops a row
    adds None too). Past an <eos> that does not stop, the <eos> reads as a newline."""
    symbols = [vocab.decode([i]) for i in range(len(vocab))]
    for step in steps:
        yield [None if t is None or (stop_at_eos and t == EOS_ID) else symbols[t] for t in step]


def generate(
    model: CharRNN, vocab: Vocab, prompts: list[str], temperatures: list[float], length: int, **kwargs
) -> list[dict]:
    """All samples as records {prompt, temperature, text, stopped_at_eos}."""
    pairs = [(p, t) for p in prompts for t in temperatures]
    texts, stopped = [[p] for p, _ in pairs], [False] * len(pairs)
    stop = kwargs.get("stop_at_eos", True)
    for step in text_pieces(token_steps(model, vocab, prompts, temperatures, length, **kwargs), vocab, stop):
        for i, piece in enumerate(step):
            if piece is None:
                stopped[i] = True
            else:
                texts[i].append(piece)
    return [
        {"prompt": p, "temperature": t, "text": "".join(text), "stopped_at_eos": s}
        for (p, t), text, s in zip(pairs, texts, stopped, strict=True)
    ]
