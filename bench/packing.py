"""Section 3: the data stages (prepare, vocab, pack) on a synthetic corpus of `budget.pack_mb` MB, each a fresh
child process: wall time and peak RSS."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from bench import harness
from bench.harness import Stat, Table


def synthetic_corpus(path: Path, megabytes: float, seed: int = 0) -> tuple[int, int]:
    """Random words, one item per line, ~`megabytes` MB of UTF-8 with a few non-ASCII letters."""
    rng = np.random.default_rng(seed)
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
    zipf = 1 / np.arange(1, len(words) + 1) ** 1.05
    target = int(megabytes * 1e6)
    size, items = 0, 0
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        while size < target:
            n_items = 2000
            counts = rng.integers(5, 80, size=n_items)
            ids = rng.choice(len(words), size=int(counts.sum()), p=zipf / zipf.sum())
            pos = 0
            lines = []
            for c in counts:
                lines.append(" ".join(words[i] for i in ids[pos:pos + c]))
                pos += c
            chunk = "\n".join(lines) + "\n"
            f.write(chunk)
            size += len(chunk.encode("utf-8"))
            items += n_items
    return path.stat().st_size, items


def section(ctx) -> list[Table]:
    bud = ctx.budget
    folder = ctx.workdir / "packing"
    raw = folder / "data" / "raw"
    raw.mkdir(parents=True)
    ctx.log(f"  writing a ~{bud.pack_mb:g} MB synthetic corpus")
    train_bytes, train_items = synthetic_corpus(raw / "train.csv", bud.pack_mb, seed=0)
    test_bytes, test_items = synthetic_corpus(raw / "test.csv", max(bud.pack_mb / 30, 0.2), seed=1)
    corpus = train_bytes + test_bytes
    harness.write_params(folder, prepare__format="lines")
    baseline_cmd = ["-c", "import numpy, yaml, charlm.core.corpus, charlm.core.data, charlm.core.vocab, charlm.pipeline.params"]
    names = ["python + imports (baseline)", "prepare", "vocab", "pack"]
    runs: dict[str, list[harness.StageRun]] = {n: [] for n in names}
    for r in range(bud.pack_rounds):
        runs[names[0]].append(harness.run_stage("baseline", folder, baseline_cmd))
        for stage in ("prepare", "vocab", "pack"):
            runs[stage].append(harness.run_stage(stage, folder))
        ctx.log(f"    round {r + 1}/{bud.pack_rounds}: " + ", ".join(
            f"{n} {runs[n][-1].seconds:.1f}s {runs[n][-1].maxrss_bytes / 2**20:.0f}MiB" for n in names[1:]))
    table = Table(f"3. Data stages on a {corpus / 1e6:.1f} MB synthetic corpus ({train_items + test_items:,} items)",
                  ["stage", "wall time", "peak RSS", "peak RSS ÷ corpus", "(peak RSS − baseline) ÷ corpus"])
    base = Stat([run.maxrss_bytes for run in runs[names[0]]]).median
    total = 0.0
    for n in names:
        t = Stat([run.seconds for run in runs[n]])
        m = Stat([run.maxrss_bytes for run in runs[n]])
        if n != names[0]:
            total += t.median
        table.add(n, t.fmt(" s", 2), m.fmt(" MiB", 0, 1 / 2**20), f"{m.median / corpus:.2f}×",
                  "—" if n == names[0] else f"{(m.median - base) / corpus:.2f}×")
    table.add("**prepare + vocab + pack**", f"**{total:.2f} s**", "", "", "")
    packed_dir = folder / "data" / "packed"
    packed_bytes = sum(p.stat().st_size for p in packed_dir.glob("*.npy"))
    table.notes += [
        f"Corpus: {train_bytes / 1e6:.1f} MB train + {test_bytes / 1e6:.2f} MB test of random Zipf-distributed words "
        f"(a few non-ASCII letters), one item per line, `prepare.format: lines`; "
        f"packed output {packed_bytes / 1e6:.1f} MB.",
        f"Each stage runs as a fresh `python stages/<stage>.py` child; wall time and its own peak RSS "
        f"(`os.wait4` rusage ru_maxrss); median (min–max) of {bud.pack_rounds} rounds. The baseline is a child "
        f"that only imports what the stages import.",
    ]
    return [table]
