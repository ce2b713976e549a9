"""Comparing experiments offline: plots rendered to files, and samples side by side.

`dvc plots show/diff --json` already returns each plot as a Vega-Lite spec with its data inlined; here it is
rendered with vl-convert (no browser, no CDN) to PNG or SVG, plus one self-contained HTML page.
Samples are read from each revision's reports/samples.json with `dvc.api`, from the cache or the remote.
"""

from __future__ import annotations

import base64
import html
import json
import re
import shutil
import subprocess
from pathlib import Path

from charlm.base.errors import CharlmError
from charlm.base.io import markdown_cell, write_text

SAMPLES_JSON = "reports/samples.json"


def dvc_plots_json(revisions: list[str]) -> dict:
    dvc = shutil.which("dvc")
    if dvc is None:
        raise CharlmError("dvc is not on PATH; activate the project's environment (source .venv/bin/activate)")
    cmd = [dvc, "plots", "diff", *revisions, "--json"] if revisions else [dvc, "plots", "show", "--json"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["unknown error"])[-1]
        raise CharlmError(f"`{' '.join(cmd[1:])}` failed: {last}")
    return json.loads(proc.stdout).get("data", {})


def render_plots(revisions: list[str], out: Path, fmt: str = "png") -> list[Path]:
    """Write one image per plot and an index.html that embeds them all; return the files written."""
    import vl_convert as vlc

    plots = dvc_plots_json(revisions)
    if not plots:
        raise CharlmError("DVC reports no plots; run `dvc repro` (or `dvc pull`) first")
    written, figures = [], []
    for plot_id, entries in plots.items():
        for n, entry in enumerate(e for e in entries if e.get("type") == "vega"):
            spec = entry["content"]
            name = re.sub(r"[^A-Za-z0-9._-]+", "_", plot_id).strip("_") + (f"_{n}" if n else "")
            if fmt == "svg":
                data, mime = vlc.vegalite_to_svg(spec).encode(), "image/svg+xml"
            else:
                data, mime = vlc.vegalite_to_png(spec, scale=2), "image/png"
            path = out / f"{name}.{fmt}"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
            written.append(path)
            figures.append(
                f"<figure><figcaption>{html.escape(plot_id)}</figcaption>"
                f'<img src="data:{mime};base64,{base64.b64encode(data).decode()}"></figure>'
            )
    title = "charlm plots: " + (" vs ".join(revisions) if revisions else "workspace")
    write_text(
        out / "index.html",
        f"<!doctype html><meta charset=utf-8><title>{html.escape(title)}</title>"
        f"<h1>{html.escape(title)}</h1>\n" + "\n".join(figures) + "\n",
    )
    return written + [out / "index.html"]


def read_samples(rev: str | None) -> dict[str, str]:
    import dvc.api

    try:
        with dvc.api.open(SAMPLES_JSON, rev=rev) as f:
            return json.load(f)["samples"]
    except Exception as e:  # dvc raises many types: missing rev, missing cache, no remote
        raise CharlmError(
            f"cannot read {SAMPLES_JSON} at {rev or 'the workspace'} "
            f"({type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}); "
            f"check the name with `dvc exp show`, and `dvc pull` or `dvc exp pull` it"
        ) from None


def compare_samples(revisions: list[str]) -> str:
    """A Markdown table: one row per prompt @ temperature, one column per revision."""
    columns = {rev: read_samples(None if rev == "workspace" else rev) for rev in revisions}
    keys = list(dict.fromkeys(k for samples in columns.values() for k in samples))

    lines = ["| sample | " + " | ".join(revisions) + " |", "|---" * (len(revisions) + 1) + "|"]
    lines += [
        f"| {markdown_cell(k)} | " + " | ".join(markdown_cell(columns[r].get(k)) for r in revisions) + " |"
        for k in keys
    ]
    return "\n".join(lines) + "\n"
