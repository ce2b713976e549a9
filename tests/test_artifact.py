"""Model files: a faithful round trip, and a one-line CharlmError (never code execution) for every bad file."""
from __future__ import annotations

import builtins
import pickle
import random
import zipfile

import pytest
import torch

from charlm.base.errors import CharlmError
from charlm.core.device import pick_device
from charlm.core.model import CharRNN
from charlm.core.vocab import EOS_ID, Vocab
from charlm.pipeline import artifact

VOCAB = Vocab(list("abcdefgh ."))


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_model(seed: int = 0, vocab: Vocab = VOCAB, **kw) -> CharRNN:
    torch.manual_seed(seed)
    config = dict(cell="gru", hidden=12, layers=2, dropout=0.25, embedding=5) | kw
    return CharRNN(len(vocab), **config)


@pytest.fixture
def model_file(tmp_path):
    path = tmp_path / "models" / "model.pt"
    artifact.save(path, artifact.model_record(tiny_model(), VOCAB, {"steps": 7, "val_bpc": 3.25}))
    return path


def load_error(path) -> str:
    with pytest.raises(CharlmError) as err:
        artifact.load_model(path)
    message = str(err.value)
    assert "\n" not in message and "\x1b" not in message, message
    assert str(path) in message, message
    assert len(message) < 600, message
    return message


@pytest.mark.parametrize("config", [dict(cell="gru", embedding=5), dict(cell="lstm", embedding=0, layers=1),
                                    dict(cell="rnn", embedding=3, layers=3)])
def test_round_trip_gives_identical_outputs(tmp_path, config):
    model = tiny_model(**config).train()  # saved in train mode; comes back in eval mode
    path = tmp_path / "m.pt"
    artifact.save(path, artifact.model_record(model, VOCAB, {"steps": 3}))
    loaded, vocab, info = artifact.load_model(path)

    assert not loaded.training
    assert vocab.itos == VOCAB.itos and info == {"steps": 3} and loaded.config == model.config
    original = model.state_dict()
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, original[name]), name
    model.eval()
    x = torch.randint(0, len(VOCAB), (3, 17), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded(x)[0], model(x)[0])
    prompts = [[EOS_ID, 4, 5], [EOS_ID]]
    assert torch.equal(loaded.prime(prompts)[0], model.prime(prompts)[0])


def test_saved_file_is_plain_data_loadable_with_weights_only(model_file):
    obj = torch.load(model_file, weights_only=True)
    assert obj["format"] == artifact.MODEL_FORMAT
    assert obj["vocab"] == VOCAB.chars and obj["config"]["vocab_size"] == len(VOCAB)
    assert all(t.device.type == "cpu" for t in obj["state_dict"].values())
    assert not list(model_file.parent.glob(".*tmp*"))  # the atomic write left no temp file


class Payload:
    """Unpickling this creates `marker`: what a hostile model file could do if loaded unsafely."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return builtins.open, (self.marker, "w")


def test_malicious_pickle_is_refused_and_runs_no_code(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    record = artifact.model_record(tiny_model(), VOCAB, {})
    record["info"] = {"note": Payload(marker)}
    torch.save(record, evil)

    message = load_error(evil)
    assert "refused" in message and "Unsupported global" in message
    assert not marker.exists()
    with pytest.raises(CharlmError):
        artifact.load(evil, "fix")
    assert not marker.exists()

    # The payload is live: an unsafe load would have run it. (Proves the test above can fail.)
    control = tmp_path / "control"
    torch.save({"x": Payload(control)}, tmp_path / "control.pt")
    torch.load(tmp_path / "control.pt", weights_only=False)
    assert control.exists()


def test_truncated_file(model_file, tmp_path):
    data = model_file.read_bytes()
    for n in (0, 1, 2, 10, 100, len(data) // 2, len(data) - 1):
        cut = tmp_path / f"cut{n}.pt"
        cut.write_bytes(data[:n])
        message = load_error(cut)
        if n >= 10:  # a byte or two is not yet recognisable as a zip archive
            assert "corrupt or truncated" in message, message


def test_random_bytes(tmp_path):
    for seed in range(60):
        rng = random.Random(seed)
        path = tmp_path / f"random{seed}.pt"
        path.write_bytes(rng.randbytes(rng.randint(1, 300)))
        load_error(path)
    # Short pickle-like byte strings upset torch's weights-only unpickler in other ways.
    for i, data in enumerate([b".", b"s", b"\x80\x04.", b"\x80\x05N.", b"\x87\x00"]):
        path = tmp_path / f"short{i}.pt"
        path.write_bytes(data)
        load_error(path)


def test_damaged_bytes_inside_a_model_file(model_file, tmp_path):
    """Flip bytes in the zip's metadata: an error or a model, never a traceback."""
    data = model_file.read_bytes()
    for seed in range(40):
        rng = random.Random(seed)
        damaged = bytearray(data)
        for _ in range(3):
            damaged[rng.randrange(len(damaged))] = rng.getrandbits(8)
        path = tmp_path / f"flip{seed}.pt"
        path.write_bytes(bytes(damaged))
        try:
            artifact.load_model(path)
        except CharlmError as e:
            assert "\n" not in str(e)


def test_a_plain_pickle_that_is_not_a_torch_file(tmp_path):
    path = tmp_path / "legacy.pt"
    path.write_bytes(pickle.dumps(["not", "a", "model"]))
    load_error(path)


def test_a_directory(tmp_path):
    assert "is a directory" in load_error(tmp_path)


def test_a_missing_file(tmp_path):
    message = load_error(tmp_path / "nope.pt")
    assert "not found" in message and "dvc repro" in message


def test_a_zip_that_is_not_a_torch_file(tmp_path):
    path = tmp_path / "zip.pt"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("hello.txt", "hi")
    assert "corrupt" in load_error(path)


@pytest.mark.parametrize("obj,expected", [
    ([1, 2, 3], "not a charlm file (holds a list)"),
    ({"format": "charlm-model/0"}, "not a charlm model (format 'charlm-model/0')"),
    ({"state_dict": {}}, "not a charlm model (format None)"),
    ({"format": "charlm-checkpoint/1", "step": 3}, "not a charlm model"),
])
def test_wrong_kind_of_file(tmp_path, obj, expected):
    path = tmp_path / "x.pt"
    torch.save(obj, path)
    assert expected in load_error(path)


def record(**changes) -> dict:
    rec = artifact.model_record(tiny_model(), VOCAB, {})
    rec.update(changes)
    return rec


@pytest.mark.parametrize("name,make", [
    ("shape", lambda: record(state_dict=tiny_model(hidden=16).state_dict())),
    ("cell", lambda: record(state_dict=tiny_model(cell="lstm").state_dict())),
    ("layers", lambda: record(state_dict=tiny_model(layers=1).state_dict())),
    ("one-hot", lambda: record(state_dict=tiny_model(embedding=0).state_dict())),
    ("vocab size", lambda: record(vocab=list("abcdefgh .xyz"))),
    ("state dict of a bigger vocabulary", lambda: record(
        state_dict=tiny_model(vocab=Vocab(list("abcdefgh .xyz"))).state_dict())),
    ("missing weights", lambda: record(state_dict={})),
    ("missing config", lambda: {k: v for k, v in record().items() if k != "config"}),
    ("unknown cell", lambda: record(config=record()["config"] | {"cell": "transformer"})),
    ("bad vocab", lambda: record(vocab=["ab", "c"])),
])
def test_weights_that_do_not_fit_their_config(tmp_path, name, make):
    path = tmp_path / "bad.pt"
    torch.save(make(), path)
    message = load_error(path)
    assert "does not match its own config or vocabulary" in message, (name, message)


def test_pick_device_cuda_without_cuda_names_the_key():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(CharlmError, match=r"^train\.device is 'cuda' but") as err:
        pick_device("cuda", "train.device")
    assert "\n" not in str(err.value) and "set train.device: auto or cpu" in str(err.value)
    with pytest.raises(CharlmError, match="--device"):
        pick_device("cuda", "--device")
    assert pick_device("auto", "x") == torch.device("cpu")
    assert pick_device("cpu", "x") == torch.device("cpu")


def test_load_model_to_the_requested_device(model_file):
    model, _, _ = artifact.load_model(model_file, device="cpu")
    assert all(p.device.type == "cpu" for p in model.parameters())


def test_a_small_file_naming_a_huge_model_is_refused_before_anything_is_allocated(tmp_path):
    """A 1x8000 LSTM would take about 1 GB; the file holds the tiny model's weights. The shapes are compared on
    the meta device first, so the refusal names the mismatch instead of allocating the model it describes."""
    path = tmp_path / "huge.pt"
    torch.save(record(config=record()["config"] | {"cell": "lstm", "hidden": 8000}), path)
    message = load_error(path)
    assert "does not match its own config" in message and "has shape (36, 5), not (32000, 5)" in message


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused_at_load(tmp_path, bad):
    weights = tiny_model().state_dict()
    weights["head.bias"][3] = bad
    path = tmp_path / "nan.pt"
    torch.save(record(state_dict=weights), path)
    assert "head.bias holds NaN or infinite weights" in load_error(path)


def test_a_compressed_archive_is_refused_before_it_can_inflate(model_file, tmp_path):
    """torch.save stores its entries uncompressed; a deflated one could make kilobytes load as gigabytes."""
    bomb = tmp_path / "bomb.pt"
    with zipfile.ZipFile(model_file) as src, zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as dst:
        for entry in src.infolist():
            dst.writestr(entry.filename, src.read(entry))
    assert "refused to load, it holds compressed entries" in load_error(bomb)


@pytest.mark.parametrize("info", ["a string", [1, 2], None])
def test_info_that_is_not_a_dict_reads_as_empty(tmp_path, info):
    path = tmp_path / "info.pt"
    torch.save(record(info=info), path)
    assert artifact.load_model(path)[2] == {}
