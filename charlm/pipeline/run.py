"""A training run as the train stage builds it from its params: data, model, Trainer and the fingerprint that a
checkpoint must match. Built the same way in every process of a data-parallel run."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from charlm.base.errors import CharlmError
from charlm.core.data import Batches, Packed, load_packed
from charlm.core.model import CharRNN, n_params
from charlm.core.precision import resolve
from charlm.core.training import Optimisation, Trainer
from charlm.core.vocab import Vocab
from charlm.pipeline import artifact, distributed
from charlm.pipeline.sections.model import ModelParams
from charlm.pipeline.sections.train import TrainParams


@dataclass
class Run:
    """Everything a training run is made of."""

    model_params: ModelParams
    train_params: TrainParams
    vocab: Vocab
    packed: Packed
    batches: Batches
    total: int  # steps
    model: CharRNN
    trainer: Trainer
    run_id: str  # the fingerprint a checkpoint must match

    @property
    def has_val(self) -> bool:  # pack.val_fraction: 0 means no validation split
        return self.packed.meta["splits"]["val"]["items"] > 0

    @property
    def chars_per_step(self) -> int:
        return self.train_params.batch_size * self.packed.meta["seq_len"]

    def describe(self, world: int, start: int) -> str:
        shape, seq_len = self.model_params, self.packed.meta["seq_len"]
        return (
            f"train: {shape.cell} {shape.layers}x{shape.hidden}, {n_params(self.model):,} parameters, "
            f"{self.trainer.device.type}"
            + (f" x {world} processes" if world > 1 else "")
            + f", {self.total:,} steps of {self.train_params.batch_size}x{seq_len} chars "
            f"({self.batches.per_epoch:,} per epoch), precision {self.trainer.precision.explained}"
            + (f", resuming at step {start:,}" if start else "")
        )

    def save_model(self, path: Path, val_bpc: float | None) -> None:
        """The model file: config, vocabulary, weights and how they were trained. Nothing run-dependent (such as
        timings) goes in: identical runs give identical bytes, so DVC does not rerun evaluate and generate after a
        resume or a retrain."""
        info = {
            "steps": self.total,
            "seq_len": self.packed.meta["seq_len"],
            "val_bpc": val_bpc,
            "precision": self.trainer.precision.record(),
            "params": {"model": dataclasses.asdict(self.model_params), "train": dataclasses.asdict(self.train_params)},
        }
        self.model.to("cpu")
        artifact.save(path, artifact.model_record(self.model, self.vocab, info))


def fingerprint(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def build_run(
    model_params: ModelParams,
    train_params: TrainParams,
    vocab_path: Path,
    packed_dir: Path,
    rank: int,
    world: int,
    device: torch.device,
) -> Run:
    """Load the data, seed, build the model (from train.init_from's weights, if set) and its Trainer."""
    vocab, packed = Vocab.load(vocab_path), load_packed(packed_dir)
    meta, settings = packed.meta, train_params
    if meta["vocab_size"] != len(vocab):
        raise CharlmError(
            f"{packed_dir} was built with {meta['vocab_size']} symbols but {vocab_path} has {len(vocab)}; "
            f"rerun `dvc repro pack`"
        )
    # train.batch_size is the global batch: each process takes a disjoint 1/world of every minibatch.
    align = meta.get("align", "stream")
    batches = Batches(
        packed.streams["train"], meta["seq_len"], settings.batch_size // world, meta["seed"], rank, world, align
    )
    total = min(batches.per_epoch * settings.epochs, settings.max_steps or batches.per_epoch * settings.epochs)
    if settings.deterministic and device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    torch.manual_seed(settings.seed)
    model = CharRNN(len(vocab), **dataclasses.asdict(model_params)).to(device)
    # Decided by the lead on its hardware and used by every process; it leaves the RNGs as they were
    precision = distributed.lead_choice(
        lambda: resolve(settings.amp, device, model.config, notice=print if rank == 0 else lambda _: None), world
    )
    init_sha = load_initial_weights(model, settings.init_from, vocab) if settings.init_from else None
    # The number of processes is left out, so a checkpoint resumes under any world size; the starting model
    # counts by its bytes, not its path. The precision counts as run, not as asked (`auto` differs by machine):
    # a checkpoint of a bf16 run does not continue in fp32.
    run_id = fingerprint(
        dataclasses.asdict(model_params), dataclasses.asdict(settings) | {"processes": None}, meta, vocab.itos,
        init_sha, device.type, torch.__version__, [precision.step, precision.recurrent],
    )  # fmt: skip
    trainer = Trainer(model, Optimisation.of(settings), total, device, world, precision)
    return Run(model_params, settings, vocab, packed, batches, total, model, trainer, run_id)


def load_initial_weights(model: CharRNN, path: str, vocab: Vocab) -> str:
    """Load the weights of a trained model into `model` (fine-tuning); return the file's sha256. The model must
    share the data's vocabulary and the model.* shape (dropout and weight_drop may differ)."""
    init, init_vocab, _ = artifact.load_model(path, fix="copy a charlm model there, or set train.init_from: null")
    if init_vocab.chars != vocab.chars:
        raise CharlmError(
            f"{path} has a different vocabulary ({len(init_vocab)} symbols) from data/vocab.json ({len(vocab)}); "
            f"set vocab.from_model: {path} so the data is encoded with the model's characters"
        )
    shape = {k: v for k, v in model.config.items() if k not in ("dropout", "weight_drop", "vocab_size")}
    theirs = {k: init.config[k] for k in shape}
    if theirs != shape:
        wanted = ", ".join(f"model.{k}: {v}" for k, v in theirs.items())
        raise CharlmError(f"{path} is a {theirs} model but params.yaml asks for {shape}; set {wanted}")
    model.load_state_dict(init.state_dict())
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()
