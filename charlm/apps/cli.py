"""The `charlm` command.

charlm generate --prompt "Today " --temperature 0.8 --length 300 [--model PATH] [--seed N]
                [--rev REV | --checkpoint [PATH]]
                [--top-k K] [--top-p P] [-n COUNT] [--no-stop-at-eos] [--device auto|cpu|cuda]
charlm plots [REV ...] [--out DIR] [--format png|svg]   # learning curves as files, offline
charlm compare REV [REV ...]                            # samples of experiments side by side
charlm serve [--model PATH]... [--port 8000] [--host 127.0.0.1] [--device auto|cpu|cuda] [--run]  # the web page
charlm doctor [--seconds 10]                            # what train does on this machine, and for how long
"""

from __future__ import annotations

import argparse
import math
import sys
import warnings

from charlm.base.errors import run_main


def _number(kind, lo=None, hi=None, lo_open=False, what=""):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        bad = (
            (isinstance(value, float) and not math.isfinite(value))
            or (lo is not None and (value <= lo if lo_open else value < lo))
            or (hi is not None and value > hi)
        )
        if bad:
            raise argparse.ArgumentTypeError(f"{text} is outside {what}")
        return value

    return parse


# Each command's one-line help (for `charlm --help`) and its description (for `charlm COMMAND --help`).
COMMANDS = {
    "generate": (
        "generate text from a trained model, streaming it to stdout",
        "Generate text from a trained charlm model. With -n 1 the characters stream "
        "to stdout as they are produced; with -n > 1 the samples are drawn as one batch "
        "and printed one after another.",
    ),
    "plots": (
        "render the learning curves to image files (offline, no browser)",
        "Render DVC's plots to PNG or SVG files plus a self-contained index.html, "
        "offline. With revisions (commits, branches or experiment names) the curves "
        "of each are overlaid, as in `dvc plots diff`; without, the workspace.",
    ),
    "compare": (
        "print the generated samples of several experiments side by side",
        "Print a Markdown table of reports/samples.json for each revision or "
        "experiment, one row per prompt and temperature.",
    ),
    "serve": (
        "a local web page to generate from, read with and look inside the models of this repository",
        "Serve a web page over HTTP: generate from several models side by side, see how each reads "
        "a text character by character, inspect hidden units, and compare learning curves. It lists the "
        "workspace model, training checkpoints, and every DVC experiment, branch and tag with a model.",
    ),
    "doctor": (
        "what the train stage will do on this machine: device, precision and why, and how long it will take",
        "Print the device, the precision that train.amp resolves to on this machine and why, the threads, the CPU "
        "features that decide it (AMX, AVX512-BF16, AVX512, AVX2), the torch and oneDNN versions, the workspace "
        "model, and an estimate of the train stage's time for the current params.yaml, from a few seconds of "
        "real training steps (and, with data/packed/ present, the real data and validation passes). Run it in "
        "the repository.",
    ),
}


def command(sub, name: str) -> argparse.ArgumentParser:
    summary, description = COMMANDS[name]
    return sub.add_parser(name, help=summary, description=description)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="charlm", description="Character-level RNN language models.")
    sub = parser.add_subparsers(dest="command", required=True)
    add_generate(sub)
    add_plots_and_compare(sub)
    add_serve(sub)
    d = command(sub, "doctor")
    d.add_argument("--seconds", type=_number(float, 0, what="> 0", lo_open=True), default=10.0,
                   help="how long to time training steps for the estimate (default: 10)")  # fmt: skip
    return parser


def add_generate(sub) -> None:
    g = command(sub, "generate")
    g.add_argument(
        "--prompt",
        default="",
        help="text to start from (default: empty, a whole new item); "
        "characters missing from the vocabulary are read as <unk> with a warning",
    )
    numbers = [  # flag, type, default, help
        ("--temperature", _number(float, 0, what=">= 0"), 0.8, "softmax temperature; 0 = greedy (default: 0.8)"),
        ("--length", _number(int, 0, what=">= 0"), 300, "most characters to generate after the prompt (default: 300)"),
        ("--seed", _number(int, 0, what=">= 0"), None, "random seed for reproducible samples (default: random)"),
        ("--top-k", _number(int, 0, what=">= 0"), 0, "sample only from the k most likely characters (default: 0, off)"),
        ("--top-p", _number(float, 0, 1, lo_open=True, what="(0, 1]"), 1.0,
         "nucleus sampling: the smallest set of characters with this probability; 1 = off (default: 1)"),
    ]  # fmt: skip
    for flag, kind, default, text in numbers:
        g.add_argument(flag, type=kind, default=default, help=text)
    # Defaults are resolved in generate_command: the artifact module imports torch, which `charlm plots` never needs.
    g.add_argument("--model", help="model file (default: the pipeline's models/model.pt)")
    source = g.add_mutually_exclusive_group()
    source.add_argument(
        "--rev",
        help="use the model as it is at this git revision, branch, tag or experiment name (see `dvc exp list`), "
        "read through DVC from the cache or the remote, without checking anything out",
    )
    source.add_argument(
        "--checkpoint",
        nargs="?",
        const=True,
        help="use a training checkpoint instead of a finished model, e.g. while training runs "
        "(default path: checkpoints/train.pt)",
    )
    g.add_argument("-n", "--count", type=_number(int, 1, what=">= 1"), default=1, help="number of samples (default: 1)")
    g.add_argument(
        "--no-stop-at-eos",
        dest="stop_at_eos",
        action="store_false",
        help="keep going past the end-of-item token (printed as a newline) instead of stopping",
    )
    g.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="where to run the model (default: auto, CUDA when present)",
    )


def add_plots_and_compare(sub) -> None:
    pl = command(sub, "plots")
    pl.add_argument("revisions", nargs="*", help="revisions or experiments to compare (default: the workspace)")
    pl.add_argument("--out", default="dvc_plots/static", help="output folder (default: dvc_plots/static)")
    pl.add_argument("--format", choices=("png", "svg"), default="png", help="image format (default: png)")
    cmp = command(sub, "compare")
    cmp.add_argument("revisions", nargs="+", help="revisions or experiment names; 'workspace' for the workspace")


def add_serve(sub) -> None:
    sv = command(sub, "serve")
    sv.add_argument("--model", action="append", default=[], metavar="PATH",
                    help="also serve this model file (repeatable); outside a repository, the only models")  # fmt: skip
    sv.add_argument("--port", type=_number(int, 0, 65535, what="0..65535"), default=8000,
                    help="port to listen on; 0 picks a free one (default: 8000)")  # fmt: skip
    sv.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (default: 127.0.0.1, this machine only); any other address needs the "
        "access token printed in the URL",
    )
    sv.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                    help="where to run the models (default: auto, CUDA when present)")  # fmt: skip
    sv.add_argument("--run", action="store_true",
                    help="show the Run part, which queues, starts, kills and removes experiments as you; "
                         "every request then needs the token in the printed URL, on loopback too "
                         "(never beyond loopback)")  # fmt: skip


def plots_command(args) -> None:
    from pathlib import Path

    from charlm.apps.report import render_plots

    for path in render_plots(args.revisions, Path(args.out), args.format):
        print(path)


def compare_command(args) -> None:
    from charlm.apps.report import compare_samples

    sys.stdout.write(compare_samples(args.revisions))


def generate_command(args) -> None:
    import random

    from charlm.core.device import pick_device
    from charlm.core.sampling import text_pieces, token_steps
    from charlm.pipeline import artifact, paths

    device = pick_device(args.device, "--device")
    if args.checkpoint:
        path = paths.CHECKPOINT if args.checkpoint is True else args.checkpoint
    else:
        path = args.model or paths.MODEL
    fix = "train one with `dvc repro` or pass --model PATH"
    model, vocab, _ = artifact.load_model(path, device, fix=fix, rev=args.rev)
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**31)
    unseen = vocab.unknown(args.prompt)
    if unseen:
        print(
            f"charlm: warning: prompt characters {''.join(unseen)!r} are not in the vocabulary; read as <unk>",
            file=sys.stderr,
        )
    out = sys.stdout
    steps = token_steps(
        model,
        vocab,
        [args.prompt] * args.count,
        [args.temperature],
        args.length,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=seed,
        stop_at_eos=args.stop_at_eos,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pieces = text_pieces(steps, vocab, args.stop_at_eos)
        if args.count == 1:
            out.write(args.prompt)
            for (piece,) in pieces:
                if piece is not None:
                    out.write(piece)
                    out.flush()
            out.write("\n")
        else:
            rows: list[list[str]] = [[args.prompt] for _ in range(args.count)]
            for step in pieces:
                for row, piece in zip(rows, step, strict=True):
                    if piece is not None:
                        row.append(piece)
            for row in rows:
                out.write("".join(row) + "\n")
    out.flush()


def serve_command(args) -> None:
    from charlm.apps.serve.server import serve  # imports torch and DVC: only for this command

    serve(args.model, args.host, args.port, args.device, read_only=not args.run)


def doctor_command(args) -> None:
    from charlm.apps.doctor import doctor  # imports torch: only for this command

    doctor(args.seconds)


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    commands = {
        "generate": generate_command,
        "plots": plots_command,
        "compare": compare_command,
        "serve": serve_command,
        "doctor": doctor_command,
    }
    command = commands[args.command]
    run_main(lambda: command(args), "charlm")


if __name__ == "__main__":
    main()
