"""The playground page (`charlm serve`) in a real browser: Chromium driven by Playwright against the real server.

Each test asserts what the page shows: written text equal to `charlm generate`'s, bits per character equal to the
API's and to the evaluation protocol's, errors in the alert area, Stop, text kept as text (no markup), no request
off the server, Inside's unit keys and the Curves message. Skipped when Chromium is missing, unless
CHARLM_REQUIRE_BROWSER=1 (CI), where that is a failure.
"""
from __future__ import annotations

import contextlib
import io
import json
import math
import os
import re
import shlex
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import Project

from charlm.core import inspection
from charlm.core.model import CharRNN
from charlm.core.scoring import score_items
from charlm.core.vocab import EOS_ID, Vocab
from charlm.pipeline import artifact

CHROMIUM = os.environ.get("CHARLM_CHROMIUM", "/usr/bin/chromium")
XSS = "<img src=x onerror=window.__xss=1>"
VOCAB = Vocab(list("abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ.,'<>=_-"))
TEXT = "The cat sat on a mat, and the dog ate it.\nA second line: hello world."
TIMEOUT_MS = 20_000

# Five small models, so that the fifth choice is refused; "big" is slow enough per character for Stop to land
# well before 5,000 characters.
MODELS = {
    "small": dict(cell="lstm", hidden=16, layers=2, dropout=0.0, embedding=8),
    "gru": dict(cell="gru", hidden=12, layers=1, dropout=0.0, embedding=8),
    "m3": dict(cell="lstm", hidden=8, layers=1, dropout=0.0, embedding=4),
    "m4": dict(cell="rnn", hidden=8, layers=1, dropout=0.0, embedding=4),
    "big": dict(cell="lstm", hidden=512, layers=2, dropout=0.0, embedding=32),
}


def _browser_or_skip() -> str:
    if Path(CHROMIUM).exists():
        return CHROMIUM
    message = f"Chromium not found at {CHROMIUM}: apt-get install chromium (or set CHARLM_CHROMIUM)"
    if os.environ.get("CHARLM_REQUIRE_BROWSER") == "1":
        pytest.fail(message + "; CHARLM_REQUIRE_BROWSER=1 makes this a failure")
    pytest.skip("Chromium not found: apt-get install chromium")


@pytest.fixture(scope="module")
def model_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("browser_models")
    files = {}
    for seed, (name, config) in enumerate(MODELS.items()):
        torch.manual_seed(seed)
        model = CharRNN(len(VOCAB), **config)
        files[name] = folder / f"{name}.pt"
        artifact.save(files[name], artifact.model_record(model, VOCAB, {"steps": 1}))
    return files


def start_server(cwd: Path, models: list[Path], *options: str):
    """`charlm serve --port 0 [options]` in `cwd`; returns (process, {"url", "origin", "token"}) once it prints its
    URL."""
    cmd = [sys.executable, "-m", "charlm.apps.cli", "serve", "--port", "0", "--device", "cpu", *options]
    for path in models:
        cmd += ["--model", str(path)]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url, seen, deadline = None, [], time.monotonic() + 120
    while url is None and time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        seen.append(line)
        match = re.search(r"http://[^\s]+", line)
        if match:
            url = match.group(0)
    if url is None:
        proc.kill()
        pytest.fail("charlm serve printed no URL:\n" + "".join(seen))
    parts = urllib.parse.urlsplit(url)
    origin = f"{parts.scheme}://{parts.netloc}"
    token = urllib.parse.parse_qs(parts.query).get("token", [None])[0]
    # Drain its output so that the pipe never fills up.
    threading.Thread(target=lambda: [None for _ in proc.stdout], daemon=True).start()
    return proc, {"url": url, "origin": origin, "token": token}


def stop_server(proc) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture(scope="module")
def server(model_files, tmp_path_factory):
    """The model files, served from an empty folder (no repository)."""
    proc, info = start_server(tmp_path_factory.mktemp("serve_cwd"), list(model_files.values()))
    yield info
    stop_server(proc)


@pytest.fixture(scope="module")
def workspace_server(model_files, tmp_path_factory):
    """A git + DVC repository that looks like a trained workspace to the server: a model (committed, tagged v1),
    its val bpc, DVCLive's curves and two checkpoints, one of which does not say whose it is; and a model file."""
    p = Project(tmp_path_factory.mktemp("workspace"))
    root = p.path
    p.git("init", "-q", "-b", "main")
    p.git("config", "user.email", "test@example.com")
    p.git("config", "user.name", "charlm tests")
    p.dvc("init", "-q")
    (root / "models").mkdir()
    (root / "models" / "model.pt").write_bytes(model_files["small"].read_bytes())
    p.dvc("add", "-q", "models/model.pt")
    p.git("add", "-A")
    p.git("commit", "-qm", "a model")
    p.git("tag", "v1")
    model, vocab, _ = artifact.load_model(model_files["gru"])
    record = artifact.model_record(model, vocab, {})
    checkpoint = {"format": artifact.CHECKPOINT_FORMAT, "config": record["config"], "vocab": record["vocab"],
                  "model": record["state_dict"], "step": 300}  # fmt: skip
    live = {"metrics.json": json.dumps({"val": {"bpc": 2.25}})}
    artifact.save(root / "checkpoints" / "train.pt", {**checkpoint, "exp_name": "wide", "live": live})
    artifact.save(root / ".dvc/tmp/charlm-checkpoints/0123abcd.pt", checkpoint)  # written before runs were named
    (root / "dvclive").mkdir()
    (root / "dvclive" / "metrics.json").write_text(json.dumps({"val": {"bpc": 2.5}}))
    for split, start in (("train", 4.0), ("val", 3.5)):
        folder = root / "dvclive" / "plots" / "metrics" / split
        folder.mkdir(parents=True)
        rows = [f"{step}\t{start - step / 1000:.4f}" for step in range(100, 1100, 100)]
        (folder / "bpc.tsv").write_text("step\tbpc\n" + "\n".join(rows) + "\n")
    write_packed(root)
    proc, info = start_server(root, [model_files["gru"]])
    yield info
    stop_server(proc)


# The workspace's packed splits: what Test item, the hardest items and the ranked units read.
SPLIT_ITEMS = [
    "The cat sat on a mat.", "Stocks rose on Monday, and bonds fell.", "A dog (a big one) ate it.",
    "qzx jjq zzv qxq vvz", "Hello world, said the man.", "It was the best of times.", "she said 'no' twice",
    "Oil prices rose again.", "ZZZ QQQ XXX", "The team won the game.", "a b c d e f g", "Rain is due on Tuesday.",
]  # fmt: skip


def write_packed(root: Path) -> None:
    from charlm.core.data import FORMAT, encode_items

    packed = root / "data" / "packed"
    packed.mkdir(parents=True)
    VOCAB.save(root / "data" / "vocab.json", {}, {})
    splits = {}
    for split in ("train", "val", "test"):
        stream = encode_items(VOCAB, "\n".join(SPLIT_ITEMS))
        np.save(packed / f"{split}.npy", stream)
        splits[split] = {"tokens": len(stream)}
    (packed / "meta.json").write_text(json.dumps({"format": FORMAT, "splits": splits}))


def api(server, path, body=None):
    url = server["origin"] + path
    if server["token"]:
        url += ("&" if "?" in url else "?") + "token=" + server["token"]
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.load(response)


@pytest.fixture(scope="module")
def models(server, model_files):
    """name -> the API's model entry, matched by file name."""
    listed = api(server, "/api/models")["models"]
    found = {}
    for name in MODELS:
        entries = [m for m in listed if f"{name}.pt" in m["id"] or f"{name}.pt" in m["label"]]
        assert len(entries) == 1, (name, listed)
        found[name] = entries[0]
    return found


@pytest.fixture(scope="module")
def browser():
    executable = _browser_or_skip()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        instance = p.chromium.launch(executable_path=executable)
        yield instance
        instance.close()


@pytest.fixture(scope="module")
def requests_seen():
    return []


@pytest.fixture
def page(browser, server, requests_seen):
    context = browser.new_context(viewport={"width": 1000, "height": 900})
    context.on("request", lambda r: requests_seen.append((server["origin"], r.url)))
    pg = context.new_page()
    errors = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    pg.set_default_timeout(TIMEOUT_MS)
    pg.goto(server["url"])
    pg.wait_for_selector("#models-table tbody tr")
    yield pg
    context.close()
    assert not errors, errors


def choose(page, models, *names):
    """Tick exactly these models, in this order."""
    wanted = [models[n]["label"] for n in names]
    for box in page.locator("#models-table tbody input[type=checkbox]").all():
        if box.is_checked() and box.get_attribute("aria-label")[len("use "):] not in wanted:
            box.uncheck()
    for label in wanted:
        box = page.get_by_label("use " + label, exact=True)
        if not box.is_checked():
            box.check()


def written(page, index=0) -> str:
    return page.locator("#columns pre").nth(index).text_content()


def run_cli(argv) -> str:
    from charlm.apps import cli

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        cli.main(argv)
    return out.getvalue()


def test_written_text_equals_charlm_generate_with_the_seed_shown(page, models, model_files):
    choose(page, models, "small", "gru")
    page.fill("#prompt", "the ")
    page.fill("#temperature", "0.9")
    page.fill("#top-k", "5")
    page.fill("#top-p", "0.95")
    page.fill("#length", "120")
    page.fill("#seed", "")  # a random seed, which the page shows
    page.uncheck("#stop-eos")
    page.click("#write-go")
    page.wait_for_selector("#write-status[data-done=finished]", state="attached")
    status = page.text_content("#write-status")
    seed = int(re.search(r"seed (\d+)", status).group(1))
    for index, name in enumerate(["small", "gru"]):
        expected = run_cli(["generate", "--model", str(model_files[name]), "--prompt", "the ", "--temperature", "0.9",
                            "--top-k", "5", "--top-p", "0.95", "--length", "120", "--seed", str(seed),
                            "--no-stop-at-eos", "--device", "cpu"])
        assert written(page, index) == expected[:-1]  # the CLI ends with a newline of its own
        assert len(expected) > 100


def test_read_bits_per_character_buckets_and_item_bpc_equal_the_api_and_the_protocol(page, server, models, model_files):
    choose(page, models, "small", "gru")
    page.fill("#read-text", TEXT)
    page.click("#read-go")
    page.wait_for_selector("#read-out .ch")
    answer = api(server, "/api/score", {"models": [models["small"]["id"], models["gru"]["id"]], "text": TEXT})
    shown = page.locator("#read-bpc .bpc-value").all_text_contents()
    assert shown == [f"{m['bpc']:.4f}" for m in answer["models"]]
    assert page.locator("#read-out .ch").count() == sum(len(item) for item in answer["items"])
    # GLTR's rank buckets under each model's bpc, and each item's bpc after it (no character of the text).
    words = page.locator("#read-bpc .bucket-words").all_text_contents()
    for shown, m in zip(words, answer["models"], strict=True):
        assert shown == "".join(f"{name} {100 * share:.1f}%" for name, share in m["buckets"])
        bar = page.locator("#read-bpc .bucket-bar").nth(answer["models"].index(m)).locator("span")
        widths = bar.evaluate_all("(parts) => parts.map((p) => parseFloat(p.style.width))")
        assert widths == pytest.approx([100 * share for _, share in m["buckets"]], abs=0.01)
    figures = page.locator("#read-out .item-bpc").all_text_contents()
    assert figures == [
        " · ".join(f"{m['item_bpc'][i]:.2f}" for m in answer["models"]) for i in range(len(answer["items"]))
    ]
    for entry, name in zip(answer["models"], ["small", "gru"], strict=True):
        model, vocab, _ = artifact.load_model(model_files[name])
        encoded = [np.concatenate([vocab.encode(item), [EOS_ID]]) for item in answer["items"]]
        stream = np.concatenate([[EOS_ID], *encoded])
        lengths = np.array([len(item) for item in answer["items"]])
        starts = 1 + np.concatenate([[0], np.cumsum(lengths + 1)[:-1]])
        nats, chars, _ = score_items(model, stream, starts, lengths, 8, "cpu")
        assert chars == entry["chars"]
        assert abs(nats / chars / math.log(2) - entry["bpc"]) < 1e-4
    # Keyboard: focus a character, move right, and the panel names the next character with its rank and top 5.
    page.locator("#read-out .ch").first.focus()
    page.keyboard.press("ArrowRight")
    tip = page.text_content("#read-tip")
    assert "position 2" in tip and "rank" in tip and "%" in tip
    assert page.evaluate("document.activeElement.dataset.index") == "1"
    page.keyboard.press("ArrowDown")  # the same position in the next item
    assert "item 2, position 2" in page.text_content("#read-tip")
    page.keyboard.press("ArrowUp")
    assert "item 1, position 2" in page.text_content("#read-tip")
    page.locator("#read-out .ch").nth(5).hover()
    assert "position 6" in page.text_content("#read-tip")
    # Two models: colour by difference.
    page.select_option("#read-colour", "diff")
    assert page.locator("#read-out .ch.d0, #read-out .ch.d1, #read-out .ch.d2, #read-out .ch.d3, "
                        "#read-out .ch.d4, #read-out .ch.d5, #read-out .ch.d6").count() > 0
    assert "A − B" in page.text_content("#read-legend")


def test_a_missing_test_item_shows_the_servers_error(page, server):
    page.click("#test-item")
    alert = page.get_by_role("alert")
    alert.wait_for()
    with pytest.raises(urllib.error.HTTPError) as err:
        api(server, "/api/test-item")
    assert alert.text_content() == json.load(err.value)["error"]


def test_models_table_shows_the_hint_and_refuses_a_fifth_model(page, server, models):
    hint = api(server, "/api/models")["hint"]
    if hint:
        assert page.text_content("#models-hint") == hint and page.is_visible("#models-hint")
    assert page.locator("#models-table tbody tr").count() == len(MODELS)
    choose(page, models, "small", "gru", "m3", "m4")
    box = page.get_by_label("use " + models["big"]["label"], exact=True)
    box.click()
    assert not box.is_checked()
    assert "At most 4" in page.get_by_role("alert").text_content()


def test_stop_stops(page, models):
    choose(page, models, "big")
    page.fill("#prompt", "a")
    page.fill("#length", "5000")
    page.fill("#seed", "1")
    page.uncheck("#stop-eos")
    page.click("#write-go")
    deadline = time.monotonic() + 20
    while len(written(page)) < 30 and time.monotonic() < deadline:
        time.sleep(0.02)
    page.click("#write-stop")
    page.wait_for_selector("#write-status[data-done=stopped]", state="attached")
    assert "stopped" in page.text_content("#write-status")
    length = len(written(page))
    assert 30 <= length < 5001
    time.sleep(0.5)
    assert len(written(page)) == length
    assert page.is_enabled("#write-go") and not page.is_enabled("#write-stop")


def test_markup_in_a_prompt_and_a_pasted_text_stays_text(page, models):
    choose(page, models, "small")
    page.fill("#prompt", XSS)
    page.fill("#length", "20")
    page.fill("#seed", "3")
    page.click("#write-go")
    page.wait_for_selector("#write-status[data-done]", state="attached")
    assert written(page).startswith(XSS)
    page.fill("#read-text", "before " + XSS + " after")
    page.click("#read-go")
    page.wait_for_selector("#read-out .ch")
    assert XSS in page.text_content("#read-out")
    page.click("#in-go")
    page.wait_for_selector("#in-out .ch")
    assert XSS in page.text_content("#in-out")
    assert page.evaluate("typeof window.__xss") == "undefined"
    assert page.locator("img").count() == 0


def test_inside_keys_step_units_and_ranking_shows_the_note(page, models):
    choose(page, models, "small")
    page.fill("#read-text", TEXT)
    page.click("#in-go")
    page.wait_for_selector("#in-shown[data-unit='0']", state="attached")
    assert page.locator("#in-out .ch").count() == len(TEXT.replace("\n", ""))
    page.focus("#in-out")
    page.keyboard.press("]")
    page.wait_for_selector("#in-shown[data-unit='1']", state="attached")
    page.keyboard.press("]")
    page.wait_for_selector("#in-shown[data-unit='2']", state="attached")
    page.keyboard.press("[")
    page.wait_for_selector("#in-shown[data-unit='1']", state="attached")
    assert "unit 1" in page.text_content("#in-shown")
    page.click("#in-next")
    page.wait_for_selector("#in-shown[data-unit='2']", state="attached")
    # Units are ranked on the workspace's validation items; outside a repository the page shows the server's note.
    page.click("#in-rank")
    note = page.locator("#in-note")
    note.wait_for()
    assert "validation" in note.text_content()
    assert page.locator("#in-units li").count() == 0


def test_curves_say_when_a_model_has_no_logs(page, models):
    choose(page, models, "small")
    empty = page.locator("#curves-empty")
    empty.wait_for()
    assert "No training logs" in empty.text_content()
    assert page.locator("#curves-plot svg path.series").count() == 0


@contextlib.contextmanager
def workspace_page(browser, workspace_server, requests_seen, width: int = 1000):
    """A page of the workspace server at this width; on leaving, no console error, failed request or page error."""
    context = browser.new_context(viewport={"width": width, "height": 900})
    context.on("request", lambda r: requests_seen.append((workspace_server["origin"], r.url)))
    problems: list[str] = []
    context.on("console", lambda m: m.type == "error" and problems.append(m.text))
    context.on("response", lambda r: r.status >= 400 and problems.append(f"{r.status} {r.url}"))
    try:
        page = context.new_page()
        page.on("pageerror", lambda e: problems.append(str(e)))
        page.set_default_timeout(TIMEOUT_MS)
        page.goto(workspace_server["url"])
        page.wait_for_selector("#models-table tbody tr")
        yield page, problems
    finally:
        context.close()


def row_texts(page) -> list[str]:
    return [t.strip() for t in page.locator("#models-table tbody tr").all_text_contents()]


def test_curves_draw_the_workspace_logs(browser, workspace_server, requests_seen):
    with workspace_page(browser, workspace_server, requests_seen) as (page, problems):
        page.wait_for_selector("#curves-plot svg path.series.val")
        assert page.locator("#curves-plot svg path.series").count() == 2  # train and val of the one model
        legend = page.text_content("#curves-plot")
        assert "train 3.000" in legend and "val 2.500" in legend  # each legend entry ends on its last point
        row = page.locator("#models-table tbody tr").first
        assert "workspace" in row.text_content() and "2.5000" in row.text_content()
        assert page.is_hidden("#curves-empty")
    assert not problems, problems


@pytest.mark.parametrize("width", [420, 1280])
def test_curves_read_out_each_line_under_the_pointer(browser, workspace_server, requests_seen, width):
    """The fixture logs train 4.0 - step/1000 and val 3.5 - step/1000 every 100 steps from 100 to 1,000."""
    with workspace_page(browser, workspace_server, requests_seen, width) as (page, problems):
        page.wait_for_selector("#curves-plot svg path.series.val")
        hint = page.text_content("#curves-readout")
        assert hint.startswith("Point at the plot")
        page.locator("#curves-plot circle").nth(4).hover()  # the val point of step 500
        text = page.text_content("#curves-readout")
        assert "workspace (models/model.pt): train 3.500 at step 500, val 3.000 at step 500" in text, text
        guide = page.locator("#curves-plot line.guide")
        circle = page.locator("#curves-plot circle").nth(4)
        assert guide.get_attribute("visibility") == "visible"
        assert float(guide.get_attribute("x1")) == pytest.approx(float(circle.get_attribute("cx")), abs=0.01)
        page.locator("#curves-plot circle").nth(9).hover()
        assert "val 2.500 at step 1,000" in page.text_content("#curves-readout")
        page.mouse.move(1, 1)  # off the plot
        assert page.text_content("#curves-readout") == hint and guide.get_attribute("visibility") == "hidden"
    assert not problems, problems


@pytest.mark.parametrize("width", [420, 1280])
def test_the_curves_legend_shows_each_line_whole(browser, workspace_server, requests_seen, width):
    with workspace_page(browser, workspace_server, requests_seen, width) as (page, problems):
        page.wait_for_selector("#curves-plot svg path.series.val")
        for kind, last in (("train", "3.000"), ("val", "2.500")):
            entry = page.locator("#curves-plot").get_by_text(re.compile(f"workspace .*{kind} {last}")).last
            # Inside what clips it (an <svg> clips its text; else the plot's box) and the window: none of it is cut.
            box = entry.bounding_box()
            clip = entry.evaluate("(e) => (e.ownerSVGElement || e.closest('#curves-plot')).getBoundingClientRect()")
            assert box["x"] >= clip["x"] - 1 and box["x"] + box["width"] <= min(clip["right"], width) + 1
            assert "models/model.pt" in entry.text_content()
    assert not problems, problems


# Every visible element with text of its own, at the size it is drawn (an SVG scaled down shrinks its text).
SMALL_TEXT = """(root) => {
  const small = [];
  for (const node of root.querySelectorAll("*")) {
    const text = [...node.childNodes].some((c) => c.nodeType === 3 && c.textContent.trim());
    if (!text || !node.getClientRects().length) continue;
    let size = parseFloat(getComputedStyle(node).fontSize);
    const svg = node.closest("svg");
    if (svg && svg.viewBox.baseVal && svg.viewBox.baseVal.width) {
      size *= svg.getBoundingClientRect().width / svg.viewBox.baseVal.width;
    }
    if (size < 11) small.push(`${node.tagName} ${size.toFixed(1)}px: ${node.textContent.slice(0, 40)}`);
  }
  return small;
}"""


@pytest.mark.parametrize("width", [420, 1280])
def test_each_view_fits_the_width_with_two_models_chosen(browser, workspace_server, requests_seen, model_files, width):
    with workspace_page(browser, workspace_server, requests_seen, width) as (page, problems):
        page.get_by_label("use " + str(model_files["gru"]), exact=True).check()  # beside the workspace's
        page.fill("#length", "300")
        page.uncheck("#stop-eos")
        page.click("#write-go")
        page.wait_for_selector("#write-status[data-done=finished]", state="attached")
        page.fill("#read-text", TEXT)
        page.click("#read-go")
        page.wait_for_selector("#read-out .ch")
        page.select_option("#read-colour", "diff")
        page.locator("#read-out .ch").nth(4).hover()
        page.locator("#columns .ch").nth(3).hover()
        page.click("#hard-go")
        page.wait_for_selector("#hard-items li")
        page.click("#in-go")
        page.wait_for_selector("#in-out .ch")
        page.fill("#span-text", "the")
        page.click("#span-go")
        page.wait_for_selector("#heat .hc i")
        page.click("#in-rank")
        page.wait_for_selector("#in-units li")
        page.wait_for_selector("#curves-plot svg path.series.val")
        for view in ("models", "write", "read", "inside", "curves"):
            page.locator("#" + view).scroll_into_view_if_needed()
            sizes = page.evaluate("[document.documentElement.scrollWidth, document.documentElement.clientWidth]")
            assert sizes[0] <= sizes[1] == width, (view, sizes)
            assert page.evaluate(SMALL_TEXT, page.locator("#" + view).element_handle()) == [], view
    assert not problems, problems


def test_add_asks_the_server_first_and_added_rows_can_be_removed(browser, workspace_server, requests_seen):
    with workspace_page(browser, workspace_server, requests_seen) as (page, problems):
        rows = row_texts(page)
        page.fill("#rev-name", "v9")
        page.click("#rev-add")
        error = page.locator("#rev-error")
        error.wait_for()
        with pytest.raises(urllib.error.HTTPError) as err:
            api(workspace_server, "/api/model?id=rev:v9")
        assert err.value.code == 404 and error.text_content() == json.load(err.value)["error"]
        assert row_texts(page) == rows and page.input_value("#rev-name") == "v9"  # nothing added
        assert page.is_hidden("#message-bar")
        problems.clear()  # the refused revision's 404, which Chromium reports in the console
        page.fill("#rev-name", "v1")
        page.click("#rev-add")
        box = page.get_by_label("use v1", exact=True)
        box.wait_for()
        assert box.is_checked() and page.is_hidden("#rev-error") and len(row_texts(page)) == len(rows) + 1
        assert "v1" in page.locator("#in-model").text_content()
        page.get_by_label("remove v1", exact=True).click()
        assert row_texts(page) == rows and "v1" not in page.locator("#in-model").text_content()
        page.fill("#length", "5")
        page.click("#write-go")  # the remaining choice still works
        page.wait_for_selector("#write-status[data-done=finished]", state="attached")
    assert not problems, problems


def test_a_checkpoint_names_its_run_step_and_val_bpc(browser, workspace_server, requests_seen):
    with workspace_page(browser, workspace_server, requests_seen) as (page, problems):
        checkpoints = [t for t in row_texts(page) if "checkpoint" in t]
        # The checkpoint that names no run is not listed.
        assert len(checkpoints) == 1 and "0123abcd" not in checkpoints[0]
        assert "checkpoint of experiment wide, step 300" in checkpoints[0] and "2.2500" in checkpoints[0]
    assert not problems, problems


def test_the_page_has_its_icon_and_no_request_fails(browser, workspace_server, requests_seen):
    with workspace_page(browser, workspace_server, requests_seen) as (page, problems):
        page.wait_for_selector("#curves-plot svg path.series.val")
        icon = page.evaluate("() => fetch(document.querySelector('link[rel=icon]').href).then((r) => r.status)")
        assert icon == 200
        assert page.evaluate("() => fetch('/favicon.ico').then((r) => r.status)") == 200
    assert not problems, problems


def test_every_request_stays_on_the_server(requests_seen):
    # Runs last in this module: every page above recorded its requests here, with the origin it was served from.
    assert len(requests_seen) > 20
    off = [url for origin, url in requests_seen if not url.startswith(origin + "/")]
    assert not off, off


LONG = "x" * 250
DISGUISED = "wide\u202e" + "gnol"  # shows as "widelong" (reversed after the control) unless the control is shown


@pytest.fixture(scope="module")
def long_names_server(model_files, tmp_path_factory):
    """Checkpoints whose run names are long and unbroken, or hold a bidi control, in a folder that is a DVC
    repository to the server (a .dvc folder, no git)."""
    root = tmp_path_factory.mktemp("long_names")
    (root / ".dvc").mkdir()
    model, vocab, _ = artifact.load_model(model_files["gru"])
    record = artifact.model_record(model, vocab, {})
    checkpoint = {"format": artifact.CHECKPOINT_FORMAT, "config": record["config"], "vocab": record["vocab"],
                  "model": record["state_dict"], "step": 3, "live": {}}  # fmt: skip
    artifact.save(root / ".dvc/tmp/charlm-checkpoints/long.pt", {**checkpoint, "exp_name": LONG})
    artifact.save(root / ".dvc/tmp/charlm-checkpoints/bidi.pt", {**checkpoint, "exp_name": DISGUISED})
    proc, info = start_server(root, [])
    yield info
    stop_server(proc)


@pytest.mark.parametrize("width", [420, 1280])
def test_long_names_wrap_and_a_bidi_control_is_shown(browser, long_names_server, requests_seen, tmp_path, width):
    def fits(what: str, selector: str) -> None:
        page.locator(selector).scroll_into_view_if_needed()
        page.screenshot(path=tmp_path / f"{what}_{width}.png")  # kept for a look
        sizes = page.evaluate("[document.documentElement.scrollWidth, document.documentElement.clientWidth]")
        assert sizes[0] <= sizes[1] == width, (what, sizes)

    with workspace_page(browser, long_names_server, requests_seen, width) as (page, problems):
        rows = row_texts(page)
        assert any(LONG in t for t in rows), rows
        shown = [t for t in rows if "wide" in t]
        assert len(shown) == 1 and "experiment wide<U+202E>gnol, step 3" in shown[0] and "\u202e" not in shown[0]
        for box in page.locator("#models-table tbody input[type=checkbox]").all():
            box.check()  # both checkpoints
        fits("models", "#models-table")
        page.fill("#read-text", TEXT)
        page.click("#read-go")
        page.wait_for_selector("#read-out .ch")
        assert "wide<U+202E>gnol" in page.text_content("#read-bpc")
        fits("read", "#read-bpc")
        page.locator("#read-out .ch").nth(4).hover()
        page.wait_for_selector("#read-tip h4")
        fits("tip", "#read-tip")
        page.fill("#rev-name", "y" * 290)
        page.click("#rev-add")
        page.locator("#rev-error").wait_for()
        fits("rev-error", "#rev-error")
        problems.clear()  # the refused revision's 404, which Chromium reports in the console
    assert not problems, problems


# --------------------------------------------------------------------------- the model's reasons (issue 25)


def expect(locator):
    from playwright.sync_api import expect as playwright_expect  # imported late: the module skips without Chromium

    return playwright_expect(locator)


def test_write_colours_each_character_by_reads_bits_and_its_command_writes_the_same_text(page, models, model_files):
    choose(page, models, "small")
    page.fill("#prompt", "the ")
    page.fill("#temperature", "1.2")
    page.fill("#length", "150")
    page.fill("#seed", "11")
    page.check("#stop-eos")
    page.click("#write-go")
    page.wait_for_selector("#write-status[data-done=finished]", state="attached")
    chars = page.locator("#columns pre .ch")
    text = "".join(chars.all_text_contents())
    assert written(page) == "the " + text and len(text) > 20
    # Read's bits for the prompt and the text as one item, by the same model: each character's colour is its bin.
    model, vocab, _ = artifact.load_model(model_files["small"])
    read = inspection.char_scores(model, vocab, ["the " + text], top=5)[0][4:]
    classes = chars.evaluate_all("(spans) => spans.map((s) => s.className)")
    checked = 0
    for cls, scored in zip(classes, read, strict=True):
        if abs(scored["bits"] - round(scored["bits"])) > 1e-3:  # not on a bin's edge, where rounding may differ
            assert cls == f"ch s{min(7, int(scored['bits']))}", (cls, scored["bits"])
            checked += 1
    assert checked > 0.9 * len(read)
    assert "bits of surprisal" in page.text_content("#write-legend")
    # The tip: on focus, and moved with the arrow keys, the character's bits, rank and the model's five guesses.
    chars.first.focus()
    page.keyboard.press("ArrowRight")
    tip = page.text_content("#write-tip")
    assert "written character 2" in tip and f"{read[1]['bits']:.2f} bits, rank {read[1]['rank']}" in tip
    assert page.locator("#write-tip tr").count() == 5
    page.uncheck("#write-colour")
    assert page.locator("#columns.plain").count() == 1 and page.text_content("#write-legend") == ""
    # Copy as command: the line, run, writes the same text.
    command = page.text_content("#write-command-text")
    argv = shlex.split(command)
    assert argv[:2] == ["charlm", "generate"] and "--seed=11" in argv and f"--model={model_files['small']}" in argv
    # One box per shell word, so that a narrow screen wraps between words, never inside an option.
    words = page.locator("#write-command-text .word").all_text_contents()
    assert [shlex.split(word)[0] for word in words] == argv
    assert run_cli([*argv[1:], "--device", "cpu"]) == written(page) + "\n"
    page.click("#write-copy")
    expect(page.locator("#write-copied")).not_to_have_text("")


def test_hardest_items_are_listed_by_bpc_and_open_in_read_with_one_click(browser, workspace_server, requests_seen):
    with workspace_page(browser, workspace_server, requests_seen) as (page, problems):
        page.click("#hard-go")
        page.wait_for_selector("#hard-items li")
        answer = api(workspace_server, "/api/hardest?model=workspace")
        shown = page.locator("#hard-items .hard-item strong").all_text_contents()
        assert shown == [f"{h['bpc']:.2f} bpc" for h in answer["items"]]
        assert len(shown) == len(SPLIT_ITEMS) and "all 12 test items" in page.text_content("#hard-status")
        page.locator("#hard-items .hard-item").nth(1).click()
        page.wait_for_selector("#read-out .ch")
        assert page.input_value("#read-text") == answer["items"][1]["text"]
        assert page.text_content("#read-out .item-bpc") == f"{answer['items'][1]['bpc']:.2f}"
    assert not problems, problems


def select_characters(page, selector: str, first: int, last: int) -> None:
    """Select characters first..last (inclusive) of an element's .ch spans, as a mouse drag does."""
    page.evaluate(
        """([selector, first, last]) => {
            const chars = document.querySelectorAll(selector + " .ch");
            const range = document.createRange();
            range.setStart(chars[first].firstChild, 0);
            range.setEnd(chars[last].firstChild, chars[last].textContent.length);
            getSelection().removeAllRanges();
            getSelection().addRange(range);
        }""",
        [selector, first, last],
    )


def test_a_span_selected_in_inside_finds_its_units_and_draws_their_heatmap(page, server, models):
    choose(page, models, "small")
    page.fill("#read-text", TEXT)
    page.click("#in-go")
    page.wait_for_selector("#in-out .ch")
    select_characters(page, "#in-out", 4, 6)  # "cat"
    expect(page.locator("#span-status")).to_have_text("3 selected characters")
    page.click("#span-go")
    page.wait_for_selector("#heat .hc")
    body = {"model": models["small"]["id"], "text": TEXT, "layer": 0, "kind": "output", "spans": [[0, 4, 7]]}
    answer = api(server, "/api/span-units", body)
    buttons = page.locator("#span-units button.unit")
    assert [int(b) for b in buttons.evaluate_all("(bs) => bs.map((b) => b.dataset.unit)")] == [
        u["unit"] for u in answer["units"]
    ]
    columns = page.locator("#heat .hc")
    assert columns.count() == sum(map(len, answer["items"]))
    assert columns.first.locator("i").count() == len(answer["units"])
    assert page.locator("#heat .hc.picked").all_text_contents() == ["c", "a", "t"]
    # A unit of the list opens in the coloured text; a typed piece takes every place it occurs.
    buttons.nth(2).click()
    page.wait_for_selector(f"#in-shown[data-unit='{answer['units'][2]['unit']}']", state="attached")
    page.fill("#read-text", "nothing like it")  # Read's text changes; the search stays on the text Inside shows
    page.fill("#span-text", "at")
    page.click("#span-go")
    expect(page.locator("#span-status")).to_have_text("8 characters in 4 spans")
    assert page.locator("#heat .hc.picked").all_text_contents() == list("at" * 4)  # cat, sat, mat, ate
    page.fill("#span-text", "nowhere")
    page.click("#span-go")
    expect(page.get_by_role("alert")).to_contain_text("does not occur")


def test_ranked_units_list_each_features_best_units_and_what_none_explains(browser, workspace_server, requests_seen):
    with workspace_page(browser, workspace_server, requests_seen) as (page, problems):
        page.click("#in-rank")
        page.wait_for_selector("#in-units li")
        body = {"model": "workspace", "layer": 0, "kind": "output"}
        answer = api(workspace_server, "/api/units", body)
        rows = page.locator("#in-units li").all_text_contents()
        assert rows == [
            f"{f['feature']}: " + " ".join(f"unit {u['unit']} (r = {u['r']:.2f})" for u in f["units"])
            for f in answer["features"]
        ]
        said = page.text_content("#in-unexplained") if page.is_visible("#in-unexplained") else ""
        for name in answer["unexplained"] + answer["constant"]:
            assert name in said
    assert not problems, problems
