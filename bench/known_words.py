"""Known words at a sampling temperature, over enough generated words to tell 92% from 95%.

    .venv/bin/python -m bench.known_words MODEL TRAIN_TEXT [--temperature 0.8] [--words 5000] [--seed 0]

The generate stage measures the share over its 5 prompts (about 150 words at T=0.8: a 95% interval of about
±4 points). This samples the same prompts again and again, each row with its own random stream, until at least
`--words` whole generated words are in, and prints the share with its binomial 95% interval. TRAIN_TEXT is the
prepared train split (data/prepared/train.txt) whose words count as known.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from charlm.core.sampling import generate, known_word_share, words_in
from charlm.pipeline import artifact, params
from charlm.pipeline.sections.generate import GenerateParams

ROWS = 40  # samples per round: each round is one batched generation


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("train_text", type=Path)
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--words", type=int, default=5000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--top-p", type=float, default=None, help="nucleus sampling (default: generate.top_p)")
    parser.add_argument("--top-k", type=int, default=None, help="top-k sampling (default: generate.top_k)")
    args = parser.parse_args()
    model, vocab, _ = artifact.load_model(args.model)
    known = words_in(args.train_text.read_text(encoding="utf-8").splitlines())
    settings = params.load(GenerateParams)
    top_p = settings.top_p if args.top_p is None else args.top_p
    top_k = settings.top_k if args.top_k is None else args.top_k
    records: list[dict] = []
    round_ = 0
    while known_word_share(records, known)[1] < args.words:
        batch = [settings.prompts[i % len(settings.prompts)] for i in range(ROWS)]
        seed = args.seed * 1000 + round_
        records += generate(model, vocab, batch, [args.temperature], 200, seed=seed, top_p=top_p, top_k=top_k)
        round_ += 1
    share, n = known_word_share(records, known)
    assert share is not None
    half = 1.96 * math.sqrt(share * (1 - share) / n)
    sampling = f"T={args.temperature:g}, top_p {top_p:g}, top_k {top_k}"
    print(f"{args.model}: known words at {sampling}: {share:.2%} ± {half:.2%} of {n:,} words "
          f"({len(records)} samples)")  # fmt: skip


if __name__ == "__main__":
    main()
