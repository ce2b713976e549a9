"""Training loops for the benchmark.

`CharlmLoop` is charlm's real training step: `charlm.core.data.Batches` over a packed stream and the library's
`charlm.core.training.Trainer`, the very object stages/train.py steps with (AdamW with two parameter groups, the
`lr_factor` schedule, the disabled-on-CPU GradScaler calls, gradient clipping), with the loss accumulated on the
device without a host sync per step. It leaves out only the tqdm bar and the periodic validation, sampling and
checkpoints, which train.py keeps out of its own throughput figure too.

`BareLoop` is the practical limit: the same network built from plain modules, trained on pre-made tensors
with plain Adam, no data pipeline, no clipping, no schedule.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from charlm.pipeline import params
from charlm.core.data import Batches
from charlm.core.model import CharRNN
from charlm.core.training import Trainer


def shape_params(layers: int, hidden: int, embedding: int, cell: str = "lstm") -> params.ModelParams:
    return params.ModelParams(cell=cell, hidden=hidden, layers=layers, dropout=0.0, embedding=embedding)


class CharlmLoop:
    """stages/train.py's training step (single process)."""

    def __init__(self, stream: np.ndarray, seq_len: int, vocab_size: int, seed: int, mp: params.ModelParams,
                 tp: params.TrainParams, device: str = "cpu"):
        self.device = device = torch.device(device)
        self.tp, self.seq_len = tp, seq_len
        self.batches = batches = Batches(stream, seq_len, tp.batch_size, seed)
        total = batches.per_epoch * tp.epochs  # the schedule's length, as in train.py
        if tp.max_steps:
            total = min(total, tp.max_steps)
        torch.manual_seed(tp.seed)
        self.model = model = CharRNN(vocab_size, **dataclasses.asdict(mp)).to(device)
        self.trainer = trainer = Trainer(model, tp, total, device)  # the very object stages/train.py steps with
        self.optimizer, self.scheduler, self.scaler = trainer.optimizer, trainer.scheduler, trainer.scaler
        self.loss_sum, self.loss_n = torch.zeros((), device=device), 0
        self.done = 0
        self.losses: list[tuple[int, float]] = []
        model.train()

    def step(self) -> int:
        """One training step; returns the characters it trained on."""
        tp, batches = self.tp, self.batches
        step = self.done
        self.loss_sum += self.trainer.step(*batches.batch(*divmod(step, batches.per_epoch)))
        self.loss_n += 1
        self.done = done = step + 1
        if done % tp.log_every == 0:
            self.losses.append((done, (self.loss_sum / self.loss_n).item()))  # the only host sync between logs
            self.loss_sum.zero_()
            self.loss_n = 0
        return tp.batch_size * self.seq_len


class BareLoop:
    """The practical limit: embedding (or pre-made one-hot input) -> nn.LSTM -> nn.Linear, F.cross_entropy,
    backward, Adam; on pre-made, contiguous tensors that are already on the device."""

    def __init__(self, stream: np.ndarray, seq_len: int, vocab_size: int, mp: params.ModelParams,
                 batch_size: int = 64, lr: float = 3e-3, device: str = "cpu", n_batches: int = 8, seed: int = 0):
        torch.manual_seed(seed)
        self.device = device = torch.device(device)
        self.vocab_size, self.chars = vocab_size, batch_size * seq_len
        self.embed = nn.Embedding(vocab_size, mp.embedding).to(device) if mp.embedding else None
        width = mp.embedding or vocab_size
        self.rnn = nn.LSTM(width, mp.hidden, mp.layers, batch_first=True).to(device)
        self.head = nn.Linear(mp.hidden, vocab_size).to(device)
        modules = [m for m in (self.embed, self.rnn, self.head) if m is not None]
        self.optimizer = torch.optim.Adam([p for m in modules for p in m.parameters()], lr=lr)
        rng = np.random.default_rng(seed)
        starts = rng.integers(0, len(stream) - seq_len - 1, size=(n_batches, batch_size))
        windows = torch.from_numpy(np.asarray(stream)[starts[..., None] + np.arange(seq_len + 1)].astype(np.int64))
        self.ys = [w[:, 1:].contiguous().to(device) for w in windows]
        if self.embed is None:  # one-hot input, made once
            self.xs = [F.one_hot(w[:, :-1], vocab_size).float().to(device) for w in windows]
        else:
            self.xs = [w[:, :-1].contiguous().to(device) for w in windows]
        self.i = 0

    def step(self) -> int:
        x, y = self.xs[self.i], self.ys[self.i]
        self.i = (self.i + 1) % len(self.xs)
        inp = self.embed(x) if self.embed is not None else x
        out, _ = self.rnn(inp)
        loss = F.cross_entropy(self.head(out).reshape(-1, self.vocab_size), y.reshape(-1))
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return self.chars
