"""CharRNN: shapes, gradients, batched priming and stepping, and that it can learn at all (torch-rnn style)."""
from __future__ import annotations

import warnings

import pytest
import torch
from torch.nn import functional as F

from charlm.core.model import CharRNN, n_params
from charlm.core.vocab import EOS_ID

V = 11  # vocabulary size of the small models below (3 specials + 8 characters)
CELLS = ["lstm", "gru", "rnn"]


pytestmark = pytest.mark.usefixtures("one_thread")


def states(state, cell):
    """The state as a tuple of (layers, batch, hidden) tensors, whatever the cell."""
    return state if cell == "lstm" else (state,)


def ids(batch: int, time: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, V, (batch, time), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("embedding", [6, 0])
@pytest.mark.parametrize("layers,dropout", [(1, 0.0), (3, 0.0), (3, 0.3)])
def test_forward_backward_shapes_and_finite_gradients(cell, embedding, layers, dropout):
    torch.manual_seed(0)
    model = CharRNN(V, cell=cell, hidden=7, layers=layers, dropout=dropout, embedding=embedding).train()
    x = ids(4, 9)
    logits, state = model(x)
    assert logits.shape == (4, 9, V)
    assert len(states(state, cell)) == (2 if cell == "lstm" else 1)
    for s in states(state, cell):
        assert s.shape == (layers, 4, 7)

    model(x, targets=ids(4, 9, seed=1))[0].backward()
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    assert trainable
    for name, p in trainable:
        assert p.grad is not None, name
        assert p.grad.shape == p.shape, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, f"{name} got an all-zero gradient"
    assert n_params(model) == sum(p.numel() for _, p in trainable)

    if embedding == 0:
        # One-hot input: a frozen identity lookup, not a learned embedding.
        assert not model.embed.weight.requires_grad and model.embed.weight.grad is None
        assert torch.equal(model.embed(x), F.one_hot(x, V).float())
        assert model.rnn.input_size == V
    else:
        assert model.embed.weight.requires_grad and model.rnn.input_size == embedding


def test_state_carries_over_between_calls():
    torch.manual_seed(0)
    model = CharRNN(V, cell="lstm", hidden=8, layers=2, embedding=4).eval()
    x = ids(3, 12)
    whole, whole_state = model(x)
    first, state = model(x[:, :5])
    rest, rest_state = model(x[:, 5:], state)
    torch.testing.assert_close(torch.cat([first, rest], 1), whole)
    for a, b in zip(rest_state, whole_state):
        torch.testing.assert_close(a, b)
    # ... and a zero state is what `None` means.
    assert not torch.allclose(model(x[:, 5:])[0], rest)


def test_dropout_is_active_in_train_mode_only():
    torch.manual_seed(0)
    model = CharRNN(V, cell="gru", hidden=16, layers=3, dropout=0.5, embedding=8)
    x = ids(2, 10)
    model.train()
    assert not torch.equal(model(x)[0], model(x)[0])
    model.eval()
    assert torch.equal(model(x)[0], model(x)[0])


def test_one_layer_with_dropout_builds_without_a_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = CharRNN(V, cell="lstm", hidden=4, layers=1, dropout=0.5, embedding=3)
    assert model.rnn.dropout == 0.0 and model.drop.p == 0.5


def test_loss_is_mean_cross_entropy_in_nats():
    torch.manual_seed(0)
    model = CharRNN(V, cell="rnn", hidden=5, layers=2, embedding=3).eval()
    x, y = ids(3, 6), ids(3, 6, seed=2)
    logits, _ = model(x)
    manual = -torch.log_softmax(logits, -1).gather(-1, y[..., None]).mean()
    torch.testing.assert_close(model(x, targets=y)[0], manual)


PROMPTS = [[EOS_ID, 5, 3, 9], [EOS_ID], [EOS_ID, 4, 4, 4, 4, 2, 7, 8, 10, 3], [EOS_ID, 6, 6], [EOS_ID, 9, 3, 5]]


@pytest.mark.parametrize("cell", CELLS)
def test_prime_of_ragged_prompts_equals_each_prompt_alone(cell):
    torch.manual_seed(0)
    model = CharRNN(V, cell=cell, hidden=8, layers=2, embedding=5).eval()
    logits, state = model.prime(PROMPTS)
    assert logits.shape == (len(PROMPTS), V)
    for i, prompt in enumerate(PROMPTS):
        with torch.no_grad():
            alone, alone_state = model(torch.tensor([prompt]))
        torch.testing.assert_close(logits[i], alone[0, -1], rtol=1e-5, atol=1e-6)
        for batched, single in zip(states(state, cell), states(alone_state, cell)):
            torch.testing.assert_close(batched[:, i], single[:, 0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("cell", CELLS)
def test_step_after_prime_equals_forward_over_the_whole_sequence(cell):
    torch.manual_seed(1)
    model = CharRNN(V, cell=cell, hidden=8, layers=3, embedding=0).eval()
    continuation = ids(len(PROMPTS), 6, seed=3)
    logits, state = model.prime(PROMPTS)
    stepped = []
    for t in range(continuation.size(1)):
        logits, state = model.step(continuation[:, t], state)
        stepped.append(logits)
    for i, prompt in enumerate(PROMPTS):
        with torch.no_grad():
            whole, whole_state = model(torch.tensor([prompt + continuation[i].tolist()]))
        for t in range(continuation.size(1)):
            torch.testing.assert_close(stepped[t][i], whole[0, len(prompt) + t], rtol=1e-5, atol=1e-6)
        for s, w in zip(states(state, cell), states(whole_state, cell)):
            torch.testing.assert_close(s[:, i], w[:, 0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("layers,embedding", [(1, 5), (2, 0), (3, 5)])
@pytest.mark.parametrize("batch", [1, 5])
def test_lstm_stepper_equals_step(layers, embedding, batch):
    """The written-out LSTM cell that generation uses on a CPU gives nn.LSTM's logits and state, step by step."""
    torch.manual_seed(layers)
    model = CharRNN(V, cell="lstm", hidden=16, layers=layers, dropout=0.2, embedding=embedding).eval()
    stepper = model.stepper()
    assert stepper != model.step
    continuation = ids(batch, 8, seed=4)
    _, state = model.prime(PROMPTS[:batch])
    fast = state
    for t in range(continuation.size(1)):
        logits, state = model.step(continuation[:, t], state)
        fast_logits, fast = stepper(continuation[:, t], fast)
        torch.testing.assert_close(fast_logits, logits, rtol=1e-5, atol=1e-6)
        for f, s in zip(fast, state):
            torch.testing.assert_close(f, s, rtol=1e-5, atol=1e-6)
    assert not fast_logits.requires_grad


def test_stepper_reads_the_weights_when_made():
    torch.manual_seed(0)
    model = CharRNN(V, cell="lstm", hidden=8, layers=2, embedding=4).eval()
    token, (_, state) = torch.tensor([3]), model.prime([[EOS_ID]])
    before = model.stepper()
    with torch.no_grad():
        model.head.bias.add_(1.0)
        model.rnn.weight_hh_l1.mul_(2.0)
    torch.testing.assert_close(model.stepper()(token, state)[0], model.step(token, state)[0])
    assert not torch.allclose(before(token, state)[0], model.step(token, state)[0])


@pytest.mark.parametrize("cell,training", [("gru", False), ("rnn", False), ("lstm", True)])
def test_stepper_is_step_where_nn_does_the_work(cell, training):
    """GRU and RNN cells, and a model in training mode (dropout between layers), step through nn itself."""
    model = CharRNN(V, cell=cell, hidden=8, layers=2, dropout=0.5, embedding=4).train(training)
    assert model.stepper() == model.step


def test_prime_and_step_do_not_track_gradients():
    model = CharRNN(V, cell="lstm", hidden=4, layers=1, embedding=3)
    logits, state = model.prime([[EOS_ID, 3]])
    assert not logits.requires_grad
    logits, _ = model.step(torch.tensor([4]), state)
    assert not logits.requires_grad


@pytest.mark.parametrize("cell", CELLS)
def test_memorises_a_short_repeated_string(cell):
    text = "hello world! " * 6
    chars = sorted(set(text))
    seq = torch.tensor([[EOS_ID] + [3 + chars.index(c) for c in text]])
    x, y = seq[:, :-1], seq[:, 1:]
    torch.manual_seed(0)
    model = CharRNN(3 + len(chars), cell=cell, hidden=32, layers=1, embedding=8)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    first = model(x, targets=y)[0].item()
    for _ in range(120):
        loss = model(x, targets=y)[0]
        opt.zero_grad()
        loss.backward()
        opt.step()
    final = model(x, targets=y)[0].item()
    assert first > 2.0
    # Only the first 'h' after <eos> is a real guess: the rest is determined by context.
    assert final < 0.05, f"{cell} failed to memorise: loss {first:.3f} -> {final:.4f}"

    # Greedy continuation from a prime reproduces the string.
    model.eval()
    logits, state = model.prime([seq[0, :8].tolist()])
    out = []
    for _ in range(20):
        token = logits.argmax(-1)
        out.append(token.item())
        logits, state = model.step(token, state)
    assert out == seq[0, 8:28].tolist()


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("embedding", [3, 0])
def test_gradcheck_float64(cell, embedding):
    torch.manual_seed(0)
    model = CharRNN(5, cell=cell, hidden=3, layers=2, embedding=embedding).double()
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    x, y = torch.tensor([[1, 3, 4, 2], [0, 4, 1, 3]]), torch.tensor([[3, 4, 2, 1], [4, 1, 3, 3]])

    def loss(*params):
        out = torch.func.functional_call(model, dict(zip(names, params)), (x,))[0]
        return F.cross_entropy(out.reshape(-1, 5), y.reshape(-1))

    inputs = tuple(dict(model.named_parameters())[n].detach().clone().requires_grad_() for n in names)
    assert torch.autograd.gradcheck(loss, inputs, eps=1e-6, atol=1e-5)


def test_the_model_cell_choices_of_params_are_the_models_cells():
    """The cell contract: a cell is added to CELLS alone, and params.yaml's choices and comment follow it."""
    import dataclasses
    from pathlib import Path

    from charlm.core.model import CELLS
    from charlm.pipeline.sections.model import ModelParams

    cell = next(f for f in dataclasses.fields(ModelParams) if f.name == "cell")
    assert tuple(cell.metadata["choices"]) == tuple(CELLS)
    shipped = (Path(__file__).resolve().parent.parent / "params.yaml").read_text(encoding="utf-8")
    line = next(line for line in shipped.splitlines() if line.strip().startswith("cell:"))
    assert line.split("#", 1)[1].split() == " | ".join(CELLS).split(), line
    for name in CELLS:
        model = CharRNN(5, cell=name, hidden=3, layers=2, embedding=2)
        assert isinstance(model.rnn, torch.nn.RNNBase) and hasattr(model.rnn, "dropout")
        assert all(hasattr(model.rnn, f"{w}_l1") for w in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"))
