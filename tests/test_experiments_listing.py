"""charlm.pipeline.experiments without a repository: revision names, exp_show's values, DVCLive curve files."""
from __future__ import annotations

import pytest

from charlm.base.errors import CharlmError
from charlm.pipeline import experiments as ex


@pytest.mark.parametrize("name", ["main", "wide-lr", "v1.0", "a1b2c3d", "feature/x", "HEAD~1"])
def test_revision_names_pass(name):
    assert ex.check_rev(name) == name


@pytest.mark.parametrize("name", ["", "-h", "--output=/tmp/x", "a b", "a\nb", "a\x00", "x" * 201])
def test_revision_names_that_could_be_read_as_options_or_hold_control_characters_are_refused(name):
    with pytest.raises(CharlmError) as err:
        ex.check_rev(name)
    assert "\n" not in str(err.value)


def test_exp_show_values_become_plain_json():
    assert [ex._plain(v) for v in (512.0, 0.016, "True", "False", "None", "lstm", float("nan"), None)] == [
        512, 0.016, True, False, None, "lstm", None, None]  # fmt: skip


def test_curve_files_read_as_step_bpc_pairs():
    text = "step\tbpc\n5\t4.5\n10\t3.25\nbad\trow\n15\tnan\n"
    assert ex._read_curve(text) == [[5, 4.5], [10, 3.25]]


def test_a_folder_without_dvc_lists_only_the_files(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "model.pt").write_bytes(b"not read")  # not a repository: the workspace is not looked at
    catalog = ex.Catalog(["a.pt"])
    listing = catalog.listing()
    assert listing["repo"] is False and [m["id"] for m in listing["models"]] == ["file:0"]
    assert catalog.resolve("file:0").path.name == "a.pt"
    with pytest.raises(CharlmError):
        catalog.resolve("rev:main")
    assert ex.Catalog([]).listing()["hint"].startswith("No model: pass --model PATH")
