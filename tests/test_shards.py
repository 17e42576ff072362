"""Shards without Ray: each shard runs through the local loop into its own file, and the
merged file equals the file one local run writes (datasets, attributes, values).

The Ray executor (tests/test_ray.py) adds workers, retries and resume on top of exactly
these pieces; here they run in-process, so a merge bug shows up in the fast tier.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
import shard_cases
from helpers import assert_same_output, one_torch_thread, write_yaml

import nnrun
from nnrun.executor import Shard, plan_shards, run_shard
from nnrun.executor._shards import clear_shards, finished, shard_dir, write_manifest
from nnrun.spec import check_spec
from nnrun.store._merge import FailedPoints, ShardPart, merge_shards


@pytest.fixture(autouse=True)
def _one_thread():
    with one_torch_thread():
        yield


def run_in_shards(spec: dict[str, Any], out: Path, size: int) -> list[Shard]:
    """Plan shards, run each in this process, merge them into `out`."""
    from nnrun._run import sweep_layout

    loaded = check_spec(spec)
    shards = plan_shards(loaded, workers=1, size=size)
    directory = shard_dir(out)
    for shard in shards:
        run_shard(loaded, shard, shard.file(directory))
    parts = [ShardPart(s.file(directory), s.points) for s in shards]
    merge_shards(parts, out, sweep=sweep_layout(loaded), attrs={"executor": "test"})
    return shards


@pytest.mark.parametrize("size", [1, 4])
def test_sweep_in_shards_equals_local_run(tiny_llama: Path, tmp_path: Path, size: int) -> None:
    spec = shard_cases.patching(tiny_llama)
    local = nnrun.run(spec, output=tmp_path / "local.h5").path
    shards = run_in_shards(spec, tmp_path / "merged.h5", size)
    assert len(shards) == (6 if size == 1 else 2)
    assert_same_output(local, tmp_path / "merged.h5")
    with h5py.File(tmp_path / "merged.h5") as f:
        assert f.attrs["status"] == "complete" and "shard" not in f.attrs
        assert f["sweep/status"][()].tolist() == [1] * 6


def test_generation_sweep_in_shards_equals_local_run(tiny_gpt2: Path, tmp_path: Path) -> None:
    spec = shard_cases.steering(tiny_gpt2)
    local = nnrun.run(spec, output=tmp_path / "local.h5").path
    run_in_shards(spec, tmp_path / "merged.h5", 1)
    assert_same_output(local, tmp_path / "merged.h5")


@pytest.mark.parametrize("generate", [False, True])
def test_prompt_file_windows_equal_local_run(
    tiny_llama: Path, tmp_path: Path, generate: bool
) -> None:
    spec = shard_cases.prompt_file(tiny_llama, tmp_path, generate=generate)
    local = nnrun.run(spec, output=tmp_path / "local.h5").path
    shards = run_in_shards(spec, tmp_path / "merged.h5", 3)
    # Windows are whole batches (batch_size 2): 3 -> 4 prompts, the last one short.
    assert [s.window for s in shards] == [(0, 4), (4, 8), (8, 11)]
    assert_same_output(local, tmp_path / "merged.h5")
    merged = nnrun.load(tmp_path / "merged.h5")
    assert merged.prompt_meta()["late"][6:8] == ["", "x7"]


def test_sweep_over_a_prompt_file_in_shards(tiny_llama: Path, tmp_path: Path) -> None:
    spec = shard_cases.sweep_over_file(tiny_llama, tmp_path)
    local = nnrun.run(spec, output=tmp_path / "local.h5").path
    run_in_shards(spec, tmp_path / "merged.h5", 1)
    assert_same_output(local, tmp_path / "merged.h5")


def test_inline_prompts_without_a_sweep_are_one_shard(tiny_llama: Path, tmp_path: Path) -> None:
    spec = shard_cases.patching(tiny_llama)
    del spec["sweep"]
    spec["edits"][0]["at"], spec["edits"][0]["tokens"] = "model.layers.1.output", 1
    spec["save"]["last"]["at"] = "model.layers.1.output"
    local = nnrun.run(spec, output=tmp_path / "local.h5").path
    assert run_in_shards(spec, tmp_path / "merged.h5", 1) == [Shard(0)]
    assert_same_output(local, tmp_path / "merged.h5")


def test_failed_shards_are_recorded_as_failed_points(tiny_llama: Path, tmp_path: Path) -> None:
    from nnrun._run import sweep_layout

    loaded = check_spec(shard_cases.patching(tiny_llama))
    shards = plan_shards(loaded, workers=1, size=2)
    directory = shard_dir(tmp_path / "out.h5")
    for shard in shards[:2]:
        run_shard(loaded, shard, shard.file(directory))
    parts = [ShardPart(s.file(directory), s.points) for s in shards[:2]]
    lost = FailedPoints(shards[2].points or (), "shard 2 failed 3 times: the worker died")
    merge_shards(parts, tmp_path / "out.h5", sweep=sweep_layout(loaded), attrs={}, failed=[lost])
    results = nnrun.load(tmp_path / "out.h5")
    assert results.failed_points() == {
        "layer=2, pos=1": "shard 2 failed 3 times: the worker died",
        "layer=2, pos=-1": "shard 2 failed 3 times: the worker died",
    }
    local = nnrun.run(loaded, output=tmp_path / "local.h5")
    np.testing.assert_allclose(results.metric("p")[:2], local.metric("p")[:2], rtol=1e-5)
    assert np.isnan(results.metric("p")[2]).all()  # layer 2: never written


def test_shard_plans(tiny_llama: Path, tmp_path: Path) -> None:
    sweep = check_spec(shard_cases.patching(tiny_llama))  # 6 points
    assert [s.points for s in plan_shards(sweep, workers=1)] == [(0, 1), (2, 3), (4, 5)]
    assert [s.points for s in plan_shards(sweep, workers=2)] == [(i,) for i in range(6)]
    assert [s.points for s in plan_shards(sweep, workers=1, size=4)] == [(0, 1, 2, 3), (4, 5)]
    assert plan_shards(sweep, workers=1, size=4)[1].label == "shard 1 (points 4..5)"
    big = shard_cases.patching(tiny_llama)
    big["sweep"]["pos"] = [1, 2, 3, -1]  # 3 x 4 = 12 points
    big = check_spec(big)
    assert len(plan_shards(big, workers=2)) == 6  # about four per worker (2 points each)
    assert len(plan_shards(big, workers=3)) == 12
    files = check_spec(shard_cases.prompt_file(tiny_llama, tmp_path))  # 11 prompts, batch 2
    assert [s.window for s in plan_shards(files, workers=1)] == [
        (0, 4),
        (4, 8),
        (8, 11),
    ]
    assert plan_shards(files, workers=1, size=1)[0].window == (0, 2)  # at least one batch
    assert plan_shards(files, workers=1, size=1)[1].label == "shard 1 (prompts 2..3)"
    with pytest.raises(nnrun.NnrunError, match="at least 1"):
        plan_shards(sweep, workers=1, size=0)


def test_shard_files_are_checked_and_cleared(tiny_llama: Path, tmp_path: Path) -> None:
    loaded = check_spec(shard_cases.patching(tiny_llama))
    directory = shard_dir(tmp_path / "out.h5")
    shard = plan_shards(loaded, workers=1, size=6)[0]
    assert not finished(shard.file(directory), loaded)
    write_manifest(directory, loaded, [shard])
    run_shard(loaded, shard, shard.file(directory))
    assert finished(shard.file(directory), loaded)
    other = check_spec({**shard_cases.patching(tiny_llama), "seed": 5})
    assert not finished(shard.file(directory), other)  # written for another spec
    keep = directory / "notes.txt"
    keep.write_text("mine")
    clear_shards(directory)
    assert sorted(p.name for p in directory.iterdir()) == ["notes.txt"]


def test_executor_ray_without_ray_says_how_to_install(
    tiny_llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "ray", None)  # as if not installed
    with pytest.raises(nnrun.NnrunError, match=r"pip install 'nnrun\[ray\]'"):
        nnrun.run(shard_cases.patching(tiny_llama), output=tmp_path / "x.h5", executor="ray")
    assert not (tmp_path / "x.h5").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--workers", "2"], "--workers only apply with --executor ray"),
        (["--address", "auto", "--gpus-per-worker", "1"], "--address, --gpus-per-worker only"),
        (["--executor", "dask"], "--executor 'dask': use local or ray"),
    ],
)
def test_cli_ray_options_need_the_ray_executor(
    tiny_llama: Path, tmp_path: Path, args: list[str], message: str
) -> None:
    from typer.testing import CliRunner

    from nnrun.cli import app

    spec = write_yaml(tmp_path / "s.yaml", shard_cases.patching(tiny_llama))
    result = CliRunner(env={"COLUMNS": "250"}).invoke(app, ["run", str(spec), *args])
    # main() prints an NnrunError as one line with exit 1; app raises it before any load
    assert isinstance(result.exception, nnrun.NnrunError), result.output
    assert message in str(result.exception)
    assert not (tmp_path / "runs").exists()


def test_the_file_comparison_sees_every_dataset(tiny_llama: Path, tmp_path: Path) -> None:
    """assert_same_output, which the shard, Ray and device-map tests rest on, fails on a
    changed value anywhere: in a packed save, a padded one, or a metric."""
    import shutil

    spec = shard_cases.patching(tiny_llama)
    local = tmp_path / "local.h5"
    nnrun.run(spec, output=local)
    assert_same_output(local, local)
    for name in ("saves/resid", "saves/last", "metrics/p"):  # packed, padded, a metric
        changed = tmp_path / f"{name.replace('/', '-')}.h5"
        shutil.copy(local, changed)
        with h5py.File(changed, "r+") as f:
            where = (0,) * f[name].ndim  # the first point's first value: a real one
            f[name][where] = f[name][where] + 1.0
        with pytest.raises(AssertionError, match=name):
            assert_same_output(local, changed)
