"""Section 5: test-set scoring throughput of `charlm.core.scoring.score_items` (the evaluate stage's protocol),
oneDNN on and off, on the AG News test split."""

from __future__ import annotations

import numpy as np
import torch

from bench.harness import CUDA, Case, Table, measure, ratio_stat, shape_name
from charlm.core.data import item_bounds
from charlm.core.model import CharRNN
from charlm.core.scoring import score_items
from charlm.core.vocab import EOS_ID

SHAPES = [(1, 256, 32), (2, 512, 32)]  # layers, hidden, embedding
BATCHES = (64, 256)


def length_batches(lengths: np.ndarray, batch: int) -> list[np.ndarray]:
    """score_items' own batches: item indices sorted by length, `batch` at a time."""
    order = np.argsort(lengths, kind="stable")
    return [order[i : i + batch] for i in range(0, len(order), batch)]


def strata(lengths: np.ndarray, batch: int, n: int) -> list[list[np.ndarray]]:
    """score_items' batches of the whole split dealt round-robin into `n` strata, so every stratum spans all
    lengths and the strata together are the whole split, each batch once. A partial run starts with the stratum
    whose length mix is closest to the whole split's."""
    batches = length_batches(lengths, batch)
    k = min(n, len(batches))
    cells = [batches[c::k] for c in range(k)]
    return sorted(cells, key=lambda cell: abs(np.mean([lengths[i].mean() for i in cell]) - lengths.mean()))


def padding_efficiency(lengths: np.ndarray, batch: int) -> float:
    """Scored characters ÷ padded positions when score_items pads each length-sorted batch to its longest item."""
    return lengths.sum() / sum(int(lengths[idx].max()) * len(idx) for idx in length_batches(lengths, batch))


def scoring_case(name: str, model, test, starts, lengths, cells, device: str, mkldnn: bool | None) -> Case:
    """Each unit scores the next stratum, batch by batch, through score_items."""
    it = iter(range(10**9))

    def unit():
        chars = 0
        for idx in cells[next(it) % len(cells)]:
            chars += score_items(model, test, starts[idx], lengths[idx], len(idx), torch.device(device))[1]
        return chars

    def warm():
        idx = np.argsort(lengths, kind="stable")[:8]
        score_items(model, test, starts[idx], lengths[idx], 8, torch.device(device))

    return Case(name, unit, device, mkldnn, warm=warm)


def rate(c: Case, n_cells: int) -> str:
    if len(c.rates) == n_cells:
        return f"**{sum(c.amounts) / sum(c.seconds):,.0f}** whole split; strata {c.stat.fmt()}"
    return f"{c.stat.fmt()} ({len(c.rates)} of {n_cells} strata)"


def shape_rows(ctx, tables: list[Table], test: np.ndarray, vocab_size: int, shape: tuple[int, int, int]) -> None:
    bud, name = ctx.budget, shape_name(*shape)
    starts, lengths = item_bounds(test, EOS_ID)
    layers, hidden, emb = shape
    torch.manual_seed(0)
    model = CharRNN(vocab_size, cell="lstm", hidden=hidden, layers=layers, embedding=emb).eval()
    for batch in BATCHES:
        ctx.log(f"  evaluation {name}, batch {batch}")
        cells = strata(lengths, batch, bud.eval_cells)
        cases = [scoring_case(d, model, test, starts, lengths, cells, "cpu", d == "on") for d in ("on", "off")]
        r = measure(cases, min(bud.eval_rounds, len(cells)), 0.0, log=ctx.log, cap_s=bud.eval_cap_seconds)
        ratio = ratio_stat(r["on"], r["off"])
        cells_rates = [rate(cases[0], len(cells)), rate(cases[1], len(cells)), ratio.fmt("×", 2)]
        faster = "oneDNN on" if ratio.median >= 1 else "oneDNN off"
        tables[0].add(name, batch, f"{padding_efficiency(lengths, batch):.0%}", *cells_rates, faster)
        if ctx.cuda:
            cmodel = CharRNN(vocab_size, cell="lstm", hidden=hidden, layers=layers, embedding=emb).to(CUDA).eval()
            cc = scoring_case("cuda", cmodel, test, starts, lengths, cells, CUDA, None)
            measure([cc], len(cases[0].rates), 0.0)  # as many strata as the CPU cases got through
            tables[1].add(name, batch, rate(cc, len(cells)))


def section(ctx) -> list[Table]:
    bud, packed = ctx.budget, ctx.data().packed()
    test = np.asarray(packed.streams["test"])
    tables = [
        Table(
            "5. Test-set scoring throughput of `score_items`, chars/s (CPU)",
            "model | batch | padding efficiency | oneDNN on | oneDNN off | on ÷ off | faster",
        ),
        Table("5b. Test-set scoring throughput on CUDA, chars/s", "model | batch | CUDA"),
    ]
    for shape in SHAPES:
        shape_rows(ctx, tables, test, packed.meta["vocab_size"], shape)
    lengths = item_bounds(test, EOS_ID)[1]
    timed = (
        f"Up to {bud.eval_rounds} strata are timed per case, the one closest to the split's mean length first, "
        if bud.eval_rounds > 1
        else "One stratum is timed per case, the one closest to the split's mean length, "
    )
    tables[0].notes += [
        f"The {len(lengths):,}-item test split ({int(lengths.sum()):,} scored characters), random weights. "
        "score_items sorts items by length and pads each batch to its longest item; padding efficiency = scored "
        "characters ÷ padded positions.",
        f"score_items' own batches are dealt round-robin into {bud.eval_cells} strata (every stratum spans all item "
        f"lengths); each round times one stratum, batch by batch through `score_items`, with oneDNN on and off "
        f"interleaved on the same batches. {timed}and no new stratum is started after {bud.eval_cap_seconds:g} s per "
        f"model and batch size. When all strata are timed, 'whole split' = all scored characters ÷ the summed time "
        f"of every batch, and 'strata' gives the median (min–max) of the per-stratum rates; otherwise the figure "
        f"covers the strata shown.",
    ]
    return tables if ctx.cuda else tables[:1]
