"""Quality per compute: charlm's recipes against the strongest references on the bench split, in one run.

    .venv/bin/python -m bench.quality --ag-news PATH          # about an hour on a 2-core CPU; writes BENCHMARKS.md
    .venv/bin/python -m bench.quality --ag-news PATH --smoke  # minutes, tiny budgets: checks the script, writes nothing

Run it on a quiet machine: the references train for a wall-clock budget, and every time in the table is measured.

- **charlm recipes** (`RECIPES`, quoted in the README as `dvc exp run -S ...` lines): the real prepare, vocab, pack,
  train, evaluate and generate stages in a scratch folder, with params.yaml plus the recipe's overrides.
- **references**, each trained for the wall-clock of the charlm recipe it is compared with: the plain loop
  (`train_plain`, the issue's 30-line nn.LSTM loop) and the lesson's recipe (bench/lesson.py). Both are scored
  by `charlm.core.scoring.stream_bpc`, the protocol of the test bpc.
- **compressors**, scored as "test after train": 8 x (size of train+test compressed - size of train compressed)
  / test characters, so that they, like the models, have read the training text first.

Data: PATH is a local copy of the AG News test split; its first 6,600 rows are the train split and its last 1,000
the test split (bench/harness.py).
"""

from __future__ import annotations

import argparse
import bz2
import csv
import gzip
import json
import lzma
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from bench import harness, lesson
from bench.harness import ROOT, Table
from charlm.core.model import CharRNN, n_params
from charlm.core.scoring import stream_bpc
from charlm.pipeline import artifact, paths

# The recipes, as `dvc exp run -S` overrides of params.yaml. "defaults" is params.yaml as shipped.
RECIPES: dict[str, dict[str, object]] = {
    "defaults": {},
    "quick": {"train.max_steps": 4000},
    "best": {"model.hidden": 768, "train.max_steps": 7500},
}
MARKER = "<!-- quality: written by bench/quality.py; make bench keeps this part as it is -->"
PNG = ROOT / "bench" / "quality.png"


def exp_run_line(overrides: dict[str, object]) -> str:
    return "dvc exp run" + "".join(f" -S {k}={v}" for k, v in overrides.items())


def run_recipe(name: str, overrides: dict[str, object], raw: Path, scratch: Path, log) -> dict:
    """The real stages, one fresh process each, in scratch/name; train's own timing and every output."""
    folder = scratch / name
    shutil.copytree(raw, folder / paths.RAW)
    harness.write_params(folder, overrides)
    for stage in ("prepare", "vocab", "pack"):
        harness.run_stage(stage, folder)
    log(f"  {name}: training ({exp_run_line(overrides)})")
    train = harness.run_stage("train", folder)
    harness.run_stage("evaluate", folder)
    harness.run_stage("generate", folder)
    result = collect(name, overrides, folder, train.seconds)
    log(f"  {name}: test {result['test_bpc']:.4f} bpc, stage {train.seconds:.0f} s")
    return result


def collect(name: str, overrides: dict[str, object], folder: Path, stage_s: float) -> dict:
    """A finished recipe's figures, from the outputs of its stages in `folder`."""

    def read(path: Path) -> dict:
        return json.loads((folder / path).read_text(encoding="utf-8"))

    live, evaluation = read(paths.LIVE / "metrics.json"), read(paths.EVAL_METRICS)
    samples = read(paths.SAMPLES_JSON)["samples"]
    model, _, info = artifact.load_model(folder / paths.MODEL, torch.device("cpu"))
    m = info["params"]["model"]
    # DVCLive keeps steps, not times: a step's time is the run's mean seconds per step (validation included).
    with open(folder / paths.LIVE / "plots/metrics/val/bpc.tsv", newline="") as f:
        rows = csv.DictReader(f, delimiter="\t")
        curve = [(int(r["step"]) * live["train_time_s"] / live["steps"], float(r["bpc"])) for r in rows]
    return {
        "name": name,
        "overrides": overrides,
        "stage_s": stage_s,
        "train_s": live["train_time_s"],
        "steps": live["steps"],
        "val_bpc": live["val"]["bpc"],
        "test_bpc": evaluation["test_bpc"],
        "test_bpc_cache": evaluation.get("test_bpc_cache"),  # adaptive: absent with evaluate.cache_lambda 1
        "known_t08": read(paths.GENERATE_METRICS)["known_words"].get("T=0.8"),
        "curve": curve,
        "model": f"{m['layers']}×{m['hidden']} {m['cell']}, emb {m['embedding']}, dropout {m['dropout']:g}",
        "n_params": n_params(model),
        "samples_t08": [t for k, t in samples.items() if k.endswith("@ T=0.8")],
    }


def train_plain(stream: np.ndarray, vocab_size: int, seconds: float, seed: int = 0) -> tuple[CharRNN, dict]:
    """The plain reference loop: Embedding(64) -> 1x256 LSTM -> Linear, Adam 2e-3 with no schedule, clip 1.0,
    minibatches of 64 windows of 100 characters at uniformly random offsets, no dropout; for `seconds`."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = CharRNN(vocab_size, cell="lstm", hidden=256, layers=1, dropout=0.0, embedding=64)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    offsets = np.arange(101)
    t0, steps = time.perf_counter(), 0
    while time.perf_counter() - t0 < seconds:
        w = torch.from_numpy(stream[rng.integers(0, len(stream) - 101, 64)[:, None] + offsets].astype(np.int64))
        logits, _ = model(w[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, vocab_size), w[:, 1:].reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        steps += 1
    return model, {"steps": steps, "train_s": time.perf_counter() - t0}


def compressor_bpc(train_text: bytes, test_text: bytes, test_chars: int) -> dict[str, float]:
    """Test bits per character of each compressor after it has read `train_text`."""
    import pyppmd

    def ppmd(order: int, variant: str):
        return lambda b: pyppmd.compress(b, max_order=order, mem_size=256 << 20, variant=variant)

    compressors = {
        "gzip -9": lambda b: gzip.compress(b, 9),
        "bzip2 -9": lambda b: bz2.compress(b, 9),
        "xz -9e": lambda b: lzma.compress(b, preset=9 | lzma.PRESET_EXTREME),
        "PPMd var. H (7-Zip's), order 6": ppmd(6, "H"),
        "PPMd var. H (7-Zip's), order 8": ppmd(8, "H"),
        "PPMd var. I (pyppmd's default), order 6": ppmd(6, "I"),
        "PPMd var. I (pyppmd's default), order 8": ppmd(8, "I"),
    }
    return {n: 8 * (len(c(train_text + test_text)) - len(c(train_text))) / test_chars for n, c in compressors.items()}


def render_png(results: list[dict], ppmd8: float, path: Path) -> None:
    """Validation bpc against seconds since the train stage started, per recipe; PPMd order 8's test bpc as a rule."""
    import vl_convert as vlc

    values = [{"recipe": r["name"], "seconds": round(s, 1), "val bpc": b} for r in results for s, b in r["curve"]]
    x_title, y_title = "training seconds (step × mean seconds per step)", "validation bits per character"
    y_rule = {"y": {"field": "y", "type": "quantitative"}}
    curves = {
        "data": {"values": values},
        "mark": {"type": "line", "point": True},
        "encoding": {
            "x": {"field": "seconds", "type": "quantitative", "title": x_title},
            "y": {"field": "val bpc", "type": "quantitative", "scale": {"zero": False}, "title": y_title},
            "color": {"field": "recipe", "type": "nominal"},
        },
    }
    rule = {
        "data": {"values": [{"y": ppmd8}]},
        "mark": {"type": "rule", "strokeDash": [4, 4], "color": "gray"},
        "encoding": y_rule,
    }
    label = {
        "data": {"values": [{"y": ppmd8, "label": f"PPMd order 8 (test): {ppmd8:.3f}"}]},
        "mark": {"type": "text", "align": "right", "dy": -6, "color": "gray"},
        "encoding": {**y_rule, "x": {"value": 550}, "text": {"field": "label"}},
    }
    spec = {
        "$schema": "https://vega.github.io/schema/vega-lite/v5.json",
        "width": 560,
        "height": 320,
        "title": "charlm recipes on the bench split: validation bpc against training time (2-core CPU)",
        "layer": [curves, rule, label],
    }
    path.write_bytes(vlc.vegalite_to_png(spec, scale=2))


def models_table(results: list[dict], references: list[dict], test_chars: int) -> Table:
    models = Table(
        "Test bpc at equal wall-clock (bench split, 2-core CPU, one run)",
        "what | model | parameters | steps | train stage s | training s | val bpc | test bpc | test bpc, adaptive "
        "(n-gram cache) | known words at T=0.8",
    )
    for r in results:
        what = f"charlm **{r['name']}**" + (" (†)" if r.get("reused") else "")
        known = "-" if r["known_t08"] is None else f"{r['known_t08']:.1%}"
        counts = [f"{r['n_params']:,}", f"{r['steps']:,}", f"{r['stage_s']:.0f}", f"{r['train_s']:.0f}"]
        cache = "-" if r["test_bpc_cache"] is None else f"{r['test_bpc_cache']:.4f}"
        models.add(what, r["model"], *counts, f"{r['val_bpc']:.4f}", f"**{r['test_bpc']:.4f}**", cache, known)
    for ref in references:
        counts = [f"{ref['n_params']:,}", f"{ref['steps']:,}", "-", f"{ref['train_s']:.0f}"]
        models.add(ref["name"], ref["model"], *counts, "-", f"{ref['test_bpc']:.4f}", "-", "-")
    if any(r.get("reused") for r in results):
        models.notes.append(
            "†: measured by an earlier invocation of this script at the same commit's recipe and reused with "
            "`--reuse` (that run was stopped after this recipe); every other row is from this invocation, one case "
            "at a time."
        )
    models.notes += [
        "train stage s: the whole `python stages/train.py` process (start-up, validation, checkpoints and the model "
        "file included), the figure the 12-minute target is about. training s: DVCLive's `train_time_s` for charlm; "
        "for a reference, the wall-clock budget it was given, the training time of the charlm recipe named.",
        f"test bpc: charlm's protocol (charlm/core/scoring.py) on the {test_chars:,} characters of the 1,000 test "
        "items; val bpc: the same protocol on the 330 items pack holds out. One seed per row: treat differences "
        "under ~0.02 bpc as noise. adaptive: `test_bpc_cache` of metrics/eval.json, the network mixed with an n-gram "
        "cache that counts each test item once it is scored (evaluate.cache_*; README, Evaluation protocol).",
        "known words: the share of generated words (letter runs) that occur in the training text, over the 5 "
        "default prompts at T=0.8 (metrics/generate.json).",
    ]
    return models


def markdown(
    results: list[dict], references: list[dict], compressors: dict, facts: dict, total_s: float, test_chars: int
) -> str:
    comp = Table(
        "Compressors, test after train",
        "compressor | test bpc after the 6,270 training items | after all 6,600 train rows (the validation items too)",
    )
    for name, (bpc, bpc_all) in compressors.items():
        comp.add(name, f"{bpc:.4f}", f"{bpc_all:.4f}")
    comp.notes.append(
        "8 × (compressed size of train + test − compressed size of train) ÷ test characters. The models train on "
        "the 6,270 items that pack keeps for training; a compressor may as well read all 6,600. The compressors also "
        "code the 1,000 newlines between items (0.4% more symbols) and see the few characters that charlm's "
        "vocabulary maps to <unk>; PPMd uses 256 MB of model memory."
    )
    loads = f"load average at start {facts['load average at start (1/5/15 min)']}, at end {harness.load_line()}"
    generated = f"Generated by `.venv/bin/python -m bench.quality` in {total_s / 60:.0f} min, at git revision "
    generated += f"{facts['git revision']}, {facts['date']}; {loads}."
    out = [MARKER, "", "## Quality", "", generated, "", "Recipes (each line is also in the README):", ""]
    out += [f"- **{r['name']}**: `{exp_run_line(r['overrides'])}`" for r in results]
    out += ["", models_table(results, references, test_chars).markdown(), comp.markdown()]
    out += [f"![validation bpc against training seconds](bench/{PNG.name})", ""]
    out += ["Samples of the **defaults** at T=0.8 (reports/samples.md):", ""]
    return "\n".join(out + [f"- {text!r}" for text in results[0]["samples_t08"]]) + "\n"


def write_section(text: str, path: Path = ROOT / "BENCHMARKS.md") -> None:
    old = path.read_text(encoding="utf-8") if path.exists() else ""
    head = old.split(MARKER)[0].rstrip("\n")
    tail = old[old.index(harness.PLAYGROUND_MARKER) :] if harness.PLAYGROUND_MARKER in old else ""
    path.write_text((head + "\n\n" if head else "") + text + ("\n" + tail if tail else ""), encoding="utf-8")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    harness.add_ag_news_argument(parser)
    parser.add_argument("--smoke", action="store_true", help="tiny budgets; check the script, write nothing")
    reuse = "take recipe NAME from the finished stage outputs in FOLDER (a stopped run's scratch folder) whose "
    reuse += "train stage took SECONDS, instead of training it again; the report says so"
    parser.add_argument("--reuse", action="append", default=[], metavar="NAME=FOLDER:SECONDS", help=reuse)
    return parser.parse_args(argv)


def run_compressors(data: harness.Prepared, log) -> dict[str, tuple[float, float]]:
    """Each compressor's test bpc after the items pack keeps for training, and after all train rows."""
    test_items = data.items("test")
    test_text, test_chars = ("\n".join(test_items) + "\n").encode(), sum(len(s) for s in test_items)
    fits = [
        compressor_bpc(("\n".join(t) + "\n").encode(), test_text, test_chars)
        for t in (data.train_items(), data.items("train"))
    ]
    compressors = {name: (fits[0][name], fits[1][name]) for name in fits[0]}
    for name, (bpc, bpc_all) in compressors.items():
        log(f"  {name}: {bpc:.4f} ({bpc_all:.4f} after all train rows)")
    return compressors


def run_recipes(args: argparse.Namespace, data: harness.Prepared, scratch: Path, log) -> list[dict]:
    reused = {}
    for spec in args.reuse:
        name, _, rest = spec.partition("=")
        folder, _, seconds = rest.rpartition(":")
        reused[name] = (Path(folder), float(seconds))
    results = []
    for name, overrides in RECIPES.items():
        if args.smoke:
            overrides = {**overrides, "train.max_steps": 20, "train.eval_every": 10}
        if name in reused:
            results.append(collect(name, overrides, *reused[name]) | {"reused": True})
            log(f"  {name}: reused {reused[name][0]}, test {results[-1]['test_bpc']:.4f} bpc")
        else:
            results.append(run_recipe(name, overrides, data.folder / paths.RAW, scratch, log))
    return results


def run_references(data: harness.Prepared, budgets: dict[str, float], log) -> list[dict]:
    """The plain loop for as long as the defaults trained, the lesson's recipe for as long as quick."""
    vocab, packed = data.vocab(), data.packed()

    def scored(name: str, shape: str, model: CharRNN, stats: dict) -> dict:
        bpc = stream_bpc(model, np.asarray(packed.streams["test"]), 64, torch.device("cpu"))
        log(f"    test {bpc:.4f}")
        return {"name": name, "model": shape, "n_params": n_params(model), **stats, "test_bpc": bpc}

    log(f"  plain loop for {budgets['defaults']:.0f} s (as defaults)")
    plain = train_plain(np.asarray(packed.streams["train"]), len(vocab), budgets["defaults"])
    references = [scored("plain loop (as long as defaults)", "1×256 lstm, emb 64", *plain)]
    log(f"  lesson recipe for {budgets['quick']:.0f} s")
    taught = lesson.train_lesson(vocab, data.train_items(), budgets["quick"], seed=0)
    return references + [scored("the lesson's recipe (as long as quick)", "1×64 lstm, one-hot", *taught)]


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    t_start, facts = time.perf_counter(), harness.machine_facts()
    scratch = Path(tempfile.mkdtemp(prefix="charlm-quality-"))

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t_start:7.1f}s] {msg}", file=sys.stderr, flush=True)

    try:
        data = harness.prepare_ag_news(scratch / "data", args.ag_news)
        test_chars = sum(len(s) for s in data.items("test"))
        log("compressors")
        compressors = run_compressors(data, log)
        results = run_recipes(args, data, scratch, log)
        budgets = {r["name"]: (1 / 20 if args.smoke else 1) * r["train_s"] for r in results}
        references = run_references(data, budgets, log)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    text = markdown(results, references, compressors, facts, time.perf_counter() - t_start, test_chars)
    print(text)
    if not args.smoke:
        render_png(results, min(min(v) for k, v in compressors.items() if k.endswith("order 8")), PNG)
        write_section(text)
        print(f"wrote BENCHMARKS.md (Quality) and {PNG.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
