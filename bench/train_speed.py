"""Section 1: training-step throughput of charlm's loop against a bare nn.LSTM loop, oneDNN on and off, and
a profile of the gap between the two (bench/loops.py has both loops)."""
from __future__ import annotations

import dataclasses

import torch

from bench.harness import CUDA, ROOT, Case, Stat, Table, measure, onednn, ratio_stat, shape_name, time_calls
from bench.loops import BareLoop, CharlmLoop, shape_params
from charlm.pipeline import params
from charlm.core.model import n_params

SHAPES = [(1, 64, 0), (2, 256, 32), (2, 512, 32)]  # layers, hidden, embedding
SEQ_LEN, BATCH = 100, 64


def gap_profile(loop: CharlmLoop, device: str, seconds: float) -> dict[str, Stat]:
    """Seconds per step of each piece of charlm's loop that the bare loop does not have, timed in isolation."""
    out = {}
    counter = iter(range(10**9))
    b = loop.batches

    def gather():
        x, y = b.batch(*divmod(next(counter) % (b.per_epoch * 3), b.per_epoch))
        return torch.from_numpy(x).to(device, non_blocking=True), torch.from_numpy(y).to(device, non_blocking=True)

    out["batch gathering"] = time_calls(gather, seconds, 5, device)
    x, y = gather()
    if loop.model.config["embedding"] == 0:
        out["one-hot lookup"] = time_calls(lambda: loop.model.embed(x), seconds, 5, device)
    logits, _ = loop.model(x)
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), y.reshape(-1))
    loop.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    params_list = list(loop.model.parameters())
    out["clip_grad_norm_"] = time_calls(lambda: torch.nn.utils.clip_grad_norm_(params_list, 1.0), seconds, 5, device)
    adam = torch.optim.Adam([p for p in params_list if p.requires_grad], lr=1e-3)
    t_adamw = time_calls(loop.optimizer.step, seconds, 5, device)
    t_adam = time_calls(adam.step, seconds, 5, device)
    out["AdamW − Adam"] = Stat([a - b for a, b in zip(t_adamw.values, t_adam.values, strict=True)])
    out["LambdaLR"] = time_calls(loop.scheduler.step, seconds, 5, device)
    loss_sum = torch.zeros((), device=device)

    def bookkeeping():
        nonlocal loss_sum
        loop.scaler.scale(loss)
        loop.scaler.unscale_(loop.optimizer) if loop.scaler.is_enabled() else None
        loop.scaler.update()
        loss_sum += loss.detach()

    out["scaler no-ops + loss sum"] = time_calls(bookkeeping, seconds, 5, device)
    return out


def section(ctx) -> list[Table]:
    bud = ctx.budget
    packed = ctx.data().packed()
    stream, vocab_size, seed = packed.streams["train"], packed.meta["vocab_size"], packed.meta["seed"]
    tp = dataclasses.replace(params.load(params.TrainParams, ROOT / "params.yaml"), batch_size=BATCH, max_steps=0)
    chars_per_step = BATCH * SEQ_LEN
    pieces_cols = ["batch gathering", "clip_grad_norm_", "AdamW − Adam", "LambdaLR", "scaler no-ops + loss sum",
                   "one-hot lookup"]
    t_main = Table("1a. Training throughput, chars/s (CPU, oneDNN on = torch's default)",
                   ["model", "params", "charlm loop", "bare nn.LSTM loop", "charlm ÷ bare", "≥ 95%?"])
    t_dnn = Table("1b. oneDNN on vs off for training, chars/s (CPU)",
                  ["model", "charlm, oneDNN on", "charlm, oneDNN off", "on ÷ off", "bare, on", "bare, off",
                   "charlm ÷ bare (off)", "faster for training"])
    t_gap = Table("1c. Where charlm's loop spends time that the bare loop does not (CPU, oneDNN on), per step",
                  ["model", "charlm step", "bare step", "observed gap", *pieces_cols, "sum of pieces"])
    t_cuda = Table("1d. Training throughput on CUDA, chars/s", ["model", "charlm loop", "bare loop", "charlm ÷ bare"])

    def loop(kind: str, mp: params.ModelParams, device: str) -> CharlmLoop | BareLoop:
        if kind == "charlm":
            return CharlmLoop(stream, SEQ_LEN, vocab_size, seed, mp, tp, device)
        return BareLoop(stream, SEQ_LEN, vocab_size, mp, BATCH, tp.lr, device)

    for layers, hidden, emb in SHAPES:
        mp = shape_params(layers, hidden, emb)
        name = shape_name(layers, hidden, emb)
        ctx.log(f"  training {name}")
        loops = {(kind, dnn): loop(kind, mp, "cpu") for dnn in (True, False) for kind in ("charlm", "bare")}
        cases = [Case(f"{kind}/{'on' if dnn else 'off'}", lp.step, "cpu", dnn) for (kind, dnn), lp in loops.items()]
        r = measure(cases, bud.train_rounds, bud.train_seconds, log=ctx.log)
        on, bare_on, off, bare_off = r["charlm/on"], r["bare/on"], r["charlm/off"], r["bare/off"]
        ratio = ratio_stat(on, bare_on)
        charlm_loop = loops[("charlm", True)]
        t_main.add(name, f"{n_params(charlm_loop.model):,}", on.fmt(), bare_on.fmt(), ratio.pct(),
                   "yes" if ratio.median >= 0.95 else "**no**")
        dnn = ratio_stat(on, off)
        t_dnn.add(name, on.fmt(), off.fmt(), dnn.fmt("×", 2), bare_on.fmt(), bare_off.fmt(),
                  ratio_stat(off, bare_off).pct(), "oneDNN on" if dnn.median >= 1 else "**oneDNN off**")
        ctx.log("  gap profile")
        with onednn(True):
            pieces = gap_profile(charlm_loop, "cpu", bud.gap_seconds)
        del loops, charlm_loop
        step_c, step_b = chars_per_step / on.median, chars_per_step / bare_on.median
        total = sum(p.median for p in pieces.values())
        share = [f"{pieces[k].median * 1e6:,.0f} µs ({pieces[k].median / step_c:.2%})" if k in pieces else "n/a"
                 for k in pieces_cols]
        t_gap.add(name, f"{step_c * 1e3:,.2f} ms", f"{step_b * 1e3:,.2f} ms",
                  f"{(step_c - step_b) * 1e3:,.2f} ms ({(step_c - step_b) / step_c:.1%})", *share,
                  f"{total * 1e6:,.0f} µs ({total / step_c:.2%})")
        if ctx.cuda:
            cases = [Case(f"{kind}/{CUDA}", loop(kind, mp, CUDA).step, CUDA) for kind in ("charlm", "bare")]
            r = measure(cases, bud.train_rounds, bud.train_seconds, log=ctx.log)
            c, b = r[f"charlm/{CUDA}"], r[f"bare/{CUDA}"]
            t_cuda.add(name, c.fmt(), b.fmt(), ratio_stat(c, b).pct())
            del cases
    t_main.notes += [
        f"seq_len {SEQ_LEN}, batch {BATCH}, LSTM, dropout 0 (section 2 uses params.yaml's own model, dropout "
        f"included); {bud.train_rounds} interleaved rounds of ≥ {bud.train_seconds:g} s "
        f"(whole steps, at least one) per case, after one warm-up step; median (min–max) over rounds.",
        "charlm loop = bench/loops.py `CharlmLoop.step`: `charlm.core.data.Batches` over the packed AG News train stream, "
        "`CharRNN`, `F.cross_entropy`, backward, `clip_grad_norm_(1.0)`, AdamW (2 param groups), `LambdaLR` with "
        "charlm.core.training's `lr_factor`, the GradScaler calls (disabled on CPU), loss summed on the device.",
        "bare loop = `nn.Embedding` (or a pre-made one-hot float input) → `nn.LSTM` → `nn.Linear`, `F.cross_entropy`, "
        "backward, `Adam`, on 8 pre-made batches already on the device: no data pipeline, clipping or schedule.",
        "charlm ÷ bare is the median of the per-round ratios (target ≥ 95%).",
    ]
    t_gap.notes += [
        f"charlm step and bare step are {chars_per_step:,} chars ÷ the medians of table 1a; the pieces are timed in "
        "isolation (median of 5 means, each over ≥ 2 calls) and shown with their share of the charlm step.",
        "The observed gap is the difference of two noisy medians; the sum of pieces is what the extra code costs "
        "by itself. A gap much larger than the sum is noise (or a cost hidden inside the model call).",
    ]
    return [t_main, t_dnn, t_gap] + ([t_cuda] if ctx.cuda else [])
