"""train: fit the character model on the packed train stream; validate in bits per character.

Reads `model` and `train` from params.yaml, data/packed/ and data/vocab.json. Writes models/model.pt
(config, vocabulary and weights in one file), dvclive/ (metrics and plots) and reports/train_samples.md.
Resumable checkpoints (charlm/pipeline/checkpoints.py) are deliberately not DVC outputs: DVC deletes outputs
before it reruns a stage, and a checkpoint must survive a killed run. Each carries this stage's logs too.
"""

from __future__ import annotations

from charlm.base.errors import run_main
from charlm.core.sampling import generate
from charlm.pipeline import checkpoints, distributed, params, paths
from charlm.pipeline.live import TrainLog
from charlm.pipeline.run import Run, build_run
from charlm.pipeline.sections.model import ModelParams
from charlm.pipeline.sections.train import TrainParams


def main() -> None:
    model_params, train_params = params.load(ModelParams), params.load(TrainParams)
    rank, world, device = distributed.setup_processes(train_params)
    lead = rank == 0  # only the lead process validates, samples and writes files
    run = build_run(model_params, train_params, paths.VOCAB, paths.PACKED, rank, world, device)
    model, trainer, batches, total, config = run.model, run.trainer, run.batches, run.total, train_params
    checkpoint = checkpoints.location(run.run_id)
    saved = checkpoints.resume(checkpoint, trainer, run.run_id, print if lead else lambda _: None)
    start = int(saved["step"]) if saved else 0
    log = TrainLog(lead, saved, total, start, run.chars_per_step, device,
                   f"Samples during training (prompt {config.sample_prompt!r})")  # fmt: skip
    log.message(run.describe(world, start))
    log.fact("precision", trainer.precision.label)
    val = run.packed.streams["val"]
    if config.init_from and run.has_val and start == 0 and lead:  # fine-tuning: where the starting model stands
        log.val(0, trainer.validate(val), f" ({config.init_from}, before fine-tuning)")
        log.commit()

    stop = checkpoints.StopRequested()
    model.train()
    for step in range(start, total):
        log.step(trainer.step(*batches.batch(*divmod(step, batches.per_epoch))))
        done = step + 1
        at_log = done % config.log_every == 0 or done == total
        at_val = run.has_val and (done % config.eval_every == 0 or done == total)
        if world > 1 and at_log:  # agree on stopping, at the same step on config process
            stop.requested = distributed.agree(stop.requested, device)
        stopping = stop.requested and (world == 1 or at_log)
        if at_log:
            log.train(done, trainer.lr())
        with log.paused():
            if done == total and lead:
                finish_weights(run, log, done)
            if at_val and lead and done < total:
                bpc = trainer.validate(val)
                trainer.keep_if_best(done, bpc)
                log.val(done, bpc)
            if at_val and lead and done == total:  # the model file's weights, as finish_weights made them
                log.val(done, trainer.validate(val))
            if config.sample_every and (done % config.sample_every == 0 or done == total) and lead:
                log.samples(done, samples(run, done))
            if at_log or at_val:
                log.commit()
            if (done % config.checkpoint_every == 0 or done == total or stopping) and lead:
                checkpoints.save(checkpoint, trainer, run.run_id, done, run.vocab, **log.state())
        if stopping:
            log.bar.close()
            raise KeyboardInterrupt(f"checkpoint saved at step {done:,}; rerun to resume")
    train_s, val_bpc = log.finish(ran=total > start, chars=total * run.chars_per_step, steps=total)
    distributed.finish(world)
    if lead:
        run.save_model(paths.MODEL, val_bpc)
        shown = f", val {val_bpc:.4f} bpc" if val_bpc is not None else ""
        print(f"train: done, {total:,} steps in {train_s:,.0f}s{shown} -> {paths.MODEL}")
        if checkpoint != paths.CHECKPOINT:  # a finished temporary experiment needs no checkpoint
            checkpoint.unlink(missing_ok=True)


def finish_weights(run: Run, log: TrainLog, step: int) -> None:
    """The model file's weights: the average (train.ema_decay), or the best-validated weights (train.keep_best),
    and a fitted temperature (train.fit_temperature). Logs what each changed: val of the weights as trained at
    the last step, of the weights chosen before the temperature, the step they are from, and the temperature."""
    trainer, val, settings = run.trainer, run.packed.streams["val"], run.trainer.settings
    figures = {}
    if run.has_val and trainer.average is not None:
        figures["val_bpc_trained_weights"] = trainer.validate(val, averaged=False)
    if run.has_val and (settings.fit_temperature or settings.keep_best):
        last = trainer.validate(val)
        trainer.keep_if_best(step, last)
        figures["val_bpc_before_temperature"] = trainer.best_bpc if settings.keep_best else last
    if run.has_val and settings.keep_best:
        figures["best_step"] = trainer.best_step
    temperature = trainer.finish(val if run.has_val else None)
    if temperature is not None:
        figures["temperature"] = temperature
    if figures:
        log.final(step, figures)


def samples(run: Run, step: int) -> str:
    """Greedy and T=0.8 samples from the model as it is at `step`, one line each."""
    config = run.train_params
    run.model.eval()
    records = generate(run.model, run.vocab, [config.sample_prompt], [0.0, 0.8], config.sample_length, seed=step)
    run.model.train()
    return "".join(f"- T={r['temperature']}: {r['text']!r}\n" for r in records)


if __name__ == "__main__":
    run_main(lambda: distributed.relaunch_under_torchrun("stages.train", params.load(TrainParams).processes), "train")
    run_main(main, "train")
