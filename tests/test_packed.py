"""The packed layout of ragged saves and the lazy reader.

A save over `tokens: all` (or a slice) stores only real tokens on one flat axis, with
per-prompt offsets and lengths; the reader gives back the padded view, equal to what
`layout: padded` stores, and reads only the rows asked for.
"""

from __future__ import annotations

import json
import os
import pickle
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
import torch
from helpers import one_torch_thread, write_jsonl

import nnrun
from nnrun.models import load_model

PROMPTS = {
    "a": "The capital of France is",
    "b": "Hi",
    "c": "When Mary and John went to the store, John gave a drink to Mary",
    "d": "The cat sat on the mat",
    "e": "One, two, three",
    "f": "The Eiffel Tower is in the city of Paris",
}


@pytest.fixture(autouse=True)
def _one_torch_thread() -> Iterator[None]:
    with one_torch_thread():
        yield


def _spec(model: Path, **extra: Any) -> dict[str, Any]:
    save = {
        "packed": {"at": "transformer.h.*.output"},  # tokens: all -> packed by default
        "padded": {"at": "transformer.h.*.output", "layout": "padded"},
        "mid": {"at": "transformer.h.1.mlp.c_proj.input", "tokens": "1:4"},
        "mid_padded": {
            "at": "transformer.h.1.mlp.c_proj.input",
            "tokens": "1:4",
            "layout": "padded",
        },
        "top": {"at": "output", "tokens": "all", "apply": [{"topk": 3}]},
        "top_padded": {"at": "output", "tokens": "all", "apply": [{"topk": 3}], "layout": "padded"},
        "last": {"at": "output", "tokens": -1},  # a fixed selection: padded, already exact
    }
    return {
        "nnrun": 1,
        "model": {"path": str(model)},
        "batch_size": 4,
        "prompts": PROMPTS,
        "save": save,
        **extra,
    }


def _equal(a: Any, b: Any) -> None:
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # NaN equals NaN here


PAIRS = (
    ("packed", "padded"),
    ("mid", "mid_padded"),
    ("top", "top_padded"),
    ("top.indices", "top_padded.indices"),
)


def _check_pairs(results: nnrun.Results, path: Path, pairs: Any = PAIRS) -> None:
    """Packed saves round-trip exactly and read back as the padded layout."""
    with h5py.File(path) as f:
        for packed, padded in pairs:
            stored = f["saves"][packed]
            assert stored.attrs["layout"] == "packed", packed
            assert f["saves"][padded].attrs["layout"] == "padded", padded
            # The padded view: axes, shape, values and lengths all as the padded layout.
            assert results.axes(packed) == results.axes(padded)
            assert results[packed].shape == results[padded].shape
            _equal(results.array(packed), f["saves"][padded][()])
            _equal(results.lengths(packed.split(".")[0]), results.lengths(padded.split(".")[0]))
            # Stored: exactly the real tokens, each unit's at its offset, nothing else.
            values, offsets, lengths = results.packed(packed)
            _equal(values, stored[()])
            # Each prompt's tokens (per point and step) as the padded layout has them,
            # packed by the reader; the flat order may differ (rows land as they run).
            again = results.packed(padded)
            sweep = results.axes(packed).index("prompt")
            _equal(lengths, again[2])
            assert _units(values, offsets, lengths, sweep) == _units(*again, sweep)
            per_point = lengths.reshape(int(np.prod(lengths.shape[:sweep])), -1).sum(axis=1)
            assert stored.shape[sweep] == per_point.max(), packed


def _units(values: np.ndarray, offsets: np.ndarray, lengths: np.ndarray, sweep: int) -> list[bytes]:
    """The stored bytes of every unit (point, prompt[, step]), in unit order; `sweep` is
    how many sweep axes lead."""
    out = []
    for unit in np.ndindex(*offsets.shape):
        start, n = int(offsets[unit]), int(lengths[unit])
        out.append(values[unit[:sweep]][start : start + n].tobytes())
    return out


def test_packed_saves_round_trip_and_read_back_as_the_padded_layout(
    tiny_gpt2: Path, tmp_path: Path
) -> None:
    out = tmp_path / "o.h5"
    results = nnrun.run(_spec(tiny_gpt2), output=out)
    _check_pairs(results, out)
    with h5py.File(out) as f:
        assert f["saves/last"].attrs["layout"] == "padded"
        stored = f["saves/packed"]
        lengths = f["axes/packed/length"][()]
        offsets = f["axes/packed/offset"][()]
        assert json.loads(stored.attrs["axes"]) == ["packed", "layer", "hidden"]
        assert stored.shape == (int(lengths.sum()), 3, 32)  # no padding at all
        assert offsets.tolist() == np.concatenate([[0], np.cumsum(lengths)[:-1]]).tolist()
        flat = stored[()]
    # The stored values are each prompt's own forward pass (a peer: plain transformers).
    loaded = load_model({"path": str(tiny_gpt2)})
    for i, text in enumerate(PROMPTS.values()):
        with torch.inference_mode():
            own = loaded.model(
                **loaded.tokenizer(text, return_tensors="pt"), output_hidden_states=True
            )
        rows = flat[offsets[i] : offsets[i] + lengths[i]]  # (tokens, layer, hidden)
        assert rows.shape[0] == len(loaded.tokenizer(text)["input_ids"])
        for layer in range(2):  # hidden_states[i + 1] is block i's output (the last is normed)
            torch.testing.assert_close(
                torch.from_numpy(rows[:, layer]),
                own.hidden_states[layer + 1][0],
                rtol=1e-4,
                atol=1e-5,
            )


def test_packed_generation_steps_and_sweeps(tiny_gpt2: Path, tmp_path: Path) -> None:
    generating = _spec(tiny_gpt2, generate={"max_new_tokens": 3})
    for name in ("top", "top_padded"):  # logits while generating: the last position only
        del generating["save"][name]
    out = tmp_path / "gen.h5"
    _check_pairs(nnrun.run(generating, output=out), out, PAIRS[:2])
    with h5py.File(out) as f:
        assert f["axes/packed/offset"].shape == (len(PROMPTS), 3)  # (prompt, step)
    swept = _spec(tiny_gpt2, sweep={"alpha": [0.0, 2.0]})
    swept["edits"] = [{"at": "transformer.h.0.output", "mul": "${alpha}", "prompts": ["a", "c"]}]
    out = tmp_path / "sweep.h5"
    results = nnrun.run(swept, output=out)
    _check_pairs(results, out)
    # Rows of one sweep point read alone equal that point in the whole view.
    _equal(results["packed"][1], results.array("packed")[1])
    _equal(results["packed"][0, 2:4], results.array("packed")[0, 2:4])


def test_streamed_prompt_file_stores_little_more_than_its_values(
    tiny_gpt2: Path, tmp_path: Path
) -> None:
    rng = np.random.default_rng(0)
    words = "the capital of france is paris and the cat sat on a mat when mary went".split()
    texts = [" ".join(rng.choice(words, size=rng.integers(2, 21))) for _ in range(300)]
    source = write_jsonl(tmp_path / "p.jsonl", [{"text": t} for t in texts])
    spec = _spec(tiny_gpt2, prompts={"file": str(source)}, batch_size=16)
    spec["save"] = {"packed": {"at": "transformer.h.*.output"}}
    out = tmp_path / "file.h5"
    results = nnrun.run(spec, output=out)
    padded = nnrun.run(
        {**spec, "save": {"padded": {**spec["save"]["packed"], "layout": "padded"}}},
        output=tmp_path / "padded.h5",
    )
    _equal(results.array("packed"), padded.array("padded"))
    lengths = results.lengths("packed")
    real = int(lengths.sum()) * 3 * 32 * 4  # tokens x layers x hidden x float32
    with h5py.File(out) as f:
        stored = f["saves/packed"].id.get_storage_size()
    assert real <= stored <= 1.1 * real + 64 * 1024, (stored, real)
    assert os.path.getsize(out) <= 1.1 * real + 256 * 1024  # prompts, ids, labels, metadata


def test_lazy_reads_read_only_the_rows_asked_for_and_once(
    tiny_gpt2: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "o.h5"
    nnrun.run(_spec(tiny_gpt2), output=out)
    whole = {name: nnrun.load(out).array(name) for name in ("packed", "padded", "last")}
    reads: list[tuple[str, Any]] = []
    getitem = h5py.Dataset.__getitem__

    def spy(self: h5py.Dataset, key: Any) -> Any:
        reads.append((self.name, key))
        return getitem(self, key)

    monkeypatch.setattr(h5py.Dataset, "__getitem__", spy)
    results = nnrun.load(out)
    for name in ("packed", "padded", "last"):
        view = results[name]
        assert isinstance(view, torch.Tensor) and view.shape == whole[name].shape
        reads.clear()
        _equal(view[3:5], whole[name][3:5])
        saved = [key for ds, key in reads if ds == f"/saves/{name}"]
        assert len(saved) == 1, reads
        if name == "packed":  # the flat range of prompts 3 and 4 only
            with h5py.File(out) as f:
                offsets, lengths = f["axes/packed/offset"][()], f["axes/packed/length"][()]
            assert saved[0] == (slice(int(offsets[3]), int(offsets[4] + lengths[4])),)
        else:
            assert saved[0] == (slice(3, 5),)
        reads.clear()
        _equal(view[3:5], whole[name][3:5])  # again: nothing read
        assert not [r for r in reads if r[0] == f"/saves/{name}"], reads
        _equal(results.array(name, prompt="d"), whole[name][3])
        _equal(results.array(name, prompt=["e", "d"]), whole[name][[4, 3]])
        reads.clear()
        _equal(results.array(name, prompt="d"), whole[name][3])  # again: nothing read
        assert not [r for r in reads if r[0] == f"/saves/{name}"], reads
        _equal(view[-1, 0], whole[name][-1, 0])
        _equal(view[[0, 2]], whole[name][[0, 2]])
        reads.clear()
        _equal(results[name].numpy(), whole[name])
        _equal(results.array(name), whole[name])  # read whole once, then kept
        assert len([r for r in reads if r[0] == f"/saves/{name}"]) <= 1, reads


def test_a_lazy_save_is_a_tensor_to_torch_and_numpy(tiny_gpt2: Path, tmp_path: Path) -> None:
    out = tmp_path / "o.h5"
    results = nnrun.run(_spec(tiny_gpt2), output=out)
    view, values = results["last"], torch.from_numpy(results.array("last"))
    assert isinstance(view, torch.Tensor) and view.dtype == torch.float32 and len(view) == 6
    torch.testing.assert_close(view, values)
    torch.testing.assert_close(torch.as_tensor(view), values)
    assert torch.equal(view + 1, values + 1) and torch.equal(view.float().mean(0), values.mean(0))
    assert [tuple(row.shape) for row in view] == [tuple(values[0].shape)] * 6
    assert dict(zip(results.prompt_ids("last"), view))["c"].shape == values[2].shape
    assert view.tolist() == values.tolist() and np.asarray(view).shape == tuple(values.shape)
    assert torch.equal(pickle.loads(pickle.dumps(view)), values)
    assert "tensor(" in repr(view)


def test_a_packed_save_is_a_file_operand_as_its_padded_view(
    tiny_gpt2: Path, tmp_path: Path
) -> None:
    text = PROMPTS["c"]
    source = tmp_path / "source.h5"
    spec = {"nnrun": 1, "model": {"path": str(tiny_gpt2)}, "prompts": {"v": text}}
    nnrun.run({**spec, "save": {"v": {"at": "transformer.h.0.output"}}}, output=source)
    with h5py.File(source) as f:
        assert f["saves/v"].attrs["layout"] == "packed" and f["saves/v"].ndim == 2
    vector = torch.from_numpy(nnrun.load(source).array("v"))  # (1, tokens, hidden)
    steer = {
        **spec,
        "prompts": {"x": text},
        "edits": [
            {"at": "transformer.h.1.output", "add": {"file": str(source), "dataset": "saves/v"}}
        ],
        "save": {
            "before": {"at": "transformer.h.1.output", "before_edits": True},
            "after": {"at": "transformer.h.1.output"},
        },
    }
    results = nnrun.run(steer, output=tmp_path / "o.h5")
    torch.testing.assert_close(results["after"].tensor(), results["before"].tensor() + vector)
