"""`nnrun diff` and `nnrun.diff`: dataset-by-dataset comparison of two output files.

Files come from real runs on the tiny GPT-2, then are changed with plain h5py; every
number the report gives (max abs/rel difference, worst index, count) is checked
against numpy computing the same thing independently.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
from helpers import NNRUN, one_torch_thread
from typer.testing import CliRunner

import nnrun
from nnrun.cli import app
from nnrun.store import _diff

runner = CliRunner(env={"COLUMNS": "250"})


@pytest.fixture(autouse=True)
def _one_torch_thread() -> Iterator[None]:
    with one_torch_thread():
        yield


def _spec(model: Path) -> dict[str, Any]:
    return {
        "nnrun": 1,
        "model": {"path": str(model)},
        "seed": 3,
        "prompts": {"a": "The capital of France is", "b": "Hi there"},
        "save": {
            # ragged, padded: NaN padding for b (packed saves diff as stored, too)
            "resid": {"at": "transformer.h.*.output", "layout": "padded"},
            "logits": {"at": "output", "tokens": -1},
            "top": {"at": "output", "tokens": -1, "apply": [{"topk": 3}]},
        },
        "edits": [{"at": "transformer.h.1.output", "noise": {"std": 0.5}}],  # seeded
        "generate": {"max_new_tokens": 2, "do_sample": True},  # seeded sampling
    }


@pytest.fixture(scope="module")
def pair(tiny_gpt2: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The same spec run twice into two files (seeded noise and sampling included)."""
    base = tmp_path_factory.mktemp("diff")
    with one_torch_thread():
        nnrun.run(_spec(tiny_gpt2), output=base / "a.h5")
        nnrun.run(_spec(tiny_gpt2), output=base / "b.h5")
    return base / "a.h5", base / "b.h5"


@pytest.fixture
def files(pair: tuple[Path, Path], tmp_path: Path) -> tuple[Path, Path]:
    """Fresh copies to change."""
    a, b = tmp_path / "a.h5", tmp_path / "b.h5"
    shutil.copy(pair[0], a)
    shutil.copy(pair[1], b)
    return a, b


def _row(report: Any, name: str) -> Any:
    return next(d for d in report.datasets if d.name == name)


def test_two_runs_are_equal_and_provenance_is_only_listed(files: tuple[Path, Path]) -> None:
    a, b = files
    report = nnrun.diff(a, b)
    assert report.equal and report.exit_code == 0
    names = {d.name for d in report.datasets}
    # Every group is covered: saves (and a companion), prompts, generation, axes.
    for expected in (
        "/saves/resid",
        "/saves/top.indices",
        "/prompts/text",
        "/prompts/input_ids",
        "/generation/ids",
        "/generation/text",
        "/axes/resid/prompt",
        "/axes/resid/length",
    ):
        assert expected in names
    assert all(d.verdict == "equal" for d in report.datasets)
    # The stored specs differ in their output (-o is recorded): listed, never failing.
    spec = next(p for p in report.provenance if p.key == "spec")
    assert "\noutput: " in spec.a and spec.a.split("\noutput: ")[1].split("\n")[0].endswith("a.h5")
    assert spec.b.split("\noutput: ")[1].split("\n")[0].endswith("b.h5")
    with h5py.File(a, "r") as f:
        assert np.isnan(f["saves/resid"][1]).any()  # NaN padding compared as equal


def test_a_changed_value_fails_with_its_dataset_index_and_size(files: tuple[Path, Path]) -> None:
    a, b = files
    with h5py.File(b, "r+") as f:
        f["saves/resid"][0, 2, 0, 3, 7] += 0.25  # (prompt, layer, step, token, hidden)
        f["saves/resid"][1, 0, 0, 0, 1] += 0.125
        expected = f["saves/resid"][()]
    with h5py.File(a, "r") as f:
        original = f["saves/resid"][()]
    report = nnrun.diff(a, b)
    row = _row(report, "/saves/resid")
    assert not report.equal and report.exit_code == 1
    assert row.verdict == "values differ" and row.differing == 2
    # numpy as the oracle for the worst element and the largest differences
    delta = np.abs(np.nan_to_num(original) - np.nan_to_num(expected))
    worst = np.unravel_index(np.argmax(delta), delta.shape)
    assert row.worst == tuple(int(i) for i in worst) == (0, 2, 0, 3, 7)
    assert row.max_abs == pytest.approx(delta.max(), rel=1e-6)
    with np.errstate(divide="ignore", invalid="ignore"):
        rel = np.where(delta == 0, 0, delta / np.abs(np.nan_to_num(expected)))
    assert row.max_rel == pytest.approx(np.nanmax(rel), rel=1e-6)
    assert [d.name for d in report.datasets if not d.ok] == ["/saves/resid"]
    # Within tolerance when atol covers the change.
    loose = nnrun.diff(a, b, atol=0.3)
    assert loose.equal and _row(loose, "/saves/resid").verdict == "within tolerance"
    assert nnrun.diff(a, b, atol=0.2).exit_code == 1


def test_rtol_is_relative_to_b(files: tuple[Path, Path]) -> None:
    a, b = files
    with h5py.File(b, "r+") as f:
        value = float(f["saves/logits"][0, 0, 0, 5])
        f["saves/logits"][0, 0, 0, 5] = value * (1 + 1e-3)
    assert nnrun.diff(a, b, rtol=2e-3).equal
    assert not nnrun.diff(a, b, rtol=5e-4).equal


def test_texts_and_token_ids_must_match_exactly(files: tuple[Path, Path]) -> None:
    a, b = files
    with h5py.File(b, "r+") as f:
        f["prompts/text"][1] = "Hi there!"
        f["generation/ids"][0, 0] += 1
    report = nnrun.diff(a, b, rtol=1.0, atol=1e9)  # tolerances never excuse ids or texts
    text = _row(report, "/prompts/text")
    assert text.verdict == "values differ" and text.worst == (1,)
    assert text.a_value == "'Hi there'" and text.b_value == "'Hi there!'"
    ids = _row(report, "/generation/ids")
    assert ids.verdict == "values differ" and ids.worst == (0, 0) and ids.differing == 1
    assert report.exit_code == 1


def test_nan_on_one_side_shape_dtype_and_missing_datasets(files: tuple[Path, Path]) -> None:
    a, b = files
    with h5py.File(b, "r+") as f:
        f["saves/logits"][1, 0, 0, 0] = np.nan
        data = f["saves/top"][()]
        del f["saves/top"]
        f["saves/top"] = data.astype(np.float64)  # same values, wider dtype
        del f["axes/resid/length"]
        f["extra"] = np.arange(3)
        f["saves/resid"].resize(1, axis=0)
    report = nnrun.diff(a, b)
    logits = _row(report, "/saves/logits")
    assert logits.verdict == "values differ" and logits.max_abs == float("inf")
    assert logits.worst == (1, 0, 0, 0) and logits.b_value == "nan"
    assert _row(report, "/saves/top").verdict == "dtype differs"
    assert _row(report, "/axes/resid/length").verdict == "only in A"
    assert _row(report, "/extra").verdict == "only in B"
    resid = _row(report, "/saves/resid")
    assert resid.verdict == "shape differs" and resid.shape[0] == 2 and resid.shape_b[0] == 1


def test_new_groups_are_compared_without_changes(files: tuple[Path, Path]) -> None:
    """Groups a later nnrun adds (metrics, sweep coordinates) are datasets like any other."""
    a, b = files
    for path, value in ((a, 0.5), (b, 0.75)):
        with h5py.File(path, "r+") as f:
            f["metrics/p_paris"] = np.array([value, 0.1])
            f["sweep/layer"] = np.arange(4)
            f["axes/p_paris/layer"] = np.arange(4)
    report = nnrun.diff(a, b)
    assert _row(report, "/metrics/p_paris").verdict == "values differ"
    assert _row(report, "/sweep/layer").verdict == "equal"
    assert _row(report, "/axes/p_paris/layer").verdict == "equal"
    only = nnrun.diff(a, b, only=["p_paris"])
    assert {d.name for d in only.datasets} == {"/metrics/p_paris", "/axes/p_paris/layer"}
    assert nnrun.diff(a, b, only=["sweep"]).equal


def test_only_selects_saves_groups_and_paths(files: tuple[Path, Path]) -> None:
    a, b = files
    report = nnrun.diff(a, b, only=["top", "/prompts/text"])
    assert {d.name for d in report.datasets} == {
        "/saves/top",
        "/saves/top.indices",
        "/axes/top/prompt",
        "/axes/top/step",
        "/axes/top/token",
        "/axes/top/length",
        "/prompts/text",
    }
    with pytest.raises(_diff.UnreadableFile, match="matches no dataset"):
        nnrun.diff(a, b, only=["nope"])


def test_blocks_cover_big_datasets_and_find_the_global_worst_index(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Reading in blocks (here tiny ones) must give the numbers of a whole-array compare."""
    rng = np.random.default_rng(0)
    data = rng.standard_normal((5, 7, 11)).astype(np.float32)
    other = data.copy()
    other[3, 6, 9] += 2.0
    other[0, 1, 2] -= 0.5
    other[4, 0, 0] = np.inf
    data[4, 0, 0] = np.inf  # the same infinity on both sides is equal
    other[2, 2, 2] = data[2, 2, 2] = np.nan
    for path, values in ((tmp_path / "a.h5", data), (tmp_path / "b.h5", other)):
        with h5py.File(path, "w") as f:
            f["x"] = values
    for block in (1, 5, 13, 77, 1 << 22):
        monkeypatch.setattr(_diff, "_BLOCK", block)
        row = _row(nnrun.diff(tmp_path / "a.h5", tmp_path / "b.h5"), "/x")
        assert row.worst == (3, 6, 9), block
        assert row.max_abs == pytest.approx(2.0, rel=1e-6)
        assert row.differing == 2


def test_unreadable_input(tmp_path: Path, files: tuple[Path, Path]) -> None:
    a, _ = files
    (tmp_path / "junk.h5").write_bytes(b"not hdf5 at all")
    with pytest.raises(_diff.UnreadableFile, match="cannot read"):
        nnrun.diff(a, tmp_path / "junk.h5")
    with pytest.raises(_diff.UnreadableFile, match="does not exist"):
        nnrun.diff(a, tmp_path / "missing.h5")


def test_cli_table_json_and_exit_codes(files: tuple[Path, Path], tmp_path: Path) -> None:
    a, b = files
    same = runner.invoke(app, ["diff", str(a), str(b)])
    assert same.exit_code == 0, same.output
    assert "/saves/resid" in same.stdout and "equal" in same.stdout
    with h5py.File(b, "r+") as f:
        f["saves/logits"][0, 0, 0, 3] += 1.0
    changed = runner.invoke(app, ["diff", str(a), str(b)])
    assert changed.exit_code == 1
    line = next(x for x in changed.stdout.splitlines() if "/saves/logits" in x)
    assert "(0, 0, 0, 3)" in line and "values differ" in line and "1 of 2,048" in line
    assert "different: 1 of" in changed.stdout
    loose = runner.invoke(app, ["diff", str(a), str(b), "--atol", "2"])
    assert loose.exit_code == 0 and "within tolerance" in loose.stdout
    as_json = runner.invoke(app, ["diff", str(a), str(b), "--json"])
    assert as_json.exit_code == 1
    data = json.loads(as_json.stdout)
    assert data["equal"] is False and data["exit_code"] == 1
    bad = [d for d in data["datasets"] if d["verdict"] != "equal"]
    assert [(d["name"], d["worst"]) for d in bad] == [("/saves/logits", [0, 0, 0, 3])]
    (tmp_path / "junk.h5").write_text("junk")
    unreadable = runner.invoke(app, ["diff", str(a), str(tmp_path / "junk.h5")])
    assert unreadable.exit_code == 2 and "cannot read" in unreadable.output
    negative = runner.invoke(app, ["diff", str(a), str(b), "--rtol", "-1"])
    assert negative.exit_code == 2  # a usage error


def test_installed_executable_exit_codes(files: tuple[Path, Path]) -> None:
    a, b = files
    same = subprocess.run([NNRUN, "diff", a, b], capture_output=True, text=True, timeout=120)
    assert same.returncode == 0, same.stderr
    with h5py.File(b, "r+") as f:
        f["prompts/input_ids"][0, 0] = 7
    changed = subprocess.run(
        [NNRUN, "diff", a, b, "--only", "prompts"], capture_output=True, text=True, timeout=120
    )
    assert changed.returncode == 1
    assert "/prompts/input_ids" in changed.stdout and "Traceback" not in changed.stderr
