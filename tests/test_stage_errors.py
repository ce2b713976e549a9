"""Bad input through the real data stage scripts (subprocesses): every problem is one line on stderr, exit
status 2, no traceback and no output left behind. Also the `lines` format and byte-identical reruns."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from conftest import Project, ag_news_rows, csv_bytes

from charlm.core.data import load_packed
from charlm.core.model import CharRNN
from charlm.core.scoring import stream_bpc

OUTPUTS = {
    "download": ["data/raw/train.csv", "data/raw/test.csv"],
    "prepare": ["data/prepared/train.txt", "data/prepared/test.txt"],
    "vocab": ["data/vocab.json"],
    "pack": ["data/packed/train.npy", "data/packed/val.npy", "data/packed/test.npy", "data/packed/meta.json"],
}


def write_raw(project: Project, train: bytes, test: bytes | None = None) -> None:
    raw = project.path / "data" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    (raw / "train.csv").write_bytes(train)
    (raw / "test.csv").write_bytes(csv_bytes(ag_news_rows(30, seed=4)) if test is None else test)


def good_raw(project: Project) -> None:
    write_raw(project, csv_bytes(ag_news_rows(120, seed=3)), csv_bytes(ag_news_rows(30, seed=4)))


def stage_fails(project: Project, stage: str) -> str:
    """Run `stage`; it must exit 2 with exactly one `<stage>: error: ...` line and leave no output."""
    proc = project.stage(stage, check=False)
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"{stage}: error: "), lines[0]
    for out in OUTPUTS[stage]:
        assert not (project.path / out).exists(), out
    leftovers = [p for p in project.path.joinpath("data").rglob("*") if ".tmp" in p.name]
    assert leftovers == []
    return lines[0]


def has(message: str, *parts: str) -> None:
    for part in parts:
        assert part in message, (part, message)


# --------------------------------------------------------------------------- prepare


def test_prepare_malformed_csv(project):
    write_raw(project, b'"1","T1","D1"\n"2","T2","D2"\n"3","only two"\n')
    has(stage_fails(project, "prepare"), "data/raw/train.csv", "line 3", "2 columns", "expected 3")


def test_prepare_malformed_test_split_leaves_no_train_output(project):
    write_raw(project, csv_bytes(ag_news_rows(20)), b'"1","T1","D1"\n"9","T2","D2"\n')
    has(stage_fails(project, "prepare"), "data/raw/test.csv", "row 2", "label '9'", "1..4")


def test_prepare_non_utf8(project):
    write_raw(project, b'"1","T1","D1"\n"2","caf\xe9","D2"\n')
    has(stage_fails(project, "prepare"), "data/raw/train.csv", "line 2", "UTF-8")


@pytest.mark.parametrize("fmt", ["ag_news", "lines"])
def test_prepare_empty_corpus(project, fmt):
    project.set_params(prepare={"format": fmt})
    write_raw(project, b"")
    has(stage_fails(project, "prepare"), "data/raw/train.csv", "empty")


def test_prepare_corpus_of_empty_items(project):
    write_raw(project, b'"1","",""\n"2","   ","\\\\"\n')
    has(stage_fails(project, "prepare"), "data/raw/train.csv", "no non-empty items")


def test_prepare_without_raw_files(project):
    has(stage_fails(project, "prepare"), "data/raw/train.csv", "not found")


# --------------------------------------------------------------------------- params, for every data stage


@pytest.mark.parametrize("stage, section, key, suggestion", [
    ("download", "download", "timout", "timeout"),
    ("prepare", "prepare", "formt", "format"),
    ("vocab", "vocab", "min_cout", "min_count"),
    ("pack", "pack", "seqlen", "seq_len"),
])
def test_unknown_param_key(project, stage, section, key, suggestion):
    # Params are checked before any input is read, so no input files are needed.
    project.set_params(**{section: {key: 1}})
    has(stage_fails(project, stage), f"unknown key {section}.{key}", f"did you mean '{suggestion}'")


@pytest.mark.parametrize("stage, section, key, value", [
    ("download", "download", "timeout", "30s"),
    ("vocab", "vocab", "min_count", "5"),
    ("pack", "pack", "seq_len", "100"),
])
def test_string_where_a_number_belongs(project, stage, section, key, value):
    project.set_params(**{section: {key: value}})
    has(stage_fails(project, stage), f"{section}.{key} = {value!r}", "(a string)")


def test_prepare_bad_fields(project):
    good_raw(project)
    project.set_params(prepare={"fields": ["title", "body"]})
    has(stage_fails(project, "prepare"), "prepare.fields[1] = 'body'")


# --------------------------------------------------------------------------- vocab and pack


def prepared(project: Project) -> None:
    good_raw(project)
    project.stage("prepare")


def test_vocab_without_prepared_files(project):
    has(stage_fails(project, "vocab"), "data/prepared/train.txt", "not found", "dvc repro prepare")


def test_vocab_min_count_above_every_count(project):
    prepared(project)
    project.set_params(vocab={"min_count": 10 ** 9})
    has(stage_fails(project, "vocab"), "vocab.min_count=1000000000")


def test_pack_without_vocab(project):
    prepared(project)
    has(stage_fails(project, "pack"), "data/vocab.json", "not found")


def test_pack_with_damaged_vocab(project):
    prepared(project)
    project.stage("vocab")
    path = project.path / "data" / "vocab.json"
    path.write_bytes(path.read_bytes()[:100])
    has(stage_fails(project, "pack"), "data/vocab.json", "not valid JSON")


def test_pack_without_prepared_test_split(project):
    prepared(project)
    project.stage("vocab")
    (project.path / "data" / "prepared" / "test.txt").unlink()
    has(stage_fails(project, "pack"), "data/prepared/test.txt", "not found")


def test_pack_seq_len_longer_than_the_corpus(project):
    prepared(project)
    project.stage("vocab")
    project.set_params(pack={"seq_len": 1_000_000})
    has(stage_fails(project, "pack"), "train split", "pack.seq_len=1000000")
    assert not (project.path / "data" / "packed").exists() or not any((project.path / "data" / "packed").iterdir())


def test_pack_accepts_a_validation_split_shorter_than_a_window(project):
    # Validation scores whole items (charlm/core/scoring.py), not windows: one short item is a usable split.
    prepared(project)
    project.stage("vocab")
    # 120 items: a 1% split is one item (well under 1000 characters), while train has thousands of windows' worth.
    project.set_params(pack={"seq_len": 1000, "val_fraction": 0.01})
    project.stage("pack")
    packed = load_packed(project.path / "data" / "packed")
    assert packed.meta["splits"]["val"] == {**packed.meta["splits"]["val"], "items": 1, "windows": 0}
    model = CharRNN(packed.meta["vocab_size"], cell="lstm", hidden=8, layers=1, embedding=4)
    assert 0 < stream_bpc(model, packed.streams["val"], 4, "cpu") < 16


# --------------------------------------------------------------------------- the lines format, past 256 symbols

CJK = [chr(0x4E00 + i) for i in range(300)]


def lines_corpus(seed: int, n: int) -> bytes:
    rng = np.random.default_rng(seed)
    words = ["caf\u00e9", "na\u00efve", "\u00fcber", "\U0001F600", "\U0001F680", "Z\u00fcrich", "\u6771\u4eac", "plain"]
    lines = []
    for i in range(n):
        cjk = "".join(CJK[(i * 7 + j) % len(CJK)] for j in range(12))
        lines.append(f"  {words[i % len(words)]}  {cjk}\t{' '.join(rng.choice(words, 4))} ")
    return ("\ufeff" + "\r\n".join(lines) + "\r\n").encode("utf-8")


def test_lines_format_with_non_ascii_widens_to_uint16(project):
    project.set_params(prepare={"format": "lines"}, vocab={"min_count": 1}, pack={"seq_len": 16, "val_fraction": 0.1})
    write_raw(project, lines_corpus(0, 200), lines_corpus(1, 20))
    for stage in ("prepare", "vocab", "pack"):
        project.stage(stage)

    train_txt = (project.path / "data/prepared/train.txt").read_text(encoding="utf-8")
    lines = train_txt.splitlines()
    assert len(lines) == 200 and train_txt.endswith("\n")
    assert all(line == " ".join(line.split()) and line for line in lines)  # whitespace normalised, BOM gone
    assert lines[0].startswith("caf\u00e9 ") and "\U0001F600" in train_txt

    vocab = json.loads((project.path / "data/vocab.json").read_text(encoding="utf-8"))
    assert vocab["size"] > 256
    chars = {t["char"] for t in vocab["tokens"]}
    assert set(CJK) <= chars and {"\u00e9", "\U0001F600", "\u00fc"} <= chars

    meta = json.loads((project.path / "data/packed/meta.json").read_text())
    assert meta["dtype"] == "uint16" and meta["vocab_size"] == vocab["size"]
    itos = [t["char"] for t in vocab["tokens"]]
    for split in ("train", "val", "test"):
        stream = np.load(project.path / f"data/packed/{split}.npy")
        assert stream.dtype == np.uint16 and len(stream) == meta["splits"][split]["tokens"]
        assert stream[0] == stream[-1] == 1
    train = np.load(project.path / "data/packed/train.npy")
    val = np.load(project.path / "data/packed/val.npy")
    assert int(max(train.max(), val.max())) > 255
    decoded = "".join("\n" if i == 1 else itos[i] for i in train[1:].tolist())
    val_decoded = "".join("\n" if i == 1 else itos[i] for i in val[1:].tolist())
    assert sorted(decoded.splitlines() + val_decoded.splitlines()) == sorted(lines)
    assert meta["splits"]["val"]["items"] == 20 and meta["splits"]["train"]["items"] == 180


# --------------------------------------------------------------------------- reproducibility


def data_files(project: Project) -> dict[str, bytes]:
    files = {}
    for out in OUTPUTS["prepare"] + OUTPUTS["vocab"] + OUTPUTS["pack"]:
        files[out] = (project.path / out).read_bytes()
    return files


def run_data_stages(project: Project) -> dict[str, bytes]:
    for stage in ("prepare", "vocab", "pack"):
        project.stage(stage)
    return data_files(project)


def test_same_params_give_byte_identical_outputs(project, tmp_path):
    good_raw(project)
    copies = []
    for name in ("first", "second"):
        shutil.copytree(project.path, tmp_path / name)
        copies.append(Project(tmp_path / name))
    first, second = (run_data_stages(p) for p in copies)
    assert first.keys() == second.keys() and len(first) == 7
    for out in first:
        assert first[out] == second[out], out
    # The comparison has teeth: another split seed changes the packed streams.
    copies[1].set_params(pack={"seed": 1})
    copies[1].stage("pack")
    reseeded = data_files(copies[1])
    assert reseeded["data/packed/val.npy"] != first["data/packed/val.npy"]
    assert reseeded["data/packed/meta.json"] != first["data/packed/meta.json"]
