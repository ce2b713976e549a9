"""DropConnect on the recurrent weights (model.weight_drop), the moving average of the weights (train.ema_decay),
the softmax temperature fitted on val and folded into the head (train.fit_temperature), and bf16 mixed precision
of the training step on CPU (train.amp; its choice per machine is tests/test_precision.py)."""

from __future__ import annotations

import copy
import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from charlm.base.errors import CharlmError
from charlm.core.model import CharRNN
from charlm.core.precision import resolve
from charlm.core.scoring import TEMPERATURES, best_temperature, stream_bpc
from charlm.core.training import Optimisation, Trainer
from charlm.core.vocab import EOS_ID, Vocab
from charlm.pipeline import artifact
from charlm.pipeline.run import load_initial_weights
from conftest import needs_native_bf16

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = Vocab(list("abcdefgh"))
V = len(VOCAB)  # 3 specials + 8 characters
CELLS = ["lstm", "gru", "rnn"]
CPU = torch.device("cpu")
OLD_MODEL = Path(__file__).resolve().parent / "fixtures" / "model-before-layers.pt"


def ids(batch: int, time: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, V, (batch, time), generator=torch.Generator().manual_seed(seed))


def without_weight_drop(model: CharRNN) -> CharRNN:
    """The same weights in a model built with weight_drop 0."""
    twin = CharRNN(**{**model.config, "weight_drop": 0.0})
    twin.load_state_dict(model.state_dict())
    return twin.train(model.training)


# --------------------------------------------------------------------------- model.weight_drop


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("layers", [1, 2])
def test_weight_drop_zeroes_a_share_of_each_recurrent_matrix_for_one_forward(cell, layers):
    p = 0.4
    torch.manual_seed(0)
    model = CharRNN(V, cell=cell, hidden=32, layers=layers, embedding=5, weight_drop=p).train()
    twin = without_weight_drop(model)
    before = copy.deepcopy(model.state_dict())
    x, y = ids(4, 12), ids(4, 12, seed=1)

    assert not torch.equal(model(x)[0], model(x)[0])  # a fresh mask per forward call
    assert torch.equal(twin(x)[0], twin(x)[0])  # (dropout is 0: nothing else is random)

    loss, _ = model(x, targets=y)
    loss.backward()
    # The gradient's zeros are the mask: the loss and every gradient are those of the same model whose
    # hidden-to-hidden matrices are multiplied by (gradient != 0) / (1 - p), and nothing else differs.
    masks = {}
    for i in range(layers):
        keep = (getattr(model.rnn, f"weight_hh_l{i}").grad != 0).float()
        dropped = 1 - keep.mean().item()
        assert abs(dropped - p) < 0.05, f"layer {i}: {dropped:.3f} of weight_hh dropped, not about {p}"
        masks[f"rnn.weight_hh_l{i}"] = getattr(twin.rnn, f"weight_hh_l{i}") * keep / (1 - p)
    reference, _ = torch.func.functional_call(twin, masks, (x,), {"targets": y})
    reference.backward()
    torch.testing.assert_close(loss, reference, rtol=1e-6, atol=0)
    for (name, param), (_, same) in zip(model.named_parameters(), twin.named_parameters(), strict=True):
        torch.testing.assert_close(param.grad, same.grad, rtol=1e-5, atol=1e-7, msg=name)
        if name.startswith("rnn.") and "weight_hh" not in name:
            assert (param.grad != 0).all(), f"{name}: only the hidden-to-hidden weights are dropped"

    for name, tensor in model.state_dict().items():  # the mask went into a copy, not into the parameters
        assert torch.equal(tensor, before[name]), name
    model.eval()
    twin.eval()
    assert torch.equal(model(x)[0], twin(x)[0])  # off in eval mode


@pytest.mark.parametrize("cell", [pytest.param("lstm", marks=needs_native_bf16()), "gru", "rnn"])
def test_weight_drop_under_cpu_autocast_gives_finite_gradients(cell):
    torch.manual_seed(0)
    model = CharRNN(V, cell=cell, hidden=16, layers=2, embedding=5, weight_drop=0.5).train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = model(ids(3, 10), targets=ids(3, 10, seed=1))
    loss.backward()
    assert torch.isfinite(loss)
    for name, param in model.named_parameters():
        assert param.dtype == torch.float32 and torch.isfinite(param.grad).all(), name
    for i in range(2):
        dropped = (getattr(model.rnn, f"weight_hh_l{i}").grad == 0).float().mean().item()
        assert 0.35 < dropped < 0.65, f"layer {i}: {dropped:.3f} dropped under autocast"


@pytest.mark.parametrize("cell", CELLS)
def test_generation_ignores_weight_drop_in_eval_mode(cell):
    torch.manual_seed(0)
    model = CharRNN(V, cell=cell, hidden=16, layers=2, embedding=5, weight_drop=0.5).eval()
    twin = without_weight_drop(model).eval()
    prompts = [[EOS_ID, 5, 3, 9], [EOS_ID], [EOS_ID, 4, 4, 2]]
    logits, state = model.prime(prompts)
    twin_logits, twin_state = twin.prime(prompts)
    assert torch.equal(logits, twin_logits)
    token = logits.argmax(-1)
    stepper, twin_stepper = model.stepper(), twin.stepper()
    assert (stepper == model.step) == (cell != "lstm")  # the LSTM keeps its written-out cell
    for step, twin_step in [(model.step, twin.step), (stepper, twin_stepper)]:
        a, b = step(token, state), twin_step(token, twin_state)
        assert torch.equal(a[0], b[0])
        for s, t in zip(a[1] if cell == "lstm" else (a[1],), b[1] if cell == "lstm" else (b[1],), strict=True):
            assert torch.equal(s, t)


def test_weight_drop_is_kept_by_the_model_file_and_absent_from_old_ones(tmp_path):
    torch.manual_seed(0)
    model = CharRNN(V, cell="lstm", hidden=8, layers=1, embedding=4, weight_drop=0.3)
    path = tmp_path / "model.pt"
    artifact.save(path, artifact.model_record(model, VOCAB, {}))
    loaded, _, _ = artifact.load_model(path)
    assert loaded.config["weight_drop"] == 0.3 and loaded.weight_drop == 0.3
    x = ids(2, 6)
    loaded.train()
    assert not torch.equal(loaded(x)[0], loaded(x)[0])  # the loaded model drops, not just its config says so

    record = artifact.model_record(model, VOCAB, {})
    del record["config"]["weight_drop"]  # as written before weight_drop existed
    artifact.save(path, record)
    old, _, _ = artifact.load_model(path)
    assert old.weight_drop == 0 and "weight_drop" not in old.config
    old.train()
    assert torch.equal(old(x)[0], old(x)[0])
    shipped, _, _ = artifact.load_model(OLD_MODEL)  # a file written by old code
    assert shipped.weight_drop == 0 and "weight_drop" not in shipped.config
    # a model without it writes no key, so its files stay as they were
    assert "weight_drop" not in artifact.model_record(without_weight_drop(model), VOCAB, {})["config"]


@pytest.mark.parametrize("theirs,ours", [(0.3, 0.0), (0.0, 0.5), (0.3, 0.5)])
def test_fine_tuning_may_change_weight_drop(tmp_path, theirs, ours):
    torch.manual_seed(0)
    start = CharRNN(V, cell="lstm", hidden=8, layers=1, embedding=4, weight_drop=theirs)
    path = tmp_path / "start.pt"
    artifact.save(path, artifact.model_record(start, VOCAB, {}))
    torch.manual_seed(1)
    model = CharRNN(V, cell="lstm", hidden=8, layers=1, embedding=4, weight_drop=ours)
    load_initial_weights(model, str(path), VOCAB)
    assert model.weight_drop == ours
    for name, tensor in start.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name


# --------------------------------------------------------------------------- train.ema_decay


def settings(**changes) -> Optimisation:
    base = Optimisation(lr=1e-2, beta2=0.99, weight_decay=0.01, warmup_steps=2, schedule="cosine",
                        min_lr_ratio=0.1, grad_clip=1.0, amp="none")  # fmt: skip
    return dataclasses.replace(base, **changes)


def tiny_trainer(total: int = 12, seed: int = 0, weight_drop: float = 0.0, **changes) -> Trainer:
    torch.manual_seed(seed)
    model = CharRNN(V, cell="lstm", hidden=8, layers=1, embedding=4, weight_drop=weight_drop).train()
    return Trainer(model, settings(**changes), total, CPU)


def batch(step: int) -> tuple[np.ndarray, np.ndarray]:
    window = np.random.default_rng(step).integers(3, V, size=(4, 11))
    return window[:, :-1], window[:, 1:]


def val_stream(seed: int = 0, items: int = 12) -> np.ndarray:
    """`<eos> item <eos> item ... <eos>`: items of 1..30 characters."""
    rng = np.random.default_rng(seed)
    stream = [EOS_ID]
    for n in rng.integers(1, 31, size=items):
        stream += rng.integers(3, V, size=n).tolist() + [EOS_ID]
    return np.array(stream, dtype=np.uint8)


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def with_weights(model: CharRNN, params: list[torch.Tensor], values: list[torch.Tensor]) -> CharRNN:
    """A copy of `model` whose parameters `params` (the Trainer's list) hold `values`."""
    names = {id(p): name for name, p in model.named_parameters()}
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for p, value in zip(params, values, strict=True):
            twin.get_parameter(names[id(p)]).copy_(value)
    return twin


def test_the_average_is_the_warm_up_moving_average_of_the_weights_after_each_step():
    decay, steps = 0.5, 12  # (1 + t) / (10 + t) reaches 0.5 at t = 8: the warm-up, then the set decay
    trainer = tiny_trainer(ema_decay=decay)
    plain = tiny_trainer(ema_decay=0.0)
    assert plain.average is None
    expected = [p.detach().double().clone() for p in trainer.params]
    for t in range(1, steps + 1):
        trainer.step(*batch(t))
        plain.step(*batch(t))
        d = min(decay, (1 + t) / (10 + t))
        expected = [d * e + (1 - d) * p.detach().double() for e, p in zip(expected, trainer.params, strict=True)]
    assert len(trainer.average) == len(trainer.params) == len(list(trainer.model.parameters()))
    for average, hand, param in zip(trainer.average, expected, trainer.params, strict=True):
        assert average.dtype == torch.float32 and average.data_ptr() != param.data_ptr()
        torch.testing.assert_close(average.double(), hand, rtol=1e-5, atol=1e-7)
        assert not torch.allclose(average, param)
    # averaging does not touch training: the weights are those of the same run without it
    for name, tensor in plain.model.state_dict().items():
        assert torch.equal(trainer.model.state_dict()[name], tensor), name


def test_validate_scores_the_average_and_gives_the_trained_weights_back():
    trainer = tiny_trainer(ema_decay=0.9)
    for t in range(8):
        trainer.step(*batch(t))
    val, trained = val_stream(), snapshot(trainer.model)
    averaged_model = with_weights(trainer.model, trainer.params, trainer.average)

    assert trainer.validate(val) == pytest.approx(stream_bpc(averaged_model, val, 5, CPU), rel=1e-6)
    assert trainer.validate(val, averaged=False) == pytest.approx(stream_bpc(trainer.model, val, 5, CPU), rel=1e-6)
    assert trainer.validate(val) != pytest.approx(trainer.validate(val, averaged=False), rel=1e-4)
    assert trainer.model.training
    for name, tensor in trainer.model.state_dict().items():
        assert torch.equal(tensor, trained[name]), name

    with pytest.raises(RuntimeError, match="inside"), trainer.averaged():
        for name, tensor in trainer.model.state_dict().items():
            assert torch.equal(tensor, averaged_model.state_dict()[name]), name
        raise RuntimeError("inside")
    for name, tensor in trainer.model.state_dict().items():  # given back after an error too
        assert torch.equal(tensor, trained[name]), name


def test_finish_leaves_the_average_in_the_model():
    trainer = tiny_trainer(ema_decay=0.9)
    for t in range(8):
        trainer.step(*batch(t))
    average = [a.clone() for a in trainer.average]
    val = val_stream()
    averaged_bpc = trainer.validate(val)
    assert trainer.finish(val) is None  # no temperature without train.fit_temperature
    assert trainer.average is None and "average" not in trainer.state_dict()
    for param, value in zip(trainer.params, average, strict=True):
        assert torch.equal(param, value)
    assert trainer.validate(val) == trainer.validate(val, averaged=False) == pytest.approx(averaged_bpc, rel=1e-6)


@pytest.mark.parametrize("ema_decay", [0.0, 0.9])
def test_a_trainer_resumed_from_a_checkpoint_continues_bit_identically(tmp_path, ema_decay):
    """With weight drop on, so that the RNG must come back too."""
    total, stop = 10, 4
    straight = tiny_trainer(total, weight_drop=0.3, ema_decay=ema_decay)
    for t in range(total):
        straight.step(*batch(t))

    first = tiny_trainer(total, weight_drop=0.3, ema_decay=ema_decay)
    for t in range(stop):
        first.step(*batch(t))
    path = tmp_path / "checkpoint.pt"
    artifact.save(path, first.state_dict())
    assert ("average" in first.state_dict()) == (ema_decay > 0)  # without it, checkpoints are as before
    # as another process would: other initial weights, other RNG state, until the checkpoint loads
    resumed = tiny_trainer(total, seed=7, weight_drop=0.3, ema_decay=ema_decay)
    resumed.load_state_dict(artifact.load(path, ""))
    for t in range(stop, total):
        resumed.step(*batch(t))

    for name, tensor in straight.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[name], tensor), name
    if ema_decay:
        for a, b in zip(resumed.average, straight.average, strict=True):
            assert torch.equal(a, b)
    else:
        assert resumed.average is None


def test_an_old_checkpoint_resumes_without_an_average():
    saved = artifact.load(OLD_MODEL.parent / "checkpoint-before-layers.pt", "")
    assert "average" not in saved
    trainer = Trainer(CharRNN(**saved["config"]), settings(), 2, CPU)
    trainer.load_state_dict(saved)
    assert trainer.average is None and "average" not in trainer.state_dict()
    trainer.step(*batch(0))  # and trains on


def test_a_trainer_loaded_from_another_trainers_state_owns_its_average():
    source, loaded = tiny_trainer(ema_decay=0.9), tiny_trainer(ema_decay=0.9)
    source.step(*batch(0))
    loaded.load_state_dict(source.state_dict())
    before = [a.clone() for a in loaded.average]
    source.step(*batch(1))
    assert all(torch.equal(a, b) for a, b in zip(loaded.average, before, strict=True))


# --------------------------------------------------------------------------- train.fit_temperature


def sampled_stream(model: CharRNN, items: int = 40, length: int = 30, seed: int = 0) -> np.ndarray:
    """Items sampled from `model` itself at T=1, so that it is calibrated on them: its best temperature is
    near 1, and a head scaled by s moves it near s."""
    generator = torch.Generator().manual_seed(seed)
    token = torch.full((items,), EOS_ID)
    logits, state = model.prime([[EOS_ID]] * items)
    rows = []
    for _ in range(length):
        logits[:, EOS_ID] = -math.inf  # items of exactly `length` characters
        token = torch.multinomial(torch.softmax(logits, -1), 1, generator=generator)[:, 0]
        rows.append(token)
        logits, state = model.step(token, state)
    stream = [EOS_ID]
    for item in torch.stack(rows, 1).tolist():
        stream += item + [EOS_ID]
    return np.array(stream, dtype=np.uint8)


def scaled_head(model: CharRNN, factor: float) -> CharRNN:
    scaled = copy.deepcopy(model)
    with torch.no_grad():
        scaled.head.weight.mul_(factor)
        scaled.head.bias.mul_(factor)
    return scaled


def brute_force(model: CharRNN, stream: np.ndarray) -> dict[float, float]:
    """bpc of `model` with its head divided by each temperature of the grid, scored by stream_bpc."""
    return {t: stream_bpc(scaled_head(model, 1 / t), stream, 16, CPU) for t in TEMPERATURES}


@pytest.fixture(scope="module")
def calibrated() -> tuple[CharRNN, np.ndarray]:
    torch.manual_seed(3)
    model = CharRNN(V, cell="gru", hidden=12, layers=1, embedding=4).eval()
    with torch.no_grad():
        model.head.weight.mul_(4)  # peaked, so that temperature matters
    return model, sampled_stream(model)


@pytest.mark.parametrize("factor,side", [(1.3, "above"), (1 / 1.3, "below")])
def test_best_temperature_is_the_grid_minimum(calibrated, factor, side):
    model, stream = calibrated
    assert TEMPERATURES[0] < 1 < TEMPERATURES[-1] and 1.0 in TEMPERATURES
    scaled = scaled_head(model, factor).train()
    before = snapshot(scaled)
    found = best_temperature(scaled, stream, 16, CPU)
    assert scaled.training  # left as it was
    for name, tensor in scaled.state_dict().items():
        assert torch.equal(tensor, before[name]), name
    scores = brute_force(scaled, stream)
    assert found == pytest.approx(min(scores, key=scores.get), abs=1e-6)
    # over-confident (a head scaled up) wants T > 1, under-confident T < 1; both well inside the grid
    assert found > 1 if side == "above" else found < 1, found
    assert TEMPERATURES[0] < found < TEMPERATURES[-1]
    scaled.eval()
    assert best_temperature(scaled, stream, 16, CPU) == found and not scaled.training


def test_best_temperature_is_a_value_of_the_grid(calibrated):
    """The temperature logged in dvclive/metrics.json is one of TEMPERATURES, as its docstring says."""
    model, stream = calibrated
    assert best_temperature(scaled_head(model, 1.3), stream, 16, CPU) in TEMPERATURES


@pytest.mark.parametrize("ema_decay", [0.0, 0.9])
def test_finish_folds_the_best_temperature_into_the_head(calibrated, ema_decay):
    model, stream = calibrated
    scaled = scaled_head(model, 1.3).train()
    trainer = Trainer(scaled, settings(ema_decay=ema_decay, fit_temperature=True), 4, CPU)
    if ema_decay:  # a moving average that differs from the weights: the temperature is fitted to the average
        trainer.average = [a + 0.01 * torch.randn_like(a) for a in trainer.average]
    finished = with_weights(scaled, trainer.params, trainer.average) if ema_decay else copy.deepcopy(scaled)
    scores = brute_force(finished, stream)

    temperature = trainer.finish(stream)
    assert temperature == pytest.approx(min(scores, key=scores.get), abs=1e-6) and temperature > 1
    assert scaled.training and trainer.average is None
    assert stream_bpc(scaled, stream, 16, CPU) == pytest.approx(min(scores.values()), rel=1e-6)
    assert min(scores.values()) < scores[1.0]
    torch.testing.assert_close(scaled.head.weight, finished.head.weight / temperature)
    torch.testing.assert_close(scaled.head.bias, finished.head.bias / temperature)
    for name, tensor in scaled.state_dict().items():
        if not name.startswith("head."):
            assert torch.equal(tensor, finished.state_dict()[name]), name


def test_finish_without_val_or_without_the_option_keeps_the_head(calibrated):
    model, stream = calibrated
    for fit, val in [(True, None), (False, stream)]:
        scaled = scaled_head(model, 1.3)
        trainer = Trainer(scaled, settings(fit_temperature=fit), 4, CPU)
        assert trainer.finish(val) is None
        assert torch.equal(scaled.head.weight, model.head.weight * 1.3)


# --------------------------------------------------------------------------- train.amp on CPU


def head_dtypes(model: CharRNN) -> list[torch.dtype]:
    """The dtype of every output of the model's head from now on (what autocast made of the matmuls)."""
    seen: list[torch.dtype] = []
    model.head.register_forward_hook(lambda _module, _inputs, output: seen.append(output.dtype))
    return seen


@needs_native_bf16()
def test_bf16_on_cpu_runs_the_step_in_bf16_and_keeps_the_weights_and_the_average_in_fp32():
    fp32, bf16 = tiny_trainer(ema_decay=0.9), tiny_trainer(ema_decay=0.9, amp="bf16")
    seen = head_dtypes(bf16.model)
    for step in range(6):
        for trainer in (fp32, bf16):
            assert torch.isfinite(trainer.step(*batch(step)))
    assert seen == [torch.bfloat16] * 6
    assert all(p.dtype == torch.float32 for p in bf16.model.parameters())
    assert bf16.average is not None and all(a.dtype == torch.float32 for a in bf16.average)
    # the same training, computed in bf16: close to the fp32 run but not the same numbers
    pairs = list(zip(fp32.model.parameters(), bf16.model.parameters(), strict=True))
    assert any(not torch.equal(a, b) for a, b in pairs)
    assert all(torch.allclose(a, b, atol=0.05) for a, b in pairs)


@needs_native_bf16()
def test_under_bf16_validation_and_the_temperature_fit_score_in_fp32_as_evaluate_does():
    trainer = tiny_trainer(amp="bf16", fit_temperature=True)
    for step in range(4):
        trainer.step(*batch(step))
    seen = head_dtypes(trainer.model)
    stream = val_stream()
    assert trainer.validate(stream) == float(stream_bpc(trainer.model, stream, 64, CPU))
    expected = best_temperature(trainer.model, stream, 64, CPU)
    assert trainer.finish(stream) == expected
    assert seen and set(seen) == {torch.float32}


def test_fp16_on_cpu_is_an_error_naming_the_fix_not_silently_fp32():
    with pytest.raises(CharlmError, match=r"train.amp=fp16 needs a CUDA GPU.*set train.amp=auto"):
        tiny_trainer(amp="fp16")


def test_auto_and_none_train_on_any_cpu_and_auto_steps_in_what_this_machine_resolves_to():
    none, auto = tiny_trainer(), tiny_trainer(amp="auto")
    seen = head_dtypes(auto.model)
    for step in range(3):
        assert torch.isfinite(none.step(*batch(step))) and torch.isfinite(auto.step(*batch(step)))
    assert none.precision.step == "fp32" and none.amp_dtype is None
    assert seen == [auto.amp_dtype or torch.float32] * 3
    assert auto.precision == resolve("auto", CPU, auto.model.config)


# --------------------------------------------------------------------------- train.keep_best


def copies(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    return [t.detach().clone() for t in tensors]


@pytest.mark.parametrize("ema_decay", [0.0, 0.9])
def test_keep_best_gives_the_model_the_weights_of_the_best_validation(ema_decay):
    """Validation scores at steps 1..5 of 2.0, 1.5, 1.7, 1.5, 1.9: the file gets step 2's weights (the average with
    train.ema_decay), kept as they were then, and a tie does not replace them."""
    trainer = tiny_trainer(ema_decay=ema_decay, keep_best=True)
    kept = {}
    for step, bpc in enumerate([2.0, 1.5, 1.7, 1.5, 1.9], start=1):
        trainer.step(*batch(step))
        kept[step] = copies(trainer.average if ema_decay else trainer.params)
        trainer.keep_if_best(step, bpc)
    assert (trainer.best_step, trainer.best_bpc) == (2, 1.5)
    trainer.finish(None)
    assert all(torch.equal(p, k) for p, k in zip(trainer.params, kept[2], strict=True))
    assert trainer.best is None and trainer.average is None


def test_without_keep_best_the_model_keeps_the_average_of_the_last_step():
    trainer = tiny_trainer(ema_decay=0.9)
    for step, bpc in enumerate([1.0, 2.0, 3.0], start=1):
        trainer.step(*batch(step))
        trainer.keep_if_best(step, bpc)
    assert trainer.best is None and "best" not in trainer.state_dict()
    last = copies(trainer.average)
    trainer.finish(None)
    assert all(torch.equal(p, k) for p, k in zip(trainer.params, last, strict=True))


def test_keep_best_with_a_temperature_fits_it_to_the_kept_weights():
    trainer = tiny_trainer(ema_decay=0.9, keep_best=True, fit_temperature=True)
    stream = val_stream()
    for step in range(1, 9):
        trainer.step(*batch(step))
        trainer.keep_if_best(step, trainer.validate(stream))
    kept = with_weights(trainer.model, trainer.params, trainer.best)
    temperature = trainer.finish(stream)
    assert temperature == best_temperature(kept, stream, 64, CPU)
    assert torch.equal(trainer.model.head.weight, kept.head.weight / temperature)


def test_keep_best_resumes_from_a_checkpoint_bit_identically(tmp_path):
    total, stop, scores = 8, 4, [2.0, 1.2, 1.9, 1.8, 1.1, 1.6, 1.7, 1.9]
    straight = tiny_trainer(total, ema_decay=0.9, keep_best=True)
    for t in range(total):
        straight.step(*batch(t))
        straight.keep_if_best(t + 1, scores[t])

    first = tiny_trainer(total, ema_decay=0.9, keep_best=True)
    for t in range(stop):
        first.step(*batch(t))
        first.keep_if_best(t + 1, scores[t])
    path = tmp_path / "checkpoint.pt"
    artifact.save(path, first.state_dict())
    resumed = tiny_trainer(total, seed=7, ema_decay=0.9, keep_best=True)
    resumed.load_state_dict(artifact.load(path, ""))  # weights_only, as every checkpoint is read
    assert (resumed.best_step, resumed.best_bpc) == (2, 1.2)
    for t in range(stop, total):
        resumed.step(*batch(t))
        resumed.keep_if_best(t + 1, scores[t])
    assert (resumed.best_step, resumed.best_bpc) == (straight.best_step, straight.best_bpc) == (5, 1.1)
    straight.finish(None)
    resumed.finish(None)
    for name, tensor in straight.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[name], tensor), name
