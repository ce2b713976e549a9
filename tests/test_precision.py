"""train.amp: the precision chosen per machine (charlm/core/precision.py). The decision takes the capabilities as
input, so every branch (CUDA's too) is covered on any CPU; what needs oneDNN to behave as an AVX2 CPU runs in a
subprocess under ONEDNN_MAX_CPU_ISA=AVX2, which oneDNN reads once, at its first use."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from charlm.base.errors import CharlmError
from charlm.core import inspection
from charlm.core.adaptive import item_log_probs
from charlm.core.model import CharRNN
from charlm.core.precision import Capabilities, Precision, capabilities, decide, probe, resolve
from charlm.core.sampling import generate
from charlm.core.scoring import item_bounds, stream_bpc
from charlm.core.training import Optimisation, Trainer
from charlm.core.vocab import EOS_ID, Vocab

pytestmark = pytest.mark.usefixtures("one_thread")

CPU = torch.device("cpu")
AMX = Capabilities("cpu", amx=True, avx512_bf16=True, avx512=True, avx2=True, onednn_bf16=True)
AVX512_BF16 = Capabilities("cpu", avx512_bf16=True, avx512=True, avx2=True, onednn_bf16=True)
AVX512 = Capabilities("cpu", avx512=True, avx2=True, onednn_bf16=True)  # no BF16: oneDNN emulates it
AVX2 = Capabilities("cpu", avx2=True)
OLD_CPU = Capabilities("cpu")  # or another architecture: none of the features
CAPPED = dataclasses.replace(AMX, onednn_bf16=False)  # an AMX CPU under ONEDNN_MAX_CPU_ISA=AVX2
AMPERE = Capabilities("cuda", avx2=True, cuda_bf16=True, gpu="NVIDIA A100")
TURING = Capabilities("cuda", avx2=True, cuda_bf16=False, gpu="Tesla T4")


def config(cell: str = "lstm") -> dict:
    return dict(vocab_size=11, cell=cell, hidden=8, layers=1, embedding=4, dropout=0.0)


@pytest.mark.parametrize(
    "caps, step",
    [(AMX, "bf16"), (AVX512_BF16, "bf16"), (AVX512, "fp32"), (AVX2, "fp32"), (OLD_CPU, "fp32"), (CAPPED, "fp32"),
     (AMPERE, "bf16"), (TURING, "fp16")],
)  # fmt: skip
@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_auto_picks_what_runs_natively_from_the_features_alone(caps, step, cell):
    decision = decide("auto", caps, cell)
    assert (decision.step, decision.warning) == (step, None)
    assert decision.reason.startswith("this CPU (" if caps.device == "cpu" else "this GPU (")


@pytest.mark.parametrize("caps", [AMX, AVX512, AVX2, OLD_CPU, AMPERE, TURING])
def test_none_is_fp32_everywhere(caps):
    assert decide("none", caps, "lstm") == decide("none", caps, "gru") and decide("none", caps, "rnn").step == "fp32"


@pytest.mark.parametrize("caps", [AMX, AVX512, AVX2, OLD_CPU])
def test_fp16_on_a_cpu_is_an_error_naming_the_fix(caps):
    with pytest.raises(CharlmError, match=r"train.amp=fp16 needs a CUDA GPU.*set train.amp=auto"):
        decide("fp16", caps, "lstm")


def test_explicit_bf16_runs_natively_warns_where_emulated_and_stops_where_it_cannot_run():
    for native in (AMX, AVX512_BF16, AMPERE):
        assert decide("bf16", native, "lstm") == decide("bf16", native, "gru")
        assert (decide("bf16", native, "lstm").step, decide("bf16", native, "lstm").warning) == ("bf16", None)
    for emulated, cell in [(AVX512, "lstm"), (AVX2, "rnn"), (AVX2, "gru"), (CAPPED, "rnn"), (TURING, "lstm")]:
        warning = decide("bf16", emulated, cell).warning
        assert warning and "emulated" in warning and "set train.amp=auto" in warning and "\n" not in warning
    for impossible in (AVX2, OLD_CPU, CAPPED):  # oneDNN has no bf16 LSTM below AVX512
        with pytest.raises(CharlmError, match=r"cannot train an LSTM on this CPU .*set train.amp=auto"):
            decide("bf16", impossible, "lstm")


def test_explicit_fp16_on_cuda_is_kept_whatever_the_gpu():
    assert decide("fp16", AMPERE, "lstm").step == decide("fp16", TURING, "lstm").step == "fp16"


def test_the_capabilities_name_the_features_a_user_sees_in_lscpu():
    assert AMX.features() == "AMX, AVX512-BF16, AVX512, AVX2"
    assert AVX2.features() == "AVX2"
    assert "ONEDNN_MAX_CPU_ISA" in CAPPED.features()
    here = capabilities(CPU)
    assert here.device == "cpu" and here.onednn_bf16 == torch.ops.mkldnn._is_mkldnn_bf16_supported()
    assert here.native_cpu_bf16 == ((here.amx or here.avx512_bf16) and here.onednn_bf16)


def test_the_probe_tells_what_the_recurrent_layer_ran_in_and_leaves_the_rngs_alone():
    before = torch.get_rng_state()
    assert probe(config("lstm"), CPU, "fp32") == "fp32"
    # torch's CPU autocast runs RNN in bf16 (natively or emulated) and leaves GRU in fp32, on any x86 CPU
    assert probe(config("rnn"), CPU, "bf16") == "bf16"
    assert probe(config("gru"), CPU, "bf16") == "fp32"
    assert torch.equal(torch.get_rng_state(), before)


def test_a_gru_under_bf16_records_that_its_recurrent_layer_ran_in_fp32(recwarn):
    precision = resolve("bf16", CPU, config("gru"), caps=AMX, notice=lambda _: None)
    assert (precision.step, precision.recurrent, precision.label) == ("bf16", "fp32", "bf16 (recurrent layer in fp32)")
    assert precision.record()["label"] == precision.label and precision.autocast_dtype == torch.bfloat16


def test_an_explicit_precision_the_trainer_is_given_is_the_one_it_steps_in():
    torch.manual_seed(0)
    model = CharRNN(**config("rnn")).train()
    settings = Optimisation(lr=1e-2, beta2=0.99, weight_decay=0.0, warmup_steps=0, schedule="constant",
                            min_lr_ratio=0.0, grad_clip=1.0, amp="none")  # fmt: skip
    seen: list[torch.dtype] = []
    model.head.register_forward_hook(lambda _m, _i, out: seen.append(out.dtype))
    trainer = Trainer(model, settings, 4, CPU, precision=Precision("bf16", "bf16", "bf16", "test"))
    window = np.random.default_rng(0).integers(3, 11, size=(2, 9))
    trainer.step(window[:, :-1], window[:, 1:])
    assert seen == [torch.bfloat16] and trainer.precision.step == "bf16" and not trainer.scaler.is_enabled()


AVX2_SCRIPT = """
import sys, torch
from charlm.core.precision import Capabilities, capabilities, resolve
from charlm.base.errors import CharlmError
config = dict(vocab_size=11, cell="lstm", hidden=8, layers=1, embedding=4, dropout=0.0)
claims_native = Capabilities("cpu", amx=True, avx512_bf16=True, avx512=True, avx2=True, onednn_bf16=True)
print("onednn_bf16", capabilities(torch.device("cpu")).onednn_bf16)
notices = []
precision = resolve("auto", torch.device("cpu"), config, caps=claims_native, notice=notices.append)
print("auto", precision.step, precision.recurrent, precision.reason)
print("notices", len(notices), notices[0])
try:
    resolve("bf16", torch.device("cpu"), config, caps=claims_native, notice=print)
except CharlmError as e:
    print("error", e)
"""


def test_under_an_avx2_onednn_a_failed_trial_step_falls_back_to_fp32_or_stops_an_explicit_bf16():
    """Where the features say bf16 but oneDNN cannot run the LSTM in it (here: capped at AVX2), `auto` trains in
    fp32 after a one-line notice, and an explicit bf16 is a one-line error naming the fix."""
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2"}
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(AVX2_SCRIPT)], capture_output=True, text=True,
                         env=env, timeout=120, check=True).stdout.splitlines()  # fmt: skip
    assert out[0] == "onednn_bf16 False"
    assert out[1] == "auto fp32 fp32 bf16 failed a trial step here"
    assert out[2].startswith("notices 1 train: bf16 failed a trial step here (") and out[2].endswith("training in fp32")
    assert out[3].startswith("error train.amp=bf16: a bf16 training step cannot run here (")
    assert out[3].endswith("set train.amp=auto (or none for fp32)") and len(out) == 4


# --------------------------------------------------------------------------- every other place runs in fp32


def test_scoring_generating_and_inspecting_run_the_model_in_fp32():
    """Only the training step is mixed precision: evaluate, validation, the adaptive scores, generate and the
    playground's inspection run the model in fp32, so they run on any CPU."""
    vocab = Vocab(list("abcdefgh"))
    torch.manual_seed(0)
    model = CharRNN(len(vocab), cell="lstm", hidden=8, layers=1, embedding=4).eval()
    seen: list[torch.dtype] = []
    model.rnn.register_forward_hook(lambda _m, _i, out: seen.append(getattr(out[0], "data", out[0]).dtype))
    model.head.register_forward_hook(lambda _m, _i, out: seen.append(out.dtype))
    stream = np.array([EOS_ID, *vocab.encode("abcabc"), EOS_ID, *vocab.encode("hgfe"), EOS_ID], dtype=np.uint8)
    runs = {
        "validation and evaluate": lambda: stream_bpc(model, stream, 4, CPU),
        "the adaptive scores": lambda: item_log_probs(model, stream, *item_bounds(stream, EOS_ID), 4, CPU),
        "generate": lambda: generate(model, vocab, ["ab"], [0.0, 1.0], 5, seed=0),
        "the playground's Read": lambda: inspection.char_scores(model, vocab, ["abc dea"]),
    }
    for name, run in runs.items():
        seen.clear()
        run()
        assert seen and set(seen) == {torch.float32}, name
