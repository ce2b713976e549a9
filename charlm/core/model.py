"""The character-level language model: embedding (or one-hot) -> stacked LSTM/GRU/RNN -> linear head."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.utils.rnn import pack_padded_sequence, pad_sequence

# The cell contract. Every cell here is an nn.RNNBase, and CharRNN relies on all of it:
# - constructed as Cell(input_width, hidden, layers, batch_first=True, dropout=p);
# - it accepts a PackedSequence (`prime` runs prompts of different lengths in one batch);
# - its weights are named weight_ih_l{i}, weight_hh_l{i}, bias_ih_l{i}, bias_hh_l{i} (`stepper`, and the
#   playground's unit activations in core/inspection.py);
# - it has a `dropout` attribute (scoring switches it off for dynamic evaluation);
# - its state is one tensor (layers, batch, hidden), or for an LSTM a tuple (h, c) of two such tensors.
# A cell that meets the contract is added here and nowhere else: the `model.cell` choices of params.yaml are
# these keys (charlm/pipeline/sections/model.py), which tests/test_model.py checks.
CELLS = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}
IGNORE = -100  # a target that is not scored (padding after an item's end)


class CharRNN(nn.Module):
    """Embedding (or one-hot) -> stacked recurrent cells -> linear head. The shape comes from the `model` params
    section (no defaults here: params.yaml holds them); dropout 0 means off."""

    def __init__(
        self,
        vocab_size: int,
        *,
        cell: str,
        hidden: int,
        layers: int,
        embedding: int,
        dropout: float = 0.0,
        weight_drop: float = 0.0,
    ):
        super().__init__()
        self.config = dict(
            vocab_size=vocab_size, cell=cell, hidden=hidden, layers=layers, dropout=dropout, embedding=embedding
        )
        if weight_drop:  # absent from files written before it existed, and from models without it: 0 = off
            self.config["weight_drop"] = weight_drop
        self.weight_drop = weight_drop
        if embedding > 0:
            self.embed = nn.Embedding(vocab_size, embedding)
        else:
            # One-hot input as an identity lookup table: same maths, no one_hot().float() per step.
            self.embed = nn.Embedding.from_pretrained(torch.eye(vocab_size), freeze=True)
        width = embedding or vocab_size
        self.rnn = CELLS[cell](width, hidden, layers, batch_first=True, dropout=dropout if layers > 1 else 0.0)
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(hidden, vocab_size)

    def forward(self, x: torch.Tensor, state=None, targets: torch.Tensor | None = None, reduction: str = "mean"):
        """x: (batch, time) token ids -> logits (batch, time, vocab) and the final recurrent state.

        Given targets (batch, time), returns the cross-entropy in nats instead of the logits: the mean per
        character, or with reduction="sum" the total; a target of IGNORE is not scored. This is the one loss of
        charlm, used by training (through DDP, which only sees forward), validation and evaluation.
        """
        out, state = self.recur(self.embed(x), state)
        logits = self.head(self.drop(out))
        if targets is None:
            return logits, state
        flat = logits.reshape(-1, logits.size(-1)).float()  # the softmax in fp32, also under autocast
        return F.cross_entropy(flat, targets.reshape(-1), ignore_index=IGNORE, reduction=reduction), state

    def recur(self, inputs: torch.Tensor, state=None):
        """The recurrent cells over `inputs`. In training mode with weight_drop > 0, each hidden-to-hidden matrix is
        replaced, for this call, by a copy with that share of its entries zeroed (DropConnect, as AWD-LSTM does):
        one mask per minibatch, the same at every time step, and nn.LSTM's fused kernel still does the work."""
        if not (self.training and self.weight_drop > 0):
            return self.rnn(inputs, state)
        dropped = {}
        for i in range(self.rnn.num_layers):
            weight = getattr(self.rnn, f"weight_hh_l{i}")
            # F.dropout's own mask is twice as slow on a CPU as uniform noise compared in place
            keep = torch.rand_like(weight).ge_(self.weight_drop).div_(1 - self.weight_drop)
            dropped[f"weight_hh_l{i}"] = weight * keep
        with warnings.catch_warnings():  # cuDNN notes that the swapped weights are not one flat buffer: expected
            warnings.filterwarnings("ignore", message="RNN module weights are not part")
            return torch.func.functional_call(self.rnn, dropped, (inputs, state))

    @torch.no_grad()
    def prime(self, prompts: list[list[int]]):
        """Run prompts of different lengths in one batch; return next-token logits (batch, vocab) and state."""
        device = self.head.weight.device
        lengths = torch.tensor([len(p) for p in prompts])
        x = pad_sequence([torch.tensor(p, dtype=torch.long) for p in prompts], batch_first=True).to(device)
        packed = pack_padded_sequence(self.embed(x), lengths, batch_first=True, enforce_sorted=False)
        out, state = self.rnn(packed)
        # The packed output is sorted by length; take each prompt's last step in the original order.
        out, _ = torch.nn.utils.rnn.pad_packed_sequence(out, batch_first=True)
        last = out[torch.arange(len(prompts), device=device), (lengths - 1).to(device)]
        return self.head(last), state

    @torch.no_grad()
    def step(self, token: torch.Tensor, state):
        """One character per stream: token (batch,) -> logits (batch, vocab), new state. O(1) per character."""
        out, state = self.rnn(self.embed(token[:, None]), state)
        return self.head(out[:, 0]), state

    @torch.no_grad()
    def stepper(self) -> Callable:
        """`step` for generating with the weights as they are now: a function (token, state) -> (logits, state).

        An LSTM in eval mode on a CPU gets its cell written out, which is faster per character at few streams
        (BENCHMARKS.md, generation section): layer 0's input projection is folded into the embedding table, so it is a
        row lookup, and nn.LSTM's per-call set-up goes. Elsewhere (GRU, RNN, training mode with dropout, and
        CUDA, where cuDNN's fused step is the faster one, BENCHMARKS.md) this is `step` itself. The
        weights are read once: call it again after they change.
        """
        if self.config["cell"] != "lstm" or self.training or self.head.weight.device.type != "cpu":
            return self.step
        layers = [
            [getattr(self.rnn, f"{name}_l{i}") for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]
            for i in range(self.rnn.num_layers)
        ]
        table = torch.addmm(layers[0][2] + layers[0][3], self.embed.weight, layers[0][0].T)  # (vocab, 4 hidden)
        upper = [(w_ih.T.contiguous(), b_ih + b_hh) for w_ih, _, b_ih, b_hh in layers[1:]]
        w_hh = [layer[1].T.contiguous() for layer in layers]
        head_w, head_b = self.head.weight.T.contiguous(), self.head.bias

        @torch.no_grad()
        def step(token: torch.Tensor, state):
            h, c = state
            gates, new_h, new_c = table[token], [], []
            for i in range(len(w_hh)):
                gates.addmm_(h[i], w_hh[i])
                in_gate, forget, cell, out = gates.chunk(4, 1)  # nn.LSTM's gate order
                new_c.append(torch.sigmoid(forget) * c[i] + torch.sigmoid(in_gate) * torch.tanh(cell))
                new_h.append(torch.sigmoid(out) * torch.tanh(new_c[-1]))
                if i + 1 < len(w_hh):
                    gates = torch.addmm(upper[i][1], new_h[-1], upper[i][0])
            return torch.addmm(head_b, new_h[-1], head_w), (torch.stack(new_h), torch.stack(new_c))

        return step


@contextmanager
def evaluating(model: nn.Module) -> Iterator[None]:
    """Eval mode (no dropout, no weight drop) and no autograd for the duration; the model is given back in the
    mode it came in, so scoring during training leaves training as it was."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
