"""The lesson's Recipe B, reproduced as a baseline: per-item minibatches, one-hot LSTM(64), Adam at 0.01.

Each minibatch is every 100-character window of ONE news item, built with a Python loop, as in the lesson;
items shorter than 110 characters are skipped. bench/quality.py trains it on charlm's prepared train split and
vocabulary for a wall-clock budget and scores it with charlm's test protocol, so its test bpc is directly comparable
with a charlm model's. The two generation styles are the baselines of bench/generation.py.
"""

from __future__ import annotations

import time

import torch

from charlm.core.model import CharRNN
from charlm.core.vocab import Vocab

NCHARS = 100


def get_batch(vocab: Vocab, text: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The lesson's batch: all len(text) - 100 windows of one item, encoded character by character."""
    ins = torch.zeros(len(text) - NCHARS, NCHARS, dtype=torch.long)
    outs = torch.zeros(len(text) - NCHARS, NCHARS, dtype=torch.long)
    for i in range(len(text) - NCHARS):
        ins[i] = torch.tensor(vocab.ids(text[i : i + NCHARS]))
        outs[i] = torch.tensor(vocab.ids(text[i + 1 : i + NCHARS + 1]))
    return ins, outs


def train_lesson(vocab: Vocab, items: list[str], seconds: float, seed: int = 0) -> tuple[CharRNN, dict]:
    """Train Recipe B for `seconds` of wall clock."""
    torch.manual_seed(seed)
    # One-hot -> LSTM(64) -> linear; CharRNN with embedding=0 is exactly that network.
    net = CharRNN(len(vocab), cell="lstm", hidden=64, layers=1, dropout=0.0, embedding=0)
    optimizer = torch.optim.Adam(net.parameters(), 0.01)
    loss_fn = torch.nn.CrossEntropyLoss()
    net.train()
    t0, steps = time.perf_counter(), 0
    while time.perf_counter() - t0 < seconds:
        for text in items:
            if len(text) - NCHARS < 10:
                continue
            text_in, text_out = get_batch(vocab, text)
            optimizer.zero_grad()
            out, _ = net(text_in)
            loss_fn(out.view(-1, len(vocab)), text_out.flatten()).backward()
            optimizer.step()
            steps += 1
            if time.perf_counter() - t0 >= seconds:
                break
    return net.eval(), {"steps": steps, "train_s": round(time.perf_counter() - t0, 1)}


def next_chars(vocab: Vocab, out, texts: list[str], temperature: float, generator):
    """The lesson's sampling: exp(logits / T) (no max subtraction), each character decoded as it comes."""
    nc = torch.multinomial(out[:, -1].div(temperature).exp(), 1, generator=generator)
    return nc, [t + vocab.itos[i] for t, i in zip(texts, nc[:, 0].tolist(), strict=True)]


@torch.no_grad()
def generate_stateful(net, vocab: Vocab, prompts: list[str], size: int, temperature=0.8, generator=None) -> list[str]:
    """The lesson's generation, batched: feed the prompt once, then one step per character with the carried
    (h, c), on the device of `net`."""
    device = next(net.parameters()).device
    out, state = net(torch.tensor([vocab.ids(p) for p in prompts], device=device))
    texts = list(prompts)
    for _ in range(size):
        nc, texts = next_chars(vocab, out, texts, temperature, generator)
        out, state = net(nc, state)
    return texts


@torch.no_grad()
def generate_prefix(net, vocab: Vocab, prompts: list[str], size: int, temperature=0.8, generator=None) -> list[str]:
    """Recipe A's generation: re-run the whole text so far for every new character (O(n^2))."""
    ids, texts = torch.tensor([vocab.ids(p) for p in prompts]), list(prompts)
    for _ in range(size):
        out, _ = net(ids)
        nc, texts = next_chars(vocab, out, texts, temperature, generator)
        ids = torch.cat([ids, nc], dim=1)
    return texts
