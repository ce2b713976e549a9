"""The playground's Run part in a real browser (Chromium through Playwright) against `charlm serve` in a tiny real
DVC repository: fill the form, queue, start, watch a curve grow, kill, see the others finish and appear in Models
with the test bpc of `dvc exp show`, compare two. git status is the same before and after, and no DVC worker
outlives the test. Skipped without Chromium, as tests/test_browser.py.

CHARLM_SCREENSHOTS=DIR keeps a screenshot of the Run part at each width there (the README's comes from it).
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_browser import browser, start_server, stop_server  # noqa: F401  # browser: the module's Chromium, a fixture
from test_runs import make_repo, snapshot, stop_workers, exp_show_test_bpc

pytestmark = pytest.mark.slow
TIMEOUT_MS = 300_000  # a tiny experiment trains in seconds, but two jobs share two busy cores


@pytest.fixture
def served(tmp_path, monkeypatch):
    """A served copy of the tiny repository, by a server started without this environment on PATH (its queue
    must still run this environment's `dvc`)."""
    repo = make_repo(tmp_path)
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    proc, info = start_server(repo, [], "--run")
    yield repo, info
    stop_server(proc)
    stop_workers(repo)


def open_page(browser, url: str, width: int):
    context = browser.new_context(viewport={"width": width, "height": 900})
    page = context.new_page()
    problems: list[str] = []
    page.on("console", lambda m: m.type == "error" and problems.append(m.text))
    page.on("pageerror", lambda e: problems.append(f"{e}: {e.stack}"))
    page.set_default_timeout(TIMEOUT_MS)
    page.goto(url)
    page.wait_for_selector("#run:not([hidden]) #run-fields input[data-key='model.hidden']")
    return context, page, problems


def field(page, key: str):
    return page.locator(f"#run-fields input[data-key='{key}']")


def queue_in_form(page, name: str, values: dict[str, str]) -> None:
    page.fill("#run-name", name)
    for key, text in values.items():
        field(page, key).fill(text)
    page.click("#run-queue")


def row(page, name: str):
    return page.locator("#run-table tbody tr", has=page.locator("td.name", has_text=re.compile(f"^{name}$")))


def fits(page, width: int) -> None:
    sizes = page.evaluate("[document.documentElement.scrollWidth, document.documentElement.clientWidth]")
    assert sizes[0] <= sizes[1] == width, sizes


def test_queue_watch_kill_finish_and_compare_in_the_page(browser, served):
    repo, info = served
    before = snapshot(repo)
    context, page, problems = open_page(browser, info["url"], 1280)
    help_text = page.locator("#run-f-model-hidden-help").text_content()
    assert "(int, ≥ 1, ≤ 65536)" in help_text

    # A bad value is the stage's own line, and nothing is queued.
    queue_in_form(page, "bad", {"train.lr": "yes"})
    page.wait_for_selector("#run-error:not([hidden])")
    assert page.text_content("#run-error") == (
        "train: error: params.yaml: train.lr = 'yes' (a string): expected a number")
    field(page, "train.lr").fill(field(page, "train.lr").get_attribute("data-initial"))
    assert problems == ["Failed to load resource: the server responded with a status of 400 (Bad Request)"]
    problems.clear()  # the refusal's 400, which Chromium reports in the console

    queue_in_form(page, "long", {"train.max_steps": "20000", "train.epochs": "1000", "train.eval_every": "40",
                                 "train.log_every": "10", "train.sample_every": "20"})  # fmt: skip
    page.wait_for_selector("#run-status:has-text('queued long')")
    for key in ("train.max_steps", "train.epochs", "train.eval_every", "train.log_every", "train.sample_every"):
        field(page, key).fill(field(page, key).get_attribute("data-initial"))
    queue_in_form(page, "pair", {"model.hidden": "12,20"})  # a sweep: one experiment per value
    page.wait_for_selector("#run-status:has-text('queued pair-1, pair-2')")
    for name in ("long", "pair-1", "pair-2"):
        row(page, name).locator("td", has_text="Queued").wait_for()
    assert not row(page, "bad").count()

    page.fill("#run-jobs", "2")
    page.click("#run-start")
    # The running experiment's curve grows in the page, pushed by the server.
    lengths: list[int] = []
    deadline = time.monotonic() + TIMEOUT_MS / 1000
    while len(set(lengths)) < 3 and time.monotonic() < deadline:
        points = page.evaluate("""() => { const p = document.querySelector('#run-live [data-name="long"] .run-series');
            return p ? p.getAttribute('points').split(' ').length : 0; }""")
        if points:
            lengths.append(points)
        time.sleep(0.5)
    assert len(set(lengths)) >= 3 and lengths == sorted(lengths), lengths
    assert "sample at step" in page.text_content("#run-live")
    keep = os.environ.get("CHARLM_SCREENSHOTS")
    for width in (1280, 420):
        page.set_viewport_size({"width": width, "height": 900})
        time.sleep(0.3)
        fits(page, width)
        if keep:  # the form's end, the queue and the running experiment's curve
            top, bottom = page.evaluate("""() => [document.querySelector('#run-queue').getBoundingClientRect().top,
                document.querySelector('#run-live').getBoundingClientRect().bottom].map((y) => y + window.scrollY)""")
            page.screenshot(path=str(Path(keep) / f"run-live-{width}.png"), full_page=True,
                            clip={"x": 0, "y": top - 10, "width": width, "height": bottom - top + 20})
    page.set_viewport_size({"width": 1280, "height": 900})

    row(page, "long").get_by_role("button", name="Kill long").click()
    row(page, "long").locator("td", has_text="Failed").wait_for()
    for name in ("pair-1", "pair-2"):
        row(page, name).locator("td", has_text="Success").wait_for()
    row(page, "long").get_by_role("button", name="Log long").click()
    page.wait_for_selector("#run-log:has-text('train: interrupted; checkpoint saved')")

    # Finished, they are models: Models lists them with the test bpc that `dvc exp show` gives.
    shown = json.loads(subprocess.run([str(Path(sys.executable).parent / "dvc"), "exp", "show", "--json"], cwd=repo,
                                      capture_output=True, text=True, check=True).stdout)  # fmt: skip
    for name in ("pair-1", "pair-2"):
        model_row = page.locator("#models-table tbody tr", has=page.locator("td.name", has_text=name))
        model_row.wait_for()
        assert model_row.locator("td.num").nth(1).text_content() == f"{exp_show_test_bpc(shown, name):.4f}"

    row(page, "pair-1").get_by_role("checkbox").check()
    row(page, "pair-2").get_by_role("checkbox").check()
    page.click("#run-compare")
    first = page.locator("#run-compare-out tbody tr").first
    first.wait_for()
    assert first.locator("td").all_text_contents() == ["≠ model.hidden", "12", "20"]
    assert page.locator("#run-compare-out svg polyline").count() == 4  # train and val of each
    for width in (1280, 420):
        page.set_viewport_size({"width": width, "height": 900})
        time.sleep(0.3)
        fits(page, width)
        if keep:
            page.locator("#run-compare-out").screenshot(path=str(Path(keep) / f"run-compare-{width}.png"))
    context.close()
    assert not problems, problems
    stop_workers(repo)
    assert snapshot(repo) == before


def test_a_read_only_page_has_no_run_part(browser, tmp_path):
    """Without `--run` (the default): the form answers that it is read-only, and the page hides the Run part and its
    link."""
    repo = make_repo(tmp_path)
    proc = subprocess.Popen([sys.executable, "-m", "charlm.apps.cli", "serve", "--port", "0", "--device", "cpu"],
                            cwd=repo, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    try:
        url = None
        while url is None:
            line = proc.stdout.readline()
            assert line, "the server printed no URL"
            found = re.search(r"http://\S+", line)
            url = found.group(0) if found else None
        context = browser.new_context(viewport={"width": 420, "height": 900})
        page = context.new_page()
        with page.expect_response(lambda r: "/api/runs/form" in r.url) as answer:
            page.goto(url)
        assert answer.value.json()["read_only"] is True
        page.wait_for_selector("#models-table")
        assert page.evaluate("[document.querySelector('#run').hidden, document.querySelector('#run-link').hidden]") \
            == [True, True]
        fits(page, 420)
        context.close()
    finally:
        stop_server(proc)
