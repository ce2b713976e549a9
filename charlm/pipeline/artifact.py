"""Saving and safely loading models and training checkpoints.

Both are plain `torch.save` dicts of tensors, numbers and strings. They are loaded with
`torch.load(weights_only=True)`, so a file pulled from a shared remote cannot run code when opened:
a pickle that references anything but plain data is refused.
"""

from __future__ import annotations

import io
import pickle
import re
import warnings
import zipfile
from pathlib import Path

import torch

from charlm.base.errors import CharlmError
from charlm.base.io import atomic_path
from charlm.core.model import CharRNN
from charlm.core.vocab import Vocab
from charlm.pipeline import paths

MODEL_FORMAT = "charlm-model/1"
CHECKPOINT_FORMAT = "charlm-checkpoint/3"  # /3: also carries the model config and vocabulary, for sampling


def save(path: str | Path, obj: dict) -> None:
    # Serialised in memory first, then written by Python: torch's own file writer turns a full disk into a
    # cryptic RuntimeError ("enforce fail at inline_container.cc"), Python's into OSError(ENOSPC).
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(buffer.getbuffer())


def load(path: str | Path, fix: str, map_location="cpu", data: bytes | None = None) -> dict:
    """torch.load with weights_only=True and a one-line error for each way a file can be bad. With `data`, the
    file's bytes come from there (a revision read through DVC) and `path` only names it in errors."""
    path = Path(path) if data is None else path
    _refuse_compressed(Path(path) if data is None else io.BytesIO(data), path, fix)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's notes on odd pickle protocols: a damaged file gets the error
            source = path if data is None else io.BytesIO(data)
            obj = torch.load(source, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise CharlmError(f"{path}: not found; {fix}") from None
    except IsADirectoryError:
        raise CharlmError(f"{path}: is a directory, not a model file; {fix}") from None
    except pickle.UnpicklingError as e:
        reason = _unpickling_reason(e)
        raise CharlmError(
            f"{path}: refused to load, the file holds more than tensors and plain data "
            f"({reason}); only use files written by charlm. {fix}"
        ) from None
    except Exception as e:  # damaged bytes raise anything from torch's readers: RuntimeError, EOFError, IndexError...
        reason = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise CharlmError(f"{path}: corrupt or truncated ({reason}); {fix}") from None
    if not isinstance(obj, dict):
        raise CharlmError(f"{path}: not a charlm file (holds a {type(obj).__name__}); {fix}")
    return obj


def _refuse_compressed(source: Path | io.BytesIO, path: str | Path, fix: str) -> None:
    """torch.save stores its zip archive's entries uncompressed, so a compressed entry means a crafted file, and
    one that would let a file of kilobytes inflate into gigabytes of tensors (a zip bomb) on loading."""
    try:
        with zipfile.ZipFile(source) as archive:
            packed = [entry.filename for entry in archive.infolist() if entry.compress_type != zipfile.ZIP_STORED]
    except (zipfile.BadZipFile, OSError, ValueError):  # not a zip, or not there: torch.load names the problem
        return
    if packed:
        raise CharlmError(
            f"{path}: refused to load, it holds compressed entries ({packed[0][:80]}), which torch.save never "
            f"writes; only use files written by charlm. {fix}"
        )


def _unpickling_reason(e: Exception) -> str:
    """The useful line of torch's multi-paragraph weights-only error ("Unsupported global: GLOBAL os.system ...").

    Its first line is advice to retry with weights_only=False (and carries terminal escape codes)."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(e))
    _, found, detail = text.partition("WeightsUnpickler error:")
    lines = [line.strip() for line in (detail if found else text).splitlines() if line.strip()]
    return lines[0].split(". ")[0][:160] if lines else "unpickling failed"


def model_record(model: CharRNN, vocab: Vocab, info: dict) -> dict:
    """A self-describing model: config, vocabulary and weights in one file."""
    return {
        "format": MODEL_FORMAT,
        "config": dict(model.config),
        "vocab": list(vocab.chars),
        "info": info,
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
    }


def check_weights(config: dict, weights) -> None:
    """Raise ValueError unless `weights` has exactly the tensors, shapes and finite values that a model of
    `config` has. The shapes are compared on the meta device, which allocates nothing: a file of kilobytes that
    names a huge config must not make the loader allocate gigabytes before the mismatch is found."""
    with torch.device("meta"):
        skeleton = CharRNN(**config).state_dict()
    if not isinstance(weights, dict) or weights.keys() != skeleton.keys():
        raise ValueError("its weights are not the ones of its config's model")
    for name, tensor in weights.items():
        if not isinstance(tensor, torch.Tensor) or tensor.shape != skeleton[name].shape:
            shape = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
            raise ValueError(f"{name} has shape {shape}, not {tuple(skeleton[name].shape)}")
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise ValueError(f"{name} holds NaN or infinite weights")


def read_at_revision(path: str | Path, rev: str) -> bytes:
    """The bytes of a DVC-tracked file at a git revision or experiment name, through dvc.api: from the local
    cache when it is there, else from the DVC remote, without checking anything out."""
    import dvc.api  # slow to import: only when asked for
    from dvc.exceptions import DvcException
    from scmrepo.exceptions import SCMError

    try:
        with dvc.api.open(str(path), rev=rev, mode="rb") as f:
            return f.read()
    except (DvcException, SCMError, FileNotFoundError, OSError) as e:
        reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise CharlmError(
            f"{path} at revision {rev!r}: cannot be read ({reason}); check the name with `dvc exp list` or "
            f"`git log`, and that the model was pushed (`dvc push`) to a remote you can reach"
        ) from None


def load_model(
    path: str | Path = paths.MODEL,
    device: str | torch.device = "cpu",
    fix: str = "run `dvc repro train` or pass the path of a trained model",
    rev: str | None = None,
):
    """Return (model in eval mode, vocab, info) from a model file written by the train stage, or from a training
    checkpoint (which carries the same config and vocabulary). With `rev`, the file as it is at that git
    revision or experiment, read through DVC."""
    data = read_at_revision(path, rev) if rev is not None else None
    if rev is not None:
        path = f"{path}@{rev}"
    obj = load(path, fix, data=data)
    if obj.get("format") not in (MODEL_FORMAT, CHECKPOINT_FORMAT):
        raise CharlmError(f"{path}: not a charlm model (format {obj.get('format')!r}); {fix}")
    try:
        vocab = Vocab(obj["vocab"])
        config = dict(obj["config"])
        if config["vocab_size"] != len(vocab):
            raise ValueError(f"config says {config['vocab_size']} symbols, vocabulary has {len(vocab)}")
        weights = obj["state_dict"] if obj["format"] == MODEL_FORMAT else obj["model"]
        check_weights(config, weights)
        model = CharRNN(**config)
        model.load_state_dict(weights)
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        reason = str(e).strip().splitlines()[0][:200]
        raise CharlmError(f"{path}: model file does not match its own config or vocabulary ({reason}); {fix}") from None
    info = obj.get("info") if obj["format"] == MODEL_FORMAT else {"steps": obj.get("step"), "checkpoint": True}
    info = info if isinstance(info, dict) else {}
    return model.to(device).eval(), vocab, info
