"""The training step's precision, chosen per machine (`train.amp`).

`auto` picks what runs natively here, from the hardware's features alone (no timing, so a machine always makes
the same choice), as nanoGPT picks its dtype:
- bf16 on a CPU with native bf16 arithmetic (AMX or AVX512-BF16) and on a CUDA GPU with bf16 (Ampere on);
- fp16 with the gradient scaler on a CUDA GPU without bf16;
- fp32 everywhere else: AVX2 CPUs (most laptops), AVX512 without BF16 (bf16 would be emulated), other CPUs.
An explicit `bf16` or `fp16` that cannot run here is an error naming the fix; one that runs only emulated warns.
Then one tiny forward and backward of the configured cell under autocast confirms the choice before training,
and tells what the recurrent layer really ran in: under CPU autocast a GRU stays fp32 (torch's autocast lists
have no CPU GRU), so its model records `bf16 (gru in fp32)`.

Only the step is mixed precision: the weights, the optimiser, the average, validation, evaluation and every
other place that runs a model stay fp32.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass

import torch

from charlm.base.errors import CharlmError
from charlm.core.model import CharRNN

NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
DTYPES = {name: dtype for dtype, name in NAMES.items()}
FIX = "set train.amp=auto (or none for fp32)"


@dataclass(frozen=True)
class Capabilities:
    """What decides the precision: the device and the features that matter for it. `onednn_bf16` is oneDNN's
    own test that its effective ISA has bf16 kernels (AVX512 core or better); it honours ONEDNN_MAX_CPU_ISA,
    which the CPU's feature flags do not."""

    device: str  # cpu | cuda
    amx: bool = False
    avx512_bf16: bool = False
    avx512: bool = False
    avx2: bool = False
    onednn_bf16: bool = False
    cuda_bf16: bool = False  # a GPU with bf16 arithmetic (compute capability 8.0 or later)
    gpu: str = ""

    @property
    def native_cpu_bf16(self) -> bool:
        return (self.amx or self.avx512_bf16) and self.onednn_bf16

    def features(self) -> str:
        """The CPU features that matter, as a user reads them in lscpu: 'AMX, AVX512-BF16, AVX512, AVX2'."""
        named = [("AMX", self.amx), ("AVX512-BF16", self.avx512_bf16), ("AVX512", self.avx512), ("AVX2", self.avx2)]
        present = [name for name, has in named if has]
        text = ", ".join(present) if present else "none of AMX, AVX512-BF16, AVX512, AVX2"
        if (self.amx or self.avx512_bf16) and not self.onednn_bf16:
            text += " (oneDNN capped below AVX512 by ONEDNN_MAX_CPU_ISA)"
        return text


def capabilities(device: torch.device) -> Capabilities:
    """This machine's capabilities for `device`."""
    cpu = Capabilities(
        "cpu",
        amx=bool(torch.cpu._is_amx_tile_supported()),
        avx512_bf16=bool(torch.cpu._is_avx512_bf16_supported()),
        avx512=bool(torch.cpu._is_avx512_supported()),
        avx2=bool(torch.cpu._is_avx2_supported()),
        onednn_bf16=bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()),
    )
    if device.type != "cuda":
        return cpu
    return dataclasses.replace(
        cpu,
        device="cuda",
        cuda_bf16=bool(torch.cuda.is_bf16_supported(including_emulation=False)),
        gpu=torch.cuda.get_device_name(device),
    )


@dataclass(frozen=True)
class Decision:
    """The step's autocast dtype (`fp32` = no autocast), why, and a warning when it runs only emulated."""

    step: str  # fp32 | bf16 | fp16
    reason: str
    warning: str | None = None


def decide(amp: str, caps: Capabilities, cell: str) -> Decision:
    """The precision `train.amp` asks for on a machine with `caps`, or a CharlmError when it cannot run there."""
    where = f"this CPU ({caps.features()})" if caps.device == "cpu" else f"this GPU ({caps.gpu or 'CUDA'})"
    if amp == "none":
        return Decision("fp32", "as asked")
    if caps.device == "cuda":
        if amp == "auto":
            if caps.cuda_bf16:
                return Decision("bf16", f"{where} has bf16")
            return Decision("fp16", f"{where} has no bf16, so fp16 with the gradient scaler")
        if amp == "bf16" and not caps.cuda_bf16:
            return Decision("bf16", "as asked", f"train.amp=bf16: {where} has no bf16 arithmetic, so it is "
                            f"emulated and slower than fp32; {FIX}")  # fmt: skip
        return Decision(amp, "as asked")
    if amp == "fp16":
        raise CharlmError(f"train.amp=fp16 needs a CUDA GPU (its gradient scaler), but this run is on the CPU; {FIX}")
    if amp == "auto":
        if caps.native_cpu_bf16:
            return Decision("bf16", f"{where} has native bf16")
        return Decision("fp32", f"{where} has no native bf16 (AMX or AVX512-BF16)")
    # amp == "bf16" on a CPU
    if caps.native_cpu_bf16:
        return Decision("bf16", "as asked")
    if caps.onednn_bf16:  # AVX512 without BF16: oneDNN emulates bf16
        return Decision("bf16", "as asked", f"train.amp=bf16: {where} has no native bf16, so it is emulated "
                        f"and slower than fp32; {FIX}")  # fmt: skip
    if cell == "lstm":  # below AVX512 oneDNN has no bf16 LSTM at all: nn.LSTM raises under autocast
        raise CharlmError(f"train.amp=bf16 cannot train an LSTM on {where}: oneDNN has no bf16 LSTM below "
                          f"AVX512; {FIX}")  # fmt: skip
    return Decision("bf16", "as asked", f"train.amp=bf16: {where} has no native bf16, so the step is "
                    f"emulated and slower than fp32; {FIX}")  # fmt: skip


@dataclass(frozen=True)
class Precision:
    """What a training run computes in: the step's autocast dtype and the dtype its recurrent layer produced."""

    setting: str  # train.amp as written
    step: str  # fp32 | bf16 | fp16
    recurrent: str  # what the recurrent layer ran in, as the probe saw it
    reason: str

    @property
    def label(self) -> str:
        """One word when step and recurrent layer agree, e.g. 'bf16'; else 'bf16 (recurrent layer in fp32)'."""
        return self.step if self.recurrent == self.step else f"{self.step} (recurrent layer in {self.recurrent})"

    @property
    def explained(self) -> str:
        """'fp32 (train.amp=auto: this CPU (AVX2) has no native bf16 (AMX or AVX512-BF16))'."""
        return f"{self.label} (train.amp={self.setting}: {self.reason})"

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        return None if self.step == "fp32" else DTYPES[self.step]

    def record(self) -> dict:
        return dataclasses.asdict(self) | {"label": self.label}


def autocast(device: torch.device, dtype: torch.dtype | None):
    """Autocast to `dtype` on `device`, or nothing for fp32 (None)."""
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def probe(model_config: dict, device: torch.device, step: str) -> str:
    """One tiny forward and backward of a model of `model_config`'s shape under the step's autocast; returns the
    dtype the recurrent layer's output had. Raises what torch raises when that cannot run here. The global RNGs
    are left as they were, so the run's own initialisation does not depend on it."""
    seen: list[torch.dtype] = []
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        model = CharRNN(**model_config).to(device).train()
        model.rnn.register_forward_hook(lambda _m, _inputs, output: seen.append(output[0].dtype))
        tokens = torch.randint(0, model_config["vocab_size"], (2, 9), device=device)
        with autocast(device, DTYPES[step] if step != "fp32" else None):
            loss, _ = model(tokens[:, :-1], targets=tokens[:, 1:])
        loss.backward()
    return NAMES.get(seen[-1], str(seen[-1]).removeprefix("torch.")) if seen else step


def resolve(amp: str, device: torch.device, model_config: dict, caps: Capabilities | None = None,
            notice=print) -> Precision:  # fmt: skip
    """The precision of a training run: `decide` on this machine's capabilities, confirmed by `probe`. Under
    `auto` a failed probe falls back to fp32 with a one-line notice; an explicit setting that fails is an
    error. A warning from `decide` (emulated bf16) goes to `notice` too."""
    caps = caps or capabilities(device)
    decision = decide(amp, caps, model_config["cell"])
    if decision.warning:
        notice(decision.warning)
    step, reason = decision.step, decision.reason
    try:
        recurrent = probe(model_config, device, step)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        if amp != "auto" or step == "fp32":
            raise CharlmError(f"train.amp={amp}: a {step} training step cannot run here ({first}); {FIX}") from None
        notice(f"train: {step} failed a trial step here ({first}); training in fp32")
        step, reason = "fp32", f"{step} failed a trial step here"
        recurrent = probe(model_config, device, step)
    return Precision(amp, step, recurrent, reason)
