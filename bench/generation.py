"""Section 4: generation throughput of `charlm.core.sampling.token_steps` against the lesson's two styles (bench/lesson.py:
stateful steps, and the O(n²) prefix re-run), the oneDNN on/off crossover that `few_rows_backend` encodes for
the cells that step through nn, and the written-out LSTM step of `CharRNN.stepper` against nn.LSTM's."""
from __future__ import annotations

import contextlib

import torch

import charlm.core.sampling as sampling
from bench import lesson
from bench.harness import CUDA, Case, Table, best_of, measure, onednn, ratio_stat, shape_name
from charlm.core.model import CharRNN

SHAPES = [(1, 256, 32), (2, 256, 32), (2, 512, 32)]  # layers, hidden, embedding
STREAMS = (1, 64)
CROSSOVER_CELL = "gru"  # an LSTM steps through CharRNN.stepper on a CPU, which oneDNN does not touch
CROSSOVER_STREAMS = (1, 4, 16, 32, 64)
STEP_STREAMS = (1, 4, 16, 64)
STEPS_PER_UNIT = 100
PROMPT, TEMPERATURE = "The ", 0.8


@contextlib.contextmanager
def forced_backend():
    """Make charlm.core.sampling.token_steps use whatever torch.backends.mkldnn.enabled is set to (no automatic choice)."""
    original = sampling.few_rows_backend
    sampling.few_rows_backend = lambda device, batch: contextlib.nullcontext()
    try:
        yield
    finally:
        sampling.few_rows_backend = original


def shipped_threshold() -> int:
    """The batch size up to which charlm.core.sampling.few_rows_backend turns oneDNN off (probed, not assumed)."""
    last_off = 0
    for batch in range(1, 129):
        with onednn(True), sampling.few_rows_backend(torch.device("cpu"), batch):
            if not torch.backends.mkldnn.enabled:
                last_off = batch
    return last_off


def charlm_unit(model, vocab, batch: int, length: int):
    """One call of charlm.core.sampling.token_steps (looked up at call time, so that forced_backend applies)."""
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


def lesson_unit(fn, model, vocab, batch: int, length: int):
    gen = torch.Generator().manual_seed(0)

    def unit():
        fn(model, vocab, [PROMPT] * batch, length, TEMPERATURE, gen)
        return batch * length
    return unit


def lesson_cuda_unit(model, vocab, batch: int, length: int):
    """lesson.generate_stateful with its tensors on CUDA."""
    gen = torch.Generator(device=CUDA).manual_seed(0)

    @torch.no_grad()
    def unit():
        out, state = model(torch.tensor([vocab.ids(PROMPT)] * batch, device=CUDA))
        texts = [PROMPT] * batch
        for _ in range(length):
            nc = torch.multinomial(out[:, -1].div(TEMPERATURE).exp(), 1, generator=gen)
            texts = [t + vocab.itos[i] for t, i in zip(texts, nc[:, 0].tolist(), strict=True)]
            out, state = model(nc, state)
        return batch * length
    return unit


def section(ctx) -> list[Table]:
    bud = ctx.budget
    vocab = ctx.data().vocab()
    t_cmp = Table("4a. Generation, chars/s (all streams together)",
                  ["model", "streams", "device", "charlm `token_steps` (as shipped)", "lesson: stateful steps (oneDNN on)",
                   "lesson: prefix re-run", "fastest", "charlm ÷ lesson stateful"])
    t_x = Table("4b. charlm generation through nn (a GRU), oneDNN on vs off (CPU), chars/s",
                ["model", "streams", "oneDNN on", "oneDNN off", "on ÷ off", "faster",
                 "`few_rows_backend` picks", "right choice?"])
    label = {"charlm": "charlm", "lesson-stateful": "lesson stateful", "lesson-prefix": "lesson prefix"}
    threshold = shipped_threshold()
    for layers, hidden, emb in SHAPES:
        name = shape_name(layers, hidden, emb)
        torch.manual_seed(0)
        model = CharRNN(len(vocab), "lstm", hidden, layers, 0.0, emb).eval()
        for batch in STREAMS:
            ctx.log(f"  generation {name}, {batch} stream(s)")
            plen = bud.prefix_single if batch == 1 else bud.prefix_batch
            cases = [Case("charlm", charlm_unit(model, vocab, batch, bud.gen_length), mkldnn=True),
                     Case("lesson-stateful", lesson_unit(lesson.generate_stateful, model, vocab, batch,
                                                         bud.gen_length), mkldnn=True),
                     Case("lesson-prefix", lesson_unit(lesson.generate_prefix, model, vocab, batch, plen),
                          mkldnn=True, warmup_units=0,
                          warm=lesson_unit(lesson.generate_prefix, model, vocab, batch, 5))]
            r = measure(cases, bud.gen_rounds, bud.gen_seconds, log=ctx.log)
            t_cmp.add(name, batch, "cpu", r["charlm"].fmt(), r["lesson-stateful"].fmt(),
                      f"{r['lesson-prefix'].fmt()} (n = {plen})", label[best_of(r)],
                      ratio_stat(r["charlm"], r["lesson-stateful"]).fmt("×", 2))
        if ctx.cuda:
            cmodel = CharRNN(len(vocab), "lstm", hidden, layers, 0.0, emb).to(CUDA).eval()
            for batch in STREAMS:
                cases = [Case("charlm", charlm_unit(cmodel, vocab, batch, bud.gen_length), CUDA),
                         Case("lesson-stateful", lesson_cuda_unit(cmodel, vocab, batch, bud.gen_length), CUDA)]
                r = measure(cases, bud.gen_rounds, bud.gen_seconds, log=ctx.log)
                t_cmp.add(name, batch, CUDA, r["charlm"].fmt(), r["lesson-stateful"].fmt(), "—",
                          label[best_of(r)],
                          ratio_stat(r["charlm"], r["lesson-stateful"]).fmt("×", 2))
    crossover = {}
    for layers, hidden, emb in SHAPES:
        name = f"{shape_name(layers, hidden, emb)} {CROSSOVER_CELL}"
        torch.manual_seed(0)
        model = CharRNN(len(vocab), CROSSOVER_CELL, hidden, layers, 0.0, emb).eval()
        ctx.log(f"  oneDNN crossover {name}")
        with forced_backend():
            for batch in CROSSOVER_STREAMS:
                cases = [Case("on", charlm_unit(model, vocab, batch, bud.gen_length), mkldnn=True),
                         Case("off", charlm_unit(model, vocab, batch, bud.gen_length), mkldnn=False)]
                r = measure(cases, bud.gen_rounds, bud.gen_seconds, log=ctx.log)
                ratio = ratio_stat(r["on"], r["off"])
                faster = "on" if ratio.median >= 1 else "off"
                picks = "off" if batch <= threshold else "on"
                t_x.add(name, batch, r["on"].fmt(), r["off"].fmt(), ratio.fmt("×", 2), f"oneDNN {faster}",
                        f"oneDNN {picks}", "yes" if picks == faster else "**no**")
                crossover.setdefault(name, []).append((batch, ratio.median))
    t_step = Table("4c. One LSTM step: `CharRNN.stepper` (written out) vs nn.LSTM (`CharRNN.step`), CPU, chars/s",
                   ["model", "streams", "nn.LSTM, oneDNN on", "nn.LSTM, oneDNN off", "written out",
                    "written out ÷ best nn.LSTM"])
    for layers, hidden, emb in SHAPES:
        name = shape_name(layers, hidden, emb)
        torch.manual_seed(0)
        model = CharRNN(len(vocab), "lstm", hidden, layers, 0.0, emb).eval()
        ctx.log(f"  stepper {name}")
        for batch in STEP_STREAMS:
            cases = [Case("on", step_unit(model.step, model, batch), mkldnn=True),
                     Case("off", step_unit(model.step, model, batch), mkldnn=False),
                     Case("stepper", step_unit(model.stepper(), model, batch), mkldnn=True)]
            r = measure(cases, bud.gen_rounds, bud.gen_seconds, log=ctx.log)
            best_nn = r["on"] if r["on"].median >= r["off"].median else r["off"]
            t_step.add(name, batch, r["on"].fmt(), r["off"].fmt(), r["stepper"].fmt(),
                       ratio_stat(r["stepper"], best_nn).fmt("×", 2))
    t_step.notes += [
        f"{STEPS_PER_UNIT} steps per call from a primed state, the sampler left out; the same rounds and budgets as "
        "4a. The written-out step folds layer 0's input projection into the embedding table; oneDNN does not "
        "touch it. `token_steps` uses it for an LSTM in eval mode on a CPU, up to `charlm.core.sampling.FEW_ROWS` streams.",
    ]
    t_cmp.notes += [
        f"Random weights, vocabulary of the AG News data ({len(vocab)} symbols), prompt {PROMPT!r}, "
        f"temperature {TEMPERATURE}; {bud.gen_length} characters per stream per call for the stateful methods; the "
        f"prefix re-run (Recipe A, O(n²)) generates n characters per call, so its rate falls as n grows.",
        "charlm `token_steps` is `charlm.core.sampling.token_steps` as shipped (its `few_rows_backend` picks oneDNN per batch); "
        "the lesson styles (bench/lesson.py `generate_stateful`, `generate_prefix`) run with torch's default, "
        "oneDNN on.",
        f"{bud.gen_rounds} interleaved rounds of ≥ {bud.gen_seconds:g} s (whole calls) per case after a warm-up call; "
        f"median (min–max); ratios are medians of per-round ratios.",
    ]
    summary = []
    for name, points in crossover.items():
        on_wins = [b for b, x in points if x >= 1]
        off_wins = [b for b, x in points if x < 1]
        summary.append(f"{name}: oneDNN faster at {on_wins or 'none'}, native faster at {off_wins or 'none'}")
    t_x.notes += [
        f"A {CROSSOVER_CELL.upper()} (GRU and RNN cells step through nn; an LSTM through 4c's written-out step, "
        "which oneDNN does not touch). `charlm.core.sampling.token_steps` with its automatic choice disabled, so the flag set "
        "here is what runs.",
        f"`few_rows_backend` as shipped turns oneDNN off for batch ≤ {threshold} on CPU.",
        "Observed: " + "; ".join(summary) + ".",
    ]
    return [t_cmp, t_x, t_step]
