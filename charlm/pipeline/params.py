"""Typed, validated params: one frozen dataclass per `params.yaml` section.

Each stage calls `load(SectionClass)` first. An unknown key, a wrong type or an out-of-range value stops
the stage with one line that names the key, the value and what is allowed. The dataclass defaults equal the
shipped `params.yaml` (a test holds them together); the comments in `params.yaml` document every key.

params.yaml is read with DVC's own YAML 1.2 loader (ruamel, safe), so a stage sees exactly the values that
`dvc params diff` and `dvc exp show` show: `1e-3` is a number, `yes` and `on` are strings (tests/test_params.py
holds the two readers together).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

from ruamel.yaml import YAML, YAMLError

from charlm.base.errors import CharlmError

PARAMS_FILE = "params.yaml"


def spec(default, *, ge=None, gt=None, le=None, lt=None, choices=None, items=None):
    """A field with range rules. `items` holds the rules for each element of a list field."""
    rules = dict(ge=ge, gt=gt, le=le, lt=lt, choices=choices, items=items)
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=rules)
    return field(default=default, metadata=rules)


# --------------------------------------------------------------------------- sections


@dataclass(frozen=True)
class Source:
    url: str = spec("")
    md5: str | None = spec(None)


AG_NEWS = "https://raw.githubusercontent.com/mhjabreel/CharCnn_Keras/master/data/ag_news_csv"


@dataclass(frozen=True)
class DownloadParams:
    train: Source = field(default_factory=lambda: Source(f"{AG_NEWS}/train.csv", "b1a00f826fdfbd249f79597b59e1dc12"))
    test: Source = field(default_factory=lambda: Source(f"{AG_NEWS}/test.csv", "d52ea96a97a2d943681189a97654912d"))
    timeout: float = spec(30.0, gt=0)
    retries: int = spec(5, ge=0, le=100)

    def check(self):
        for name in ("train", "test"):
            src = getattr(self, name)
            if not src.url:
                fail(f"download.{name}.url", src.url, "a URL (http://, https://, file://) or a local path")
            if src.md5 is not None and not (len(src.md5) == 32 and all(c in "0123456789abcdef" for c in src.md5)):
                fail(f"download.{name}.md5", src.md5, "32 lower-case hex digits, or null to skip the check")


@dataclass(frozen=True)
class PrepareParams:
    format: str = spec("ag_news", choices=("ag_news", "lines"))
    fields: list[str] = spec(["title", "description"], items=dict(choices=("title", "description")))
    clean: bool = spec(True)
    separator: str = spec(" ")

    def check(self):
        if not self.fields or len(set(self.fields)) != len(self.fields):
            fail(
                "prepare.fields",
                self.fields,
                "a non-empty list without repeats: [title], [description] or [title, description]",
            )


@dataclass(frozen=True)
class VocabParams:
    min_count: int = spec(5, ge=1)
    from_model: str | None = spec(None)

    def check(self):
        check_init_path("vocab.from_model", self.from_model)


@dataclass(frozen=True)
class PackParams:
    seq_len: int = spec(100, ge=1, le=1_000_000)
    align: str = spec("item", choices=("item", "stream"))
    val_fraction: float = spec(0.05, ge=0.0, lt=1.0)
    seed: int = spec(0, ge=0)


@dataclass(frozen=True)
class ModelParams:
    cell: str = spec("lstm", choices=("lstm", "gru", "rnn"))
    hidden: int = spec(384, ge=1, le=65536)
    layers: int = spec(1, ge=1, le=64)
    dropout: float = spec(0.0, ge=0.0, lt=1.0)
    embedding: int = spec(32, ge=0, le=65536)


@dataclass(frozen=True)
class TrainParams:
    batch_size: int = spec(16, ge=1)
    lr: float = spec(1.6e-2, gt=0.0, le=10.0)
    beta2: float = spec(0.99, gt=0.0, lt=1.0)
    epochs: int = spec(50, ge=1)
    max_steps: int = spec(10000, ge=0)
    seed: int = spec(0, ge=0)
    device: str = spec("auto", choices=("auto", "cpu", "cuda"))
    warmup_steps: int = spec(50, ge=0)
    schedule: str = spec("cosine", choices=("cosine", "linear", "constant"))
    min_lr_ratio: float = spec(0.0, ge=0.0, le=1.0)
    weight_decay: float = spec(0.05, ge=0.0)
    grad_clip: float = spec(1.0, ge=0.0)
    amp: str = spec("none", choices=("none", "bf16", "fp16"))
    deterministic: bool = spec(False)
    processes: int = spec(1, ge=1, le=1024)
    eval_every: int = spec(1000, ge=1)
    log_every: int = spec(100, ge=1)
    checkpoint_every: int = spec(1000, ge=1)
    sample_every: int = spec(2500, ge=0)
    sample_prompt: str = spec("The ")
    sample_length: int = spec(200, ge=1, le=100_000)
    init_from: str | None = spec(None)

    def check(self):
        check_init_path("train.init_from", self.init_from)


INIT_DIR = "init"


def check_init_path(key: str, value: str | None) -> None:
    """A starting model must sit under init/, the folder dvc.yaml declares as a dependency of vocab and train:
    DVC then reruns them when that model changes, which it could not do for an arbitrary path."""
    if value is None:
        return
    parts = Path(value).parts
    if len(parts) < 2 or parts[0] != INIT_DIR or ".." in parts:
        fail(
            key,
            value,
            f"null or a model file under {INIT_DIR}/ (e.g. {INIT_DIR}/ag_news.pt), the folder dvc.yaml "
            f"declares as a dependency; copy the model there or `dvc import` it",
        )


@dataclass(frozen=True)
class EvaluateParams:
    batch_size: int = spec(64, ge=1)
    device: str = spec("auto", choices=("auto", "cpu", "cuda"))
    dynamic_lr: float = spec(0.0, ge=0.0, le=10.0)


@dataclass(frozen=True)
class GenerateParams:
    prompts: list[str] = spec(["Today ", "On Sunday ", "Moscow, ", "President ", "Little red riding hood "])
    temperatures: list[float] = spec([0.3, 0.8, 1.0, 1.3, 1.8], items=dict(ge=0.0))
    length: int = spec(200, ge=0, le=1_000_000)
    top_k: int = spec(0, ge=0)
    top_p: float = spec(1.0, gt=0.0, le=1.0)
    seed: int = spec(0, ge=0)
    stop_at_eos: bool = spec(True)
    device: str = spec("auto", choices=("auto", "cpu", "cuda"))

    def check(self):
        if not self.prompts:
            fail("generate.prompts", self.prompts, "a non-empty list of strings")
        if not self.temperatures:
            fail("generate.temperatures", self.temperatures, "a non-empty list of numbers >= 0 (0 means greedy)")


SECTIONS = {
    "download": DownloadParams,
    "prepare": PrepareParams,
    "vocab": VocabParams,
    "pack": PackParams,
    "model": ModelParams,
    "train": TrainParams,
    "evaluate": EvaluateParams,
    "generate": GenerateParams,
}


# --------------------------------------------------------------------------- loading


def fail(key: str, value, allowed: str):
    raise CharlmError(f"{PARAMS_FILE}: {key} = {value!r} ({_type_name(value)}): expected {allowed}")


def load(cls, path: str | Path = PARAMS_FILE):
    """Read the section of `path` that belongs to `cls` and return a validated instance."""
    name = next(k for k, v in SECTIONS.items() if v is cls)
    return parse(name, read_yaml(path).get(name, {}), cls)


def read_yaml(path: str | Path = PARAMS_FILE) -> dict:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CharlmError(f"{path} not found; run from the project root, which holds params.yaml") from None
    except UnicodeDecodeError as e:
        raise CharlmError(f"{path}: byte {e.start} is not UTF-8; save the file as UTF-8") from None
    try:
        data = YAML(typ="safe").load(text)  # exactly as dvc.utils.serialize.parse_yaml
    except YAMLError as e:
        where = getattr(e, "problem_mark", None)
        line = f" at line {where.line + 1}" if where else ""
        raise CharlmError(f"{path}: invalid YAML{line}; fix the syntax") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise CharlmError(f"{path}: expected a mapping of sections (download:, prepare:, ...) at the top level")
    unknown = [k for k in data if k not in SECTIONS]
    if unknown:
        raise CharlmError(
            f"{path}: unknown section {unknown[0]!r}{_suggest(str(unknown[0]), SECTIONS)}; "
            f"sections are {', '.join(SECTIONS)}"
        )
    return data


def parse(prefix: str, data, cls):
    if data is None:
        data = {}
    if not isinstance(data, dict):
        fail(prefix, data, "a mapping of keys")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in fields:
            raise CharlmError(
                f"{PARAMS_FILE}: unknown key {prefix}.{_show(key)}{_suggest(str(key), fields)}; "
                f"{prefix} takes {', '.join(fields)}"
            )
    values = {}
    for name, f in fields.items():
        if name in data:
            values[name] = _convert(f"{prefix}.{name}", data[name], hints[name], f.metadata)
    obj = cls(**values)
    if hasattr(obj, "check"):
        obj.check()
    return obj


def _convert(key: str, value, tp, rules):
    if dataclasses.is_dataclass(tp):
        return parse(key, value, tp)
    origin = typing.get_origin(tp)
    if origin in (types.UnionType, typing.Union):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return None if value is None else _convert(key, value, args[0], rules)
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            fail(key, value, f"a list of {_type_word(item_tp)}s")
        item_rules = rules.get("items") or {}
        return [_convert(f"{key}[{i}]", v, item_tp, item_rules) for i, v in enumerate(value)]
    return _check_range(key, _scalar(key, value, tp), rules)


def _scalar(key, value, tp):
    if tp is bool:
        if not isinstance(value, bool):
            fail(key, value, "true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            fail(key, value, "an integer")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            fail(key, value, "a number")
        try:
            finite = math.isfinite(value)
        except OverflowError:  # an integer too large for a float
            finite = False
        if not finite:
            fail(key, value, "a finite number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            fail(key, value, "a string (quote it)")
        return value
    raise TypeError(f"unsupported param type {tp}")


def _check_range(key, value, rules):
    choices = rules.get("choices")
    if choices is not None and value not in choices:
        fail(key, value, "one of " + ", ".join(map(str, choices)))
    bounds = [
        (">=", rules.get("ge"), lambda v, b: v >= b),
        (">", rules.get("gt"), lambda v, b: v > b),
        ("<=", rules.get("le"), lambda v, b: v <= b),
        ("<", rules.get("lt"), lambda v, b: v < b),
    ]
    for _, bound, ok in bounds:
        if bound is not None and not ok(value, bound):
            allowed = " and ".join(f"{s} {b}" for s, b, _ in bounds if b is not None)
            fail(key, value, f"a value {allowed}")
    return value


def _suggest(word: str, options) -> str:
    close = difflib.get_close_matches(word, list(options), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _show(key) -> str:
    """A key as written, or its repr when it is not a plain printable string (keeps the message one line)."""
    return key if isinstance(key, str) and key.isprintable() else repr(key)


def _type_name(value) -> str:
    return {
        bool: "a boolean",
        int: "an integer",
        float: "a number",
        str: "a string",
        list: "a list",
        dict: "a mapping",
        type(None): "null",
    }.get(type(value), type(value).__name__)


def _type_word(tp) -> str:
    return {bool: "boolean", int: "integer", float: "number", str: "string"}.get(tp, str(tp))
