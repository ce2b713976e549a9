"""Section 4: generation throughput of `charlm.core.sampling.token_steps` against the lesson's two styles
(bench/lesson.py: stateful steps, and the O(n²) prefix re-run), the oneDNN on/off crossover that
`few_rows_backend` encodes for the cells that step through nn, and the written-out LSTM step of
`CharRNN.stepper` against nn.LSTM's."""

from __future__ import annotations

import contextlib
from unittest import mock

import torch

import charlm.core.sampling as sampling
from bench import lesson
from bench.harness import CUDA, Case, Table, best_of, measure, ratio_stat, shape_name
from charlm.core.model import CharRNN

SHAPES = [(1, 256, 32), (2, 256, 32), (2, 512, 32)]  # layers, hidden, embedding
STREAMS = (1, 64)
CROSSOVER_CELL = "gru"  # an LSTM steps through CharRNN.stepper on a CPU, which oneDNN does not touch
CROSSOVER_STREAMS = (1, 4, 16, 32, 64)
STEP_STREAMS = (1, 4, 16, 64)
STEPS_PER_UNIT = 100
PROMPT, TEMPERATURE = "The ", 0.8
LABEL = {"charlm": "charlm", "lesson-stateful": "lesson stateful", "lesson-prefix": "lesson prefix"}


def forced_backend():
    """Make token_steps use whatever torch.backends.mkldnn.enabled is set to (no automatic choice)."""
    return mock.patch.object(sampling, "few_rows_backend", lambda device, batch: contextlib.nullcontext())


def charlm_unit(model, vocab, batch: int, length: int):
    """One call of token_steps (looked up at call time, so that forced_backend applies)."""

    def unit():
        for _ in sampling.token_steps(model, vocab, [PROMPT] * batch, [TEMPERATURE], length, seed=0, stop_at_eos=False):
            pass
        return batch * length

    return unit


def step_unit(step, model, batch: int):
    """STEPS_PER_UNIT one-character steps of `batch` streams through `step` (model.step or model.stepper())."""
    token = torch.randint(3, model.config["vocab_size"], (batch,), generator=torch.Generator().manual_seed(0))
    _, state = model.prime([[1, 5, 6]] * batch)

    @torch.no_grad()
    def unit():
        s = state
        for _ in range(STEPS_PER_UNIT):
            _, s = step(token, s)
        return batch * STEPS_PER_UNIT

    return unit


def lesson_unit(fn, model, vocab, batch: int, length: int, device: str = "cpu"):
    gen = torch.Generator(device=device).manual_seed(0)

    def unit():
        fn(model, vocab, [PROMPT] * batch, length, TEMPERATURE, gen)
        return batch * length

    return unit


def model_of(vocab, cell: str, layers: int, hidden: int, emb: int, device: str = "cpu") -> CharRNN:
    torch.manual_seed(0)
    return CharRNN(len(vocab), cell=cell, hidden=hidden, layers=layers, embedding=emb).to(device).eval()


def comparison_rows(ctx, table: Table, vocab, shape: tuple[int, int, int]) -> None:
    """4a: one shape, CPU and (when there) CUDA."""
    bud, name = ctx.budget, shape_name(*shape)
    model, n = model_of(vocab, "lstm", *shape), bud.gen_length
    for batch in STREAMS:
        ctx.log(f"  generation {name}, {batch} stream(s)")
        plen = bud.prefix_single if batch == 1 else bud.prefix_batch
        prefix = lesson_unit(lesson.generate_prefix, model, vocab, batch, plen)
        warm = lesson_unit(lesson.generate_prefix, model, vocab, batch, 5)  # a full-length call would take long
        cases = [
            Case("charlm", charlm_unit(model, vocab, batch, n), mkldnn=True),
            Case("lesson-stateful", lesson_unit(lesson.generate_stateful, model, vocab, batch, n), mkldnn=True),
            Case("lesson-prefix", prefix, mkldnn=True, warm=warm),
        ]
        r = measure(cases, bud.gen_rounds, bud.gen_seconds, log=ctx.log)
        prefix_rate = f"{r['lesson-prefix'].fmt()} (n = {plen})"
        ratio = ratio_stat(r["charlm"], r["lesson-stateful"]).fmt("×", 2)
        table.add(
            name, batch, "cpu", r["charlm"].fmt(), r["lesson-stateful"].fmt(), prefix_rate, LABEL[best_of(r)], ratio
        )
    if not ctx.cuda:
        return
    model = model_of(vocab, "lstm", *shape, device=CUDA)
    for batch in STREAMS:
        stateful = lesson_unit(lesson.generate_stateful, model, vocab, batch, n, CUDA)
        cases = [Case("charlm", charlm_unit(model, vocab, batch, n), CUDA), Case("lesson-stateful", stateful, CUDA)]
        r = measure(cases, bud.gen_rounds, bud.gen_seconds, log=ctx.log)
        ratio = ratio_stat(r["charlm"], r["lesson-stateful"]).fmt("×", 2)
        table.add(name, batch, CUDA, r["charlm"].fmt(), r["lesson-stateful"].fmt(), "—", LABEL[best_of(r)], ratio)


def crossover_rows(ctx, table: Table, vocab, shape: tuple[int, int, int]) -> str:
    """4b: one shape; returns the summary of where each backend won."""
    name = f"{shape_name(*shape)} {CROSSOVER_CELL}"
    model, n = model_of(vocab, CROSSOVER_CELL, *shape), ctx.budget.gen_length
    ctx.log(f"  oneDNN crossover {name}")
    wins: dict[str, list[int]] = {"on": [], "off": []}
    with forced_backend():
        for batch in CROSSOVER_STREAMS:
            cases = [Case(dnn, charlm_unit(model, vocab, batch, n), mkldnn=dnn == "on") for dnn in ("on", "off")]
            r = measure(cases, ctx.budget.gen_rounds, ctx.budget.gen_seconds, log=ctx.log)
            ratio = ratio_stat(r["on"], r["off"])
            faster = "on" if ratio.median >= 1 else "off"
            picks = "off" if sampling.few_cpu_rows(torch.device("cpu"), batch) else "on"
            verdict = [f"oneDNN {faster}", f"oneDNN {picks}", "yes" if picks == faster else "**no**"]
            table.add(name, batch, r["on"].fmt(), r["off"].fmt(), ratio.fmt("×", 2), *verdict)
            wins[faster].append(batch)
    return f"{name}: oneDNN faster at {wins['on'] or 'none'}, native faster at {wins['off'] or 'none'}"


def stepper_rows(ctx, table: Table, vocab, shape: tuple[int, int, int]) -> None:
    """4c: one shape."""
    model = model_of(vocab, "lstm", *shape)
    ctx.log(f"  stepper {shape_name(*shape)}")
    for batch in STEP_STREAMS:
        cases = [
            Case("on", step_unit(model.step, model, batch), mkldnn=True),
            Case("off", step_unit(model.step, model, batch), mkldnn=False),
            Case("stepper", step_unit(model.stepper(), model, batch), mkldnn=True),
        ]
        r = measure(cases, ctx.budget.gen_rounds, ctx.budget.gen_seconds, log=ctx.log)
        best_nn = r["on"] if r["on"].median >= r["off"].median else r["off"]
        ratio = ratio_stat(r["stepper"], best_nn).fmt("×", 2)
        table.add(shape_name(*shape), batch, r["on"].fmt(), r["off"].fmt(), r["stepper"].fmt(), ratio)


def section(ctx) -> list[Table]:
    bud, vocab = ctx.budget, ctx.data().vocab()
    t_cmp = Table(
        "4a. Generation, chars/s (all streams together)",
        "model | streams | device | charlm `token_steps` (as shipped) | lesson: stateful steps (oneDNN on) | "
        "lesson: prefix re-run | fastest | charlm ÷ lesson stateful",
    )
    t_x = Table(
        "4b. charlm generation through nn (a GRU), oneDNN on vs off (CPU), chars/s",
        "model | streams | oneDNN on | oneDNN off | on ÷ off | faster | `few_rows_backend` picks | right choice?",
    )
    t_step = Table(
        "4c. One LSTM step: `CharRNN.stepper` (written out) vs nn.LSTM (`CharRNN.step`), CPU, chars/s",
        "model | streams | nn.LSTM, oneDNN on | nn.LSTM, oneDNN off | written out | written out ÷ best nn.LSTM",
    )
    for shape in SHAPES:
        comparison_rows(ctx, t_cmp, vocab, shape)
    summary = [crossover_rows(ctx, t_x, vocab, shape) for shape in SHAPES]
    for shape in SHAPES:
        stepper_rows(ctx, t_step, vocab, shape)
    t_step.notes.append(
        f"{STEPS_PER_UNIT} steps per call from a primed state, the sampler left out; the same rounds and budgets as "
        "4a. The written-out step folds layer 0's input projection into the embedding table; oneDNN does not "
        "touch it. `token_steps` uses it for an LSTM in eval mode on a CPU, up to `charlm.core.sampling.FEW_ROWS` "
        "streams."
    )
    t_cmp.notes += [
        f"Random weights, vocabulary of the AG News data ({len(vocab)} symbols), prompt {PROMPT!r}, "
        f"temperature {TEMPERATURE}; {bud.gen_length} characters per stream per call for the stateful methods; the "
        f"prefix re-run (Recipe A, O(n²)) generates n characters per call, so its rate falls as n grows.",
        "charlm `token_steps` is `charlm.core.sampling.token_steps` as shipped (its `few_rows_backend` picks oneDNN "
        "per batch); the lesson styles (bench/lesson.py `generate_stateful`, `generate_prefix`) run with torch's "
        "default, oneDNN on.",
        f"{bud.gen_rounds} interleaved rounds of ≥ {bud.gen_seconds:g} s (whole calls) per case after a warm-up call; "
        f"median (min–max); ratios are medians of per-round ratios.",
    ]
    t_x.notes += [
        f"A {CROSSOVER_CELL.upper()} (GRU and RNN cells step through nn; an LSTM through 4c's written-out step, "
        "which oneDNN does not touch). `charlm.core.sampling.token_steps` with its automatic choice disabled, so the "
        "flag set here is what runs.",
        f"`few_rows_backend` as shipped turns oneDNN off for batch ≤ {sampling.FEW_ROWS} on CPU.",
        "Observed: " + "; ".join(summary) + ".",
    ]
    return [t_cmp, t_x, t_step]
