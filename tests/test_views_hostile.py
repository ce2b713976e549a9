"""A hostile review of the playground views of issue 25 (span units, hardest items,
rank buckets and item bpc, streamed scores, the `charlm generate` line, and the page code that shows them).

Each test is a finding: it fails while the finding stands. Server tests use the real server in a thread
(tests/test_serve.py's helpers); page tests use Chromium (tests/test_browser.py's helpers).
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import numpy as np
import pytest
import torch
from test_browser import browser  # noqa: F401  # the module's Chromium, a fixture
from test_serve import VOCAB, Running, one_thread_module, tiny_model  # noqa: F401  # one_thread_module: autouse

from charlm.core.data import FORMAT, encode_items
from charlm.core.model import CharRNN
from charlm.pipeline import artifact


def write_split(root: Path, test: np.ndarray, vocab=VOCAB) -> None:
    """A workspace's data/packed (test as given, train and val a small valid stream) and data/vocab.json."""
    packed = root / "data" / "packed"
    packed.mkdir(parents=True, exist_ok=True)
    vocab.save(root / "data" / "vocab.json", {}, {})
    small = encode_items(vocab, "the cat\nsat on it")
    splits = {}
    for split, stream in (("train", small), ("val", small), ("test", test)):
        np.save(packed / f"{split}.npy", stream)
        splits[split] = {"tokens": len(stream)}
    (packed / "meta.json").write_text(json.dumps({"format": FORMAT, "splits": splits}))


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("review25")
    files = [str(tiny_model(root / "m0.pt", seed=0)), str(tiny_model(root / "m1.pt", seed=1))]
    s = Running(root, files)
    yield s
    s.close()


@pytest.fixture
def workspace(served, tmp_path, monkeypatch):
    """The served models, with the server's current folder a fresh workspace (paths.PACKED is relative)."""
    monkeypatch.chdir(tmp_path)
    # The hardest answer is cached per model: start every test from an empty cache (named _kept_results since
    # 299cd97).
    for name in ("_units", "_kept_results"):
        getattr(served.app, name, {}).clear()
    return served, tmp_path


def one_line_4xx(status: int, out) -> bool:
    return 400 <= status < 500 and isinstance(out, dict) and "\n" not in out.get("error", "\n")


# --------------------------------------------------------------------------- /api/hardest and a hostile split


def damage(root: Path, case: str) -> None:
    stream = encode_items(VOCAB, "the cat sat\non the mat")
    if case == "id read":  # an input the model reads: nn.Embedding's "index out of range in self"
        stream = stream.astype(np.uint8)
        stream[3] = 200
    elif case == "id target-only":  # the split's last character, only ever a target: "Target 200 is out of bounds"
        stream = stream.astype(np.uint8)
        stream[-2] = 200
    elif case == "negative id":  # an int16 stream
        stream = stream.astype(np.int16)
        stream[3] = -3
    write_split(root, stream)
    nested = "[" * 100_000 + "]" * 100_000  # json.load's RecursionError, which read_json does not catch
    if case == "nested vocab.json":
        (root / "data" / "vocab.json").write_text(nested)
    elif case == "nested meta.json":
        (root / "data" / "packed" / "meta.json").write_text(nested)


@pytest.mark.parametrize("case", ["id read", "id target-only", "negative id", "nested vocab.json", "nested meta.json"])
def test_hardest_on_a_hostile_split_is_a_one_line_4xx(workspace, case):
    """data/packed and data/vocab.json may come from a shared DVC remote. The vocabulary check compares vocab.json
    with the model, never the stream's ids with the vocabulary: an id past it (or a negative one) reaches the model,
    a 500 on CPU; on CUDA it is a device-side assert, after which every CUDA call of the process fails (every
    model of the server is dead until a restart). A deeply nested JSON file is a 500 too (RecursionError)."""
    s, root = workspace
    damage(root, case)
    status, _, out = s.get("/api/hardest?model=file:0")
    assert one_line_4xx(status, out), (status, out)


def test_hardest_items_are_texts_that_read_can_score(workspace):
    """One click on a hardest item puts its text in Read and scores it; an item of the split is not bounded by
    Limits.text (nor is the whole answer, which is cached: 20 items of any length), so the click is a 400 and a
    split of long items makes an answer as big as the split's first 2,000 items, held in the cache."""
    s, root = workspace
    long_item = ("the cat sat on the mat " * 1100).strip()  # 25,299 characters, over Limits.text
    write_split(root, encode_items(VOCAB, "a short item\n" + long_item))
    status, _, out = s.get("/api/hardest?model=file:0")
    assert status == 200, out
    for item in out["items"]:
        status, _, scored = s.post("/api/score", {"models": ["file:0"], "text": item["text"]})
        assert status == 200, (len(item["text"]), scored)


def test_hardest_follows_a_rewritten_test_split(workspace):
    """The answer is cached by (model id, id(model)) only: after `dvc repro pack` / `dvc checkout` rewrites the
    split, the page keeps listing texts that are no longer in it (and Test item serves the new split)."""
    s, root = workspace
    write_split(root, encode_items(VOCAB, "the cat sat\non the mat"))
    first = s.get("/api/hardest?model=file:0")[2]
    assert {i["text"] for i in first["items"]} == {"the cat sat", "on the mat"}
    write_split(root, encode_items(VOCAB, "zebras dance\nquickly now\nbig fox"))
    status, _, again = s.get("/api/hardest?model=file:0")
    assert status == 200
    assert {i["text"] for i in again["items"]} == {"zebras dance", "quickly now", "big fox"}, again


# --------------------------------------------------------------------------- non-finite numbers


def overflowing_model(path: Path) -> Path:
    """Finite weights (artifact's check passes) that overflow float32 in the forward pass: inf - inf = NaN."""
    torch.manual_seed(3)
    model = CharRNN(len(VOCAB), cell="lstm", hidden=16, layers=1, embedding=8)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.sign(torch.randn_like(p)) * 3e38)
    artifact.save(path, artifact.model_record(model, VOCAB, {"steps": 0}))
    return path


@pytest.fixture(scope="module")
def overflow_served(tmp_path_factory):
    root = tmp_path_factory.mktemp("overflow")
    s = Running(root, [str(overflowing_model(root / "nan.pt"))])
    yield s
    s.close()


def test_a_model_whose_numbers_overflow_gets_a_one_line_4xx_and_still_streams(overflow_served, tmp_path, monkeypatch):
    """NaN reaches json.dumps(allow_nan=False) in the new outputs. /api/hardest: a 500 "internal error (ValueError:
    Out of range float values are not JSON compliant)". The stream: before ab1aac0 such a model streamed (garbage)
    text; now step_scores' NaN bits fail the first piece event, and the stream ends in an error event saying
    only "Out of range float values are not JSON compliant". (/api/score and /api/activations 500 the same way,
    from before this change; span-units holds: a NaN unit does not vary, and is left out.)"""
    s = overflow_served
    monkeypatch.chdir(tmp_path)
    write_split(tmp_path, encode_items(VOCAB, "the cat sat\non the mat"))
    status, _, out = s.get("/api/hardest?model=file:0")
    assert one_line_4xx(status, out), (status, out)
    events = s.events(s.job(models=["file:0"], prompt="the ", temperature=0, length=20, seed=1))
    assert [name for name, _ in events if name == "error"] == [], events


# --------------------------------------------------------------------------- /api/span-units as the page sends it


def page_occurrences(items: list[str], piece: str) -> list[list[int]]:
    """app.js's occurrences(), for ASCII text (where UTF-16 offsets are code point offsets)."""
    spans = []
    for item, text in enumerate(items):
        at = text.find(piece)
        while at >= 0:
            spans.append([item, at, at + len(piece)])
            at = text.find(piece, at + len(piece))
    return spans


def test_a_common_typed_piece_is_not_refused_as_malformed_spans(workspace):
    """Typing a common piece ("e", or a space) in Inside's piece field on a text of some thousand characters
    sends every occurrence, more than the server's 1,000 spans: a 400 that calls them malformed ("spans must be
    a list of [item, start, end] character ranges"), though every one is a valid range."""
    s, _ = workspace
    text = " ".join(["the cat sat on the mat, said he"] * 400)  # 12,799 characters, under Limits.text
    spans = page_occurrences([text], "e")
    assert 1000 < len(spans) < 2000
    body = {"model": "file:0", "text": text, "layer": 0, "kind": "output", "spans": spans}
    status, _, out = s.post("/api/span-units", body)
    assert status == 200, out


# --------------------------------------------------------------------------- the page, in Chromium

TIMEOUT_MS = 20_000


@pytest.fixture(scope="module")
def page_server(tmp_path_factory):
    from test_browser import MODELS, start_server, stop_server
    from test_browser import VOCAB as PAGE_VOCAB

    folder = tmp_path_factory.mktemp("review25_page")
    torch.manual_seed(0)
    model = CharRNN(len(PAGE_VOCAB), **MODELS["small"])
    path = folder / "small.pt"
    artifact.save(path, artifact.model_record(model, PAGE_VOCAB, {"steps": 1}))
    proc, info = start_server(folder, [path])
    info["model_path"] = path
    yield info
    stop_server(proc)


@pytest.fixture
def page(browser, page_server):
    context = browser.new_context(viewport={"width": 1000, "height": 900})
    pg = context.new_page()
    errors: list[str] = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    pg.set_default_timeout(TIMEOUT_MS)
    pg.goto(page_server["url"])
    pg.wait_for_selector("#models-table tbody tr")
    yield pg
    context.close()
    assert not errors, errors


def write_with_prompt(page, prompt: str) -> str:
    """Write 8 characters from `prompt` with seed 5; the command line the page shows."""
    page.fill("#prompt", prompt)
    page.fill("#temperature", "1")
    page.fill("#length", "8")
    page.fill("#seed", "5")
    page.click("#write-go")
    page.wait_for_selector("#write-status[data-done]", state="attached")
    assert page.get_attribute("#write-status", "data-done") == "finished", page.text_content("#write-status")
    return page.text_content("#write-command-text")


def test_the_command_line_runs_for_a_prompt_that_starts_with_a_dash(page):
    """`--prompt -x`, quoted or not, is an option to argparse: "argument --prompt: expected one argument", so the
    command the page offers for such a prompt fails (and a prompt such as "--seed=3" fails the same way). The
    `--prompt=<word>` form takes any prompt."""
    from test_browser import run_cli

    command = write_with_prompt(page, "-x")
    argv = shlex.split(command)
    try:
        out = run_cli([*argv[1:], "--device", "cpu"])
    except SystemExit as e:
        pytest.fail(f"{command!r}: charlm generate exits {e.code}")
    assert out == page.locator("#columns pre").first.text_content() + "\n"


def test_the_command_line_quotes_a_word_that_zsh_expands(page):
    """shellWord leaves a word of [A-Za-z0-9_.,:/=+-] bare, and a bare word that starts with "=" is zsh's
    `=command` expansion (EQUALS, on by default; zsh is macOS's login shell): `--prompt =ls` runs as
    `--prompt /bin/ls`, and `--prompt =cat2` stops with "zsh: cat2 not found"."""
    command = write_with_prompt(page, "=ls")
    assert not [w for w in command.split(" ") if w.startswith(("=", "~"))], command
    assert shell_words(command)[2] == "--prompt==ls"


def shell_words(command: str) -> list[str]:
    """The words bash makes of a command line, each expansion and quote applied."""
    import subprocess

    out = subprocess.run(["bash", "-c", 'words() { printf "%s\\0" "$@"; }; words ' + command], capture_output=True)
    assert out.returncode == 0, out.stderr
    return out.stdout.decode("utf-8").split("\0")[:-1]


def test_the_command_line_holds_no_terminal_control_characters(page):
    """Single quotes keep every byte, terminal control characters too: a prompt holding ESC [ 2 0 1 ~ ends the
    terminal's bracketed paste inside the pasted line, after which the rest is typed keys to the shell (Ctrl-U
    erases the line, a newline runs what follows). The line the page offers to copy must hold none (e.g. $'\\e'
    quoting, or no command for such a prompt)."""
    command = write_with_prompt(page, "a\x1b[201~\x15b")
    assert not re.search(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]", command), repr(command)
    assert shell_words(command)[2] == "--prompt=a\x1b[201~\x15b"  # and bash reads the prompt back as it was


def show_units(page, text: str) -> None:
    page.fill("#read-text", text)
    page.click("#in-go")
    page.wait_for_selector("#in-out .ch")


@pytest.mark.parametrize("text", ["\U0001f600\U0001f600 the cat", "\U0001f600 the cat sat here"])
def test_a_typed_piece_after_an_emoji_picks_that_piece(page, text):
    """occurrences() finds a piece with String.indexOf, in UTF-16 code units; the server and the coloured text
    count code points (showUnit's [...text], Python's str). After each emoji a span is one further off: at the
    end of an item a 400 ("span [0, 9, 12] is not a range of characters of the text"); elsewhere, silently,
    the units of other characters ("at " for "cat"), and the heatmap underlines those."""
    show_units(page, text)
    page.fill("#span-text", "cat")
    page.click("#span-go")
    page.wait_for_selector("#heat .hc, #message-bar:not([hidden])")
    assert page.locator("#message-bar").is_hidden(), page.text_content("#message")
    assert page.locator("#heat .hc.picked").all_text_contents() == ["c", "a", "t"]


def test_span_units_search_the_text_whose_characters_were_chosen(page):
    """spanUnits() finds the spans in the text Inside last coloured (state.inside.items) but sends the Read
    box's text as it is now: edit the text, then type a piece (or select one in the coloured text, still the
    old text), and the server ranks units for other characters; the heatmap underlines those."""
    from playwright.sync_api import expect

    show_units(page, "hello world")
    page.fill("#read-text", "world hello")
    page.fill("#span-text", "world")
    page.click("#span-go")
    expect(page.locator("#heat .hc.picked")).to_have_count(5)
    assert "".join(page.locator("#heat .hc.picked").all_text_contents()) == "world"
