"""The hook engine: where hooks go and that they always come off, token positions
under padding, and streamed prompts in micro-batches with bounded memory."""

from __future__ import annotations

import gc
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import h5py
import pytest
import torch
from helpers import assert_no_hooks, h5_str, hooks_by_module, one_torch_thread, write_jsonl

import nnrun
from nnrun.compile import compile_plan
from nnrun.engine import BatchResult, Engine
from nnrun.engine._select import _CACHED_INDICES
from nnrun.errors import RunError
from nnrun.models import load_model
from nnrun.spec import check_spec
from nnrun.store import _writer
from nnrun.store._background import HANDOVER_ROWS, QUEUE_DEPTH


@pytest.fixture(autouse=True)
def _one_torch_thread() -> Iterator[None]:
    with one_torch_thread():
        yield


FRANCE = "The capital of France is"
LONG = "The quick brown fox jumps over the lazy dog. The sun rises in the east and sets in the west"
SHORT = "Hi"

# kind -> (model keys, layer wildcard)
MODELS = {
    "gpt2": ({}, "transformer.h.*.output"),
    "llama": ({}, "model.layers.*.output"),
    "bert": ({"class": "AutoModel"}, "encoder.layer.*.output"),
}


@pytest.fixture(scope="module")
def llama(tiny_llama: Path) -> Any:
    return load_model({"path": str(tiny_llama)})


def _compile(spec: dict[str, Any], loaded: Any):
    return compile_plan(check_spec(spec), loaded.model)


def _collect(results: list[BatchResult]) -> dict[str, dict[str, torch.Tensor]]:
    """save -> prompt id -> that prompt's row, over every micro-batch."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    for result in results:
        for name, save in result.saves.items():
            for prompt_id, row in zip(save.prompt_ids, save.data):
                out.setdefault(name, {})[prompt_id] = row
    return out


# -- hooks ---------------------------------------------------------------------------


def test_hooks_only_on_planned_modules_and_removed_after_run(llama: Any, tiny_llama: Path) -> None:
    spec = {
        "nnrun": 1,
        "model": {"path": str(tiny_llama)},
        "batch_size": 1,
        "prompts": {"a": FRANCE, "b": SHORT},
        "save": {
            "resid": {"at": "model.layers.*.output", "tokens": [-1]},
            "logits": {"at": "output", "tokens": -1},
        },
        "edits": [{"at": "model.layers.1.mlp.down_proj.input", "mul": 0.5}],
    }
    plan = _compile(spec, llama)
    assert_no_hooks(llama.model)  # compiling (its probe pass) leaves nothing behind
    assert set(plan.modules) == {
        "model.layers.0",
        "model.layers.1",
        "model.layers.2",
        "model.layers.1.mlp.down_proj",
        "",
    }

    run = Engine(plan, llama.model, llama.tokenizer).run()
    first = next(run)  # suspended between micro-batches: the hooks are in place
    assert first.prompt_ids == ["a"]
    hooked = hooks_by_module(llama.model)
    root = hooked.pop("")
    assert hooked == {
        "model.layers.0": (1, 0),
        "model.layers.1": (1, 0),
        "model.layers.2": (1, 0),
        "model.layers.1.mlp.down_proj": (0, 1),  # an input port is a pre-hook
    }
    # The model itself: one forward hook for `output`, and at most the engine's own
    # pre-hook that counts forward passes (generation steps).
    assert root[0] == 1 and root[1] <= 1
    rest = list(run)
    assert [r.prompt_ids for r in rest] == [["b"]]
    assert_no_hooks(llama.model)


def test_hooks_removed_when_a_later_site_fails_mid_forward(llama: Any, tiny_llama: Path) -> None:
    ids = llama.tokenizer(FRANCE, return_tensors="pt")
    with torch.inference_mode():
        before = llama.model(**ids).logits.clone()
    spec = {
        "nnrun": 1,
        "model": {"path": str(tiny_llama)},
        "prompts": {"a": FRANCE},
        "save": {"resid": {"at": "model.layers.*.output", "tokens": [-1]}},
        "edits": [
            {"at": "model.layers.0.output", "add": 1.0},  # fires first and succeeds
            {"at": "model.layers.2.output", "add": [1.0, 2.0, 3.0]},  # (3,) vs hidden 32
        ],
    }
    plan = _compile(spec, llama)
    with pytest.raises(RunError) as caught:
        list(Engine(plan, llama.model, llama.tokenizer).run())
    message = str(caught.value)
    assert "edits[1]" in message and "model.layers.2.output" in message
    assert "(3,)" in message and "32" in message  # both shapes
    assert_no_hooks(llama.model)
    with torch.inference_mode():  # the model computes exactly what it did before
        after = llama.model(**ids).logits
    torch.testing.assert_close(after, before, rtol=0, atol=0)


def test_hooks_removed_when_the_consumer_stops_early(llama: Any, tiny_llama: Path) -> None:
    spec = {
        "nnrun": 1,
        "model": {"path": str(tiny_llama)},
        "batch_size": 1,
        "prompts": [FRANCE, SHORT, LONG],
        "save": {"x": {"at": "model.layers.1.mlp.input", "tokens": 0}},
    }
    run = Engine(_compile(spec, llama), llama.model, llama.tokenizer).run()
    next(run)
    hooked = hooks_by_module(llama.model)
    assert hooked.pop("", (0, 0)) in ((0, 0), (0, 1))  # at most the engine's step counter
    assert hooked == {"model.layers.1.mlp": (0, 1)}
    run.close()  # what happens when a progress callback raises between batches
    assert_no_hooks(llama.model)


# -- token positions under padding ---------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_tokens_index_each_prompts_own_tokens(kind: str, request: pytest.FixtureRequest) -> None:
    model_dir: Path = request.getfixturevalue(f"tiny_{kind}")
    extra, layers = MODELS[kind]
    loaded = load_model({"path": str(model_dir), **extra})
    saves = {
        "resid": {"at": layers, "tokens": [0, -1]},
        "out": {"at": "output", "tokens": [0, -1]},
    }

    def run(prompts: dict[str, str]) -> dict[str, dict[str, torch.Tensor]]:
        spec = {
            "nnrun": 1,
            "model": {"path": str(model_dir), **extra},
            "batch_size": 3,
            "prompts": prompts,
            "save": saves,
        }
        return _collect(list(Engine(_compile(spec, loaded), loaded.model, loaded.tokenizer).run()))

    texts = {"long": LONG, "p": FRANCE, "short": SHORT}
    together = run(texts)
    lengths = {k: len(loaded.tokenizer(t)["input_ids"]) for k, t in texts.items()}
    assert lengths["long"] > lengths["p"] > lengths["short"]  # padding on both sides of p
    for prompt_id, text in texts.items():
        alone = run({prompt_id: text})
        for name in saves:
            torch.testing.assert_close(
                together[name][prompt_id], alone[name][prompt_id], rtol=1e-4, atol=1e-5
            )
        # and both are the model's own values for the unpadded prompt at positions 0 and -1
        with torch.inference_mode():
            out = loaded.model(**loaded.tokenizer(text, return_tensors="pt"))
        own = (out.logits if kind != "bert" else out.last_hidden_state)[0, [0, -1]]
        torch.testing.assert_close(together["out"][prompt_id], own, rtol=1e-4, atol=1e-5)
    assert together["resid"]["p"].shape == (3, 2, 32)  # layer, token, hidden


# -- streamed prompts ------------------------------------------------------------------------


def _live_tensors() -> tuple[int, int]:
    """(count, bytes of distinct storages) of every torch tensor Python holds."""
    gc.collect()
    count, storages = 0, {}
    for obj in gc.get_objects():
        if issubclass(type(obj), torch.Tensor):
            count += 1
            storage = obj.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
    return count, sum(storages.values())


def _live(cls: type) -> int:
    return sum(1 for obj in gc.get_objects() if type(obj) is cls)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_streamed_jsonl_in_order_with_ids_and_bounded_memory(
    tiny_gpt2: Path, tmp_path: Path
) -> None:
    records = [{"uid": f"q{i:04d}", "text": f"The number {i} is", "other": i} for i in range(2100)]
    source = write_jsonl(tmp_path / "prompts.jsonl", records)
    spec = {
        "nnrun": 1,
        "model": {"path": str(tiny_gpt2)},
        "batch_size": 16,
        "prompts": {"file": str(source), "field": "text", "id_field": "uid", "limit": 2000},
        "save": {"r": {"at": "transformer.h.*.output", "tokens": [-1]}},
    }
    calls: list[tuple[int, int | None]] = []
    marks: dict[int, tuple[tuple[int, int], int, int]] = {}

    def progress(state: nnrun.RunProgress) -> None:
        if state.stage != "running" or state.rows_done == 0:
            return
        done = state.rows_done
        calls.append((done, state.rows_total))
        if done in (208, 2000):
            marks[done] = (_live_tensors(), _live(BatchResult), _rss_bytes())

    out = tmp_path / "stream.h5"
    results = nnrun.run(spec, output=out, progress=progress)

    assert results.status == "complete"
    assert results.axes("r") == ["prompt", "layer", "token", "hidden"]
    assert calls == [(n, 2000) for n in range(16, 2001, 16)]  # 125 micro-batches of 16
    (tensors_early, batches_early, rss_early) = marks[208]
    (tensors_late, batches_late, rss_late) = marks[2000]
    # Nothing accumulates per prompt: at most the batches the writer holds are alive (the
    # one being computed, those queued for the writer thread, those it keeps to write
    # together), whether after 208 or 2000 prompts.
    # Handed over a few at a time, queued, kept by the writer to write together:
    held = 1 + (1 + QUEUE_DEPTH) * HANDOVER_ROWS // 16 + _writer._FLUSH_ROWS // 16
    batch_bytes = 16 * 3 * 32 * 4  # 16 prompts x 3 layers x 32 floats
    # The selections of recent batches are kept too (a bounded cache of small tensors).
    selections = 5 * _CACHED_INDICES
    assert batches_early <= held and batches_late <= held, (batches_early, batches_late, held)
    assert tensors_late[0] <= tensors_early[0] + 4 * held + selections, (
        tensors_early,
        tensors_late,
    )
    assert tensors_late[1] <= tensors_early[1] + 2 * held * batch_bytes, (
        tensors_early,
        tensors_late,
    )
    assert rss_late - rss_early < 32 * 2**20, f"RSS grew {(rss_late - rss_early) / 2**20:.1f} MiB"

    wanted = [r["uid"] for r in records[:2000]]
    with h5py.File(out, "r") as f:
        assert h5_str(f["prompts/id"][()]) == wanted
        assert h5_str(f["prompts/text"][()]) == [r["text"] for r in records[:2000]]
        assert h5_str(f["axes/r/prompt"][()]) == wanted
        assert f["saves/r"].shape == (2000, 3, 1, 32)
        picked = f["saves/r"][[0, 1234, 1999]]
    assert not torch.isnan(torch.from_numpy(picked)).any()
    inline = {f"q{i:04d}": records[i]["text"] for i in (0, 1234, 1999)}
    direct = nnrun.run({**spec, "prompts": inline}, output=tmp_path / "direct.h5")
    torch.testing.assert_close(torch.from_numpy(picked), direct["r"], rtol=1e-4, atol=1e-5)


def test_streamed_txt_prompts_in_order(tiny_gpt2: Path, tmp_path: Path) -> None:
    lines = [f"Counting: {i}, {i + 1}, {i + 2}" + " and more" * (i % 4) for i in range(37)]
    source = tmp_path / "prompts.txt"
    source.write_text("\n".join(lines) + "\n")
    spec = {
        "nnrun": 1,
        "model": {"path": str(tiny_gpt2)},
        "batch_size": 16,  # 16 + 16 + 5
        "prompts": {"file": str(source)},
        "save": {"logits": {"at": "output", "tokens": -1}},
    }
    out = tmp_path / "txt.h5"
    results = nnrun.run(spec, output=out)
    loaded = load_model({"path": str(tiny_gpt2)})
    with h5py.File(out, "r") as f:
        assert h5_str(f["prompts/text"][()]) == lines
        assert h5_str(f["prompts/id"][()]) == [str(i) for i in range(37)]  # 0-based line numbers
        assert f["prompts/length"][()].tolist() == [
            len(loaded.tokenizer(t)["input_ids"]) for t in lines
        ]
    logits = results["logits"]
    assert logits.shape == (37, 1, 512)
    for i in (0, 16, 36):  # one prompt from each micro-batch
        with torch.inference_mode():
            own = loaded.model(**loaded.tokenizer(lines[i], return_tensors="pt")).logits[0, -1]
        torch.testing.assert_close(logits[i, 0], own, rtol=1e-4, atol=1e-5)
