"""Section 1: training-step throughput of charlm's loop against a bare nn.LSTM loop, oneDNN on and off, and
a profile of the gap between the two.

`CharlmLoop` is stages/train.py's training step: the `Run` that `charlm.pipeline.run.build_run` makes (the
`Batches`, the model and the `Trainer` with AdamW in two parameter groups, the `lr_factor` schedule, the
disabled-on-CPU GradScaler calls and gradient clipping) and its `Progress`, which sums the loss on the device.
It leaves out only the tqdm bar and the periodic validation, sampling and checkpoints, which train.py keeps out
of its own throughput figure too. `BareLoop` is the practical limit: the same network built from plain modules,
trained on pre-made tensors with plain Adam, no data pipeline, no clipping, no schedule.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from bench import harness
from bench.harness import CUDA, Case, Stat, Table, measure, onednn, ratio_stat, shape_name, time_calls
from charlm.core.model import n_params
from charlm.pipeline import paths
from charlm.pipeline.live import Progress
from charlm.pipeline.run import build_run

SHAPES = [(1, 64, 0), (2, 256, 32), (2, 512, 32)]  # layers, hidden, embedding
BATCH = 64
PIECES = [
    "batch gathering",
    "clip_grad_norm_",
    "AdamW − Adam",
    "LambdaLR",
    "scaler no-ops + loss sum",
    "one-hot lookup",
]


class CharlmLoop:
    """stages/train.py's training step (single process)."""

    def __init__(self, data: harness.Prepared, mp, tp, device: str):
        run = build_run(mp, tp, data.folder / paths.VOCAB, data.folder / paths.PACKED, 0, 1, torch.device(device))
        self.run, self.tp, self.progress, self.done = run, tp, Progress(torch.device(device)), 0
        self.chars = tp.batch_size * run.packed.meta["seq_len"]
        run.model.train()

    def step(self) -> int:
        batches = self.run.batches
        self.progress.add(self.run.trainer.step(*batches.batch(*divmod(self.done, batches.per_epoch))))
        self.done += 1
        if self.done % self.tp.log_every == 0:
            self.progress.take(self.chars)  # the only host sync between logs, as in train.py
        return self.chars


class BareLoop:
    """Embedding (or pre-made one-hot input) -> nn.LSTM -> nn.Linear, F.cross_entropy, backward, Adam; on
    pre-made, contiguous tensors that are already on the device; with `bf16`, the forward under bf16 autocast."""

    def __init__(
        self,
        stream: np.ndarray,
        seq_len: int,
        vocab_size: int,
        mp,
        lr: float,
        device: str,
        batch: int = BATCH,
        bf16: bool = False,
    ):
        torch.manual_seed(0)
        self.vocab_size, self.chars, self.i, self.bf16 = vocab_size, batch * seq_len, 0, bf16
        self.embed = nn.Embedding(vocab_size, mp.embedding).to(device) if mp.embedding else None
        self.rnn = nn.LSTM(mp.embedding or vocab_size, mp.hidden, mp.layers, batch_first=True).to(device)
        self.head = nn.Linear(mp.hidden, vocab_size).to(device)
        modules = [m for m in (self.embed, self.rnn, self.head) if m is not None]
        self.optimizer = torch.optim.Adam([p for m in modules for p in m.parameters()], lr=lr)
        starts = np.random.default_rng(0).integers(0, len(stream) - seq_len - 1, size=(8, batch))
        windows = torch.from_numpy(np.asarray(stream)[starts[..., None] + np.arange(seq_len + 1)].astype(np.int64))
        self.ys = [w[:, 1:].contiguous().to(device) for w in windows]
        if self.embed is None:  # one-hot input, made once
            self.xs = [F.one_hot(w[:, :-1], vocab_size).float().to(device) for w in windows]
        else:
            self.xs = [w[:, :-1].contiguous().to(device) for w in windows]

    def step(self) -> int:
        x, y = self.xs[self.i], self.ys[self.i]
        self.i = (self.i + 1) % len(self.xs)
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            out, _ = self.rnn(self.embed(x) if self.embed is not None else x)
            logits = self.head(out)
        loss = F.cross_entropy(logits.float().reshape(-1, self.vocab_size), y.reshape(-1))
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return self.chars


def gap_profile(loop: CharlmLoop, device: str, seconds: float) -> dict[str, Stat]:
    """Seconds per step of each piece of charlm's loop that the bare loop does not have, timed in isolation."""
    model, trainer, b = loop.run.model, loop.run.trainer, loop.run.batches
    counter = iter(range(10**9))

    def gather():
        x, y = b.batch(*divmod(next(counter) % (b.per_epoch * 3), b.per_epoch))
        return torch.from_numpy(x).to(device, non_blocking=True), torch.from_numpy(y).to(device, non_blocking=True)

    out = {"batch gathering": time_calls(gather, seconds, 5, device)}
    x, y = gather()
    if model.config["embedding"] == 0:
        out["one-hot lookup"] = time_calls(lambda: model.embed(x), seconds, 5, device)
    logits, _ = model(x)
    loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), y.reshape(-1))
    trainer.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    weights = list(model.parameters())
    out["clip_grad_norm_"] = time_calls(lambda: torch.nn.utils.clip_grad_norm_(weights, 1.0), seconds, 5, device)
    adam = torch.optim.Adam([p for p in weights if p.requires_grad], lr=1e-3)
    t_adamw, t_adam = time_calls(trainer.optimizer.step, seconds, 5, device), time_calls(adam.step, seconds, 5, device)
    out["AdamW − Adam"] = Stat([a - b for a, b in zip(t_adamw.values, t_adam.values, strict=True)])
    out["LambdaLR"] = time_calls(trainer.scheduler.step, seconds, 5, device)
    loss_sum = torch.zeros((), device=device)

    def bookkeeping():
        nonlocal loss_sum
        trainer.scaler.scale(loss)
        if trainer.scaler.is_enabled():
            trainer.scaler.unscale_(trainer.optimizer)
        trainer.scaler.update()
        loss_sum += loss.detach()

    out["scaler no-ops + loss sum"] = time_calls(bookkeeping, seconds, 5, device)
    return out


def make_loops(ctx, mp, tp, device: str, dnn: tuple[bool | None, ...]) -> tuple[list[Case], CharlmLoop]:
    """A charlm and a bare loop for each oneDNN setting in `dnn` (None: the device's default), and the first
    charlm loop."""
    packed = ctx.data().packed()
    stream, seq_len, vocab_size = packed.streams["train"], packed.meta["seq_len"], packed.meta["vocab_size"]
    cases, charlm = [], []
    for on in dnn:
        suffix = device if on is None else ("on" if on else "off")
        charlm.append(CharlmLoop(ctx.data(), mp, tp, device))
        cases.append(Case(f"charlm/{suffix}", charlm[-1].step, device, on))
        cases.append(Case(f"bare/{suffix}", BareLoop(stream, seq_len, vocab_size, mp, tp.lr, device).step, device, on))
    return cases, charlm[0]


def cpu_rows(ctx, tables: list[Table], mp, tp) -> None:
    """One shape's rows of 1a, 1b and 1c."""
    t_main, t_dnn, t_gap = tables[:3]
    name = shape_name(mp.layers, mp.hidden, mp.embedding)
    ctx.log(f"  training {name}")
    cases, loop = make_loops(ctx, mp, tp, "cpu", (True, False))
    r = measure(cases, ctx.budget.train_rounds, ctx.budget.train_seconds, log=ctx.log)
    on, bare_on, off, bare_off = r["charlm/on"], r["bare/on"], r["charlm/off"], r["bare/off"]
    ratio, dnn = ratio_stat(on, bare_on), ratio_stat(on, off)
    t_main.add(
        name,
        f"{n_params(loop.run.model):,}",
        on.fmt(),
        bare_on.fmt(),
        ratio.pct(),
        "yes" if ratio.median >= 0.95 else "**no**",
    )
    faster = "oneDNN on" if dnn.median >= 1 else "**oneDNN off**"
    bare_ratio = ratio_stat(off, bare_off).pct()
    t_dnn.add(name, on.fmt(), off.fmt(), dnn.fmt("×", 2), bare_on.fmt(), bare_off.fmt(), bare_ratio, faster)
    ctx.log("  gap profile")
    with onednn(True):
        pieces = gap_profile(loop, "cpu", ctx.budget.gap_seconds)
    step_c, step_b = loop.chars / on.median, loop.chars / bare_on.median
    total = sum(p.median for p in pieces.values())
    share = [
        f"{pieces[k].median * 1e6:,.0f} µs ({pieces[k].median / step_c:.2%})" if k in pieces else "n/a" for k in PIECES
    ]
    gap = f"{(step_c - step_b) * 1e3:,.2f} ms ({(step_c - step_b) / step_c:.1%})"
    sum_cell = f"{total * 1e6:,.0f} µs ({total / step_c:.2%})"
    t_gap.add(name, f"{step_c * 1e3:,.2f} ms", f"{step_b * 1e3:,.2f} ms", gap, *share, sum_cell)


def section(ctx) -> list[Table]:
    bud, seq_len = ctx.budget, ctx.data().packed().meta["seq_len"]
    tp = harness.train_params(batch_size=BATCH, max_steps=0)
    tables = [
        Table(
            "1a. Training throughput, chars/s (CPU, oneDNN on = torch's default)",
            "model | params | charlm loop | bare nn.LSTM loop | charlm ÷ bare | ≥ 95%?",
        ),
        Table(
            "1b. oneDNN on vs off for training, chars/s (CPU)",
            "model | charlm, oneDNN on | charlm, oneDNN off | on ÷ off | bare, on | bare, off | charlm ÷ bare (off) | "
            "faster for training",
        ),
        Table(
            "1c. Where charlm's loop spends time that the bare loop does not (CPU, oneDNN on), per step",
            " | ".join(["model", "charlm step", "bare step", "observed gap", *PIECES, "sum of pieces"]),
        ),
        Table("1d. Training throughput on CUDA, chars/s", "model | charlm loop | bare loop | charlm ÷ bare"),
    ]
    for layers, hidden, emb in SHAPES:
        mp = harness.model_params(cell="lstm", hidden=hidden, layers=layers, dropout=0.0, embedding=emb)
        cpu_rows(ctx, tables, mp, tp)
        if ctx.cuda:
            r = measure(make_loops(ctx, mp, tp, CUDA, (None,))[0], bud.train_rounds, bud.train_seconds, log=ctx.log)
            c, b = r[f"charlm/{CUDA}"], r[f"bare/{CUDA}"]
            tables[3].add(shape_name(layers, hidden, emb), c.fmt(), b.fmt(), ratio_stat(c, b).pct())
    tables[0].notes += [
        f"seq_len {seq_len}, batch {BATCH}, LSTM, dropout 0 (section 2 uses params.yaml's own model, dropout "
        f"included); {bud.train_rounds} interleaved rounds of ≥ {bud.train_seconds:g} s "
        f"(whole steps, at least one) per case, after one warm-up step; median (min–max) over rounds.",
        "charlm loop = bench/train_speed.py `CharlmLoop.step`: `charlm.core.data.Batches` over the packed AG News "
        "train stream, `CharRNN`, `F.cross_entropy`, backward, `clip_grad_norm_(1.0)`, AdamW (2 param groups), "
        "`LambdaLR` with charlm.core.training's `lr_factor`, the GradScaler calls (disabled on CPU), loss summed on "
        "the device.",
        "bare loop = `nn.Embedding` (or a pre-made one-hot float input) → `nn.LSTM` → `nn.Linear`, `F.cross_entropy`, "
        "backward, `Adam`, on 8 pre-made batches already on the device: no data pipeline, clipping or schedule.",
        "charlm ÷ bare is the median of the per-round ratios (target ≥ 95%).",
    ]
    tables[2].notes += [
        f"charlm step and bare step are {BATCH * seq_len:,} chars ÷ the medians of table 1a; the pieces are timed in "
        "isolation (median of 5 means, each over ≥ 2 calls) and shown with their share of the charlm step.",
        "The observed gap is the difference of two noisy medians; the sum of pieces is what the extra code costs "
        "by itself. A gap much larger than the sum is noise (or a cost hidden inside the model call).",
    ]
    return tables if ctx.cuda else tables[:3]
