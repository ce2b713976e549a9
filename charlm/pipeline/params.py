"""Reading and checking params.yaml: the validator that every section's declaration uses.

Each section is declared once, as a frozen dataclass in its own module of `charlm/pipeline/sections/`, which
only the stages that read that section import: adding or changing a key there reruns only those stages. This
module is shared by every stage and changes rarely. A stage calls `load(SectionClass)` first. An unknown or
missing key, a wrong type or an out-of-range value stops it with one line that names the key, the value and
what is allowed. Defaults are written once, in params.yaml, whose comments document every key.

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
from dataclasses import field
from pathlib import Path

from ruamel.yaml import YAML, YAMLError

from charlm.base.errors import CharlmError
from charlm.pipeline import paths

PARAMS_FILE = "params.yaml"


def spec(*, ge=None, gt=None, le=None, lt=None, choices=None, items=None):
    """A field with range rules and no default: params.yaml holds every value. `items` holds the rules for each
    element of a list field."""
    return field(metadata=dict(ge=ge, gt=gt, le=le, lt=lt, choices=choices, items=items))


def check_init_path(key: str, value: str | None) -> None:
    """A starting model must sit under init/, the folder dvc.yaml declares as a dependency of vocab and train:
    DVC then reruns them when that model changes, which it could not do for an arbitrary path."""
    if value is None:
        return
    parts = Path(value).parts
    if len(parts) < 2 or parts[0] != paths.INIT.name or ".." in parts:
        fail(
            key,
            value,
            f"null or a model file under {paths.INIT}/ (e.g. {paths.INIT}/ag_news.pt), the folder dvc.yaml "
            f"declares as a dependency; copy the model there or `dvc import` it",
        )


# --------------------------------------------------------------------------- loading


def fail(key: str, value, allowed: str):
    raise CharlmError(f"{PARAMS_FILE}: {key} = {value!r} ({_type_name(value)}): expected {allowed}")


# The sections params.yaml may hold; each is declared in charlm/pipeline/sections/<name>.py.
SECTIONS = ("download", "prepare", "vocab", "pack", "model", "train", "evaluate", "generate")


def load(cls, path: str | Path = PARAMS_FILE):
    """Read the section of `path` that `cls` declares (its `section` name) and return a validated instance."""
    data = read_yaml(path)
    if cls.section not in data:
        raise CharlmError(f"{path}: the section {cls.section!r} is missing; add it (params.yaml documents each key)")
    return parse(cls.section, data[cls.section], cls)


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
    fields = {f.name: f for f in dataclasses.fields(cls)}  # a ClassVar is not a field
    for key in data:
        if key not in fields:
            raise CharlmError(
                f"{PARAMS_FILE}: unknown key {prefix}.{_show(key)}{_suggest(str(key), fields)}; "
                f"{prefix} takes {', '.join(fields)}"
            )
    values = {name: _convert(f"{prefix}.{name}", data[name], hints[name], fields[name].metadata) for name in data}
    missing = [name for name in fields if name not in data]
    if missing:
        raise CharlmError(
            f"{PARAMS_FILE}: {prefix}.{missing[0]} is missing; add it to {prefix}: (params.yaml documents each key)"
        )
    obj = cls(**values)
    if hasattr(obj, "check"):
        obj.check()
    return obj


def _convert(key: str, value, declared, rules):
    if dataclasses.is_dataclass(declared):
        return parse(key, value, declared)
    origin = typing.get_origin(declared)
    if origin in (types.UnionType, typing.Union):
        args = [a for a in typing.get_args(declared) if a is not type(None)]
        return None if value is None else _convert(key, value, args[0], rules)
    if origin is list:
        (item_type,) = typing.get_args(declared)
        if not isinstance(value, list):
            fail(key, value, f"a list of {_type_word(item_type)}s")
        item_rules = rules.get("items") or {}
        return [_convert(f"{key}[{i}]", v, item_type, item_rules) for i, v in enumerate(value)]
    return _check_range(key, _scalar(key, value, declared), rules)


def _scalar(key, value, declared):
    if declared is bool:
        if not isinstance(value, bool):
            fail(key, value, "true or false")
        return value
    if declared is int:
        if isinstance(value, bool) or not isinstance(value, int):
            fail(key, value, "an integer")
        return value
    if declared is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            fail(key, value, "a number")
        try:
            finite = math.isfinite(value)
        except OverflowError:  # an integer too large for a float
            finite = False
        if not finite:
            fail(key, value, "a finite number")
        return float(value)
    if declared is str:
        if not isinstance(value, str):
            fail(key, value, "a string (quote it)")
        return value
    raise TypeError(f"unsupported param type {declared}")


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


def _type_word(declared) -> str:
    return {bool: "boolean", int: "integer", float: "number", str: "string"}.get(declared, str(declared))
