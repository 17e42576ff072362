"""Conformance against nnsight 0.8.1: the same saves and edits, written the nnsight way.

nnsight runs one trace with one `tracer.invoke` per prompt; it left-pads the batch and
passes position ids, so each prompt's values are its last `len(tokens)` columns there.
Tiny Llama / GPT-2 are compared with allclose; SmolLM2-135M relatively (its residuals
reach several hundred), plus the classic France -> Germany activation-patching result.
"""

from __future__ import annotations

import functools
import importlib
import subprocess
import sys
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch
from test_conformance import (
    ARCHS,
    PROMPTS,
    SITES,
    _vec,
    assert_close,
    by_prompt,
    one_thread,  # noqa: F401  (autouse fixture: one intra-op thread for this module too)
    run_spec,
    tiny_dir,
    token_ids,
)

pytestmark = pytest.mark.real

# (prompt id, layer index, that layer's envoy, shared dict with "barrier") -> None.
# Called inside the prompt's invoke just before the layer's output is read, so it may
# touch the layer's submodules and its output in execution order.
LayerEdit = Callable[[str, int, Any, dict[str, Any]], None]

SMOL_PROMPTS: dict[str, str] = {
    "clean": "The capital of France is",
    "corrupt": "The capital of Germany is",
}


@functools.cache
def _nnsight() -> ModuleType:
    """nnsight, imported only after nnrun's plan dataclasses exist.

    Importing nnsight mounts a `save` method on `object`, which breaks any dataclass
    defined afterwards with a field named `save`; test_nnrun_imports_after_nnsight
    guards nnrun against that, this order keeps the other tests independent of it.
    """
    for name in ("nnrun.compile", "nnrun.engine", "nnsight"):  # in this order
        module = importlib.import_module(name)
    return module


@functools.cache
def ns_model(path: str) -> Any:
    """nnsight's wrapper around a local checkpoint (LanguageModel is deprecated in 0.8.1)."""
    return _nnsight().TransformersModel(path, task="text-generation", tokenizer=path, dispatch=True)


def _layers(model: Any, arch: str) -> Any:
    return model.model.layers if arch == "llama" else model.transformer.h


def _norm(model: Any, arch: str) -> Any:
    return model.model.norm if arch == "llama" else model.transformer.ln_f


def nnsight_run(
    path: str,
    arch: str,
    prompts: Mapping[str, str],
    edit: LayerEdit | None = None,
    *,
    barrier: int = 0,
    lens: bool = True,
) -> dict[str, dict[str, torch.Tensor]]:
    """One nnsight trace over `prompts`; per prompt, over its own tokens (padding cut off):
    `resid` [layer, T, hidden] (after `edit`), `lens` softmax(lm_head(norm(resid[:, -1])))
    [layer, vocab] (modules applied ad hoc inside the trace) and `logits` [T, vocab]."""
    model = ns_model(path)
    out: dict[str, Any] = {}
    with torch.no_grad(), model.trace() as tracer:
        shared: dict[str, Any] = {"barrier": tracer.barrier(barrier) if barrier else None}
        for prompt, text in prompts.items():
            with tracer.invoke(text):
                resid, lenses = [], []
                for i, layer in enumerate(_layers(model, arch)):
                    if edit is not None:
                        edit(prompt, i, layer, shared)
                    h = layer.output
                    resid.append(h[0].clone())
                    if lens:
                        lenses.append(
                            torch.softmax(model.lm_head(_norm(model, arch)(h[0, -1])), dim=-1)
                        )
                logits = model.output.logits[0]
                out[prompt] = _nnsight().save({"resid": resid, "lens": lenses, "logits": logits})
    result = {}
    for prompt, text in prompts.items():
        n = len(token_ids(path, text))
        got = out[prompt]
        assert got["logits"].shape[0] >= n
        result[prompt] = {
            "resid": torch.stack(got["resid"])[:, -n:].detach(),
            "logits": got["logits"][-n:].detach(),
        }
        if lens:
            result[prompt]["lens"] = torch.stack(got["lens"]).detach()
    return result


def assert_rel_close(got: torch.Tensor, want: torch.Tensor, what: str, tol: float = 1e-4) -> None:
    """max |got - want| / max |want| < tol: for real models whose values reach hundreds."""
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    rel = ((got - want).abs().max() / want.abs().max()).item()
    assert rel < tol, f"{what}: relative max diff {rel:.3g}"


# -- tiny models ------------------------------------------------------------------------


def test_nnrun_imports_after_nnsight() -> None:
    """A notebook that imported nnsight first can still use nnrun."""
    code = "import nnsight, nnrun.compile, nnrun.engine"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize("arch", ARCHS)
def test_saves_match_nnsight(arch: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    """Every layer's output (all tokens and the last), the logits at the last token and a
    logit lens `apply: [norm, lm_head, softmax]` equal nnsight's `.output.save()` and its
    ad hoc module calls, for a batch of prompts of different lengths."""
    path = str(tiny_dir(arch, request))
    sites = SITES[arch]
    at = f"{sites['layers']}.*.output"
    results = run_spec(
        tmp_path,
        {
            "model": {"path": path},
            "prompts": PROMPTS,
            "save": {
                "resid": {"at": at},
                "last": {"at": at, "tokens": -1},
                "lens": {"at": at, "tokens": -1, "apply": [sites["norm"], "lm_head", "softmax"]},
                "logits": {"at": "output", "tokens": -1},
            },
        },
    )
    ref = nnsight_run(path, arch, PROMPTS)
    saved = {name: by_prompt(results, name) for name in ("resid", "last", "lens", "logits")}
    for prompt in PROMPTS:
        want = ref[prompt]
        assert_close(saved["resid"][prompt], want["resid"], f"{arch} resid[{prompt}]")
        assert_close(saved["last"][prompt], want["resid"][:, -1:], f"{arch} last[{prompt}]")
        assert_close(saved["lens"][prompt][:, 0], want["lens"], f"{arch} lens[{prompt}]")
        assert_close(saved["logits"][prompt][0], want["logits"][-1], f"{arch} logits[{prompt}]")
        assert saved["logits"][prompt][0].argmax() == want["logits"][-1].argmax()


def _edit_zero(prompt: str, i: int, layer: Any, shared: dict[str, Any]) -> None:
    if i == 1 and prompt == "clean":
        layer.output[:, -1] = 0


def _edit_patch(prompt: str, i: int, layer: Any, shared: dict[str, Any]) -> None:
    if i != 1 or prompt not in ("clean", "corrupt"):
        return
    if prompt == "clean":
        shared["source"] = layer.output[:, -2].clone()
        shared["barrier"]()
    else:
        shared["barrier"]()
        layer.output[:, -2] = shared["source"]


def _edit_mul_input(arch: str) -> LayerEdit:
    def edit(prompt: str, i: int, layer: Any, shared: dict[str, Any]) -> None:
        if i == 0:
            proj = layer.mlp.down_proj if arch == "llama" else layer.mlp.c_proj
            proj.input = proj.input * 0.5

    return edit


def _edit_add(prompt: str, i: int, layer: Any, shared: dict[str, Any]) -> None:
    if i == 2:
        out = layer.output
        out[:, -1] = out[:, -1] + 2.0 * torch.tensor(_vec(0.5))


def _edit_skip(prompt: str, i: int, layer: Any, shared: dict[str, Any]) -> None:
    # nnsight 0.8.1 requires a batched skip to cover every invoke.
    if i == 1:
        layer.mlp.skip(layer.mlp.input)


# id -> (nnrun edit with {role} placeholders, nnsight edit factory, barrier size)
NNSIGHT_EDITS: dict[str, tuple[dict[str, Any], Callable[[str], LayerEdit], int]] = {
    "zero": (
        {"at": "{layers}.1.output", "prompts": ["clean"], "tokens": -1, "zero": True},
        lambda arch: _edit_zero,
        0,
    ),
    "patch": (
        {
            "at": "{layers}.1.output",
            "prompts": ["corrupt"],
            "tokens": [-2],
            "set": {"from": "clean"},
        },
        lambda arch: _edit_patch,
        2,
    ),
    "mul-input": ({"at": "{down0}", "mul": 0.5}, _edit_mul_input, 0),
    "add": (
        {"at": "{layers}.2.output", "tokens": -1, "add": _vec(0.5), "alpha": 2.0},
        lambda arch: _edit_add,
        0,
    ),
    "skip": (
        {"at": "{mlp1}.output", "skip": True},
        lambda arch: _edit_skip,
        0,
    ),
}


@pytest.mark.parametrize("op", NNSIGHT_EDITS)
@pytest.mark.parametrize("arch", ARCHS)
def test_edits_match_nnsight(
    arch: str, op: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """zero / patching (set from another prompt) / input-port mul / add / skip give the
    same residual stream after the edit and the same logits as nnsight doing that edit."""
    path = str(tiny_dir(arch, request))
    template, make_edit, barrier = NNSIGHT_EDITS[op]
    edit = {k: v.format(**SITES[arch]) if k == "at" else v for k, v in template.items()}
    results = run_spec(
        tmp_path,
        {
            "model": {"path": path},
            "prompts": PROMPTS,
            "edits": [edit],
            "save": {
                "resid": {"at": f"{SITES[arch]['layers']}.*.output"},
                "logits": {"at": "output"},
            },
        },
    )
    ref = nnsight_run(path, arch, PROMPTS, make_edit(arch), barrier=barrier, lens=False)
    unedited = nnsight_run(path, arch, PROMPTS, lens=False)
    resid, logits = by_prompt(results, "resid"), by_prompt(results, "logits")
    moved = False
    for prompt in PROMPTS:
        assert_close(resid[prompt], ref[prompt]["resid"], f"{arch} {op} resid[{prompt}]")
        assert_close(logits[prompt], ref[prompt]["logits"], f"{arch} {op} logits[{prompt}]")
        assert torch.equal(logits[prompt].argmax(-1), ref[prompt]["logits"].argmax(-1))
        moved |= not torch.allclose(ref[prompt]["logits"], unedited[prompt]["logits"])
    assert moved, "the nnsight edit changed nothing: the comparison would prove nothing"


# -- SmolLM2-135M -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def smol(smollm2_dir: Path) -> Iterator[str]:
    """The converted SmolLM2 checkpoint; its nnsight wrapper is dropped after the module."""
    yield str(smollm2_dir)
    ns_model.cache_clear()


def test_smollm2_every_layer_matches_nnsight(smol: str, tmp_path: Path) -> None:
    """All 30 layers' outputs and the logits at the last token of two prompts equal
    nnsight's, relative to the values' scale; same top prediction (" Paris")."""
    results = run_spec(
        tmp_path,
        {
            "model": {"path": smol},
            "prompts": SMOL_PROMPTS,
            "save": {
                "resid": {"at": "model.layers.*.output", "tokens": [-1]},
                "logits": {"at": "output", "tokens": [-1]},
            },
        },
    )
    ref = nnsight_run(smol, "llama", SMOL_PROMPTS, lens=False)
    resid, logits = by_prompt(results, "resid"), by_prompt(results, "logits")
    assert resid["clean"].shape == (30, 1, 576)
    for prompt in SMOL_PROMPTS:
        assert_rel_close(resid[prompt], ref[prompt]["resid"][:, -1:], f"smollm2 resid[{prompt}]")
        assert_rel_close(logits[prompt][0], ref[prompt]["logits"][-1], f"smollm2 logits[{prompt}]")
        assert logits[prompt][0].argmax() == ref[prompt]["logits"][-1].argmax()
    paris = _single_token(smol, " Paris")
    assert int(logits["clean"][0].argmax()) == paris


def _single_token(path: str, text: str) -> int:
    """The id of `text`, which must be exactly one token (no special tokens added)."""
    (token,) = ns_model(path).tokenizer(text, add_special_tokens=False)["input_ids"]
    return token


def test_smollm2_patching_country_token(smol: str, tmp_path: Path) -> None:
    """Activation patching: the clean prompt's layer-8 output at " France" patched into
    "The capital of Germany is" at the same position makes " Paris" the corrupt prompt's
    top prediction (it is " Berlin" unpatched), in nnrun and in nnsight alike."""
    ids = token_ids(smol, SMOL_PROMPTS["clean"])
    france, paris, berlin = (_single_token(smol, t) for t in (" France", " Paris", " Berlin"))
    country = ids.index(france)
    assert len(token_ids(smol, SMOL_PROMPTS["corrupt"])) == len(ids)
    results = run_spec(
        tmp_path,
        {
            "model": {"builtin": "smollm2-135m-instruct"},
            "prompts": SMOL_PROMPTS,
            "edits": [
                {
                    "at": "model.layers.8.output",
                    "prompts": ["corrupt"],
                    "tokens": [country],
                    "set": {"from": "clean"},
                }
            ],
            "save": {"logits": {"at": "output", "tokens": [-1]}},
        },
    )
    logits = by_prompt(results, "logits")
    assert int(logits["clean"][0].argmax()) == paris
    assert int(logits["corrupt"][0].argmax()) == paris

    offset = country - len(ids)  # the same position, counted from the end (left padding)

    def patch(prompt: str, i: int, layer: Any, shared: dict[str, Any]) -> None:
        if i != 8:
            return
        if prompt == "clean":
            shared["source"] = layer.output[:, offset].clone()
            shared["barrier"]()
        else:
            shared["barrier"]()
            layer.output[:, offset] = shared["source"]

    patched = nnsight_run(smol, "llama", SMOL_PROMPTS, patch, barrier=2, lens=False)
    plain = nnsight_run(smol, "llama", {"corrupt": SMOL_PROMPTS["corrupt"]}, lens=False)
    assert int(plain["corrupt"]["logits"][-1].argmax()) == berlin
    assert int(patched["corrupt"]["logits"][-1].argmax()) == paris
    for prompt in SMOL_PROMPTS:
        assert_rel_close(logits[prompt][0], patched[prompt]["logits"][-1], f"patched {prompt}")
