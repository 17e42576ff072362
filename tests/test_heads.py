"""Attention heads and attention patterns against hand-written hooks on the plain model.

Head edits (`heads:`) split the value's last axis into heads x head_dim (counts from the
config) and act on the selected heads only; the reference does the same slice by hand
in a plain forward pre-hook / hook, one prompt alone. Tiny Llama has grouped-query
attention (4 query heads, 2 key/value heads of head_dim 8), tiny GPT-2 fuses q, k and v
into `c_attn` (heads work at `attn.c_proj.input`). Attention patterns are compared with
the eager model's own attention weights; the real tier repeats both on SmolLM2, and the
patterns against nnsight.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from test_conformance import (
    ARCHS,
    PROMPTS,
    assert_close,
    by_prompt,
    hf_model,
    hook_reference,
    one_thread,  # noqa: F401  (autouse: one intra-op thread)
    run_spec,
    tiny_dir,
    token_ids,
)
from transformers import AutoModelForCausalLM

import nnrun
from nnrun.errors import CompileError, NnrunError

HEAD_DIM = 8  # tiny models: width 32, 4 heads
# The input of each architecture's attention output projection in layer 1.
OUT_PROJ = {
    "llama": "model.layers.1.self_attn.o_proj.input",
    "gpt2": "transformer.h.1.attn.c_proj.input",
}
ATTN = {"llama": "model.layers.{}.self_attn", "gpt2": "transformer.h.{}.attn"}


def heads_slice(value: torch.Tensor, heads: list[int], fn: Any) -> torch.Tensor:
    """value [..., H*D] with fn applied to each selected head's [..., D] slice."""
    out = value.clone()
    for h in heads:
        out[..., h * HEAD_DIM : (h + 1) * HEAD_DIM] = fn(
            out[..., h * HEAD_DIM : (h + 1) * HEAD_DIM]
        )
    return out


def logits_alone(path: Path, text: str, edits: dict[str, Any] | None = None) -> torch.Tensor:
    """The plain model's logits [T, vocab] for one prompt with hand-written edits."""
    model = hf_model(str(path))
    return hook_reference(model, token_ids(str(path), text), ["output"], edits)["output"]


# -- heads: edits ----------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_head_ablation_matches_hooks(
    arch: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """zero: heads [1, 3] of the output projection's input, every token of every prompt."""
    path = tiny_dir(arch, request)
    site = OUT_PROJ[arch]
    results = run_spec(
        tmp_path,
        {
            "model": {"path": str(path)},
            "batch_size": 3,
            "prompts": PROMPTS,
            "edits": [{"at": site, "heads": [1, 3], "zero": True}],
            "save": {"logits": {"at": "output"}},
        },
    )
    got = by_prompt(results, "logits")
    moved = False
    for prompt, text in PROMPTS.items():
        want = logits_alone(
            path, text, {site: lambda v, _: heads_slice(v, [1, 3], torch.zeros_like)}
        )
        assert_close(got[prompt], want, f"{arch} head ablation {prompt}")
        moved |= not torch.allclose(want, logits_alone(path, text), atol=1e-4)
    assert moved, "ablating two heads changed nothing: the comparison would prove nothing"


@pytest.mark.parametrize("arch", ARCHS)
def test_head_patching_matches_hooks(
    arch: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """set: {from: clean} at head 2, last token: only that head's slice is clean's."""
    path = tiny_dir(arch, request)
    site = OUT_PROJ[arch]
    results = run_spec(
        tmp_path,
        {
            "model": {"path": str(path)},
            "batch_size": 2,
            "prompts": PROMPTS,
            "edits": [
                {
                    "at": site,
                    "prompts": ["corrupt", "long"],
                    "tokens": [-1],
                    "heads": [2],
                    "set": {"from": "clean"},
                }
            ],
            "save": {"logits": {"at": "output", "tokens": -1}, "o": {"at": site, "tokens": -1}},
        },
    )
    model = hf_model(str(path))
    clean = hook_reference(model, token_ids(str(path), PROMPTS["clean"]), [site])[site][-1]

    def patch(value: torch.Tensor, _: Any) -> torch.Tensor:
        out = value.clone()
        out[0, -1, 2 * HEAD_DIM : 3 * HEAD_DIM] = clean[2 * HEAD_DIM : 3 * HEAD_DIM]
        return out

    got, seen = by_prompt(results, "logits"), by_prompt(results, "o")
    for prompt in ("corrupt", "long"):
        want = logits_alone(path, PROMPTS[prompt], {site: patch})
        assert_close(got[prompt][0], want[-1], f"{arch} head patch {prompt}")
        torch.testing.assert_close(
            seen[prompt][0, 2 * HEAD_DIM : 3 * HEAD_DIM], clean[2 * HEAD_DIM : 3 * HEAD_DIM]
        )
    assert_close(got["clean"][0], logits_alone(path, PROMPTS["clean"])[-1], f"{arch} clean")


def test_grouped_query_heads_at_q_k_v(tiny_llama: Path, tmp_path: Path) -> None:
    """Tiny Llama has 4 query heads and 2 key/value heads: k_proj and v_proj split into 2,
    q_proj into 4; a mul by a head_dim vector at key head 1 matches a hand-written hook."""
    attn = "model.layers.0.self_attn"
    scale = [0.5 + 0.1 * i for i in range(HEAD_DIM)]
    results = run_spec(
        tmp_path,
        {
            "model": {"path": str(tiny_llama)},
            "prompts": PROMPTS,
            "edits": [{"at": f"{attn}.k_proj.output", "heads": [1], "mul": scale}],
            "save": {
                "logits": {"at": "output", "tokens": -1},
                "v": {"at": f"{attn}.v_proj.output", "heads": "all"},
                "q": {"at": f"{attn}.q_proj.output", "heads": [3], "tokens": -1},
                "k": {"at": f"{attn}.k_proj.output", "heads": [1], "tokens": -1},
            },
        },
    )
    assert results.axes("v") == ["prompt", "token", "head", "head_dim"]
    assert results.labels("v", "head") == [0, 1] and results.labels("q", "head") == [3]
    factor = torch.tensor(scale)
    edit = {f"{attn}.k_proj.output": lambda v, _: heads_slice(v, [1], lambda s: s * factor)}
    reads = [f"{attn}.v_proj.output", f"{attn}.q_proj.output", f"{attn}.k_proj.output", "output"]
    model = hf_model(str(tiny_llama))
    v, q, k, logits = (by_prompt(results, n) for n in ("v", "q", "k", "logits"))
    for prompt, text in PROMPTS.items():
        ref = hook_reference(model, token_ids(str(tiny_llama), text), reads, edit)
        n = ref["output"].shape[0]
        assert_close(v[prompt], ref[reads[0]].reshape(n, 2, HEAD_DIM), f"v {prompt}")
        assert_close(q[prompt][0, 0], ref[reads[1]][-1, 3 * HEAD_DIM :], f"q {prompt}")
        assert_close(k[prompt][0, 0], ref[reads[2]][-1, HEAD_DIM:], f"k {prompt}")
        assert_close(logits[prompt][0], ref["output"][-1], f"logits {prompt}")


def test_head_mean_ablation_and_add(tiny_llama: Path, tmp_path: Path) -> None:
    """mean_ablate over two prompts and add a head_dim vector, both on head 0 only."""
    site = OUT_PROJ["llama"]
    vec = [float(i) / 10 for i in range(HEAD_DIM)]
    prompts = {"clean": PROMPTS["clean"], "corrupt": PROMPTS["corrupt"]}
    results = run_spec(
        tmp_path,
        {
            "model": {"path": str(tiny_llama)},
            "prompts": prompts,
            "edits": [
                {
                    "at": site,
                    "tokens": [-1],
                    "heads": [0],
                    "mean_ablate": {"over": ["clean", "corrupt"]},
                },
                {"at": site, "tokens": [-2], "heads": [0], "add": vec, "alpha": 2.0},
            ],
            "save": {"o": {"at": site, "tokens": [-2, -1]}, "logits": {"at": "output"}},
        },
    )
    model = hf_model(str(tiny_llama))
    plain = {
        p: hook_reference(model, token_ids(str(tiny_llama), t), [site])[site]
        for p, t in prompts.items()
    }
    mean = (plain["clean"][-1, :HEAD_DIM] + plain["corrupt"][-1, :HEAD_DIM]) / 2

    def edit(value: torch.Tensor, _: Any) -> torch.Tensor:
        out = value.clone()
        out[0, -1, :HEAD_DIM] = mean
        out[0, -2, :HEAD_DIM] += 2.0 * torch.tensor(vec)
        return out

    o, logits = by_prompt(results, "o"), by_prompt(results, "logits")
    for prompt, text in prompts.items():
        assert_close(o[prompt][1, :HEAD_DIM], mean, f"mean {prompt}")
        assert_close(
            o[prompt][:, HEAD_DIM:], plain[prompt][-2:, HEAD_DIM:], f"other heads {prompt}"
        )
        assert_close(
            logits[prompt], logits_alone(tiny_llama, text, {site: edit}), f"logits {prompt}"
        )


def test_head_saves_on_gpt2_and_standard_names(tiny_gpt2: Path, tmp_path: Path) -> None:
    """A head save is the value reshaped (tokens, heads, head_dim) and sliced; the standard
    name @layers.N.attn reaches the same module (transformer.h.N.attn on GPT-2)."""
    results = run_spec(
        tmp_path,
        {
            "model": {"path": str(tiny_gpt2)},
            "prompts": PROMPTS,
            "save": {
                "whole": {"at": "transformer.h.1.attn.c_proj.input"},
                "heads": {"at": "@layers.1.attn.c_proj.input", "heads": [3, 0]},
                "norms": {"at": "@layers.*.attn.c_proj.input", "heads": "all", "apply": ["norm"]},
            },
        },
    )
    whole, heads, norms = (by_prompt(results, n) for n in ("whole", "heads", "norms"))
    assert results.axes("norms") == ["prompt", "layer", "token", "head"]
    for prompt in PROMPTS:
        split = whole[prompt].reshape(*whole[prompt].shape[:-1], 4, HEAD_DIM)
        assert torch.equal(heads[prompt], split[:, [3, 0]])
        assert_close(norms[prompt][1], split.norm(dim=-1), f"norms {prompt}")


def test_one_head_spec_on_two_architectures(
    tiny_llama: Path, tiny_gpt2: Path, tmp_path: Path
) -> None:
    """`@layers.N.attn.o.input` is the output projection's input on every architecture
    (o_proj on Llama, c_proj on GPT-2): one head-ablation spec runs unchanged on both and
    equals the same spec written with real paths. GPT-2 has no separate q/k/v projection."""
    for path, real in ((tiny_llama, OUT_PROJ["llama"]), (tiny_gpt2, OUT_PROJ["gpt2"])):
        saved = []
        for at in ("@layers.1.attn.o.input", real):
            results = run_spec(
                tmp_path,
                {
                    "model": {"path": str(path)},
                    "prompts": PROMPTS,
                    "edits": [{"at": at, "heads": [0, 2], "zero": True}],
                    "save": {"logits": {"at": "output", "tokens": -1}},
                },
            )
            saved.append(results["logits"])
        assert torch.equal(saved[0], saved[1])
    spec = {
        "model": {"path": str(tiny_gpt2)},
        "prompts": {"a": "Hi"},
        "save": {"q": {"at": "@layers.0.attn.q.output", "heads": [0]}},
    }
    with pytest.raises(CompileError, match=r"@layers.N.attn.q: queries, keys and values are fused"):
        run_spec(tmp_path, spec)


@pytest.mark.parametrize(
    ("arch", "at", "heads", "fragment"),
    [
        ("gpt2", "transformer.h.0.attn.c_attn.output", [0], "fuses queries, keys and values"),
        ("llama", "model.layers.0.output", [0], "not split into heads"),
        ("llama", "model.layers.0.mlp.down_proj.input", [0], "not split into heads"),
        ("llama", "model.layers.0.self_attn.o_proj.input", [4], "head 4 does not exist"),
        ("llama", "model.layers.0.self_attn.k_proj.output", [2], "it has 2 heads (0..1)"),
        ("llama", "model.layers.0.self_attn.output[0]", "all", "not split into heads"),
    ],
)
def test_heads_where_they_make_no_sense(
    arch: str, at: str, heads: Any, fragment: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """A compile-time error that names the site and its shape, and says where heads work."""
    path = tiny_dir(arch, request)
    for entry in ("save", "edits"):
        spec: dict[str, Any] = {"model": {"path": str(path)}, "prompts": {"a": "Hi"}}
        if entry == "save":
            spec["save"] = {"s": {"at": at, "heads": heads}}
        else:
            spec["edits"] = [{"at": at, "heads": heads, "zero": True}]
        with pytest.raises(CompileError, match=re.escape(fragment)) as caught:
            run_spec(tmp_path, spec)
        message = str(caught.value)
        assert at.split("[")[0].removesuffix(".output").removesuffix(".input") in message
        assert "heads" in message


# -- attention patterns ------------------------------------------------------------------


@functools.cache
def eager_model(path: str) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, attn_implementation="eager"
    ).eval()


def eager_patterns(path: Path, arch: str, text: str) -> torch.Tensor:
    """[layer, head, T, T]: the eager model's attention weights for one prompt alone."""
    model = eager_model(str(path))
    reads = [f"{ATTN[arch].format(i)}.output[1]" for i in range(3)]
    got = hook_reference(model, token_ids(str(path), text), reads)
    return torch.stack([got[r] for r in reads])


@pytest.mark.parametrize("arch", ARCHS)
def test_patterns_match_the_eager_model(
    arch: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """(prompt, layer, head, token, key): each prompt's own keys, NaN past its end; the run
    switches a default (sdpa) model to eager for the run only, and the plan says so."""
    path = tiny_dir(arch, request)
    at = ATTN[arch].format("*") + ".output[1]"
    spec = {
        "model": {"path": str(path)},
        "batch_size": 3,
        "prompts": PROMPTS,
        "save": {"pattern": {"at": at}, "last": {"at": at, "heads": [2, 1], "tokens": -1}},
    }
    report = nnrun.plan({"nnrun": 1, **spec})
    assert any("eager" in w for w in report.plan.warnings)
    longest = max(len(token_ids(str(path), t)) for t in PROMPTS.values())
    assert report.save_shapes["pattern"] == (4, 3, 4, longest, longest)
    results = run_spec(tmp_path, spec)
    assert results.axes("pattern") == ["prompt", "layer", "head", "token", "key"]
    assert results["pattern"].shape == (4, 3, 4, longest, longest)
    lengths = results.lengths("pattern")
    last = dict(zip(results.prompt_ids("last"), results["last"], strict=True))
    for row, prompt in enumerate(results.prompt_ids("pattern")):
        want = eager_patterns(path, arch, PROMPTS[prompt])
        n = want.shape[-1]
        assert int(lengths[row]) == n
        got = results["pattern"][row]
        assert_close(got[:, :, :n, :n], want, f"{arch} pattern {prompt}")
        assert torch.isnan(got[:, :, :, n:]).all() and torch.isnan(got[:, :, n:]).all()
        torch.testing.assert_close(got[:, :, :n, :n].sum(-1), torch.ones(3, 4, n))
        assert_close(last[prompt][:, :, 0, :n], want[:, [2, 1], -1], f"{arch} last {prompt}")
    with pytest.raises(NnrunError, match="layer, head, token axes; a plot shows two"):
        nnrun.plot(results.path, "pattern")
    cached = nnrun._run.cached_model({"path": str(path), **_model_defaults()}).model
    assert cached.config._attn_implementation == "sdpa"  # switched back after the run


def _model_defaults() -> dict[str, Any]:
    from nnrun.spec._constants import MODEL_DEFAULTS

    return dict(MODEL_DEFAULTS)


def test_patterns_with_explicit_eager_and_generation(tiny_llama: Path, tmp_path: Path) -> None:
    """attn_implementation: eager loads eager (no switch, no warning); while generating a
    pattern is the prompt pass's (steps: 0), other steps are refused with the reason."""
    model = {"path": str(tiny_llama), "attn_implementation": "eager"}
    spec = {
        "model": model,
        "prompts": {"a": PROMPTS["clean"], "b": PROMPTS["short"]},
        "generate": {"max_new_tokens": 2},
        "save": {"p": {"at": "model.layers.0.self_attn.output[1]", "steps": 0, "tokens": -1}},
    }
    report = nnrun.plan({"nnrun": 1, **spec})
    assert report.plan.warnings == () and report.plan.attn_implementation is None
    results = run_spec(tmp_path, spec)
    assert results.axes("p") == ["prompt", "step", "head", "token", "key"]
    got = dict(zip(results.prompt_ids("p"), results["p"], strict=True))
    for prompt, text in (("a", PROMPTS["clean"]), ("b", PROMPTS["short"])):
        want = eager_patterns(tiny_llama, "llama", text)[0]
        n = want.shape[-1]
        assert_close(got[prompt][0, :, 0, :n], want[:, -1], f"generate pattern {prompt}")
    spec["save"]["p"]["steps"] = "all"
    with pytest.raises(CompileError, match="steps: 0"):
        run_spec(tmp_path, spec)


def test_patterns_refused_under_an_explicit_other_kernel(tiny_llama: Path, tmp_path: Path) -> None:
    spec = {
        "model": {"path": str(tiny_llama), "attn_implementation": "sdpa"},
        "prompts": {"a": "Hi"},
        "save": {"p": {"at": "@layers.0.attn.output[1]"}},
    }
    with pytest.raises(CompileError, match="set attn_implementation: eager"):
        run_spec(tmp_path, spec)
    spec["save"] = {"p": {"at": "@layers.0.attn.output[1]"}}
    spec["edits"] = [{"at": "@layers.0.attn.output[1]", "heads": [0], "zero": True}]
    spec["model"]["attn_implementation"] = "eager"
    with pytest.raises(CompileError, match="changes nothing downstream"):
        run_spec(tmp_path, spec)
    del spec["edits"]
    spec["save"]["p"]["layout"] = "packed"  # a pattern is ragged on two axes: padded only
    with pytest.raises(CompileError, match=r"save\.p\.layout: an attention pattern is stored"):
        run_spec(tmp_path, spec)


def test_unknown_attention_kernel_is_a_spec_error() -> None:
    from nnrun.spec import load_spec, validate_spec

    issues = validate_spec(
        load_spec({"nnrun": 1, "prompts": {"a": "x"}, "model": {"attn_implementation": "fast"}})
    )
    assert [i.path for i in issues] == ["model.attn_implementation"]
    assert "eager" in issues[0].message


# -- real tier: SmolLM2 ------------------------------------------------------------------


SMOL_PROMPTS = {"clean": "The capital of France is", "corrupt": "The capital of Germany is"}


@pytest.mark.real
def test_smollm2_head_ablation_and_patching_match_hooks(smollm2_dir: Path, tmp_path: Path) -> None:
    """SmolLM2 (9 query heads, 3 key/value heads of 64): zero two heads of layer 5 and patch
    head 4 of layer 12 from the clean prompt; logits equal a hand-written hook, relatively."""
    dim = 64
    o5, o12 = (f"model.layers.{i}.self_attn.o_proj.input" for i in (5, 12))
    results = run_spec(
        tmp_path,
        {
            "model": {"path": str(smollm2_dir)},
            "prompts": SMOL_PROMPTS,
            "edits": [
                {"at": "@layers.5.attn.o_proj.input", "heads": [0, 7], "zero": True},
                {"at": o12, "prompts": ["corrupt"], "heads": [4], "set": {"from": "clean"}},
            ],
            "save": {"logits": {"at": "output", "tokens": -1}},
        },
    )
    model = hf_model(str(smollm2_dir))
    ids = {p: token_ids(str(smollm2_dir), t) for p, t in SMOL_PROMPTS.items()}

    def zero(v: torch.Tensor, _: Any) -> torch.Tensor:
        out = v.clone()
        for h in (0, 7):
            out[..., h * dim : (h + 1) * dim] = 0
        return out

    clean = hook_reference(model, ids["clean"], [o12, "output"], {o5: zero})

    def patch(v: torch.Tensor, _: Any) -> torch.Tensor:
        out = v.clone()
        out[0, :, 4 * dim : 5 * dim] = clean[o12][:, 4 * dim : 5 * dim]
        return out

    corrupt = hook_reference(model, ids["corrupt"], ["output"], {o5: zero, o12: patch})
    got = by_prompt(results, "logits")
    for prompt, ref in (("clean", clean), ("corrupt", corrupt)):
        want = ref["output"][-1]
        rel = float((got[prompt][0] - want).abs().max() / want.abs().max())
        assert rel < 1e-4, f"{prompt}: relative max diff {rel:.3g}"


@pytest.mark.real
def test_smollm2_and_gpt2_patterns_match_nnsight(
    smollm2_dir: Path, tiny_gpt2: Path, tmp_path: Path
) -> None:
    """Attention weights saved by nnrun equal nnsight's `.output[1]` of the attention
    modules (both eager), for two prompts of different lengths in one batch."""
    from test_conformance_nnsight import _nnsight

    prompts = {"a": "The capital of France is", "b": "When Mary and John went to the store"}
    for path, layers in ((smollm2_dir, "model.layers"), (tiny_gpt2, "transformer.h")):
        attn = "self_attn" if layers == "model.layers" else "attn"
        results = run_spec(
            tmp_path,
            {
                "model": {"path": str(path), "attn_implementation": "eager"},
                "prompts": prompts,
                "save": {"p": {"at": f"{layers}[0:3].{attn}.output[1]"}},
            },
        )
        model = _nnsight().TransformersModel(
            str(path),
            task="text-generation",
            tokenizer=str(path),
            dispatch=True,
            attn_implementation="eager",
        )
        saved: dict[str, Any] = {}
        with torch.no_grad(), model.trace() as tracer:
            for prompt, text in prompts.items():
                with tracer.invoke(text):
                    container = (
                        model.model.layers if layers == "model.layers" else model.transformer.h
                    )
                    weights = [getattr(container[i], attn).output[1] for i in range(3)]
                    saved[prompt] = _nnsight().save(weights)
        got = dict(zip(results.prompt_ids("p"), results["p"], strict=True))
        for prompt, text in prompts.items():
            n = len(token_ids(str(path), text))
            want = torch.stack([w[0, :, -n:, -n:] for w in saved[prompt]])  # left padded
            mine = got[prompt][:, :, :n, :n]
            rel = float((mine - want).abs().max())
            assert rel < 1e-5, f"{path.name} pattern {prompt}: max diff {rel:.3g}"
            assert torch.isnan(got[prompt][:, :, :, n:]).all()
