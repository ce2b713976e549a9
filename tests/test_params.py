"""Typed params: every bad value stops with one line naming the key and the value; a missing key is an error
(params.yaml holds every default, once); every key in params.yaml is documented."""
from __future__ import annotations

import contextlib
import dataclasses
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from ruamel.yaml import YAML

from charlm.base.errors import CharlmError
from charlm.pipeline import params
from charlm.pipeline.sections.download import DownloadParams
from charlm.pipeline.sections.evaluate import EvaluateParams
from charlm.pipeline.sections.generate import GenerateParams
from charlm.pipeline.sections.model import ModelParams
from charlm.pipeline.sections.pack import PackParams
from charlm.pipeline.sections.prepare import PrepareParams
from charlm.pipeline.sections.train import TrainParams
from charlm.pipeline.sections.vocab import VocabParams

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ROOT / "params.yaml"


def load_text(tmp_path: Path, text: str, cls):
    path = tmp_path / "params.yaml"
    path.write_text(text, encoding="utf-8")
    return params.load(cls, path)


CLASSES = {cls.section: cls for cls in (DownloadParams, PrepareParams, VocabParams, PackParams, ModelParams,
                                        TrainParams, EvaluateParams, GenerateParams)}


def over_shipped(tmp_path: Path, text: str, cls):
    """Load `cls` from the shipped params.yaml with `text`'s keys laid over it (both read as YAML 1.2, as DVC
    reads them): a section must hold every key, so a test changes some and keeps the rest."""
    yaml12 = YAML(typ="safe")
    data = yaml12.load(SHIPPED.read_text(encoding="utf-8"))
    for section, values in (yaml12.load(text) or {}).items():
        merge = isinstance(values, dict) and isinstance(data.get(section), dict)
        data[section] = {**data[section], **values} if merge else values
    path = tmp_path / "params.yaml"
    with path.open("w", encoding="utf-8") as f:
        yaml12.dump(data, f)
    return params.load(cls, path)


def error_of(tmp_path: Path, text: str, cls) -> str:
    with pytest.raises(CharlmError) as info:
        load_text(tmp_path, text, cls)
    message = str(info.value)
    assert "\n" not in message, message
    return message


# --------------------------------------------------------------------------- rejected values

# (section class, params.yaml text, substrings the one-line message must hold)
REJECTED = [
    # unknown keys and sections, with a suggestion
    (TrainParams, "train:\n  lrr: 0.1\n", ["unknown key train.lrr", "did you mean 'lr'"]),
    (PackParams, "pack:\n  seqlen: 10\n", ["unknown key pack.seqlen", "did you mean 'seq_len'", "seq_len, align, val_fraction, seed"]),
    (DownloadParams, "download:\n  train: {url: x, md6: null}\n", ["download.train.md6", "did you mean 'md5'"]),
    (TrainParams, "trian:\n  lr: 0.1\n", ["unknown section 'trian'", "did you mean 'train'"]),
    (PackParams, "packing:\n  seq_len: 10\n", ["unknown section 'packing'", "sections are"]),
    # wrong types
    (TrainParams, 'train:\n  lr: "0.001"\n', ["train.lr", "'0.001' (a string)", "a number"]),
    (TrainParams, "train:\n  lr: yes\n", ["train.lr", "'yes' (a string)", "a number"]),
    (PrepareParams, "prepare:\n  clean: on\n", ["prepare.clean", "'on'", "true or false"]),
    (TrainParams, "train:\n  lr: .nan\n", ["train.lr", "a finite number"]),
    (TrainParams, "train:\n  init_from: models/model.pt\n", ["train.init_from", "under init/", "dvc import"]),
    (VocabParams, "vocab:\n  from_model: init/../x.pt\n", ["vocab.from_model", "under init/"]),
    (TrainParams, "train:\n  lr: ~\n", ["train.lr", "a number"]),
    (TrainParams, "train:\n  epochs: true\n", ["train.epochs", "True", "an integer"]),
    (PackParams, "pack:\n  seed: false\n", ["pack.seed", "False", "an integer"]),
    (TrainParams, "train:\n  lr: true\n", ["train.lr", "True", "a number"]),
    (PackParams, "pack:\n  seq_len: 10.5\n", ["pack.seq_len", "10.5", "an integer"]),
    (PackParams, 'pack:\n  seq_len: "100"\n', ["pack.seq_len", "'100'", "an integer"]),
    (PackParams, "pack:\n  seq_len: [100]\n", ["pack.seq_len", "[100]"]),
    (PrepareParams, "prepare:\n  clean: yes please\n", ["prepare.clean", "'yes please'", "true or false"]),
    (PrepareParams, "prepare:\n  clean: 1\n", ["prepare.clean", "1", "true or false"]),
    (TrainParams, "train:\n  sample_prompt: 5\n", ["train.sample_prompt", "5", "a string"]),
    (PackParams, "pack: 5\n", ["pack", "5", "a mapping"]),
    (DownloadParams, "download:\n  train: http://example.com/a.csv\n", ["download.train", "'http://example.com/a.csv'", "a mapping"]),
    # out of range
    (ModelParams, "model:\n  hidden: -1\n", ["model.hidden", "-1", ">= 1"]),
    (ModelParams, "model:\n  layers: 0\n", ["model.layers", "0", ">= 1"]),
    (ModelParams, "model:\n  embedding: -32\n", ["model.embedding", "-32", ">= 0"]),
    (TrainParams, "train:\n  batch_size: 0\n", ["train.batch_size", "0", ">= 1"]),
    (PackParams, "pack:\n  seq_len: -5\n", ["pack.seq_len", "-5", ">= 1"]),
    (VocabParams, "vocab:\n  min_count: 0\n", ["vocab.min_count", "0", ">= 1"]),
    (GenerateParams, "generate:\n  length: -1\n", ["generate.length", "-1", ">= 0"]),
    (GenerateParams, "generate:\n  top_k: -3\n", ["generate.top_k", "-3"]),
    (PackParams, "pack:\n  val_fraction: 1.0\n", ["pack.val_fraction", "1.0", "< 1.0"]),
    (PackParams, "pack:\n  val_fraction: 1.5\n", ["pack.val_fraction", "1.5"]),
    (PackParams, "pack:\n  val_fraction: -0.1\n", ["pack.val_fraction", "-0.1", ">= 0.0"]),
    (ModelParams, "model:\n  dropout: 1.0\n", ["model.dropout", "1.0"]),
    (GenerateParams, "generate:\n  top_p: 0\n", ["generate.top_p", "0", "> 0.0"]),
    (GenerateParams, "generate:\n  top_p: 1.01\n", ["generate.top_p", "1.01", "<= 1.0"]),
    (GenerateParams, "generate:\n  top_p: -0.5\n", ["generate.top_p", "-0.5"]),
    (GenerateParams, "generate:\n  temperatures: [1.0, -0.5]\n", ["generate.temperatures[1]", "-0.5", ">= 0.0"]),
    (TrainParams, "train:\n  lr: 0\n", ["train.lr", "0", "> 0.0"]),
    (DownloadParams, "download:\n  timeout: 0\n", ["download.timeout", "0"]),
    (DownloadParams, "download:\n  retries: -1\n", ["download.retries", "-1"]),
    # NaN and infinities
    (TrainParams, "train:\n  lr: .nan\n", ["train.lr", "nan", "finite"]),
    (DownloadParams, "download:\n  timeout: .inf\n", ["download.timeout", "inf", "finite"]),
    (GenerateParams, "generate:\n  temperatures: [0.5, -.inf]\n", ["generate.temperatures[1]", "-inf"]),
    (GenerateParams, "generate:\n  temperatures: [.nan]\n", ["generate.temperatures[0]", "nan"]),
    # choices
    (ModelParams, "model:\n  cell: transformer\n", ["model.cell", "'transformer'", "lstm, gru, rnn"]),
    (ModelParams, "model:\n  cell: LSTM\n", ["model.cell", "'LSTM'"]),
    (TrainParams, "train:\n  device: gpu\n", ["train.device", "'gpu'", "auto, cpu, cuda"]),
    (TrainParams, "train:\n  schedule: step\n", ["train.schedule", "'step'"]),
    (PrepareParams, "prepare:\n  format: csv\n", ["prepare.format", "'csv'", "ag_news, lines"]),
    # list fields
    (GenerateParams, 'generate:\n  prompts: "Today "\n', ["generate.prompts", "'Today '", "a list of strings"]),
    (GenerateParams, "generate:\n  prompts: []\n", ["generate.prompts", "[]", "non-empty"]),
    (GenerateParams, "generate:\n  prompts: [Today, 5]\n", ["generate.prompts[1]", "5", "a string"]),
    (GenerateParams, "generate:\n  temperatures: 0.8\n", ["generate.temperatures", "0.8", "a list of numbers"]),
    (GenerateParams, "generate:\n  temperatures: []\n", ["generate.temperatures", "[]", "non-empty"]),
    (GenerateParams, "generate:\n  temperatures: [hot]\n", ["generate.temperatures[0]", "'hot'", "a number"]),
    (PrepareParams, "prepare:\n  fields: [title, body]\n", ["prepare.fields[1]", "'body'", "title, description"]),
    (PrepareParams, "prepare:\n  fields: []\n", ["prepare.fields", "[]", "non-empty"]),
    (PrepareParams, "prepare:\n  fields: [title, title]\n", ["prepare.fields", "['title', 'title']", "without repeats"]),
    (PrepareParams, "prepare:\n  fields: title\n", ["prepare.fields", "'title'", "a list"]),
    # md5 and url
    (DownloadParams, "download:\n  train: {url: x, md5: abc}\n", ["download.train.md5", "'abc'", "32 lower-case hex"]),
    (DownloadParams, "download:\n  test: {url: x, md5: " + "B1A00F826FDFBD249F79597B59E1DC12" + "}\n",
     ["download.test.md5", "'B1A00F826FDFBD249F79597B59E1DC12'"]),
    (DownloadParams, "download:\n  train: {url: x, md5: " + "g" * 32 + "}\n", ["download.train.md5", "'" + "g" * 32 + "'"]),
    (DownloadParams, "download:\n  train: {url: x, md5: 12345}\n", ["download.train.md5", "12345", "a string"]),
    (DownloadParams, "download:\n  train: {url: '', md5: null}\n", ["download.train.url", "''", "URL"]),
    (DownloadParams, "download:\n  test: {md5: null}\n", ["download.test.url is missing"]),
]


@pytest.mark.parametrize("cls, text, expected", REJECTED, ids=[t.strip().replace("\n", " ") for _, t, _ in REJECTED])
def test_bad_values_stop_with_one_line_naming_key_and_value(tmp_path, cls, text, expected):
    """Each bad value laid over the shipped params.yaml, so that the rest of its section is complete."""
    with pytest.raises(CharlmError) as info:
        over_shipped(tmp_path, text, cls)
    message = str(info.value)
    assert "\n" not in message, message
    for part in expected:
        assert part.lower() in message.lower(), (part, message)


def test_message_names_params_file_and_what_is_allowed(tmp_path):
    message = error_of(tmp_path, "model:\n  hidden: -1\n", ModelParams)
    assert message.startswith("params.yaml: model.hidden = -1 (an integer): expected ")


def test_int_too_large_for_a_float_is_a_clear_error(tmp_path):
    message = error_of(tmp_path, f"train:\n  lr: {10 ** 400}\n", TrainParams)
    assert "train.lr" in message and "finite" in message


def test_unknown_key_with_a_newline_keeps_the_message_on_one_line(tmp_path):
    message = error_of(tmp_path, 'pack:\n  "seq\\nlen": 1\n', PackParams)
    assert "unknown key pack." in message and "seq\\nlen" in message


def test_non_string_section_name_is_a_clear_error(tmp_path):
    message = error_of(tmp_path, "1: {}\n", PackParams)
    assert "unknown section 1" in message


@pytest.mark.parametrize("text, expected", [
    ("pack:\n  seq_len: [1\n", "invalid YAML at line"),
    ("- pack\n- train\n", "mapping of sections"),
    ("pack:\n  seq_len: !!python/object:os.system x\n", "invalid YAML"),
])
def test_broken_yaml_is_a_clear_error(tmp_path, text, expected):
    assert expected in error_of(tmp_path, text, PackParams)


def test_non_utf8_params_file_is_a_clear_error(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_bytes("pack:\n  seq_len: 10  # caf\u00e9\n".encode("latin-1"))
    with pytest.raises(CharlmError, match="not UTF-8"):
        params.load(PackParams, path)


def test_missing_params_file_is_a_clear_error(tmp_path):
    with pytest.raises(CharlmError, match="not found"):
        params.load(PackParams, tmp_path / "params.yaml")


# --------------------------------------------------------------------------- accepted values


# YAML 1.1 and 1.2 disagree on these; DVC reads params.yaml as YAML 1.2, and so must every stage.
TRICKY_SCALARS = ["1e-3", "1E5", ".5", "1_000", "0o17", "012", "0x1F", "+1", "1.0e-3", "yes", "no", "on", "off",
                  "y", "True", "~", "null", ".inf", "-.inf", ".nan", "1:30", "'1e-3'"]


def test_stages_read_params_yaml_exactly_as_dvc_does(tmp_path):
    """Differential: every tricky scalar, read by charlm and by DVC itself (`dvc.api.params_show` in a real
    DVC repo), gives the same Python value."""
    dvc_api = pytest.importorskip("dvc.api")
    keys = {f"k{i}": text for i, text in enumerate(TRICKY_SCALARS)}
    (tmp_path / "params.yaml").write_text("train:\n" + "".join(f"  {k}: {v}\n" for k, v in keys.items()))
    (tmp_path / "dvc.yaml").write_text("stages:\n  s:\n    cmd: 'true'\n    params: [train]\n")
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=tmp_path, check=True)
    with contextlib.chdir(tmp_path):
        ours = params.read_yaml()["train"]
        theirs = dvc_api.params_show()["train"]
    assert [repr(ours[k]) for k in keys] == [repr(theirs[k]) for k in keys]
    # the YAML 1.2 readings a YAML 1.1 reader gets wrong
    assert ours["k0"] == 0.001 and ours["k3"] == 1000 and ours["k4"] == 15 and ours["k5"] == 12
    assert [ours[f"k{i}"] for i in (9, 10, 11, 12)] == ["yes", "no", "on", "off"]


@pytest.mark.parametrize("text, value", [("1e-3", 1e-3), ("1E5", 1e5), (".5", 0.5), ("1_000", 1000.0),
                                         ("0o17", 15.0), ("012", 12.0)])
def test_numbers_as_dvc_shows_them_reach_the_stage(tmp_path, text, value):
    p = over_shipped(tmp_path, f"download:\n  timeout: {text}\n", DownloadParams)
    assert p.timeout == value and isinstance(p.timeout, float)


def test_null_md5_skips_the_check(tmp_path):
    p = over_shipped(tmp_path, "download:\n  train: {url: 'file:///x.csv', md5: null}\n", DownloadParams)
    assert p.train.md5 is None and p.train.url == "file:///x.csv"
    # The other split keeps the shipped value.
    assert p.test == params.load(DownloadParams, SHIPPED).test


def test_valid_values_are_converted(tmp_path):
    p = over_shipped(tmp_path, "train:\n  lr: 1\n  batch_size: 3\n  deterministic: true\n", TrainParams)
    assert p.lr == 1.0 and isinstance(p.lr, float)
    assert p.batch_size == 3 and p.deterministic is True
    g = over_shipped(tmp_path, "generate:\n  temperatures: [0, 2]\n  top_p: 1\n  prompts: ['', x]\n",
                     GenerateParams)
    assert g.temperatures == [0.0, 2.0] and all(isinstance(t, float) for t in g.temperatures)
    assert g.top_p == 1.0 and g.prompts == ["", "x"]
    pr = over_shipped(tmp_path, "prepare:\n  fields: [description]\n  format: lines\n", PrepareParams)
    assert pr.fields == ["description"] and pr.format == "lines"


@pytest.mark.parametrize("text, expected", [
    ("", "the section 'pack' is missing"),
    ("train:\n  lr: 0.1\n", "the section 'pack' is missing"),
    ("pack:\n", "pack.seq_len is missing"),
    ("pack: null\n", "pack.seq_len is missing"),
    ("pack:\n  seq_len: 10\n  align: item\n  seed: 0\n", "pack.val_fraction is missing; add it to pack:"),
])
def test_a_missing_section_or_key_is_a_one_line_error_naming_it(tmp_path, text, expected):
    """Defaults are written once, in params.yaml: nothing fills a gap silently."""
    assert expected in error_of(tmp_path, text, PackParams)


def test_a_missing_nested_key_is_named(tmp_path):
    text = SHIPPED.read_text(encoding="utf-8").replace("    md5: d52ea96a97a2d943681189a97654912d  # null skips the check\n", "")
    assert "download.test.md5 is missing" in error_of(tmp_path, text, DownloadParams)


def test_boundary_values_are_accepted(tmp_path):
    p = over_shipped(tmp_path, "pack:\n  val_fraction: 0.0\n  seq_len: 1\n", PackParams)
    assert p.val_fraction == 0.0 and p.seq_len == 1
    g = over_shipped(tmp_path, "generate:\n  top_p: 1.0\n  temperatures: [0.0]\n  length: 0\n", GenerateParams)
    assert g.top_p == 1.0 and g.temperatures == [0.0] and g.length == 0


def test_params_are_frozen():
    p = params.load(PackParams, SHIPPED)
    with pytest.raises(Exception):
        p.seq_len = 5  # type: ignore[misc]


# --------------------------------------------------------------------------- the shipped params.yaml


def shipped() -> dict:
    return yaml.safe_load(SHIPPED.read_text(encoding="utf-8"))


def test_every_section_class_has_a_section_in_params_yaml_and_back():
    assert set(shipped()) == set(params.SECTIONS) == set(CLASSES)


@pytest.mark.parametrize("name", list(params.SECTIONS))
def test_the_shipped_params_yaml_loads_and_holds_exactly_the_declared_keys(name):
    cls = CLASSES[name]
    loaded = params.load(cls, SHIPPED)
    assert dataclasses.asdict(loaded) == shipped()[name]


def _strip_strings(line: str) -> str:
    return re.sub(r'"(?:[^"\\]|\\.)*"|\'[^\']*\'', '""', line)


def test_every_key_in_params_yaml_is_documented():
    """Each setting (a key holding a scalar or a list) has a comment on its line or the line above.
    Section names and nested mappings (download.train) are containers; their settings carry the comments."""
    lines = SHIPPED.read_text(encoding="utf-8").splitlines()
    data = shipped()
    undocumented = []
    stack: list[tuple[int, str]] = []  # (indent, key) of the enclosing mappings
    for i, line in enumerate(lines):
        m = re.match(r"^(\s*)([A-Za-z_][A-Za-z0-9_]*):", line)
        if not m:
            continue
        indent, key = len(m.group(1)), m.group(2)
        while stack and stack[-1][0] >= indent:
            stack.pop()
        path = [k for _, k in stack] + [key]
        stack.append((indent, key))
        value = data
        for k in path:
            value = value[k]
        if isinstance(value, dict):
            continue
        here = "#" in _strip_strings(line)
        above = i > 0 and lines[i - 1].strip().startswith("#")
        if not (here or above):
            undocumented.append(".".join(path))
    assert not undocumented, f"params.yaml keys without a comment: {undocumented}"


# --------------------------------------------------------------------------- fuzzing


def _key_paths(obj, prefix=()):
    for k, v in obj.items():
        yield prefix + (k,)
        if isinstance(v, dict):
            yield from _key_paths(v, prefix + (k,))


KEY_PATHS = list(_key_paths(shipped()))

scalars = (st.none() | st.booleans() | st.integers() | st.integers(min_value=-(10 ** 500), max_value=10 ** 500)
           | st.floats(allow_nan=True, allow_infinity=True)
           | st.text(st.characters(exclude_categories=["Cs"]), max_size=20)
           | st.sampled_from(["lstm", "auto", "title", "description", "1e-3", "", "b1a00f826fdfbd249f79597b59e1dc12"]))
keys = st.text(st.characters(exclude_categories=["Cs"]), max_size=8) | st.integers() | st.sampled_from(
    ["url", "md5", "seq_len", "lr", "cell"])
yaml_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(keys, inner, max_size=4), max_leaves=10)


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(path=st.sampled_from(KEY_PATHS), value=yaml_values)
def test_any_yaml_value_anywhere_loads_or_raises_charlm_error(fuzz_dir, path, value):
    data = shipped()
    target = data
    for k in path[:-1]:
        target = target[k]
    target[path[-1]] = value
    file = fuzz_dir / "params.yaml"
    file.write_text(yaml.dump(data, Dumper=getattr(yaml, "CSafeDumper", yaml.SafeDumper), allow_unicode=False),
                    encoding="utf-8")
    # The section that holds the change, and one that does not (it must still load or fail cleanly).
    for cls in {CLASSES[str(path[0])], VocabParams}:
        try:
            obj = params.load(cls, file)
        except CharlmError as e:
            assert "\n" not in str(e), str(e)
        else:
            assert isinstance(obj, cls)
            # Whatever loads has the declared types and finite numbers.
            for name, v in dataclasses.asdict(obj).items():
                if isinstance(v, float):
                    assert math.isfinite(v), (name, v)


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(section=st.sampled_from(list(params.SECTIONS)), extra=st.dictionaries(keys, yaml_values, min_size=1, max_size=3))
def test_any_extra_keys_in_a_section_raise_charlm_error(fuzz_dir, section, extra):
    data = shipped()
    data[section] = {**data[section], **extra}
    file = fuzz_dir / "params.yaml"
    file.write_text(yaml.dump(data, Dumper=getattr(yaml, "CSafeDumper", yaml.SafeDumper)), encoding="utf-8")
    try:
        params.load(CLASSES[section], file)
    except CharlmError as e:
        assert "\n" not in str(e), str(e)
