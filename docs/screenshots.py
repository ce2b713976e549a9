"""Render the README's screenshots of the playground: one PNG per part of the page, 900 px wide.

    python docs/screenshots.py REPO OUT_DIR

REPO is a charlm repository with trained models (with two experiments, the comparison and the difference
colouring have something to show too); `charlm serve` runs there on a free port and Chromium (/usr/bin/chromium,
or CHARLM_CHROMIUM) renders the page. The Read and Inside views use the text below, not a corpus item, and the
hardest test items are not shot, so no corpus text ends up in the images.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import threading
from pathlib import Path

from playwright.sync_api import sync_playwright

TEXT = (
    "Shares of the chip maker rose 4% on Tuesday after it said profit would beat forecasts.\n"
    'The team (led by "Smith") won 3-1 in London on Sunday.'
)
PROMPT = "Stocks "
WRITE_TIP = 12  # the written character whose tip (top 5) the Write shot shows
SPAN = '"Smith"'  # Inside: the units that are on in this quotation and off elsewhere (or the other way round)
WIDTH = 900


def start_server(repo: Path) -> tuple[subprocess.Popen, str]:
    # The installed `charlm` command: `python -m` from inside REPO would import REPO's own copy of the package.
    cmd = [str(Path(sys.executable).parent / "charlm"), "serve", "--port", "0", "--device", "cpu"]
    proc = subprocess.Popen(cmd, cwd=repo, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"))  # fmt: skip
    for line in proc.stdout:
        match = re.search(r"http://\S+", line)
        if match:
            threading.Thread(target=lambda: [None for _ in proc.stdout], daemon=True).start()
            return proc, match.group(0)
        print(line, end="", file=sys.stderr)
    raise SystemExit("charlm serve exited without printing its URL")


def choose(page, count: int) -> list[str]:
    """Tick up to `count` experiments (else the first models); returns their labels."""
    rows = page.locator("#models-table tbody tr")
    picks = [i for i in range(rows.count()) if rows.nth(i).locator("td").nth(2).text_content() == "experiment"]
    picks = (picks or list(range(rows.count())))[:count]
    for i in range(rows.count()):
        box = rows.nth(i).locator("input")
        if box.is_checked() and i not in picks:
            box.uncheck()
    for i in picks:
        box = rows.nth(i).locator("input")
        if not box.is_checked():
            box.check()
    return [rows.nth(i).locator("td").nth(1).text_content() for i in picks]


def shoot(page, section: str, path: Path) -> None:
    page.locator(section).screenshot(path=str(path))
    print(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("repo", type=Path)
    parser.add_argument("out", type=Path)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    proc, url = start_server(args.repo)
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=os.environ.get("CHARLM_CHROMIUM", "/usr/bin/chromium"))
            page = browser.new_page(viewport={"width": WIDTH, "height": 1000}, device_scale_factor=1)
            page.set_default_timeout(120_000)
            page.goto(url)
            page.wait_for_selector("#models-table tbody tr")
            choose(page, 2)
            page.wait_for_selector("#curves-plot svg, #curves-empty:not([hidden])")
            shoot(page, "#models", args.out / "models.png")

            page.fill("#prompt", PROMPT)
            page.fill("#length", "180")
            page.fill("#seed", "7")
            page.click("#write-go")
            page.wait_for_selector("#write-status[data-done]", state="attached")
            page.locator("#columns .ch").nth(WRITE_TIP).focus()
            shoot(page, "#write", args.out / "write.png")

            page.fill("#read-text", TEXT)
            page.click("#read-go")
            page.wait_for_selector("#read-out .ch")
            page.locator("#read-out .ch").nth(TEXT.index("4%")).focus()
            shoot(page, "#read", args.out / "read.png")
            if page.locator("#read-colour option[value=diff]").count():
                page.select_option("#read-colour", "diff")
                page.locator("#read-out .ch").nth(TEXT.index("forecasts")).focus()
                shoot(page, "#read", args.out / "read-diff.png")

            page.click("#in-go")
            page.wait_for_selector("#in-out .ch")
            page.fill("#span-text", SPAN)
            page.click("#span-go")
            page.wait_for_selector("#span-units li")
            page.locator("#span-units button").first.click()  # the unit that sets the span apart most, above
            page.click("#in-rank")
            page.wait_for_selector("#in-units li, #in-note:not([hidden])")
            shoot(page, "#inside", args.out / "inside.png")

            shoot(page, "#curves", args.out / "curves.png")
            browser.close()
    finally:
        proc.terminate()
        proc.wait(10)


if __name__ == "__main__":
    main()
