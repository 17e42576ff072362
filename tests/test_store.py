"""The HDF5 output file, read back with plain h5py: provenance, prompts, save layout
and axis names, ragged padding, topk companions, and atomic writing."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
import torch
import transformers
import yaml
from helpers import REPO, h5_str, one_torch_thread, write_jsonl

import nnrun
from nnrun.errors import OutputError, RunError
from nnrun.models import load_model


@pytest.fixture(autouse=True)
def _one_torch_thread() -> Iterator[None]:
    with one_torch_thread():
        yield


FRANCE = "The capital of France is"
LONG = "The quick brown fox jumps over the lazy dog. The sun rises in the east"
PROMPTS = {"b": "Hi there", "a": FRANCE, "c": LONG}  # batch 1: b, a; batch 2: c (wider)
LAYERS = [f"model.layers.{i}.output" for i in range(3)]


@pytest.fixture(scope="module")
def complete(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One complete run on the tiny Llama with every kind of save, run from the repo root."""
    spec = {
        "nnrun": 1,
        "name": "store-test",
        "model": {"path": str(tiny_llama)},
        "seed": 7,
        "batch_size": 3,  # overridden to 2 below
        "prompts": PROMPTS,
        "save": {
            # tokens: all -> ragged; padded here, to check that layout (test_packed.py
            # checks the packed one, the default for ragged tokens, against it)
            "resid": {"at": "model.layers.*.output", "layout": "padded"},
            "last": {"at": "output", "prompts": ["c", "b"], "tokens": -1},
            "mid": {
                "at": "model.layers.1.mlp.down_proj.input",
                "tokens": "1:4",
                "layout": "padded",
            },
            "probs": {
                "at": "model.layers.*.output",
                "tokens": [-1],
                "apply": ["model.norm", "lm_head", "softmax"],
            },
            "lens": {
                "at": "model.layers.*.output",
                "tokens": [-1],
                "apply": ["model.norm", "lm_head", "softmax", {"topk": 3}],
            },
        },
    }
    out = tmp_path_factory.mktemp("store") / "complete.h5"
    cwd = os.getcwd()
    os.chdir(REPO)  # provenance records the git commit of the working directory
    try:
        start = datetime.now(timezone.utc).replace(microsecond=0)
        results = nnrun.run(spec, overrides=["batch_size=2"], output=out)
        end = datetime.now(timezone.utc)
    finally:
        os.chdir(cwd)
    loaded = load_model({"path": str(tiny_llama)})
    return {
        "spec": spec,
        "out": out,
        "results": results,
        "start": start,
        "end": end,
        "model": loaded,
    }


def _attrs(path: Path) -> dict[str, Any]:
    with h5py.File(path, "r") as f:
        return {k: h5_str(v) for k, v in f.attrs.items()}


# -- provenance --------------------------------------------------------------------------


def test_root_attributes(complete: dict[str, Any], tiny_llama: Path) -> None:
    attrs = _attrs(complete["out"])
    assert attrs["status"] == "complete"
    assert "error" not in attrs
    assert attrs["format"] == 1
    assert attrs["nnrun_version"] == nnrun.__version__
    spec_text = attrs["spec"]
    assert attrs["spec_sha256"] == hashlib.sha256(spec_text.encode()).hexdigest()
    resolved = yaml.safe_load(spec_text)  # the resolved spec: defaults filled in
    assert resolved["name"] == "store-test" and resolved["seed"] == 7
    assert resolved["batch_size"] == 2  # the override, not the file's 3
    assert resolved["prompts"] == PROMPTS
    assert resolved["save"]["resid"]["tokens"] == "all"
    assert attrs["seed"] == 7
    assert attrs["model_name"] == str(tiny_llama)
    assert attrs["model_source"] == "path"
    assert attrs["model_dtype"] == "float32"
    info = complete["model"].info
    assert attrs["model_config_sha256"] == info.config_sha256
    assert attrs["model_weights_files_sha256"] == info.weights_files_sha256
    assert len(info.config_sha256) == 64 and len(info.weights_files_sha256) == 64
    assert attrs["torch_version"] == torch.__version__
    assert attrs["transformers_version"] == transformers.__version__
    assert attrs["python_version"] == platform.python_version()
    assert attrs["device"] == "cpu"
    head = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.strip()
    assert attrs["git_commit"] == head
    started = datetime.fromisoformat(attrs["started_utc"])
    finished = datetime.fromisoformat(attrs["finished_utc"])
    assert started.utcoffset() is not None and started.utcoffset().total_seconds() == 0
    assert finished.utcoffset() is not None and finished.utcoffset().total_seconds() == 0
    assert complete["start"] <= started <= finished <= complete["end"]
    assert attrs["prompt_count"] == 3


def test_prompts_group_holds_the_tokenizers_ids(complete: dict[str, Any]) -> None:
    tokenizer = complete["model"].tokenizer
    wanted = [tokenizer(text)["input_ids"] for text in PROMPTS.values()]
    assert all(ids[0] == tokenizer.bos_token_id for ids in wanted)  # special tokens included
    with h5py.File(complete["out"], "r") as f:
        assert h5_str(f["prompts/id"][()]) == list(PROMPTS)
        assert h5_str(f["prompts/text"][()]) == list(PROMPTS.values())
        assert f["prompts/length"][()].tolist() == [len(ids) for ids in wanted]
        input_ids = f["prompts/input_ids"][()]
    assert input_ids.shape == (3, max(len(ids) for ids in wanted))
    for row, ids in zip(input_ids, wanted):
        assert row[: len(ids)].tolist() == ids
        assert (row[len(ids) :] == -1).all()


# -- saves ----------------------------------------------------------------------------------


def test_layered_ragged_save_axes_scales_and_padding(complete: dict[str, Any]) -> None:
    tokenizer, model = complete["model"].tokenizer, complete["model"].model
    lengths = [len(tokenizer(t)["input_ids"]) for t in PROMPTS.values()]
    with h5py.File(complete["out"], "r") as f:
        ds = f["saves/resid"]
        axes = ["prompt", "layer", "token", "hidden"]
        assert json.loads(ds.attrs["axes"]) == axes
        assert [d.label for d in ds.dims] == axes
        assert ds.shape == (3, 3, max(lengths), 32)
        assert h5_str(f["axes/resid/prompt"][()]) == list(PROMPTS)
        assert h5_str(f["axes/resid/layer"][()]) == LAYERS
        assert f["axes/resid/length"][()].tolist() == lengths
        # the prompt and layer axes carry those datasets as HDF5 dimension scales
        assert h5_str(ds.dims[0][0][()]) == list(PROMPTS)
        assert h5_str(ds.dims[1][0][()]) == LAYERS
        data = ds[()]
    for row, (text, n) in enumerate(zip(PROMPTS.values(), lengths)):
        assert np.isfinite(data[row, :, :n]).all()
        assert np.isnan(data[row, :, n:]).all()  # padding, also for rows written narrower
        with torch.inference_mode():
            own = model(**tokenizer(text, return_tensors="pt"), output_hidden_states=True)
        for layer in (0, 1):  # hidden_states[i + 1] is layer i's output (the last is normed)
            torch.testing.assert_close(
                torch.from_numpy(data[row, layer, :n]),
                own.hidden_states[layer + 1][0],
                rtol=1e-4,
                atol=1e-5,
            )


def test_save_on_a_subset_of_prompts(complete: dict[str, Any]) -> None:
    tokenizer, model = complete["model"].tokenizer, complete["model"].model
    with h5py.File(complete["out"], "r") as f:
        ds = f["saves/last"]
        assert json.loads(ds.attrs["axes"]) == ["prompt", "token", "vocab"]
        assert [d.label for d in ds.dims] == ["prompt", "token", "vocab"]
        rows = h5_str(f["axes/last/prompt"][()])
        assert sorted(rows) == ["b", "c"]
        assert "length" not in f["axes/last"]  # one fixed position: not ragged
        data = ds[()]
    assert data.shape == (2, 1, len(tokenizer))
    for row, prompt_id in enumerate(rows):  # each row holds the prompt its label names
        with torch.inference_mode():
            own = model(**tokenizer(PROMPTS[prompt_id], return_tensors="pt")).logits[0, -1]
        torch.testing.assert_close(torch.from_numpy(data[row, 0]), own, rtol=1e-4, atol=1e-5)


def test_ragged_slice_at_an_input_port(complete: dict[str, Any]) -> None:
    tokenizer = complete["model"].tokenizer
    lengths = [len(tokenizer(t)["input_ids"]) for t in PROMPTS.values()]
    with h5py.File(complete["out"], "r") as f:
        ds = f["saves/mid"]
        axes = json.loads(ds.attrs["axes"])
        assert axes[:2] == ["prompt", "token"] and len(axes) == 3
        assert [d.label for d in ds.dims] == axes
        counts = f["axes/mid/length"][()].tolist()
        data = ds[()]
    assert counts == [min(n, 4) - 1 for n in lengths]  # tokens 1:4 of each prompt
    assert data.shape == (3, 3, 64)  # llama intermediate size 64
    for row, n in enumerate(counts):
        assert np.isfinite(data[row, :n]).all() and np.isnan(data[row, n:]).all()


def test_topk_gives_values_and_indices(complete: dict[str, Any]) -> None:
    with h5py.File(complete["out"], "r") as f:
        values, indices, probs = f["saves/lens"], f["saves/lens.indices"], f["saves/probs"]
        for ds in (values, indices):
            assert json.loads(ds.attrs["axes"]) == ["prompt", "layer", "token", "k"]
            assert [d.label for d in ds.dims] == ["prompt", "layer", "token", "k"]
            assert ds.shape == (3, 3, 1, 3)
        assert values.dtype == np.float32 and indices.dtype == np.int64
        values, indices, probs = values[()], indices[()], probs[()]
        assert h5_str(f["axes/lens/prompt"][()]) == list(PROMPTS)
    assert probs.shape == (3, 3, 1, 512)
    np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-5)
    top = torch.from_numpy(probs).topk(3, dim=-1)
    torch.testing.assert_close(torch.from_numpy(values), top.values, rtol=1e-5, atol=1e-7)
    assert indices.tolist() == top.indices.tolist()
    assert (np.diff(values, axis=-1) <= 0).all()


def test_reader_agrees_with_the_file(complete: dict[str, Any]) -> None:
    results = nnrun.load(complete["out"])
    assert results.status == "complete"
    assert sorted(results) == ["last", "lens", "lens.indices", "mid", "probs", "resid"]
    assert results.axes("resid") == ["prompt", "layer", "token", "hidden"]
    assert results.prompt_ids("resid") == list(PROMPTS)
    with h5py.File(complete["out"], "r") as f:
        np.testing.assert_array_equal(results.array("resid"), f["saves/resid"][()])
        np.testing.assert_array_equal(results.lengths("resid"), f["axes/resid/length"][()])


# -- atomic output ---------------------------------------------------------------------


def _gpt2_spec(model: Path, prompts: Any, **save: Any) -> dict[str, Any]:
    return {
        "nnrun": 1,
        "model": {"path": str(model)},
        "batch_size": 2,
        "prompts": prompts,
        "save": {"x": {"at": "transformer.h.*.output", **save}},
    }


def test_failure_in_a_streamed_later_batch_leaves_only_a_partial_file(
    tiny_gpt2: Path, tmp_path: Path
) -> None:
    source = write_jsonl(
        tmp_path / "p.jsonl",
        [{"text": LONG}, {"text": FRANCE}, {"text": "Hi"}, {"text": FRANCE}],
    )
    out = tmp_path / "runs" / "stream.h5"
    spec = _gpt2_spec(tiny_gpt2, {"file": str(source)}, tokens=[4])
    with pytest.raises(RunError) as caught:
        nnrun.run(spec, output=out)
    assert "save 'x'" in str(caught.value) and "'2'" in str(caught.value)  # names the prompt
    assert not out.exists()
    partial = out.with_name("stream.partial.h5")
    attrs = _attrs(partial)
    assert attrs["status"] == "partial"
    assert attrs["error"].startswith("RunError") and "beyond" in attrs["error"]
    with h5py.File(partial, "r") as f:  # the first micro-batch was written before the error
        assert h5_str(f["prompts/id"][()]) == ["0", "1"]
        assert f["saves/x"].shape == (2, 3, 1, 32)


def test_interrupt_keeps_the_earlier_complete_output(tiny_gpt2: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.h5"
    partial = tmp_path / "out.partial.h5"
    nnrun.run(_gpt2_spec(tiny_gpt2, [FRANCE], tokens=[-1]), output=out)
    earlier = out.read_bytes()
    assert _attrs(out)["status"] == "complete" and not partial.exists()

    def interrupt(state: nnrun.RunProgress) -> None:
        if state.stage == "running" and state.rows_done >= 1:
            raise KeyboardInterrupt

    spec = {**_gpt2_spec(tiny_gpt2, [FRANCE, LONG, "Hi"], tokens=[-1]), "batch_size": 1}
    with pytest.raises(OutputError, match="already exists; pass --overwrite"):
        nnrun.run(spec, output=out)  # never replaced without being asked
    with pytest.raises(KeyboardInterrupt):
        nnrun.run(spec, output=out, progress=interrupt, overwrite=True)
    assert out.read_bytes() == earlier  # the failed rerun did not touch the complete file
    attrs = _attrs(partial)
    assert attrs["status"] == "partial" and attrs["error"].startswith("KeyboardInterrupt")
    with h5py.File(partial, "r") as f:
        # The prompt axis is laid out in full; rows never reached stay empty.
        assert h5_str(f["prompts/id"][()]) == ["p0", "", ""]

    nnrun.run(spec, output=out, overwrite=True)  # a successful rerun replaces both
    assert not partial.exists()
    assert _attrs(out)["status"] == "complete"
    with h5py.File(out, "r") as f:
        assert h5_str(f["prompts/id"][()]) == ["p0", "p1", "p2"]


def test_inline_token_beyond_a_prompt_fails_before_any_file(
    tiny_gpt2: Path, tmp_path: Path
) -> None:
    out = tmp_path / "never.h5"
    spec = _gpt2_spec(tiny_gpt2, {"long": LONG, "tiny": "Hi"}, tokens=[5])
    with pytest.raises(RunError, match=r"save 'x'.*'tiny'"):
        nnrun.run(spec, output=out)
    assert sorted(p.name for p in tmp_path.iterdir()) == []
