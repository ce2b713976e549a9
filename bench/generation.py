"""Section 4: generation throughput of `charlm.sampling.stream` against the lesson's two styles (bench/lesson.py:
stateful steps, and the O(n²) prefix re-run), and the oneDNN on/off crossover that `single_stream_backend` encodes."""
from __future__ import annotations

import contextlib

import torch

import charlm.sampling as sampling
from bench import lesson
from bench.harness import CUDA, Case, Table, best_of, measure, onednn, ratio_stat, shape_name
from charlm.model import CharRNN

SHAPES = [(1, 256, 32), (2, 512, 32)]  # layers, hidden, embedding
STREAMS = (1, 64)
CROSSOVER_SHAPES = [(1, 256, 32), (2, 256, 32), (2, 512, 32)]
CROSSOVER_STREAMS = (1, 4, 16, 32, 64)
PROMPT, TEMPERATURE = "The ", 0.8


@contextlib.contextmanager
def forced_backend():
    """Make charlm.sampling.stream use whatever torch.backends.mkldnn.enabled is set to (no automatic choice)."""
    original = sampling.single_stream_backend
    sampling.single_stream_backend = lambda device, batch: contextlib.nullcontext()
    try:
        yield
    finally:
        sampling.single_stream_backend = original


def shipped_threshold() -> int:
    """The batch size up to which charlm.sampling.single_stream_backend turns oneDNN off (probed, not assumed)."""
    last_off = 0
    for batch in range(1, 129):
        with onednn(True), sampling.single_stream_backend(torch.device("cpu"), batch):
            if not torch.backends.mkldnn.enabled:
                last_off = batch
    return last_off


def charlm_unit(model, vocab, batch: int, length: int):
    """One call of charlm.sampling.stream (looked up at call time, so that forced_backend applies)."""
    def unit():
        for _ in sampling.stream(model, vocab, [PROMPT] * batch, [TEMPERATURE], length, seed=0, stop_at_eos=False):
            pass
        return batch * length
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
                  ["model", "streams", "device", "charlm `stream` (as shipped)", "lesson: stateful steps (oneDNN on)",
                   "lesson: prefix re-run", "fastest", "charlm ÷ lesson stateful"])
    t_x = Table("4b. charlm generation, oneDNN on vs off (CPU), chars/s",
                ["model", "streams", "oneDNN on", "oneDNN off", "on ÷ off", "faster",
                 "`single_stream_backend` picks", "right choice?"])
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
    for layers, hidden, emb in CROSSOVER_SHAPES:
        name = shape_name(layers, hidden, emb)
        torch.manual_seed(0)
        model = CharRNN(len(vocab), "lstm", hidden, layers, 0.0, emb).eval()
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
    t_cmp.notes += [
        f"Random weights, vocabulary of the AG News data ({len(vocab)} symbols), prompt {PROMPT!r}, "
        f"temperature {TEMPERATURE}; {bud.gen_length} characters per stream per call for the stateful methods; the "
        f"prefix re-run (Recipe A, O(n²)) generates n characters per call, so its rate falls as n grows.",
        "charlm `stream` is `charlm.sampling.stream` as shipped (its `single_stream_backend` picks oneDNN per batch); "
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
        "`charlm.sampling.stream` with its automatic choice disabled, so the flag set here is what runs.",
        f"`single_stream_backend` as shipped turns oneDNN off for batch ≤ {threshold} on CPU.",
        "Observed: " + "; ".join(summary) + ".",
    ]
    return [t_cmp, t_x]
