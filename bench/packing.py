"""Section 3: the data stages (prepare, vocab, pack) on a synthetic corpus of `budget.pack_mb` MB, each a fresh
child process: wall time and peak RSS."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from bench import harness
from bench.harness import Stat, Table
from charlm.pipeline import paths

STAGES = ("prepare", "vocab", "pack")
BASELINE = "python + imports (baseline)"
BASELINE_IMPORTS = "import numpy, yaml, charlm.core.corpus, charlm.core.data, charlm.core.vocab, charlm.pipeline.params"


def vocabulary(rng: np.random.Generator) -> list[str]:
    """Random words, with capitals, a few non-ASCII letters and punctuation."""
    letters = np.array(list("etaoinshrdlcumwfgypbvkjxqz"))
    weights = 1 / np.arange(1, len(letters) + 1) ** 0.9
    words = []
    for _ in range(30_000):
        w = "".join(rng.choice(letters, size=int(rng.integers(1, 11)), p=weights / weights.sum()))
        if rng.random() < 0.15:
            w = w.capitalize()
        if rng.random() < 0.01:
            w += rng.choice(["é", "ü", "—", "’"])
        if rng.random() < 0.08:
            w += rng.choice([",", ".", ";", ":", "!", "?"])
        words.append(w)
    return words


def synthetic_corpus(path: Path, megabytes: float, seed: int = 0) -> tuple[int, int]:
    """Zipf-distributed random words, one item per line, ~`megabytes` MB of UTF-8; (bytes, items)."""
    rng = np.random.default_rng(seed)
    words = vocabulary(rng)
    zipf = 1 / np.arange(1, len(words) + 1) ** 1.05
    size, items = 0, 0
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        while size < int(megabytes * 1e6):
            counts = rng.integers(5, 80, size=2000)
            ids = rng.choice(len(words), size=int(counts.sum()), p=zipf / zipf.sum())
            ends = np.cumsum(counts)
            chunk = (
                "\n".join(" ".join(words[i] for i in ids[end - c : end]) for c, end in zip(counts, ends, strict=True))
                + "\n"
            )
            f.write(chunk)
            size += len(chunk.encode("utf-8"))
            items += len(counts)
    return path.stat().st_size, items


def section(ctx) -> list[Table]:
    bud, folder = ctx.budget, ctx.workdir / "packing"
    raw = folder / paths.RAW
    raw.mkdir(parents=True)
    ctx.log(f"  writing a ~{bud.pack_mb:g} MB synthetic corpus")
    train_bytes, train_items = synthetic_corpus(raw / "train.csv", bud.pack_mb, seed=0)
    test_bytes, test_items = synthetic_corpus(raw / "test.csv", max(bud.pack_mb / 30, 0.2), seed=1)
    corpus = train_bytes + test_bytes
    harness.write_params(folder, {"prepare.format": "lines"})
    runs: dict[str, list[harness.StageRun]] = {n: [] for n in (BASELINE, *STAGES)}
    for r in range(bud.pack_rounds):
        runs[BASELINE].append(harness.run_stage("baseline", folder, ["-c", BASELINE_IMPORTS]))
        for stage in STAGES:
            runs[stage].append(harness.run_stage(stage, folder))
        done = [f"{n} {runs[n][-1].seconds:.1f}s {runs[n][-1].maxrss_bytes / 2**20:.0f}MiB" for n in STAGES]
        ctx.log(f"    round {r + 1}/{bud.pack_rounds}: " + ", ".join(done))
    table = Table(
        f"3. Data stages on a {corpus / 1e6:.1f} MB synthetic corpus ({train_items + test_items:,} items)",
        "stage | wall time | peak RSS | peak RSS ÷ corpus | (peak RSS − baseline) ÷ corpus",
    )
    base = Stat([run.maxrss_bytes for run in runs[BASELINE]]).median
    for n, stage_runs in runs.items():
        t, m = Stat([run.seconds for run in stage_runs]), Stat([run.maxrss_bytes for run in stage_runs])
        above = "—" if n == BASELINE else f"{(m.median - base) / corpus:.2f}×"
        table.add(n, t.fmt(" s", 2), m.fmt(" MiB", 0, 1 / 2**20), f"{m.median / corpus:.2f}×", above)
    total = sum(Stat([run.seconds for run in runs[s]]).median for s in STAGES)
    table.add("**prepare + vocab + pack**", f"**{total:.2f} s**", "", "", "")
    packed_bytes = sum(p.stat().st_size for p in (folder / paths.PACKED).glob("*.npy"))
    table.notes += [
        f"Corpus: {train_bytes / 1e6:.1f} MB train + {test_bytes / 1e6:.2f} MB test of random Zipf-distributed words "
        f"(a few non-ASCII letters), one item per line, `prepare.format: lines`; "
        f"packed output {packed_bytes / 1e6:.1f} MB.",
        f"Each stage runs as a fresh `python stages/<stage>.py` child; wall time and its own peak RSS "
        f"(`os.wait4` rusage ru_maxrss); median (min–max) of {bud.pack_rounds} rounds. The baseline is a child "
        f"that only imports what the stages import.",
    ]
    return [table]
