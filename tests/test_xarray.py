"""Output files as labelled arrays: xarray opens every spec's output as it is, and
Results.to_xarray labels a save's dimensions with prompt ids, layers and tokens."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import h5py
import numpy as np
import pytest
from helpers import one_torch_thread, write_jsonl

import nnrun

xr = pytest.importorskip("xarray")


@pytest.fixture(autouse=True)
def _one_torch_thread() -> Iterator[None]:
    with one_torch_thread():
        yield


def test_every_spec_output_opens_with_xarray(spec_outputs: dict[str, Path]) -> None:
    assert len(spec_outputs) >= 12
    for name, path in spec_outputs.items():
        results = nnrun.load(path)
        saves = xr.open_dataset(path, engine="h5netcdf", group="saves")
        assert set(saves.data_vars) == set(results), name
        for save in results:
            # The dimension names are the file's axis names (a size clash adds .<save>).
            dims = [d.split(".")[0].removesuffix("_axis") for d in saves[save].dims]
            with h5py.File(path, "r") as f:
                stored = f["saves"][save].attrs
                packed = stored["layout"] == "packed"
                axes = json.loads(stored["axes"])
            if packed:  # xarray sees the file as stored: real tokens on one packed axis
                assert axes[0] == "packed" and dims == axes, (name, save)
                np.testing.assert_array_equal(saves[save].values, results.packed(save)[0])
                continue
            assert dims == results.axes(save) == axes, (name, save)
            np.testing.assert_array_equal(saves[save].values, results.array(save))
        tree = xr.open_datatree(path, engine="h5netcdf")
        ids = tree["prompts"]["id"].values
        while ids.ndim > 1:  # a sweep records its prompts at every point
            ids = ids[0]
        assert list(ids) == list(results.prompts())
        if results.metric_names:
            metrics = xr.open_dataset(path, engine="h5netcdf", group="metrics")
            for metric in results.metric_names:
                dims = [d.split(".")[0].removesuffix("_axis") for d in metrics[metric].dims]
                assert dims == results.axes(metric), (name, metric)
                np.testing.assert_array_equal(metrics[metric].values, results.metric(metric))
        for save in results:
            if (sub := results.axes(save)) and "prompt" in sub and save in tree["axes"].children:
                assert list(tree["axes"][save]["prompt"].values) == results.prompt_ids(save)


def test_dimension_names_clash_gets_the_save_name(spec_outputs: dict[str, Path]) -> None:
    # steering-source saves three prompts each in love and hate and one row in vector.
    saves = xr.open_dataset(spec_outputs["steering-source"], engine="h5netcdf", group="saves")
    assert saves["vector"].dims[0] != saves["love"].dims[0]
    assert saves.sizes[saves["vector"].dims[0]] == 1


def test_to_xarray_labels(spec_outputs: dict[str, Path], tiny_llama: Path) -> None:
    from transformers import AutoTokenizer

    results = nnrun.load(spec_outputs["demo"])
    resid = results.to_xarray("resid")
    assert resid.dims == ("prompt", "layer", "token", "hidden")
    assert list(resid["prompt"].values) == ["france", "germany"]
    assert all(type(p) is str for p in resid["prompt"].values.tolist())  # str, not bytes
    assert resid["layer"].values.tolist() == [0, 1, 2]
    assert resid["site"].values.tolist() == [f"model.layers.{i}.output" for i in range(3)]
    assert resid["token"].values.tolist() == [-1]
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    prompts = results.prompts()
    for row, prompt in enumerate(resid["prompt"].values):
        ids = tok(prompts[prompt])["input_ids"]
        assert resid["position"].values[row].tolist() == [len(ids) - 1]
        assert resid["token_str"].values[row].tolist() == [tok.decode([ids[-1]])]
    np.testing.assert_array_equal(resid.values, results.array("resid"))
    # Selecting by label works as in any xarray workflow.
    np.testing.assert_array_equal(
        resid.sel(prompt="germany", layer=2).values, results.array("resid")[1, 2]
    )


def test_to_xarray_ragged_tokens(spec_outputs: dict[str, Path]) -> None:
    results = nnrun.load(spec_outputs["nnsight-setting"])
    name = next(n for n in results if results.lengths(n) is not None)
    da = results.to_xarray(name)
    lengths = results.lengths(name)
    assert da["length"].values.tolist() == lengths.tolist()
    for row, n in enumerate(lengths):
        assert da["position"].values[row, :n].tolist() == list(range(n))
        assert all(s for s in da["token_str"].values[row, :n])


def test_layer_labels_come_back_as_str(spec_outputs: dict[str, Path]) -> None:
    results = nnrun.load(spec_outputs["logit-lens"])
    labels = results.labels("lens", "layer")
    assert labels == [f"model.layers.{i}.output" for i in range(3)]
    with h5py.File(spec_outputs["logit-lens"]) as f:
        assert isinstance(f["axes/lens/layer"][0], bytes)  # what plain h5py gives


def test_prompt_meta_from_jsonl(tiny_llama: Path, tmp_path: Path) -> None:
    records = [
        {"text": "The capital of France is", "answer": " Paris", "label": 1, "score": 0.5},
        {"text": "The capital of Germany is", "answer": " Berlin", "label": 0},
        {"text": "The capital of Italy is", "answer": " Rome", "label": 1, "tags": ["x"]},
    ]
    prompts = write_jsonl(tmp_path / "p.jsonl", records)
    spec = {
        "nnrun": 1,
        "model": {"path": str(tiny_llama)},
        "batch_size": 2,
        "prompts": {"file": str(prompts)},
        "save": {"logits": {"at": "output", "tokens": -1}},
    }
    results = nnrun.run(spec, output=tmp_path / "out.h5")
    meta = results.prompt_meta()
    assert meta["answer"] == [" Paris", " Berlin", " Rome"]
    assert meta["label"] == [1, 0, 1]
    assert meta["score"][0] == 0.5 and np.isnan(meta["score"][1])
    assert meta["tags"] == [None, None, ["x"]]
    assert "text" not in meta
    tree = xr.open_datatree(tmp_path / "out.h5", engine="h5netcdf")
    assert tree["prompts/meta"]["answer"].values.tolist() == meta["answer"]


def test_netcdf_dimensions_follow_a_file_that_grew(spec_outputs: dict[str, Path], tmp_path) -> None:
    # A resumed run reopens its file and closes it again: the dimensions are redone.
    import shutil

    from nnrun.store._netcdf import add_netcdf_dimensions

    path = tmp_path / "grown.h5"
    shutil.copy(spec_outputs["demo"], path)
    with h5py.File(path, "a") as f:
        ids = f["prompts/input_ids"]
        width = ids.shape[1]
        ids.resize(width + 3, axis=1)  # a longer prompt arrived
        add_netcdf_dimensions(f)
        assert not f.attrs.get("netcdf_error")
    tree = xr.open_datatree(path, engine="h5netcdf")
    assert tree["prompts"]["input_ids"].shape == (2, width + 3)
    saves = xr.open_dataset(path, engine="h5netcdf", group="saves")
    assert saves["logits"].shape[0] == 2 and saves["resid"].shape[0] == 2
    assert saves["resid"].dims[0] == "prompt"
