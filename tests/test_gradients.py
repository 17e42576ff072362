"""Gradients: `backward:`, the grad / input.grad ports and attribution saves.

The reference is the plain transformers model (its parameters require gradients, as
loaded) run on ONE prompt alone, its site values captured in hand-written hooks and
differentiated with `torch.autograd.grad`; nnrun runs the prompts batched and padded,
with parameters frozen, and must give the same gradients (fp32, rtol 1e-4). The real
tier compares with nnsight 0.8.1 (`.grad` inside `with loss.backward():`) on the tiny
models and on SmolLM2.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from helpers import PRINT_PEAK_RSS, write_jsonl
from test_conformance import (
    ARCHS,
    PROMPTS,
    SITES,
    _get,
    _put,
    by_prompt,
    hf_model,
    one_thread,  # noqa: F401  (autouse: one intra-op thread)
    run_spec,
    split_location,
    tiny_dir,
    token_ids,
)
from transformers import AutoTokenizer

import nnrun
from nnrun.errors import CompileError, RunError
from nnrun.spec import load_spec, validate_spec

RTOL, ATOL = 1e-4, 1e-5
LossFn = Callable[[torch.Tensor], torch.Tensor]  # logits [T, vocab] -> scalar


def token(path: Path, text: str) -> int:
    (i,) = AutoTokenizer.from_pretrained(path)(text, add_special_tokens=False)["input_ids"]
    return i


def logit_diff(path: Path) -> LossFn:
    paris, berlin = token(path, " Paris"), token(path, " Berlin")
    return lambda logits: logits[-1, paris] - logits[-1, berlin]


def capture(
    model: torch.nn.Module,
    sites: Iterable[str],
    edits: Mapping[str, Callable[[torch.Tensor], torch.Tensor]] | None = None,
) -> tuple[dict[str, torch.Tensor], list[Any]]:
    """Hooks that keep each site's value (after `edits` there) as the tensor that flows on."""
    modules = dict(model.named_modules())
    edits = dict(edits or {})
    seen: dict[str, torch.Tensor] = {}
    handles = []
    for loc in dict.fromkeys([*edits, *sites]):
        name, port, indices = split_location(loc)

        def at(value: Any, loc: str = loc, indices: tuple[int, ...] = indices) -> Any:
            tensor = _get(value, indices, root=False)
            if loc in edits:
                tensor = edits[loc](tensor)
                value = _put(value, indices, tensor)
            seen[loc] = tensor
            return value

        if port == "output":
            handles.append(modules[name].register_forward_hook(lambda m, a, out, at=at: at(out)))
        else:
            handles.append(
                modules[name].register_forward_pre_hook(
                    lambda m, args, at=at: (at(args[0]), *args[1:])
                )
            )
    return seen, handles


def autograd_reference(
    path: Path,
    text: str,
    sites: list[str],
    loss: LossFn,
    edits: Mapping[str, Callable[[torch.Tensor], torch.Tensor]] | None = None,
) -> dict[str, torch.Tensor]:
    """d loss / d each site's value [T, ...] for one prompt alone, by torch.autograd.grad."""
    model = hf_model(str(path))
    seen, handles = capture(model, sites, edits)
    try:
        with torch.enable_grad():
            logits = model(input_ids=torch.tensor([token_ids(str(path), text)])).logits[0]
            grads = torch.autograd.grad(loss(logits), [seen[s] for s in sites])
    finally:
        for h in handles:
            h.remove()
    return {s: g[0].detach() for s, g in zip(sites, grads, strict=True)}


def assert_close(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    assert torch.allclose(got, want, rtol=RTOL, atol=ATOL), (
        f"{what}: max abs diff {(got - want).abs().max().item():.3g} "
        f"(max {want.abs().max().item():.3g})"
    )


def attribution_spec(path: Path, **saves: Any) -> dict[str, Any]:
    """clean/corrupt with a logit_diff loss on corrupt and an attribution save `atp` of
    every layer's output from clean (plus `saves`)."""
    return {
        "model": {"path": str(path)},
        "prompts": {"clean": PROMPTS["clean"], "corrupt": PROMPTS["corrupt"]},
        "metrics": {"ld": {"logit_diff": [" Paris", " Berlin"], "prompts": ["corrupt"]}},
        "backward": {"metric": "ld"},
        "save": {
            "atp": {
                "at": "model.layers.*.output",
                "prompts": ["corrupt"],
                "attribution": {"from": "clean"},
            },
            **saves,
        },
    }


def grad_sites(arch: str) -> dict[str, str]:
    """save name -> (nnrun location, reference location) for one architecture."""
    s = SITES[arch]
    attn0 = s["attn0"].replace(".output[0]", "")
    return {
        "resid": (f"{s['layers']}.*.grad", [f"{s['layers']}.{i}.output" for i in range(3)]),
        "embed": (s["embed"].replace(".output", ".grad"), [s["embed"]]),
        "down": (s["down0"] + ".grad", [s["down0"]]),
        "attn": (f"{attn0}.grad[0]", [s["attn0"]]),
    }


# -- gradients against torch.autograd.grad ---------------------------------------------


@pytest.mark.parametrize("reduce", ["sum", "mean"])
@pytest.mark.parametrize("arch", ARCHS)
def test_grads_match_autograd(
    arch: str, reduce: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """d logit_diff / d (every layer's output, the embeddings, an input port, a tuple
    element) per prompt, batched two at a time, equals autograd on each prompt alone."""
    path = tiny_dir(arch, request)
    sites = grad_sites(arch)
    results = run_spec(
        tmp_path,
        {
            "model": {"path": str(path)},
            "batch_size": 2,
            "prompts": PROMPTS,
            "metrics": {"ld": {"logit_diff": [" Paris", " Berlin"]}},
            "backward": {"metric": "ld", "reduce": reduce},
            "save": {name: {"at": at} for name, (at, _) in sites.items()}
            | {"dlogits": {"at": "grad", "tokens": -1}},
        },
    )
    scale = 1.0 if reduce == "sum" else 1.0 / len(PROMPTS)
    saved = {name: by_prompt(results, name) for name in [*sites, "dlogits"]}
    paris, berlin = token(path, " Paris"), token(path, " Berlin")
    for prompt, text in PROMPTS.items():
        refs = [loc for _, locs in sites.values() for loc in locs]
        want = autograd_reference(path, text, refs, logit_diff(path))
        for name, (_, locs) in sites.items():
            expected = (
                torch.stack([want[loc] for loc in locs]) if name == "resid" else want[locs[0]]
            )
            assert_close(saved[name][prompt], scale * expected, f"{arch} {name} {prompt}")
        onehot = torch.zeros_like(saved["dlogits"][prompt][0])
        onehot[paris], onehot[berlin] = scale, -scale
        assert torch.equal(saved["dlogits"][prompt][0], onehot)
        assert float(saved["resid"][prompt].abs().max()) > 0


@pytest.mark.parametrize(
    ("loss", "reference"),
    [
        ({"at": "lm_head.output", "tokens": -1, "apply": ["norm"]}, lambda x: x[-1].norm()),
        ({"at": "output", "apply": ["sum"]}, lambda x: x.sum()),  # nnsight README: logits.sum()
    ],
)
def test_loss_at_a_site_and_input_grad(
    loss: dict[str, Any], reference: LossFn, tiny_llama: Path, tmp_path: Path
) -> None:
    """backward: {loss: {at, tokens, apply}}: apply makes one number per token, summed over
    the selected tokens (padding left out); gradients at an input port and a layer output
    match autograd on each prompt alone."""
    at = "model.layers.1.mlp.down_proj.input"
    results = run_spec(
        tmp_path,
        {
            "model": {"path": str(tiny_llama)},
            "prompts": PROMPTS,
            "batch_size": 3,
            "backward": {"loss": loss},
            "save": {
                "down": {"at": f"{at}.grad", "tokens": [0, -1]},
                "l2": {"at": "model.layers.2.grad", "tokens": "1:3"},
            },
        },
    )
    down, l2 = by_prompt(results, "down"), by_prompt(results, "l2")
    for prompt, text in PROMPTS.items():
        want = autograd_reference(tiny_llama, text, [at, "model.layers.2.output"], reference)
        assert_close(down[prompt], want[at][[0, -1]], f"down {prompt}")
        assert_close(l2[prompt], want["model.layers.2.output"][1:3], f"layer 2 {prompt}")


def test_gradient_through_edits_and_across_prompts(tiny_llama: Path, tmp_path: Path) -> None:
    """Edits apply in the forward and a saved gradient is that of the value flowing on after
    them. Corrupt's layer-1 output at the last token is set from clean's layer-0 output, so
    the loss on corrupt reaches back into clean's layer 0 through the copy, exactly as
    autograd on the same two hand-edited forward passes says."""
    layers = [f"model.layers.{i}.output" for i in range(3)]
    prompts = {"clean": PROMPTS["clean"], "corrupt": PROMPTS["corrupt"]}
    spec: dict[str, Any] = {
        "model": {"path": str(tiny_llama)},
        "prompts": prompts,
        "edits": [
            {"at": "model.layers.1.mlp.output", "tokens": -2, "zero": True},
            {
                "at": "model.layers.1.output",
                "prompts": ["corrupt"],
                "tokens": -1,
                "set": {"from": "clean", "at": "model.layers.0.output"},
            },
        ],
        "metrics": {"ld": {"logit_diff": [" Paris", " Berlin"], "prompts": ["corrupt"]}},
        "backward": {"metric": "ld"},
        "save": {"g": {"at": "model.layers.*.grad"}},
    }
    got = by_prompt(run_spec(tmp_path, spec), "g")
    model = hf_model(str(tiny_llama))
    zero = {"model.layers.1.mlp.output": lambda v: _zero_at(v, -2)}
    with torch.enable_grad():
        seen_clean, handles = capture(model, layers, zero)
        model(input_ids=torch.tensor([token_ids(str(tiny_llama), prompts["clean"])]))
        for h in handles:
            h.remove()
        clean0 = seen_clean["model.layers.0.output"]

        def patch(v: torch.Tensor) -> torch.Tensor:
            out = v.clone()
            out[0, -1] = clean0[0, -1]  # the clean tensor itself: its graph comes along
            return out

        seen, handles = capture(model, layers, {**zero, "model.layers.1.output": patch})
        try:
            ids = token_ids(str(tiny_llama), prompts["corrupt"])
            logits = model(input_ids=torch.tensor([ids])).logits[0]
            wanted = [seen[s] for s in layers] + [clean0]
            grads = torch.autograd.grad(logit_diff(tiny_llama)(logits), wanted)
        finally:
            for h in handles:
                h.remove()
    assert_close(got["corrupt"], torch.stack([g[0] for g in grads[:3]]), "corrupt")
    want_clean = torch.zeros_like(got["clean"])
    want_clean[0] = grads[3][0]
    assert_close(got["clean"], want_clean, "clean: only its layer 0 feeds corrupt")
    assert float(got["clean"][0, -1].abs().max()) > 0
    assert float(got["corrupt"][0, -1].abs().max()) == 0  # patched over: nothing flows back

    # Patched at the same site, the copy is part of that site's edit: the gradient there is
    # the edited value's, so the corrupt row keeps its gradient and clean's row at layer 1
    # gets none; upstream (layer 0) clean still feeds corrupt through the copy.
    spec["edits"][1]["set"] = {"from": "clean"}
    same = by_prompt(run_spec(tmp_path, spec), "g")
    assert float(same["clean"][1:].abs().max()) == 0
    assert float(same["clean"][0, -1].abs().max()) > 0
    assert float(same["corrupt"][1, -1].abs().max()) > 0


def _zero_at(value: torch.Tensor, position: int) -> torch.Tensor:
    out = value.clone()
    out[0, position] = 0
    return out


def test_attribution_is_source_minus_value_times_gradient(tiny_llama: Path, tmp_path: Path) -> None:
    """attribution: {from: clean} = sum over the last axis of (clean - corrupt) * grad,
    per layer and token; with heads, per head at the output projection's input."""
    o = "model.layers.1.self_attn.o_proj.input"
    prompts = {"clean": PROMPTS["clean"], "corrupt": PROMPTS["corrupt"]}
    spec = attribution_spec(
        tiny_llama,
        heads={"at": o, "prompts": ["corrupt"], "heads": "all", "attribution": {"from": "clean"}},
        last={
            "at": "model.layers.0.output",
            "prompts": ["corrupt"],
            "tokens": -1,
            "attribution": {"from": "clean", "tokens": 1},
        },
    )
    results = run_spec(tmp_path, spec)
    assert results.axes("atp") == ["prompt", "layer", "token"]
    assert results.axes("heads") == ["prompt", "token", "head"]
    sites = [f"model.layers.{i}.output" for i in range(3)] + [o]
    grads = autograd_reference(tiny_llama, prompts["corrupt"], sites, logit_diff(tiny_llama))
    model = hf_model(str(tiny_llama))
    values = {}
    for prompt, text in prompts.items():
        seen, handles = capture(model, sites)
        with torch.no_grad():
            model(input_ids=torch.tensor([token_ids(str(tiny_llama), text)]))
        for h in handles:
            h.remove()
        values[prompt] = {s: v[0] for s, v in seen.items()}
    diff = {s: values["clean"][s] - values["corrupt"][s] for s in sites}
    want = torch.stack([(diff[s] * grads[s]).sum(-1) for s in sites[:3]])
    assert_close(results["atp"][0], want, "attribution")
    per_head = (diff[o] * grads[o]).reshape(-1, 4, 8).sum(-1)
    assert_close(results["heads"][0], per_head, "head attribution")
    layer0 = "model.layers.0.output"
    one = ((values["clean"][layer0][1] - values["corrupt"][layer0][-1]) * grads[layer0][-1]).sum()
    assert_close(results["last"][0, 0], one, "attribution from another token")


def test_sweep_with_backward_equals_each_point_alone(tiny_llama: Path, tmp_path: Path) -> None:
    """A patching sweep with gradients: rows are not shared between points under
    backward, so every point's gradients and attributions are its own."""
    from test_sweep import each_point_alone

    spec = {
        "nnrun": 1,
        "model": {"path": str(tiny_llama)},
        "batch_size": 4,
        "prompts": {"clean": PROMPTS["clean"], "corrupt": PROMPTS["corrupt"]},
        "sweep": {"layer": [0, 2], "pos": [2, -1]},
        "edits": [
            {
                "at": "model.layers.${layer}.output",
                "prompts": ["corrupt"],
                "tokens": "${pos}",
                "set": {"from": "clean"},
            }
        ],
        "metrics": {"ld": {"logit_diff": [" Paris", " Berlin"], "prompts": ["corrupt"]}},
        "backward": {"metric": "ld"},
        "save": {
            "g": {"at": "model.layers.*.grad"},
            "atp": {
                "at": "model.layers.*.output",
                "prompts": ["corrupt"],
                "attribution": {"from": "clean"},
            },
        },
        "output": str(tmp_path / "sweep.h5"),
    }
    packed = nnrun.run(spec)
    assert packed.array("g").shape[:3] == (2, 2, 2)
    # The clean row's gradient depends on where the point patched: rows are per point.
    g = packed.array("g")
    assert not np.allclose(g[0, 0, 0], g[1, 1, 0])
    each_point_alone(spec, packed.path, tmp_path)


def test_rows_the_loss_does_not_read_get_zero_gradients(tiny_gpt2: Path, tmp_path: Path) -> None:
    """A prompt outside the loss has gradient exactly 0, whichever batch it lands in."""
    for batch_size in (1, 4):
        results = run_spec(
            tmp_path,
            {
                "model": {"path": str(tiny_gpt2)},
                "batch_size": batch_size,
                "prompts": PROMPTS,
                "metrics": {"ld": {"logit_diff": [" Paris", " Berlin"], "prompts": ["long"]}},
                "backward": {"metric": "ld"},
                "save": {"g": {"at": "transformer.h.*.grad", "tokens": -1}},
            },
        )
        got = by_prompt(results, "g")
        assert all(float(got[p].abs().max()) == 0 for p in PROMPTS if p != "long")
        assert float(got["long"].abs().max()) > 0


def test_batches_without_a_gradient_save_skip_the_backward_pass(
    tiny_llama: Path, tmp_path: Path
) -> None:
    """The loss covers every prompt, the gradient is saved for one: the other batches
    have nothing to read and run no backward pass (and are no error)."""
    spec = {
        "model": {"path": str(tiny_llama)},
        "batch_size": 1,
        "prompts": PROMPTS,
        "metrics": {"ld": {"logit_diff": [" Paris", " Berlin"]}},
        "backward": {"metric": "ld"},
        "save": {"g": {"at": "model.layers.1.grad", "prompts": ["short"], "tokens": -1}},
    }
    got = run_spec(tmp_path, spec)["g"][0, 0]
    want = autograd_reference(
        tiny_llama, PROMPTS["short"], ["model.layers.1.output"], logit_diff(tiny_llama)
    )
    assert_close(got, want["model.layers.1.output"][-1], "short")


def test_model_is_left_as_it_was(tiny_llama: Path, tmp_path: Path) -> None:
    """No parameter gets a gradient or requires one, no hook stays, grad mode unchanged."""
    from helpers import assert_no_hooks

    from nnrun._run import cached_model

    spec = {
        "model": {"path": str(tiny_llama)},
        "prompts": PROMPTS,
        "metrics": {"p": {"logprob": " Paris"}},
        "backward": {"metric": "p"},
        "save": {"g": {"at": "model.layers.*.grad"}},
    }
    run_spec(tmp_path, spec)
    loaded = cached_model(nnrun.spec.check_spec({"nnrun": 1, **spec}).data["model"])
    assert all(p.grad is None and not p.requires_grad for p in loaded.model.parameters())
    assert_no_hooks(loaded.model)
    assert torch.is_grad_enabled()


# -- memory ------------------------------------------------------------------------------


_PEAK = (
    """
import json, sys
import nnrun
spec = json.loads(sys.argv[1])
nnrun.run(spec, cache=False)
"""
    + PRINT_PEAK_RSS
)


def test_backward_over_a_prompt_file_has_bounded_memory(tiny_llama: Path, tmp_path: Path) -> None:
    """1,000 prompts from a file with backward: the peak memory of the process is the
    same as for 100 (one batch's graph at a time), and batch_size is kept."""
    words = "The capital of France is Paris and the city of Rome is in Italy".split()
    write_jsonl(
        tmp_path / "prompts.jsonl", [{"text": " ".join(words[: 3 + i % 10])} for i in range(1000)]
    )
    peaks = {}
    for limit in (100, 1000):
        spec = {
            "nnrun": 1,
            "model": {"path": str(tiny_llama)},
            "batch_size": 8,
            "prompts": {"file": str(tmp_path / "prompts.jsonl"), "limit": limit},
            "backward": {"loss": {"at": "output", "apply": ["norm"]}},
            "save": {"g": {"at": "model.layers.*.grad", "tokens": -1}},
            "output": str(tmp_path / f"out{limit}.h5"),
        }
        done = subprocess.run(
            [sys.executable, "-c", _PEAK, json.dumps(spec)], capture_output=True, text=True
        )
        assert done.returncode == 0, done.stderr[-2000:]
        peaks[limit] = int(done.stdout.split()[-1])  # KiB
        results = nnrun.load(tmp_path / f"out{limit}.h5")
        assert results["g"].shape == (limit, 3, 1, 32)
        assert bool(results["g"].isfinite().all()) and float(results["g"].abs().max()) > 0
    assert peaks[1000] - peaks[100] < 20 * 1024, peaks  # KiB: no growth with the prompt count


def test_each_batch_frees_its_graph_without_garbage_collection(
    tiny_llama: Path, tmp_path: Path
) -> None:
    """With the garbage collector off, the tensors alive after batch 5 and after batch 30
    are as many: no batch's graph, hooks or activations outlive it in a reference cycle
    (which on a real model would pile up hundreds of MiB before a collection)."""
    import gc

    from nnrun._run import cached_model
    from nnrun.compile import compile_plan
    from nnrun.engine import Engine

    words = "The capital of France is Paris and the city of Rome is in Italy".split()
    with (tmp_path / "p.jsonl").open("w") as f:
        for i in range(120):
            f.write(json.dumps({"text": " ".join(words[: 3 + i % 10])}) + "\n")
    spec = nnrun.spec.check_spec(
        {
            "nnrun": 1,
            "model": {"path": str(tiny_llama)},
            "batch_size": 4,
            "prompts": {"file": str(tmp_path / "p.jsonl")},
            "metrics": {"p": {"logprob": " Paris"}},
            "backward": {"metric": "p"},
            "save": {"g": {"at": "model.layers.*.grad", "tokens": -1}},
        }
    )
    loaded = cached_model(spec.data["model"])
    plan = compile_plan(spec, loaded.model, loaded.tokenizer)

    def tensors() -> int:
        # type() rather than isinstance: isinstance probes lazy torch modules, which warn.
        return sum(issubclass(type(o), torch.Tensor) for o in gc.get_objects())

    counts = {}
    gc.collect()
    gc.disable()
    try:
        for i, _ in enumerate(Engine(plan, loaded.model, loaded.tokenizer).run(), start=1):
            if i in (5, 30):
                counts[i] = tensors()
    finally:
        gc.enable()
    assert counts[30] <= counts[5] + 5, counts


def test_plan_estimates_the_backward_memory(tiny_llama: Path) -> None:
    """The estimate (probe passes of one row) equals what autograd keeps for a real batch."""
    from nnrun._run import cached_model
    from nnrun.engine import Engine

    spec = {
        "nnrun": 1,
        "model": {"path": str(tiny_llama)},
        "batch_size": 3,
        "prompts": PROMPTS,
        "metrics": {"p": {"logprob": " Paris"}},
        "backward": {"metric": "p"},
        "save": {"g": {"at": "model.layers.1.grad"}},
    }
    report = nnrun.plan(spec)
    assert report.backward_rows == 3 and report.backward_bytes > 0
    loaded = cached_model(nnrun.spec.check_spec(spec).data["model"])
    params = {p.data_ptr() for p in loaded.model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.untyped_storage().data_ptr() not in params:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    plan = report.plan
    longest = [r.key for r in plan.rows if r.key in ("long", "clean", "corrupt")]
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        list(Engine(plan, loaded.model, loaded.tokenizer).run(rows=longest))
    assert report.longest == len(token_ids(str(tiny_llama), PROMPTS["long"]))
    measured = sum(seen.values())
    # The probe leaves out the padding mask and the metric's softmax: within a quarter.
    assert abs(report.backward_bytes - measured) < 0.25 * measured, (
        report.backward_bytes,
        measured,
    )


# -- bad input ----------------------------------------------------------------------------


def _issues(spec: dict[str, Any]) -> list[tuple[str, str]]:
    return [(i.path, i.message) for i in validate_spec(load_spec({"nnrun": 1, **spec}))]


BASE = {
    "prompts": {"a": "x", "b": "y"},
    "metrics": {"ld": {"logit_diff": [" Paris", " Berlin"]}, "r": {"rank": " Paris"}},
    "backward": {"metric": "ld"},
    "save": {"g": {"at": "@layers.*.grad"}},
}


@pytest.mark.parametrize(
    ("change", "path", "fragment"),
    [
        ({"backward": None}, "save.g.at", "needs a backward: section"),
        ({"generate": {"max_new_tokens": 2}}, "backward", "not on generation"),
        ({"backward": {"metric": "r"}}, "backward.metric", "no gradient"),
        ({"backward": {"metric": "ldd"}}, "backward.metric", "did you mean 'ld'"),
        ({"save": {"v": {"at": "@layers.0.output"}}}, "backward", "no save reads a gradient"),
        (
            {"model": {"device_map": {"model": 0, "lm_head": "disk"}}},
            "model.device_map",
            "offloaded to disk",
        ),
        (
            {"save": {"g": {"at": "@layers.0.grad", "before_edits": True}}},
            "save.g.before_edits",
            "after the edits",
        ),
        (
            {"edits": [{"at": "@layers.0.grad", "zero": True}]},
            "edits[0].at",
            "use @layers.0.output",
        ),
        (
            {"backward": {"loss": {"at": "@layers.1.input.grad"}}},
            "backward.loss.at",
            "use @layers.1.input",
        ),
        (
            {"save": {"g": {"at": "@layers.0.grad", "attribution": {"from": "a"}}}},
            "save.g.at",
            "not grad",
        ),
        (
            {
                "backward": None,
                "save": {"t": {"at": "@layers.0.output", "attribution": {"from": "a"}}},
            },
            "save.t.attribution",
            "needs a backward: section",
        ),
        (
            {"save": {"t": {"at": "@layers.0.output", "attribution": {"from": "c"}}}},
            "save.t.attribution.from",
            "unknown prompt 'c'",
        ),
        (
            {"backward": {"metric": "ld", "loss": {"at": "output"}}},
            "backward",
            "exactly one loss",
        ),
        ({"backward": {"reduce": "mean"}}, "backward", "exactly one loss"),
    ],
)
def test_bad_backward_specs(change: dict[str, Any], path: str, fragment: str) -> None:
    spec = {**BASE, **{k: v for k, v in change.items() if v is not None}}
    for key in [k for k, v in change.items() if v is None]:
        del spec[key]
    issues = _issues(spec)
    assert any(p == path and fragment in m for p, m in issues), issues


def test_loss_that_is_not_a_scalar_names_its_shape(tiny_llama: Path, tmp_path: Path) -> None:
    spec = {
        "model": {"path": str(tiny_llama)},
        "prompts": {"a": "Hi"},
        "save": {"g": {"at": "model.layers.0.grad"}},
    }
    for loss, message in (
        ({"at": "lm_head.output"}, "gives shape (512,) per token"),
        ({"at": "model.layers.1.output", "apply": ["softmax"]}, "gives shape (32,) per token"),
        ({"at": "output", "tokens": -1, "apply": [{"topk": 2}]}, "topk gives several numbers"),
    ):
        with pytest.raises(RunError, match=re.escape(message)):
            run_spec(tmp_path, {**spec, "backward": {"loss": loss}})


def test_gradients_the_loss_cannot_have(tiny_llama: Path, tmp_path: Path) -> None:
    """A site that runs after the loss: refused when compiling. A site that runs before
    it but does not feed it (q_proj for a loss at v_proj): refused when it gets None."""
    attn = "model.layers.0.self_attn"
    spec: dict[str, Any] = {
        "model": {"path": str(tiny_llama)},
        "prompts": {"a": "The capital of France is"},
        "backward": {"loss": {"at": "model.layers.0.output", "apply": ["sum"]}},
        "save": {"g": {"at": "model.layers.1.grad"}},
    }
    with pytest.raises(CompileError, match="is computed before model.layers.1.output runs"):
        run_spec(tmp_path, spec)
    spec["backward"] = {"loss": {"at": f"{attn}.v_proj.output", "apply": ["sum"]}}
    spec["save"] = {"g": {"at": f"{attn}.q_proj.grad"}}
    with pytest.raises(RunError, match=r"does not depend on any site.*\(None\)"):
        run_spec(tmp_path, spec)
    spec["save"] = {
        "g": {"at": f"{attn}.q_proj.grad"},
        "h": {"at": "model.layers.0.input_layernorm.grad"},
    }
    with pytest.raises(
        RunError, match=r"q_proj.output: the loss .* gets no gradient at all \(None"
    ):
        run_spec(tmp_path, spec)


def test_backward_refuses_offloaded_weights(tiny_llama: Path) -> None:
    """A device map that offloads modules to cpu (beside a GPU) or disk: refused at compile
    time (checked on the model's placement as accelerate records it)."""
    from nnrun._run import cached_model
    from nnrun.compile import compile_point

    spec = nnrun.spec.check_spec({"nnrun": 1, **attribution_spec(tiny_llama)})
    loaded = cached_model(spec.data["model"])
    model = loaded.model
    try:
        for placed, refused in (
            ({"model": 0, "lm_head": "cpu"}, True),
            ({"model": "cpu", "lm_head": "disk"}, True),
            ({"": "cpu"}, False),
            ({"model": 0, "lm_head": 1}, False),
        ):
            model.hf_device_map = placed
            if refused:
                with pytest.raises(CompileError, match="offloads .* to cpu or disk"):
                    compile_point(spec.data, model, loaded.tokenizer)
            else:
                compile_point(spec.data, model, loaded.tokenizer)
    finally:
        del model.hf_device_map


def test_rows_that_read_each_other_must_fit_a_batch(tiny_llama: Path, tmp_path: Path) -> None:
    spec = {**attribution_spec(tiny_llama), "batch_size": 1}
    with pytest.raises(CompileError, match="raise batch_size to 2"):
        run_spec(tmp_path, spec)


# -- real tier: nnsight -------------------------------------------------------------------


def nnsight_grads(path: Path, layers: str, text: str) -> torch.Tensor:
    """[layer, T, hidden]: d logit_diff / d each layer's output, by nnsight's backward."""
    from test_conformance_nnsight import ns_model

    model = ns_model(str(path))
    paris, berlin = token(path, " Paris"), token(path, " Berlin")
    found: dict[str, Any] = {}  # nnsight runs the block's body itself: results go out by a dict
    with model.trace(text):
        container = model.model.layers if layers == "model.layers" else model.transformer.h
        outputs = [layer.output for layer in container]
        logits = model.output.logits
        loss = logits[0, -1, paris] - logits[0, -1, berlin]
        with loss.backward():
            # Gradients arrive in reverse forward order; nnsight serves them in that order.
            found["grads"] = [out.grad.save() for out in reversed(outputs)]
    return torch.stack([g[0] for g in reversed(found["grads"])]).detach()


def layer_grads(
    tmp_path: Path, path: Path, layers: str, prompts: dict[str, str]
) -> dict[str, torch.Tensor]:
    """nnrun's d logit_diff / d every layer's output, per prompt [layer, T, hidden]."""
    results = run_spec(
        tmp_path,
        {
            "model": {"path": str(path)},
            "prompts": prompts,
            "metrics": {"ld": {"logit_diff": [" Paris", " Berlin"]}},
            "backward": {"metric": "ld"},
            "save": {"g": {"at": f"{layers}.*.grad"}},
        },
    )
    return by_prompt(results, "g")


@pytest.mark.real
@pytest.mark.parametrize("arch", ARCHS)
def test_grads_match_nnsight_on_tiny_models(
    arch: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    path = tiny_dir(arch, request)
    layers = SITES[arch]["layers"]
    got = layer_grads(tmp_path, path, layers, PROMPTS)
    for prompt, text in PROMPTS.items():
        assert_close(got[prompt], nnsight_grads(path, layers, text), f"{arch} {prompt}")


@pytest.mark.real
def test_smollm2_grads_match_nnsight_and_autograd(smollm2_dir: Path, tmp_path: Path) -> None:
    """SmolLM2, fp32: every layer's gradient of logit_diff equals nnsight's and autograd's
    (relative to the largest gradient, 1e-4)."""
    prompts = {"clean": "The capital of France is", "corrupt": "The capital of Germany is"}
    got = layer_grads(tmp_path, smollm2_dir, "model.layers", prompts)
    sites = [f"model.layers.{i}.output" for i in range(30)]
    for prompt, text in prompts.items():
        ours = got[prompt]
        for name, want in (
            ("nnsight", nnsight_grads(smollm2_dir, "model.layers", text)),
            (
                "autograd",
                torch.stack(
                    list(
                        autograd_reference(
                            smollm2_dir, text, sites, logit_diff(smollm2_dir)
                        ).values()
                    )
                ),
            ),
        ):
            assert ours.shape == want.shape
            rel = float((ours - want).abs().max() / want.abs().max())
            assert rel < 1e-4, f"{name} {prompt}: relative max diff {rel:.3g}"


@pytest.mark.real
def test_smollm2_attribution_matches_nnsight(smollm2_dir: Path, tmp_path: Path) -> None:
    """The attribution save equals nnsight's two-invoke trace with a backward pass and
    (clean - corrupt) * grad summed over hidden, as docs/recipes.md writes it."""
    from test_conformance_nnsight import ns_model

    prompts = {"clean": PROMPTS["clean"], "corrupt": PROMPTS["corrupt"]}
    results = run_spec(tmp_path, attribution_spec(smollm2_dir))
    model = ns_model(str(smollm2_dir))
    paris, berlin = token(smollm2_dir, " Paris"), token(smollm2_dir, " Berlin")
    saved: dict[str, Any] = {}
    with model.trace() as tracer:
        with tracer.invoke(prompts["clean"]):
            saved["clean"] = [layer.output.save() for layer in model.model.layers]
        with tracer.invoke(prompts["corrupt"]):
            corrupt = [layer.output for layer in model.model.layers]
            logits = model.output.logits[0, -1]
            with (logits[paris] - logits[berlin]).backward():
                saved["grads"] = [out.grad.save() for out in reversed(corrupt)][::-1]
            saved["corrupt"] = [x.save() for x in corrupt]
    want = torch.stack(
        [
            ((c - x) * g)[0].sum(-1)
            for c, x, g in zip(saved["clean"], saved["corrupt"], saved["grads"], strict=True)
        ]
    ).detach()
    got = results["atp"][0]
    rel = float((got - want).abs().max() / want.abs().max())
    assert rel < 1e-4, f"relative max diff {rel:.3g}"
