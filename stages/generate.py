"""generate: sample text for every prompt x temperature pair, and how many of its words are real.

Reads `generate` from params.yaml, models/model.pt and data/prepared/train.txt. Writes reports/samples.md (a table
to read), reports/samples.json (the same samples for tools; `dvc diff`-friendly, keyed by prompt and temperature)
and metrics/generate.json: per temperature, the share of generated words (letter runs) that occur in the
training text. It shows in `dvc exp show`. A high share says the model spells like its corpus; it says nothing
of grammar or sense, and copying the training text verbatim would score 1.0.
"""

from __future__ import annotations

import warnings

from charlm.base.errors import run_main
from charlm.base.io import all_or_none, markdown_cell, read_text, write_json, write_text
from charlm.core.device import pick_device
from charlm.core.sampling import generate, known_word_share, words_in
from charlm.pipeline import artifact, params, paths
from charlm.pipeline.sections.generate import GenerateParams

OUT_MD, OUT_JSON = paths.SAMPLES_MD, paths.SAMPLES_JSON
OUT_METRICS = paths.GENERATE_METRICS
TRAIN_TEXT = paths.PREPARED / "train.txt"


def main() -> None:
    config = params.load(GenerateParams)
    device = pick_device(config.device, "generate.device")
    model, vocab, _ = artifact.load_model(paths.MODEL, device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        records = generate(
            model,
            vocab,
            config.prompts,
            config.temperatures,
            config.length,
            top_k=config.top_k,
            top_p=config.top_p,
            seed=config.seed,
            stop_at_eos=config.stop_at_eos,
        )
    for w in caught:
        print(f"generate: warning: {w.message}")
    known = words_in(read_text(TRAIN_TEXT, "prepared train split", "rerun `dvc repro prepare`").splitlines())
    metrics: dict[str, dict] = {"known_words": {}, "generated_words": {}}
    for t in config.temperatures:
        share, n = known_word_share([r for r in records if r["temperature"] == t], known)
        metrics["known_words"][f"T={t:g}"] = None if share is None else round(share, 4)
        metrics["generated_words"][f"T={t:g}"] = n
    with all_or_none() as written:
        write_json(
            OUT_JSON,
            {
                "settings": {
                    "length": config.length,
                    "top_k": config.top_k,
                    "top_p": config.top_p,
                    "seed": config.seed,
                    "stop_at_eos": config.stop_at_eos,
                },
                "samples": {f"{r['prompt']!r} @ T={r['temperature']:g}": r["text"] for r in records},
            },
        )
        written.append(OUT_JSON)
        write_text(OUT_MD, to_markdown(records))
        written.append(OUT_MD)
        write_json(OUT_METRICS, metrics)
    for r in records:
        print(f"T={r['temperature']:<4g} {r['text']!r}")
    print(
        "generate: known words "
        + ", ".join(f"{k} {'-' if v is None else f'{v:.1%}'}" for k, v in metrics["known_words"].items())
    )


def to_markdown(records: list[dict]) -> str:
    """One table per prompt: a row per temperature."""

    out = ["# Samples\n"]
    for prompt in dict.fromkeys(r["prompt"] for r in records):
        out += [f"\n## {prompt!r}\n", "| T | sample |", "|---|---|"]
        out += [f"| {r['temperature']:g} | {markdown_cell(r['text'])} |" for r in records if r["prompt"] == prompt]
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    run_main(main, "generate")
