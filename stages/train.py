"""train: fit the character model on the packed train stream; validate in bits per character.

Reads `model` and `train` from params.yaml, data/packed/ and data/vocab.json. Writes models/model.pt
(config, vocabulary and weights in one file), dvclive/ (metrics and plots) and reports/train_samples.md.

Resumable checkpoints go to checkpoints/train.pt. That file is deliberately not a DVC output: DVC deletes
outputs before it reruns a stage, and the checkpoint must survive a killed run. A checkpoint holds model,
optimizer, scheduler, scaler, step, RNG states and the DVCLive logs so far; the data position is the step
itself (batches are addressed by step). It is resumed only when its fingerprint (params, data, vocabulary)
matches this run, so a rerun after a kill continues, and a rerun after a change starts over.

A queued or `--temp` experiment runs in a temporary copy of the repository (.dvc/tmp/exps/tmpXXX) that DVC
deletes afterwards, killed or not. Its checkpoint therefore lives in the repository it was queued from, under
.dvc/tmp/charlm-checkpoints/<fingerprint>.pt, where re-queuing the same experiment finds it. A finished run
deletes its own; at most KEEP_KEYED of them are kept (the most recently written), so old ones cannot pile up.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from charlm import artifact, params
from charlm.data import Batches, load_packed
from charlm.errors import CharlmError, run_main
from charlm.io import write_text
from charlm.model import CharRNN, n_params
from charlm.sampling import generate
from charlm.scoring import stream_bpc
from charlm.vocab import Vocab

CHECKPOINT = artifact.DEFAULT_CHECKPOINT
KEYED_DIR = Path(".dvc/tmp/charlm-checkpoints")  # relative to the repository an experiment was queued from
KEEP_KEYED = 8  # checkpoints of unfinished temporary experiments kept there, newest first (~model + 2x Adam each)
LIVE_DIR = Path("dvclive")
SAMPLES = Path("reports/train_samples.md")
LN2 = math.log(2)
VAL_BATCH = 64  # validation items per forward pass, as evaluate.batch_size


def lr_factor(step: int, total: int, p: params.TrainParams) -> float:
    """Linear warm-up to 1, then cosine or linear decay to min_lr_ratio at the last step."""
    if step < p.warmup_steps:
        return (step + 1) / p.warmup_steps
    if p.schedule == "constant":
        return 1.0
    progress = min(1.0, (step - p.warmup_steps) / max(1, total - p.warmup_steps))
    decay = 0.5 * (1 + math.cos(math.pi * progress)) if p.schedule == "cosine" else 1 - progress
    return p.min_lr_ratio + (1 - p.min_lr_ratio) * decay


def make_optimizer(model: CharRNN, tp: params.TrainParams, total: int, device: torch.device):
    """AdamW (no decay on biases), the warm-up/decay schedule, the AMP scaler and an autocast factory."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": tp.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=tp.lr,
        betas=(0.9, tp.beta2),
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total, tp))
    use_amp = device.type == "cuda" and tp.amp != "none"
    amp_dtype = torch.bfloat16 if tp.amp == "bf16" else torch.float16
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and tp.amp == "fp16")

    def autocast():
        return torch.autocast(device.type, dtype=amp_dtype) if use_amp else contextlib.nullcontext()

    return optimizer, scheduler, scaler, autocast


def train_step(net, model: CharRNN, x, y, optimizer, scheduler, scaler, grad_clip: float, autocast) -> torch.Tensor:
    """One optimisation step; returns the loss as a device tensor (no host sync)."""
    with autocast():
        loss, _ = net(x, targets=y)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    if grad_clip > 0:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    scaler.step(optimizer)
    scaler.update()
    scheduler.step()
    return loss.detach()


def fingerprint(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def snapshot_files(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): p.read_text(encoding="utf-8") for p in sorted(root.rglob("*")) if p.is_file()}


def restore_files(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        write_text(root / rel, text)


class StopRequested:
    """SIGINT/SIGTERM set a flag that the loop checks between steps, so the checkpoint is never mid-update."""

    def __init__(self):
        self.requested = False
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        if self.requested:  # a second Ctrl-C stops at once
            raise KeyboardInterrupt
        self.requested = True


def setup_processes(tp: params.TrainParams) -> tuple[int, int, torch.device]:
    """(rank, world size, device). Under torchrun (WORLD_SIZE > 1) join the process group first."""
    device = artifact.pick_device(tp.device, "train.device")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, device
    rank = int(os.environ["RANK"])
    die_with_parent()
    if tp.batch_size % world:
        raise CharlmError(
            f"train.batch_size={tp.batch_size} is the global batch and must divide evenly over "
            f"{world} processes; pick a multiple of {world}"
        )
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def die_with_parent() -> None:
    """A worker must not outlive its torchrun launcher: if the launcher is killed (SIGKILL leaves it no chance
    to stop its workers), orphaned workers would train on and write files. Linux only; elsewhere a no-op."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() == 1:  # the launcher died before prctl took effect
        os._exit(1)


def main() -> None:
    mp, tp = params.load(params.ModelParams), params.load(params.TrainParams)
    rank, world, device = setup_processes(tp)
    lead = rank == 0  # only the lead process logs and writes files
    vocab = Vocab.load("data/vocab.json")
    packed = load_packed("data/packed")
    meta, seq_len = packed.meta, packed.meta["seq_len"]
    if meta["vocab_size"] != len(vocab):
        raise CharlmError(
            f"data/packed was built with {meta['vocab_size']} symbols but data/vocab.json has "
            f"{len(vocab)}; rerun `dvc repro pack`"
        )
    # train.batch_size is the global batch: each process takes a disjoint 1/world of every minibatch.
    batches = Batches(
        packed.streams["train"],
        seq_len,
        tp.batch_size // world,
        meta["seed"],
        rank,
        world,
        align=meta.get("align", "stream"),
    )
    has_val = meta["splits"]["val"]["items"] > 0  # pack.val_fraction: 0 means no validation split
    total = batches.per_epoch * tp.epochs if not tp.max_steps else min(batches.per_epoch * tp.epochs, tp.max_steps)

    if tp.deterministic and device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    torch.manual_seed(tp.seed)
    model = CharRNN(len(vocab), **dataclasses.asdict(mp)).to(device)
    init_sha = start_from(model, tp.init_from, vocab, mp) if tp.init_from else None
    net = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    optimizer, scheduler, scaler, autocast = make_optimizer(model, tp, total, device)

    print_fn = tqdm.write if lead else (lambda *a, **k: None)
    # The number of processes is left out, so a checkpoint resumes under any world size.
    run_id = fingerprint(
        dataclasses.asdict(mp),
        dataclasses.asdict(tp) | {"processes": None},
        meta,
        vocab.itos,
        init_sha,  # the starting model's bytes, not just its path
        device.type,
        torch.__version__,
    )
    # Counters that a resumed run must continue, saved in every checkpoint.
    start, progress = 0, {"train_s": 0.0, "step_s": 0.0, "loss_sum": 0.0, "loss_n": 0}
    checkpoint = checkpoint_path(run_id)
    resumed = resume(
        checkpoint, run_id, model, optimizer, scheduler, scaler, device, progress, print_fn, restore_logs=lead
    )
    if resumed is not None:
        start = resumed
    elif lead:
        write_text(SAMPLES, f"# Samples during training (prompt {tp.sample_prompt!r})\n\n")

    live: Any = stage_live(resume=resumed is not None) if lead else None  # only the lead process logs
    print_fn(
        f"train: {mp.cell} {mp.layers}x{mp.hidden}, {n_params(model):,} parameters, {device.type}"
        + (f" x {world} processes" if world > 1 else "")
        + f", {total:,} steps of {tp.batch_size}x{seq_len} chars ({batches.per_epoch:,} per epoch)"
        + (f", resuming at step {start:,}" if start else "")
    )

    if tp.init_from and has_val and start == 0 and lead:  # fine-tuning: where the starting model stands
        val_bpc = stream_bpc(model, packed.streams["val"], VAL_BATCH, device)
        live.step = 0
        live.log_metric("val/loss", val_bpc * LN2)
        live.log_metric("val/bpc", val_bpc)
        live.next_step()
        print_fn(f"step 0: val {val_bpc:.4f} bpc ({tp.init_from}, before fine-tuning)")

    stop = StopRequested()
    model.train()
    # The train loss is averaged over the steps between logs; a resume may land between two logs.
    loss_sum, loss_n = torch.tensor(progress["loss_sum"], device=device), progress["loss_n"]
    t_mark, steps_since_mark = time.perf_counter(), 0
    t_start = time.perf_counter() - progress["train_s"]
    bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True, disable=None if lead else True, leave=False)
    done = start
    for step in range(start, total):
        xs, ys = batches.batch(*divmod(step, batches.per_epoch))
        x, y = torch.from_numpy(xs).to(device, non_blocking=True), torch.from_numpy(ys).to(device, non_blocking=True)
        loss_sum += train_step(net, model, x, y, optimizer, scheduler, scaler, tp.grad_clip, autocast)
        loss_n += 1
        steps_since_mark += 1
        done = step + 1
        bar.update(1)

        at_log = done % tp.log_every == 0 or done == total
        if world > 1 and at_log:  # agree on stopping, at the same step on every process
            flag = torch.tensor([float(stop.requested)], device=device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            stop.requested = bool(flag.item())
        stopping = stop.requested and (world == 1 or at_log)
        if lead and at_log:
            train_loss = (loss_sum / loss_n).item()  # the only host sync between logs
            now = time.perf_counter()
            progress["step_s"] += now - t_mark
            chars_per_s = steps_since_mark * tp.batch_size * seq_len / max(now - t_mark, 1e-9)
            live.step = done
            live.log_metric("train/loss", train_loss)
            live.log_metric("train/bpc", train_loss / LN2)
            live.log_metric("lr", scheduler.get_last_lr()[0])
            live.log_metric("chars_per_s", chars_per_s)
            bar.set_postfix(loss=f"{train_loss:.3f}", chars_s=f"{chars_per_s:,.0f}")
            if bar.disable:  # no terminal (CI, nohup, a queued experiment): plain progress lines instead
                eta = (total - done) * tp.batch_size * seq_len / max(chars_per_s, 1e-9)
                print_fn(
                    f"step {done:,}/{total:,}: loss {train_loss:.4f}, {chars_per_s:,.0f} chars/s, "
                    f"ETA {eta / 60:.1f} min"
                )
            loss_sum.zero_()
            loss_n = 0
            t_mark, steps_since_mark = time.perf_counter(), 0
        if not lead:
            if stopping:
                raise KeyboardInterrupt
            continue
        periodic_work, logged = False, at_log
        if has_val and (done % tp.eval_every == 0 or done == total):
            # scored exactly as evaluate scores the test split, so val bpc and test bpc are comparable
            with autocast():
                val_bpc = stream_bpc(model, packed.streams["val"], VAL_BATCH, device)
            live.step = done
            live.log_metric("val/loss", val_bpc * LN2)
            live.log_metric("val/bpc", val_bpc)
            print_fn(f"step {done:,}: val {val_bpc:.4f} bpc")
            periodic_work = logged = True
        if tp.sample_every and (done % tp.sample_every == 0 or done == total):
            log_sample(model, vocab, tp, done, print_fn)
            periodic_work = True
        if logged:  # metrics were logged at this step: write the summary, signal the DVC extension
            live.next_step()
        if done % tp.checkpoint_every == 0 or done == total or stopping:
            progress.update(train_s=time.perf_counter() - t_start, loss_sum=loss_sum.item(), loss_n=loss_n)
            save_checkpoint(checkpoint, run_id, done, model, vocab, optimizer, scheduler, scaler, progress)
            periodic_work = True
        if periodic_work:  # keep evaluation and I/O out of the throughput figure
            t_mark, steps_since_mark = time.perf_counter(), 0
        if stopping:
            bar.close()
            raise KeyboardInterrupt(f"checkpoint saved at step {done:,}; rerun to resume")
    bar.close()
    if world > 1:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    if not lead:
        return

    train_s = time.perf_counter() - t_start if done > start else progress["train_s"]
    chars = total * tp.batch_size * seq_len
    live.log_metric("train_time_s", round(train_s, 2), plot=False)
    live.log_metric("train_chars_per_s", round(chars / max(progress["step_s"], 1e-9), 1), plot=False)
    live.log_metric("steps", total, plot=False)
    live.end()  # the summary keeps the last logged step (`total`)
    # Nothing run-dependent (such as timings) goes in the model file: identical runs give identical bytes,
    # so DVC does not rerun evaluate and generate after a resume or a retrain.
    info = {
        "steps": total,
        "seq_len": seq_len,
        "val_bpc": live.summary.get("val", {}).get("bpc"),
        "params": {"model": dataclasses.asdict(mp), "train": dataclasses.asdict(tp)},
    }
    model.to("cpu")
    artifact.save(artifact.DEFAULT_MODEL, artifact.model_record(model, vocab, info))
    if checkpoint != CHECKPOINT:  # a finished temporary experiment needs no checkpoint in the repository
        checkpoint.unlink(missing_ok=True)
    val = f", val {info['val_bpc']:.4f} bpc" if info["val_bpc"] is not None else ""
    print_fn(f"train: done, {total:,} steps in {train_s:,.0f}s{val} -> {artifact.DEFAULT_MODEL}")


def start_from(model: CharRNN, path: str, vocab: Vocab, mp: params.ModelParams) -> str:
    """Load the weights of a trained model into `model` (fine-tuning); return the file's sha256. The model must
    share the data's vocabulary and the model.* shape (dropout may differ)."""
    fix = "copy a charlm model there, or set train.init_from: null"
    init, init_vocab, _ = artifact.load_model(path, fix=fix)
    if init_vocab.chars != vocab.chars:
        raise CharlmError(
            f"{path} has a different vocabulary ({len(init_vocab)} symbols) from data/vocab.json ({len(vocab)}); "
            f"set vocab.from_model: {path} so the data is encoded with the model's characters"
        )
    shape = {k: v for k, v in dataclasses.asdict(mp).items() if k != "dropout"}
    theirs = {k: init.config[k] for k in shape}
    if theirs != shape:
        wanted = ", ".join(f"model.{k}: {v}" for k, v in theirs.items())
        raise CharlmError(f"{path} is a {theirs} model but params.yaml asks for {shape}; set {wanted}")
    model.load_state_dict(init.state_dict())
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def relaunch_under_torchrun() -> None:
    """`train.processes: N` (N > 1) re-executes this script under torchrun with N local processes."""
    tp = params.load(params.TrainParams)
    if tp.processes > 1 and "WORLD_SIZE" not in os.environ:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={tp.processes}",
            "-m",
            "stages.train",
        ]
        os.execv(sys.executable, cmd)


def stage_live(resume: bool):
    """DVCLive for a DVC stage whose dvc.yaml already declares the metrics and plots: no dvc.yaml of its own,
    no experiment of its own (DVC runs this stage), no HTML report. Its `next_step()` signals each logged step
    to DVC's VS Code extension and DVC Studio, so a running or queued experiment shows live plots."""
    from dvclive import Live  # imported late: slow to import, and unused when params are invalid

    kwargs: dict[str, Any] = {"resume": resume, "report": None, "save_dvc_exp": False, "dvcyaml": None}
    if git_has_commits():
        return Live(str(LIVE_DIR), **kwargs)

    # In a git repo with no commits yet, DVCLive's DVC integration crashes: scm.get_rev() raises "Empty git repo"
    # (https://github.com/treeverse/dvclive/issues/522, fixed upstream only for save_dvc_exp=True). Only there
    # is it skipped; the step signals do not depend on it.
    class EmptyRepoLive(Live):
        def _init_dvc(self):
            pass

    return EmptyRepoLive(str(LIVE_DIR), **kwargs)


def git_has_commits() -> bool:
    """False only inside a git repo with no commits (exit 1); outside git (128) DVCLive copes by itself."""
    try:
        code = subprocess.run(["git", "rev-parse", "--verify", "--quiet", "HEAD"], capture_output=True).returncode
    except OSError:  # no git at all
        return True
    return code != 1


def log_sample(model, vocab, tp: params.TrainParams, step: int, print_fn) -> None:
    was_training = model.training
    model.eval()
    records = generate(model, vocab, [tp.sample_prompt], [0.0, 0.8], tp.sample_length, seed=step)
    model.train(was_training)
    text = "".join(f"- T={r['temperature']}: {r['text']!r}\n" for r in records)
    print_fn(f"step {step:,} samples:\n{text}", end="")
    write_text(SAMPLES, SAMPLES.read_text(encoding="utf-8") + f"## step {step}\n\n{text}\n")


def checkpoint_path(run_id: str) -> Path:
    """checkpoints/train.pt in a normal workspace; in DVC's temporary experiment workspace, a file keyed by the
    run's fingerprint in the repository that the experiment came from (see the module docstring)."""
    parts = Path.cwd().resolve().parts
    for i in range(len(parts) - 3, 0, -1):
        if parts[i : i + 3] == (".dvc", "tmp", "exps"):
            return Path(*parts[:i]) / KEYED_DIR / f"{run_id[:32]}.pt"
    return CHECKPOINT


def prune_keyed(keep: Path) -> None:
    """Keep the KEEP_KEYED most recently written keyed checkpoints (always `keep`, the one just written)."""
    files = sorted(keep.parent.glob("*.pt"), key=lambda f: f.stat().st_mtime, reverse=True)
    for old in [f for f in files if f != keep][KEEP_KEYED - 1 :]:
        old.unlink(missing_ok=True)


def save_checkpoint(path: Path, run_id, step, model, vocab, optimizer, scheduler, scaler, progress) -> None:
    rng: dict[str, Any] = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    path.parent.mkdir(parents=True, exist_ok=True)
    artifact.save(
        path,
        {
            "format": artifact.CHECKPOINT_FORMAT,
            "run_id": run_id,
            "step": step,
            "model": model.state_dict(),
            "config": dict(model.config),  # config and vocab: `charlm generate --checkpoint` samples mid-training
            "vocab": list(vocab.chars),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(),
            "rng": rng,
            "progress": dict(progress),
            "live": snapshot_files(LIVE_DIR),
            "samples": SAMPLES.read_text(encoding="utf-8") if SAMPLES.exists() else None,
        },
    )
    if path != CHECKPOINT:
        prune_keyed(path)


def resume(
    path: Path, run_id, model, optimizer, scheduler, scaler, device, progress, print_fn, restore_logs=True
) -> int | None:
    """Load the checkpoint at `path` if it belongs to this run; return its step, or None to start fresh."""
    if not path.exists():
        return None
    try:
        ck = artifact.load(path, "Starting from scratch.", map_location=device)
    except CharlmError as e:
        print_fn(f"train: ignoring unusable checkpoint: {e}")
        return None
    if ck.get("format") != artifact.CHECKPOINT_FORMAT or ck.get("run_id") != run_id:
        print_fn(f"train: {path} belongs to other params or data; starting from scratch")
        return None
    try:
        model.load_state_dict(ck["model"])
        optimizer.load_state_dict(ck["optimizer"])
        scheduler.load_state_dict(ck["scheduler"])
        scaler.load_state_dict(ck["scaler"])
        torch.set_rng_state(ck["rng"]["cpu"].cpu())
        if "cuda" in ck["rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all([s.cpu() for s in ck["rng"]["cuda"]])
        progress.update({k: ck["progress"][k] for k in progress})
    except (KeyError, RuntimeError, ValueError, TypeError) as e:
        raise CharlmError(
            f"{path}: does not fit this model ({str(e).splitlines()[0][:160]}); delete it to start over"
        ) from None
    if restore_logs:
        shutil.rmtree(LIVE_DIR, ignore_errors=True)
        restore_files(LIVE_DIR, ck["live"])
        if ck.get("samples") is not None:
            write_text(SAMPLES, ck["samples"])
    return int(ck["step"])


if __name__ == "__main__":
    run_main(relaunch_under_torchrun, "train")
    run_main(main, "train")
