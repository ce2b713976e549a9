"""train: fit the character model on the packed train stream; validate in bits per character.

Reads `model` and `train` from params.yaml, data/packed/ and data/vocab.json. Writes models/model.pt
(config, vocabulary and weights in one file), dvclive/ (metrics and plots) and reports/train_samples.md.
Resumable checkpoints (charlm/core/training.py) are deliberately not DVC outputs: DVC deletes outputs before it
reruns a stage, and a checkpoint must survive a killed run. Each carries this stage's logs too.
"""

from __future__ import annotations

import math
from typing import Any

from tqdm import tqdm

from charlm.base.errors import run_main
from charlm.core.sampling import generate
from charlm.core.training import Progress, Run, StopRequested, build_run, checkpoint_path
from charlm.pipeline import distributed, params, paths
from charlm.pipeline.live import StageLogs, stage_live

LN2 = math.log(2)


def main() -> None:
    mp, tp = params.load(params.ModelParams), params.load(params.TrainParams)
    rank, world, device = distributed.setup_processes(tp)
    lead = rank == 0  # only the lead process logs and writes files
    say = tqdm.write if lead else (lambda *a, **k: None)
    run = build_run(mp, tp, paths.VOCAB, paths.PACKED, rank, world, device)
    model, trainer, batches, total = run.model, run.trainer, run.batches, run.total
    val, chars_per_step = run.packed.streams["val"], tp.batch_size * run.packed.meta["seq_len"]
    checkpoint = checkpoint_path(run.run_id)
    ck = trainer.resume(checkpoint, run.run_id, say)
    start, progress = (int(ck["step"]), Progress(device, ck["progress"])) if ck else (0, Progress(device))
    logs = StageLogs(paths.LIVE, paths.TRAIN_SAMPLES, f"Samples during training (prompt {tp.sample_prompt!r})")
    if lead:
        logs.start(ck)  # the logs as they were at the checkpoint, if any
    live: Any = stage_live(paths.LIVE, resume=ck is not None) if lead else None
    say(run.describe(world, start))
    if tp.init_from and run.has_val and start == 0 and lead:  # fine-tuning: where the starting model stands
        log_val(live, 0, trainer.validate(val), say, f" ({tp.init_from}, before fine-tuning)")
        live.next_step()

    stop = StopRequested()
    model.train()
    bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True, disable=None if lead else True, leave=False)
    for step in range(start, total):
        progress.add(trainer.step(*batches.batch(*divmod(step, batches.per_epoch))))
        done = step + 1
        bar.update(1)
        at_log = done % tp.log_every == 0 or done == total
        if world > 1 and at_log:  # agree on stopping, at the same step on every process
            stop.requested = distributed.agree(stop.requested, device)
        stopping = stop.requested and (world == 1 or at_log)
        if lead and at_log:
            log_train(live, bar, progress, done, total, trainer.lr(), chars_per_step, say)
        at_val = run.has_val and (done % tp.eval_every == 0 or done == total)
        with progress.paused():
            if lead and at_val:
                log_val(live, done, trainer.validate(val), say)
            if lead and tp.sample_every and (done % tp.sample_every == 0 or done == total):
                log_samples(model, run, logs, done, say)
            if lead and (at_log or at_val):  # write the summary and signal the DVC extension that a step completed
                live.next_step()
            if lead and (done % tp.checkpoint_every == 0 or done == total or stopping):
                trainer.save(checkpoint, run.run_id, done, run.vocab, progress=progress.state(), **logs.snapshot())
        if stopping:
            bar.close()
            raise KeyboardInterrupt(f"checkpoint saved at step {done:,}; rerun to resume")
    bar.close()
    distributed.finish(world)
    if lead:
        finish(live, run, progress.train_s(ran=total > start), progress.step_s)
        if checkpoint != paths.CHECKPOINT:  # a finished temporary experiment needs no checkpoint
            checkpoint.unlink(missing_ok=True)


def log_train(live, bar, progress: Progress, done: int, total: int, lr: float, chars_per_step: int, say) -> None:
    train_loss, chars_per_s = progress.take(chars_per_step)
    log(live, done, {"train/loss": train_loss, "train/bpc": train_loss / LN2, "lr": lr, "chars_per_s": chars_per_s})
    bar.set_postfix(loss=f"{train_loss:.3f}", chars_s=f"{chars_per_s:,.0f}")
    if bar.disable:  # no terminal (CI, nohup, a queued experiment): plain progress lines instead
        eta = (total - done) * chars_per_step / max(chars_per_s, 1e-9)
        say(f"step {done:,}/{total:,}: loss {train_loss:.4f}, {chars_per_s:,.0f} chars/s, ETA {eta / 60:.1f} min")


def log(live, step: int, metrics: dict[str, float]) -> None:
    live.step = step
    for name, value in metrics.items():
        live.log_metric(name, value)


def log_val(live, step: int, val_bpc: float, say, note: str = "") -> None:
    log(live, step, {"val/loss": val_bpc * LN2, "val/bpc": val_bpc})
    say(f"step {step:,}: val {val_bpc:.4f} bpc{note}")


def log_samples(model, run: Run, logs: StageLogs, step: int, say) -> None:
    tp = run.trainer.tp
    model.eval()
    records = generate(model, run.vocab, [tp.sample_prompt], [0.0, 0.8], tp.sample_length, seed=step)
    model.train()
    text = "".join(f"- T={r['temperature']}: {r['text']!r}\n" for r in records)
    say(f"step {step:,} samples:\n{text}", end="")
    logs.add_samples(step, text)


def finish(live, run: Run, train_s: float, step_s: float) -> None:
    chars = run.total * run.trainer.tp.batch_size * run.packed.meta["seq_len"]
    live.log_metric("train_time_s", round(train_s, 2), plot=False)
    live.log_metric("train_chars_per_s", round(chars / max(step_s, 1e-9), 1), plot=False)
    live.log_metric("steps", run.total, plot=False)
    live.end()  # the summary keeps the last logged step (`total`)
    val_bpc = live.summary.get("val", {}).get("bpc")
    run.save_model(paths.MODEL, val_bpc)
    val = f", val {val_bpc:.4f} bpc" if val_bpc is not None else ""
    print(f"train: done, {run.total:,} steps in {train_s:,.0f}s{val} -> {paths.MODEL}")


if __name__ == "__main__":
    run_main(lambda: distributed.relaunch_under_torchrun("stages.train"), "train")
    run_main(main, "train")
