"""The experiment form of the playground's Run part: its fields come from the params sections' declarations (type,
range, choices) and their help from params.yaml's comments, so a new key appears in the form with nothing else to
edit; and a set of `-S` overrides is checked as the stages will check it, before anything is queued.

Values travel as DVC's `-S key=value` text (Hydra's override grammar), exactly what `dvc exp run -S` takes:
`16,32` is a sweep (one experiment per value), `'The '` a quoted string, `[0.3,0.8]` a list, `null` None.

The stage that runs an experiment imports the repository's own `charlm/`, which may differ from the one serving
the page (another commit): the declarations are read from the repository's `charlm/pipeline/sections/` files when
it has them.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import math
import re
import shutil
import sys
import tempfile
import types
import typing
from pathlib import Path
from typing import Any

from charlm.base.errors import CharlmError
from charlm.pipeline import params

MAX_TEXT = 2000  # characters of one value's -S text
MAX_SWEEP = 16  # experiments one request may queue
KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")


_LOADED: dict[tuple, types.ModuleType] = {}


def _module(name: str) -> types.ModuleType:
    """The repository's own declaration of a section, when the current directory holds one (its helpers, such as
    `spec`, come from this charlm), else this charlm's."""
    file = Path("charlm/pipeline/sections") / f"{name}.py"
    try:
        stat = file.stat()
    except OSError:
        return importlib.import_module(f"charlm.pipeline.sections.{name}")
    key = (str(file.resolve()), stat.st_mtime_ns, stat.st_size)
    if key not in _LOADED:
        module_name = f"_charlm_repo_sections.{name}_{len(_LOADED)}"
        spec = importlib.util.spec_from_file_location(module_name, file)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module  # dataclasses and get_type_hints look their module up here
        try:
            spec.loader.exec_module(module)
        except Exception as e:
            del sys.modules[module_name]
            raise CharlmError(f"{file}: cannot be read ({type(e).__name__}: {e}); fix the declaration") from None
        _LOADED[key] = module
    return _LOADED[key]


def section_class(name: str):
    """The frozen dataclass that `charlm/pipeline/sections/<name>.py` declares for section `name`."""
    module = _module(name)
    for value in vars(module).values():
        if dataclasses.is_dataclass(value) and getattr(value, "section", None) == name:
            return value
    raise CharlmError(f"charlm/pipeline/sections/{name}.py declares no class with section = {name!r}")


def _type_of(declared) -> tuple[str, bool]:
    """(type word, may be null) of a declared field type."""
    nullable = False
    if typing.get_origin(declared) in (types.UnionType, typing.Union):
        args = [a for a in typing.get_args(declared) if a is not type(None)]
        nullable, declared = True, args[0]
    if typing.get_origin(declared) is list:
        (item,) = typing.get_args(declared)
        return f"list of {item.__name__}", nullable
    return declared.__name__, nullable


def _leaves(cls, prefix: str):
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        declared = hints[f.name]
        if dataclasses.is_dataclass(declared):
            yield from _leaves(declared, f"{prefix}.{f.name}")
        else:
            yield f"{prefix}.{f.name}", declared, dict(f.metadata)


# --------------------------------------------------------------------------- help text from params.yaml's comments


def _comment_lines(token) -> list[tuple[int, str]]:
    """(column, text) of each line of a ruamel comment token; its first line starts at the token's column."""
    if token is None:
        return []
    tokens = token if isinstance(token, list) else [token]
    out = []
    for tok in tokens:
        if tok is None:
            continue
        for i, line in enumerate(tok.value.split("\n")):
            if line.strip().startswith("#"):
                col = tok.column if i == 0 else len(line) - len(line.lstrip())
                out.append((col, line.strip().lstrip("#").strip()))
    return out


def help_texts(path: str | Path = params.PARAMS_FILE) -> dict[str, str]:
    """{dotted key: its comment}, read with ruamel in round-trip mode: the comment on the key's line with the lines
    that continue it (indented past the key), after the comment lines just above the key."""
    from ruamel.yaml import YAML

    data = YAML(typ="rt").load(Path(path).read_text(encoding="utf-8"))
    out: dict[str, str] = {}

    def walk(node, prefix: str) -> None:
        leading = [text for _, text in _comment_lines(node.ca.comment[1] if node.ca.comment else None)]
        for key, value in node.items():
            dotted = f"{prefix}.{key}" if prefix else str(key)
            _, col = node.lc.key(key)
            token = node.ca.items.get(key)
            lines = _comment_lines(token[2] if token and len(token) > 2 else None)
            lines += _comment_lines(token[3] if token and len(token) > 3 else None)
            own = [text for i, (c, text) in enumerate(lines) if i == 0 or c > col]
            if isinstance(value, dict):
                walk(value, dotted)
            else:
                out[dotted] = " ".join(leading + own)
            leading = [text for i, (c, text) in enumerate(lines) if i > 0 and c <= col]

    walk(data, "")
    return out


# --------------------------------------------------------------------------- values as -S text


def _quote(text: str) -> str:
    # Hydra's quoted value: a backslash is literal except before a quote (or a run of them before one).
    body = re.sub(r"(\\*)'", lambda m: m.group(1) * 2 + "\\'", text)
    # ... and OmegaConf resolves ${...} even in quotes: escaped as \${, the backslashes before it doubled.
    body = re.sub(r"(\\*)\$\{", lambda m: m.group(1) * 2 + "\\${", body)
    body = re.sub(r"(\\+)$", lambda m: m.group(1) * 2, body)
    return f"'{body}'"


def override_text(value: Any) -> str:
    """A params value as `-S` text that DVC reads back as the same value."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise CharlmError(f"{value!r} cannot be a param (not a finite number)")
        return repr(value)
    if isinstance(value, str):
        return _quote(value)
    if isinstance(value, list):
        return "[" + ",".join(override_text(v) for v in value) + "]"
    raise CharlmError(f"a param of type {type(value).__name__} cannot be written as -S text")


def flat(tree: dict, prefix: str = "") -> dict[str, Any]:
    """{dotted key: value} of a params tree."""
    out: dict[str, Any] = {}
    for k, v in tree.items():
        dotted = f"{prefix}.{k}" if prefix else str(k)
        out.update(flat(v, dotted) if isinstance(v, dict) else {dotted: v})
    return out


def schema(path: str | Path = params.PARAMS_FILE) -> list[dict]:
    """One field per key that the declarations hold, in params.yaml's order of sections: {key, section, type,
    nullable, choices, ge, gt, le, lt, help, value (params.yaml's, as -S text; null when the file lacks it)}."""
    values = flat(params.read_yaml(path))
    helps = help_texts(path)
    fields = []
    for section in params.SECTIONS:
        for key, declared, rules in _leaves(section_class(section), section):
            word, nullable = _type_of(declared)
            rules = {**rules, **(rules.pop("items", None) or {})}  # a list's element rules are its rules
            fields.append(
                {
                    "key": key,
                    "section": section,
                    "type": word,
                    "nullable": nullable,
                    "choices": list(rules["choices"]) if rules.get("choices") else None,
                    **{b: rules.get(b) for b in ("ge", "gt", "le", "lt")},
                    "help": helps.get(key, ""),
                    "value": override_text(values[key]) if key in values else None,
                }
            )
    return fields


# --------------------------------------------------------------------------- checking overrides


def stage_of(section: str, dvc_yaml: str | Path = "dvc.yaml") -> str:
    """The first stage in dvc.yaml that reads `section`: the one whose message a bad value of it would give."""
    from ruamel.yaml import YAML

    try:
        stages = (YAML(typ="safe").load(Path(dvc_yaml).read_text(encoding="utf-8")) or {}).get("stages", {})
    except OSError:
        return section
    for name, stage in stages.items():
        if section in (stage.get("params") or []):
            return name
    return section


def overrides_of(values: dict[str, str], known: set[str]) -> list[str]:
    """`key=text` for each value, refusing a key that no declaration holds and text that is not one line."""
    out = []
    for key, text in values.items():
        if not isinstance(key, str) or not KEY.fullmatch(key) or key not in known:
            shown = key if isinstance(key, str) and key.isprintable() else repr(key)
            raise CharlmError(f"{params.PARAMS_FILE}: unknown key {shown[:80]}; the form's fields are the keys to set")
        if not isinstance(text, str) or not text.strip() or len(text) > MAX_TEXT or not text.isprintable():
            raise CharlmError(f"{key}: the value must be one line of at most {MAX_TEXT} characters, as -S takes it")
        if "${" in text:  # OmegaConf would resolve it: another key's value, or the server's environment (oc.env)
            raise CharlmError(f"{key}: a value may not hold ${{...}}, which -S resolves (even the environment's)")
        out.append(f"{key}={text.strip()}")
    return out


def _sweep_count(overrides: list[str]) -> int:
    """How many experiments the overrides make, counted without making them: DVC builds every combination first,
    and two `range(0,100000)` values are 10**10 of them. 0 when Hydra cannot read them (`sweeps` says why)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import ChoiceSweep, RangeSweep

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except Exception:  # Hydra's grammar errors; get_hydra_sweeps reports them with their first line
        return 0
    count = 1
    for override in parsed:
        value = override.value() if override.is_sweep_override() else None
        if isinstance(value, ChoiceSweep):
            count *= len(value.list)
        elif isinstance(value, RangeSweep):
            start, stop, step = value.start or 0, value.stop or 0, value.step or 1
            count *= max(0, math.ceil((stop - start) / step)) if step else MAX_SWEEP + 1
        elif value is not None:  # an interval has no end of values
            count *= MAX_SWEEP + 1
        count = min(count, MAX_SWEEP + 1)  # past the cap the exact number does not matter, and may not fit
    return count


def sweeps(overrides: list[str]) -> list[list[str]]:
    """The experiments that `dvc exp run --queue -S ...` makes of these overrides: one per combination of swept
    values (DVC's own expansion), each a list of plain overrides."""
    from dvc.utils.hydra import get_hydra_sweeps

    if _sweep_count(overrides) > MAX_SWEEP:  # counted up to the cap only
        raise CharlmError(f"the values make more than {MAX_SWEEP} experiments; at most {MAX_SWEEP} at once")
    try:
        expanded = get_hydra_sweeps({params.PARAMS_FILE: overrides})
    except Exception as e:  # Hydra's grammar errors come in several kinds; the first line says what is wrong
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CharlmError(f"cannot read the values as -S takes them ({first[:200]}); quote text: 'The '") from None
    if len(expanded) > MAX_SWEEP:
        raise CharlmError(f"the values make {len(expanded)} experiments; at most {MAX_SWEEP} at once")
    return [list(e[params.PARAMS_FILE]) for e in expanded]


def check(values: dict[str, str], path: str | Path = params.PARAMS_FILE) -> list[list[str]]:
    """The overrides of each experiment these form values make, once every stage would accept its params: a
    CharlmError with the stage's own one line (`train: error: params.yaml: ...`) otherwise."""
    from dvc.utils.hydra import apply_overrides

    known = {f["key"] for f in schema(path)}
    experiments = sweeps(overrides_of(values, known))
    classes = {s: section_class(s) for s in params.SECTIONS}
    with tempfile.TemporaryDirectory() as tmp:
        for overrides in experiments:
            copy = Path(tmp) / params.PARAMS_FILE
            shutil.copyfile(path, copy)
            try:
                apply_overrides(copy, overrides)  # what `dvc exp run -S` does to the experiment's params.yaml
            except Exception as e:
                cause = e.__cause__ or e
                first = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
                raise CharlmError(f"cannot apply {' '.join(overrides)[:200]} ({first[:200]})") from None
            data = params.read_yaml(copy)
            for section, cls in classes.items():
                try:
                    params.parse(section, data.get(section), cls)
                except CharlmError as e:
                    raise CharlmError(f"{stage_of(section)}: error: {e}") from None
    return experiments
