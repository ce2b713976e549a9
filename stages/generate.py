"""generate: sample text for every prompt x temperature pair.

Reads `generate` from params.yaml and models/model.pt. Writes reports/samples.md (a table to read) and
reports/samples.json (the same samples for tools; `dvc diff`-friendly, keyed by prompt and temperature).
"""
from __future__ import annotations

import warnings
from pathlib import Path

from charlm import artifact, params
from charlm.errors import run_main
from charlm.io import write_json, write_text
from charlm.sampling import generate

OUT_MD, OUT_JSON = Path("reports/samples.md"), Path("reports/samples.json")


def main() -> None:
    p = params.load(params.GenerateParams)
    device = artifact.pick_device(p.device, "generate.device")
    model, vocab, _ = artifact.load_model("models/model.pt", device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        records = generate(model, vocab, p.prompts, p.temperatures, p.length, top_k=p.top_k, top_p=p.top_p,
                           seed=p.seed, stop_at_eos=p.stop_at_eos)
    for w in caught:
        print(f"generate: warning: {w.message}")
    try:
        write_json(OUT_JSON, {"settings": {"length": p.length, "top_k": p.top_k, "top_p": p.top_p,
                                           "seed": p.seed, "stop_at_eos": p.stop_at_eos},
                              "samples": {f"{r['prompt']!r} @ T={r['temperature']:g}": r["text"] for r in records}})
        write_text(OUT_MD, to_markdown(records, p.temperatures))
    except BaseException:
        OUT_JSON.unlink(missing_ok=True)  # leave no outputs, not half of them
        raise
    for r in records:
        print(f"T={r['temperature']:<4g} {r['text']!r}")


def to_markdown(records: list[dict], temperatures: list[float]) -> str:
    """One table per prompt: a row per temperature."""
    def cell(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", " ⏎ ")

    out = ["# Samples\n"]
    for prompt in dict.fromkeys(r["prompt"] for r in records):
        out += [f"\n## {prompt!r}\n", "| T | sample |", "|---|---|"]
        out += [f"| {r['temperature']:g} | {cell(r['text'])} |" for r in records if r["prompt"] == prompt]
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    run_main(main, "generate")
