"""Conformance: nnrun's saves and edits equal a hand-written plain-PyTorch-hook reference.

Every reference runs ONE prompt alone (no padding, no position ids) through the plain
transformers model with forward hooks / pre-hooks, so a match also proves that nnrun's
batching (left padding, position ids, micro-batches, auxiliary source rows) changes
nothing beyond floating-point noise. Tiny seeded models, fp32, CPU.

NNRUN_TEST_DEVICE / NNRUN_TEST_DTYPE (benchmarks/gpu.sh) run nnrun's side on another
device or dtype (cuda, bfloat16) against the same fp32 CPU references; in a 16-bit
dtype values are compared within that dtype's rounding (see RTOL, ATOL).
"""

from __future__ import annotations

import functools
import itertools
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import placement_overrides
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

import nnrun
from nnrun.store import Results

PLACEMENT = placement_overrides()  # {} unless NNRUN_TEST_DEVICE / NNRUN_TEST_DTYPE are set
LOW_PRECISION = PLACEMENT.get("dtype", "float32") not in ("float32", "auto")
# fp32 anywhere: floating-point noise only. 16-bit: the run rounds every activation to
# 8 (bf16) or 11 (fp16) mantissa bits over 3 layers, against an fp32 reference.
RTOL, ATOL = (3e-2, 3e-2) if LOW_PRECISION else (1e-4, 1e-5)

pytestmark = pytest.mark.skipif(
    PLACEMENT.get("device", "cpu").startswith("cuda") and not torch.cuda.is_available(),
    reason=f"NNRUN_TEST_DEVICE={PLACEMENT.get('device')} but torch sees no CUDA GPU",
)

# Batch order matters: different lengths, the shortest and longest not at the ends.
PROMPTS: dict[str, str] = {
    "clean": "The capital of France is",
    "short": "Hi",
    "long": "The Eiffel Tower is in the city of",
    "corrupt": "The capital of Germany is",
}

# The same roles in each architecture. " France" / " Germany" sit at token -2 in both.
SITES: dict[str, dict[str, str]] = {
    "llama": {
        "layers": "model.layers",
        "attn0": "model.layers.0.self_attn.output[0]",
        "mlp1": "model.layers.1.mlp",
        "down0": "model.layers.0.mlp.down_proj.input",
        "down1": "model.layers.1.mlp.down_proj.input",
        "embed": "model.embed_tokens.output",
        "norm": "model.norm",
    },
    "gpt2": {
        "layers": "transformer.h",
        "attn0": "transformer.h.0.attn.output[0]",
        "mlp1": "transformer.h.1.mlp",
        "down0": "transformer.h.0.mlp.c_proj.input",
        "down1": "transformer.h.1.mlp.c_proj.input",
        "embed": "transformer.wte.output",
        "norm": "transformer.ln_f",
    },
}
ARCHS = tuple(SITES)
HIDDEN = 32  # width of every tiny model

EditFn = Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]
# (selected values [1, K, ...], module input at those entries or None,
#  unedited plain-hook values: prompt -> location -> [T, ...]) -> new selected values
RefFn = Callable[
    [torch.Tensor, torch.Tensor | None, dict[str, dict[str, torch.Tensor]]], torch.Tensor
]

# -- helpers ----------------------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """Width-32 models gain nothing from intra-op threads, and on a loaded 2-CPU machine
    OpenMP spin-waiting made this file 5x slower; restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


_run_ids = itertools.count()


def run_spec(tmp_path: Path, spec: Mapping[str, Any], overrides: Iterable[str] = ()) -> Results:
    """Run `spec` (format 1 added) through the public API into a fresh file under tmp_path."""
    full = {"nnrun": 1, "name": "conformance", **spec}
    full["model"] = {**PLACEMENT, **full["model"]}
    return nnrun.run(full, overrides=list(overrides), output=tmp_path / f"run{next(_run_ids)}.h5")


def tiny_dir(arch: str, request: pytest.FixtureRequest) -> Path:
    return request.getfixturevalue(f"tiny_{arch}")


@functools.cache
def hf_model(path: str, cls_name: str = "AutoModelForCausalLM") -> torch.nn.Module:
    """The plain transformers model (fp32, eval), loaded once per checkpoint."""
    cls = {"AutoModelForCausalLM": AutoModelForCausalLM, "AutoModel": AutoModel}[cls_name]
    return cls.from_pretrained(path, dtype=torch.float32).eval()


@functools.cache
def token_ids(path: str, text: str) -> tuple[int, ...]:
    """The prompt's own token ids, special tokens included (as nnrun tokenizes it)."""
    return tuple(AutoTokenizer.from_pretrained(path)(text)["input_ids"])


def split_location(location: str) -> tuple[str, str, tuple[int, ...]]:
    """'a.b.output[0]' -> ('a.b', 'output', (0,)); the root 'output' -> ('', 'output', ())."""
    m = re.fullmatch(r"(?:(.*)\.)?(input|output)((?:\[\d+\])*)", location)
    assert m, location
    indices = tuple(int(i) for i in re.findall(r"\d+", m.group(3)))
    return m.group(1) or "", m.group(2), indices


def _get(container: Any, indices: tuple[int, ...], root: bool) -> torch.Tensor:
    if root:
        return container.logits if hasattr(container, "logits") else container.last_hidden_state
    for i in indices:
        container = container[i]
    return container


def _put(container: Any, indices: tuple[int, ...], value: torch.Tensor) -> Any:
    if not indices:
        return value
    items = list(container)
    items[indices[0]] = _put(items[indices[0]], indices[1:], value)
    return tuple(items)


def hook_reference(
    model: torch.nn.Module,
    ids: Iterable[int],
    reads: Iterable[str],
    edits: Mapping[str, EditFn] | None = None,
) -> dict[str, torch.Tensor]:
    """Run one prompt alone with plain hooks; return each read location's value [T, ...].

    `edits` maps a location to fn(value [1, T, ...], module input or None) -> new value;
    a read at an edited location sees the value after the edit.
    """
    edits = dict(edits or {})
    reads = list(reads)
    by_site: dict[tuple[str, str], list[str]] = {}
    for loc in [*edits, *reads]:
        module, port, _ = split_location(loc)
        by_site.setdefault((module, port), [])
        if loc not in by_site[(module, port)]:
            by_site[(module, port)].append(loc)
    modules = dict(model.named_modules())
    got: dict[str, torch.Tensor] = {}

    def at_site(container: Any, locs: list[str], first_input: Any, root: bool) -> Any:
        for loc in locs:
            if loc in edits:
                _, _, idx = split_location(loc)
                new = edits[loc](_get(container, idx, root), first_input)
                container = _put(container, idx, new)
        for loc in locs:
            if loc in reads:
                got[loc] = _get(container, split_location(loc)[2], root)[0].detach().clone()
        return container

    handles = []
    for (name, port), locs in by_site.items():
        module = modules[name]
        if port == "output":

            def hook(mod, args, kwargs, output, locs=locs, root=name == ""):
                first = args[0] if args else next(iter(kwargs.values()), None)
                return at_site(output, locs, first, root)

            handles.append(module.register_forward_hook(hook, with_kwargs=True))
        else:

            def pre_hook(mod, args, kwargs, locs=locs):
                if args:
                    return (at_site(args[0], locs, None, False), *args[1:]), kwargs
                key = next(iter(kwargs))
                return args, {**kwargs, key: at_site(kwargs[key], locs, None, False)}

            handles.append(module.register_forward_pre_hook(pre_hook, with_kwargs=True))
    try:
        with torch.inference_mode():
            model(input_ids=torch.tensor([list(ids)]))
    finally:
        for handle in handles:
            handle.remove()
    return got


@functools.cache
def unedited(
    path: str, cls_name: str, text: str, reads: tuple[str, ...]
) -> dict[str, torch.Tensor]:
    """Plain-hook values of an unedited single-prompt run (cached)."""
    return hook_reference(hf_model(path, cls_name), token_ids(path, text), reads)


def positions(tokens: Any, length: int) -> list[int]:
    """A token selection (int, list, 'a:b', 'all') resolved in a prompt of `length` tokens."""
    every = list(range(length))
    if tokens == "all":
        return every
    if isinstance(tokens, str):
        start, stop = (int(p) if p else None for p in tokens.split(":"))
        return every[start:stop]
    return [every[t] for t in ([tokens] if isinstance(tokens, int) else tokens)]


def by_prompt(results: Results, name: str) -> dict[str, torch.Tensor]:
    """Each prompt's values of a save, ragged token padding stripped (and checked to be NaN)."""
    data = results[name]
    axes = results.axes(name)
    token_axis = axes.index("token") - 1  # within one prompt's row
    lengths = results.lengths(name)
    out = {}
    for row, prompt in enumerate(results.prompt_ids(name)):
        value = data[row]
        if lengths is not None:
            n = int(lengths[row])
            pad = value.narrow(token_axis, n, value.shape[token_axis] - n)
            assert torch.isnan(pad).all(), f"{name}[{prompt}]: padding past length {n} is not NaN"
            value = value.narrow(token_axis, 0, n)
        assert not torch.isnan(value).any(), f"{name}[{prompt}]: NaN inside the prompt's tokens"
        out[prompt] = value
    return out


def assert_close(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    got, want = got.float().cpu(), want.float().cpu()
    assert torch.allclose(got, want, rtol=RTOL, atol=ATOL), (
        f"{what}: max abs diff {(got - want).abs().max().item():.3g}"
    )


# -- saves ------------------------------------------------------------------------------


@pytest.mark.parametrize("batch_size", [1, 3, 8])
@pytest.mark.parametrize("arch", ARCHS)
def test_layer_saves_match_single_prompt_hooks(
    arch: str, batch_size: int, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """Every layer's output at [-1], all (ragged) and "1:3", for prompts of different
    lengths batched (1, 3 or 8 per pass), equals each prompt run alone with plain hooks."""
    path = str(tiny_dir(arch, request))
    at = f"{SITES[arch]['layers']}.*.output"
    selections = {"last": [-1], "every": "all", "middle": "1:3"}
    results = run_spec(
        tmp_path,
        {
            "model": {"path": path},
            "batch_size": batch_size,
            "prompts": PROMPTS,
            "save": {name: {"at": at, "tokens": tok} for name, tok in selections.items()},
        },
    )
    layer_locs = tuple(f"{SITES[arch]['layers']}.{i}.output" for i in range(3))
    for name, tokens in selections.items():
        assert results.axes(name) == ["prompt", "layer", "token", "hidden"]
        assert results.prompt_ids(name) == list(PROMPTS)
        got = by_prompt(results, name)
        lengths = results.lengths(name)
        for row, (prompt, text) in enumerate(PROMPTS.items()):
            ref = unedited(path, "AutoModelForCausalLM", text, layer_locs)
            pos = positions(tokens, len(token_ids(path, text)))
            if lengths is not None:
                assert int(lengths[row]) == len(pos), f"{name}[{prompt}]: length"
            want = torch.stack([ref[loc][pos] for loc in layer_locs])
            assert_close(got[prompt], want, f"{arch} bs={batch_size} {name}[{prompt}]")
    # The short prompt has fewer tokens than "1:3" asks for: the slice stops at its end.
    assert results.lengths("middle").tolist() == [
        len(positions("1:3", len(token_ids(path, t)))) for t in PROMPTS.values()
    ]


@pytest.mark.parametrize("arch", ARCHS)
def test_site_saves_match_single_prompt_hooks(
    arch: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """A tuple element (attention output[0]), an input port (a pre-hook), the embedding
    output and the root output (logits) at every token equal plain hooks per prompt."""
    path = str(tiny_dir(arch, request))
    sites = SITES[arch]
    locs = {
        "attn": sites["attn0"],
        "down": sites["down1"],
        "embed": sites["embed"],
        "logits": "output",
    }
    results = run_spec(
        tmp_path,
        {
            "model": {"path": path},
            "prompts": PROMPTS,
            "save": {name: {"at": loc} for name, loc in locs.items()},
        },
    )
    assert results.axes("logits") == ["prompt", "token", "vocab"]
    for name, loc in locs.items():
        got = by_prompt(results, name)
        for prompt, text in PROMPTS.items():
            ref = unedited(path, "AutoModelForCausalLM", text, tuple(locs.values()))
            assert_close(got[prompt], ref[loc], f"{arch} {name}[{prompt}]")


@pytest.mark.parametrize("arch", ARCHS)
def test_logit_lens_apply_matches_plain_modules(
    arch: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """`apply: [norm, lm_head, softmax]` (and `{topk: 3}`) on each layer's last token
    equals running those modules by hand on the plain-hook residual."""
    path = str(tiny_dir(arch, request))
    sites = SITES[arch]
    chain = [sites["norm"], "lm_head", "softmax"]
    at = f"{sites['layers']}.*.output"
    results = run_spec(
        tmp_path,
        {
            "model": {"path": path},
            "prompts": PROMPTS,
            "save": {
                "lens": {"at": at, "tokens": -1, "apply": chain},
                "top": {"at": at, "tokens": -1, "apply": [*chain, {"topk": 3}]},
            },
        },
    )
    model = hf_model(path)
    modules = dict(model.named_modules())
    layer_locs = tuple(f"{sites['layers']}.{i}.output" for i in range(3))
    lens = by_prompt(results, "lens")
    top_values, top_indices = results["top"], results["top.indices"]
    for row, (prompt, text) in enumerate(PROMPTS.items()):
        ref = unedited(path, "AutoModelForCausalLM", text, layer_locs)
        resid = torch.stack([ref[loc][-1:] for loc in layer_locs])  # (layer, 1, hidden)
        with torch.inference_mode():
            want = torch.softmax(modules["lm_head"](modules[sites["norm"]](resid)), dim=-1)
        assert_close(lens[prompt], want, f"{arch} lens[{prompt}]")
        assert_close(top_values[row], want.topk(3, dim=-1).values, f"{arch} top[{prompt}]")
        if LOW_PRECISION:
            # Rounding may reorder near-ties: each picked token must hold a top-3 value.
            picked = want.gather(-1, top_indices[row].long())
            assert_close(picked, want.topk(3, dim=-1).values, f"{arch} top.indices[{prompt}]")
        else:
            assert torch.equal(top_indices[row], want.topk(3, dim=-1).indices)


def test_bert_encoder_saves_match_single_prompt_hooks(tiny_bert: Path, tmp_path: Path) -> None:
    """A bare encoder (`class: AutoModel`): every layer at every token and the root output
    (= last_hidden_state) for prompts of different lengths equal each prompt run alone."""
    path = str(tiny_bert)
    results = run_spec(
        tmp_path,
        {
            "model": {"path": path, "class": "AutoModel"},
            "prompts": PROMPTS,
            "save": {"layers": {"at": "encoder.layer.*.output"}, "out": {"at": "output"}},
        },
    )
    locs = tuple(f"encoder.layer.{i}.output" for i in range(3)) + ("output",)
    layers, out = by_prompt(results, "layers"), by_prompt(results, "out")
    for prompt, text in PROMPTS.items():
        ref = unedited(path, "AutoModel", text, locs)
        assert_close(layers[prompt], torch.stack([ref[loc] for loc in locs[:3]]), f"bert {prompt}")
        assert_close(out[prompt], ref["output"], f"bert output[{prompt}]")
        assert torch.equal(out[prompt], layers[prompt][-1])  # the last layer IS the output


# -- edits ------------------------------------------------------------------------------


@dataclass(frozen=True)
class EditCase:
    """One edit, as a spec entry (`{role}` placeholders name SITES) and as a reference.

    `ref` (a RefFn) does the same edit by hand on the selected prompts and tokens only.
    """

    id: str
    edit: dict[str, Any]
    ref: RefFn
    sources: tuple[str, ...] = ()  # extra locations the reference reads from unedited runs
    prompts: tuple[str, ...] = field(default_factory=lambda: tuple(PROMPTS))
    tokens: Any = "all"


def _vec(scale: float) -> list[float]:
    """A fixed hidden-size vector with exact binary fractions."""
    return [scale * ((i % 7) - 3) / 8 for i in range(HIDDEN)]


def _direction() -> list[float]:
    return [float((i % 5) - 2) for i in range(HIDDEN)]


def _case(
    id: str,
    at: str,
    op: dict[str, Any],
    fn: RefFn,
    *,
    prompts: tuple[str, ...] | None = None,
    tokens: Any = "all",
    sources: tuple[str, ...] = (),
) -> EditCase:
    edit = {"at": at, **op, "tokens": tokens}
    if prompts is not None:
        edit["prompts"] = list(prompts)
    return EditCase(id, edit, fn, sources, prompts or tuple(PROMPTS), tokens)


EDIT_CASES: list[EditCase] = [
    _case(
        "set-literal",
        "{layers}.1.output",
        {"set": _vec(1.0)},
        lambda x, i, s: torch.tensor(_vec(1.0)).expand_as(x),
        tokens=[1],
    ),
    _case(
        "add-alpha",
        "{layers}.2.output",
        {"add": _vec(0.5), "alpha": 2.0},
        lambda x, i, s: x + 2.0 * torch.tensor(_vec(0.5)),
        tokens="1:3",
    ),
    _case("mul", "{layers}.1.output", {"mul": 3.0}, lambda x, i, s: x * 3.0, prompts=("long",)),
    _case(
        "zero-tuple-element",
        "{attn0}",
        {"zero": True},
        lambda x, i, s: torch.zeros_like(x),
        tokens=[0, -1],
    ),
    _case(
        "mean-ablate",
        "{layers}.1.output",
        {"mean_ablate": {"over": ["clean", "corrupt"]}},
        lambda x, i, s: (
            (s["clean"]["{layers}.1.output"][-1] + s["corrupt"]["{layers}.1.output"][-1]) / 2
        ).expand_as(x),
        prompts=("short",),
        tokens=[-1],
        sources=("{layers}.1.output",),
    ),
    _case(
        "project-out",
        "{layers}.1.output",
        {"project_out": _direction()},
        lambda x, i, s: _project_out(x, torch.tensor(_direction())),
        prompts=("clean", "long"),
    ),
    _case(
        "clamp",
        "{layers}.0.output",
        {"clamp": {"min": -0.02, "max": 0.02}},
        lambda x, i, s: x.clamp(-0.02, 0.02),
    ),
    _case("skip-mlp", "{mlp1}.output", {"skip": True}, lambda x, i, s: i, prompts=("clean",)),
    _case(
        "skip-layer",
        "{layers}.1.output",
        {"skip": True},
        lambda x, i, s: i,
        prompts=("short", "long"),
        tokens="1:3",
    ),
    _case("input-port-mul", "{down0}", {"mul": 0.5}, lambda x, i, s: x * 0.5, tokens="1:3"),
    _case(
        "patch-from-clean",
        "{layers}.1.output",
        {"set": {"from": "clean"}},
        lambda x, i, s: s["clean"]["{layers}.1.output"][-2].expand_as(x),
        prompts=("corrupt",),
        tokens=[-2],
        sources=("{layers}.1.output",),
    ),
    _case(
        "add-from-earlier-site",
        "{layers}.1.output",
        {"add": {"from": "clean", "at": "{embed}"}, "alpha": 0.5},
        lambda x, i, s: x + 0.5 * s["clean"]["{embed}"][-1],
        prompts=("corrupt",),
        tokens=[-1],
        sources=("{embed}",),
    ),
]


def _project_out(x: torch.Tensor, direction: torch.Tensor) -> torch.Tensor:
    unit = direction / direction.norm()
    return x - (x @ unit)[..., None] * unit


def _fill(template: Any, arch: str) -> Any:
    """Replace `{role}` placeholders by the architecture's site names, recursively."""
    if isinstance(template, str):
        return template.format(**SITES[arch])
    if isinstance(template, dict):
        return {k: _fill(v, arch) for k, v in template.items()}
    if isinstance(template, list):
        return [_fill(v, arch) for v in template]
    return template


def _site_of(case: EditCase, arch: str) -> str:
    return _fill(case.edit["at"], arch)


def _selected(case: EditCase, prompt: str, length: int) -> torch.Tensor:
    """(T,) bool: which of the prompt's own tokens the edit selects."""
    mask = torch.zeros(length, dtype=torch.bool)
    if prompt in case.prompts:
        mask[positions(case.tokens, length)] = True
    return mask


def reference_edit(case: EditCase, arch: str, path: str) -> tuple[str, dict[str, EditFn]]:
    """The edited location, and per prompt the plain-hook edit fn for `hook_reference`."""
    site = _site_of(case, arch)
    sources = tuple(_fill(s, arch) for s in case.sources)
    src = {p: unedited(path, "AutoModelForCausalLM", t, sources) for p, t in PROMPTS.items()}
    # The case's lambdas name sources with placeholders; give them both spellings.
    src = {p: {**v, **{s: v[_fill(s, arch)] for s in case.sources}} for p, v in src.items()}
    fns = {}
    for prompt in PROMPTS:

        def fn(
            x: torch.Tensor, first_input: torch.Tensor | None, prompt: str = prompt
        ) -> torch.Tensor:
            mask = _selected(case, prompt, x.shape[1])
            if not mask.any():
                return x
            new = x.clone()
            inp = None if first_input is None else first_input[:, mask]
            new[:, mask] = case.ref(x[:, mask], inp, src).to(x.dtype)
            return new

        fns[prompt] = fn
    return site, fns


def _edit_spec(path: str, arch: str, case: EditCase | None, site: str, **extra: Any) -> dict:
    spec = {
        "model": {"path": path},
        "prompts": PROMPTS,
        "save": {
            "after": {"at": site},
            "before": {"at": site, "before_edits": True},
            "logits": {"at": "output"},
        },
        **extra,
    }
    if case is not None:
        spec["edits"] = [_fill(case.edit, arch)]
    return spec


@pytest.fixture(scope="module")
def baseline(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str, str, int], Results]:
    """Unedited nnrun runs with the same saves as an edit case, cached per site."""
    cache: dict[tuple[str, str, int], Results] = {}
    tmp = tmp_path_factory.mktemp("baseline")

    def get(path: str, site: str, batch_size: int = 8) -> Results:
        key = (path, site, batch_size)
        if key not in cache:
            spec = _edit_spec(path, "", None, site, batch_size=batch_size)
            cache[key] = run_spec(tmp, spec)
        return cache[key]

    return get


@pytest.mark.parametrize("case", EDIT_CASES, ids=lambda c: c.id)
@pytest.mark.parametrize("arch", ARCHS)
def test_edit_matches_plain_hook_edit(
    arch: str,
    case: EditCase,
    request: pytest.FixtureRequest,
    tmp_path: Path,
    baseline: Callable[..., Results],
) -> None:
    """The edit (1) changes the selected entries of its site to what the plain-hook edit
    gives, (2) leaves every other row and token of the site bit-identical to an unedited
    run, (3) is seen by a save at the site unless `before_edits: true`, and (4) gives the
    same logits downstream as the plain-hook edit on each prompt alone."""
    path = str(tiny_dir(arch, request))
    site, fns = reference_edit(case, arch, path)
    results = run_spec(tmp_path, _edit_spec(path, arch, case, site))
    base = baseline(path, site)
    after, before = by_prompt(results, "after"), by_prompt(results, "before")
    base_after, logits = by_prompt(base, "after"), by_prompt(results, "logits")
    changed = False
    for prompt, text in PROMPTS.items():
        ids = token_ids(path, text)
        mask = _selected(case, prompt, len(ids))
        # (3) before_edits sees the unedited value, bit for bit.
        assert torch.equal(before[prompt], base_after[prompt]), f"{prompt}: before_edits"
        # (2) outside the selection nothing moved at the edited site.
        assert torch.equal(after[prompt][~mask], base_after[prompt][~mask]), f"{prompt}: outside"
        # (1) inside: the reference edit applied to the unedited value.
        want = fns[prompt](
            unedited(path, "AutoModelForCausalLM", text, (site,))[site][None],
            _skip_input(case, arch, path, text),
        )[0]
        assert_close(after[prompt], want, f"{arch} {case.id} site[{prompt}]")
        changed |= not torch.equal(after[prompt][mask], before[prompt][mask])
        # (4) downstream.
        edited = hook_reference(hf_model(path), ids, ["output"], {site: fns[prompt]})
        assert_close(logits[prompt], edited["output"], f"{arch} {case.id} logits[{prompt}]")
    assert changed, "the edit changed nothing: the test would prove nothing"


def _skip_input(case: EditCase, arch: str, path: str, text: str) -> torch.Tensor | None:
    """The edited module's unedited input (for skip), as [1, T, ...]."""
    if "skip" not in case.edit:
        return None
    module = _site_of(case, arch).rsplit(".", 1)[0]
    return unedited(path, "AutoModelForCausalLM", text, (f"{module}.input",))[f"{module}.input"][
        None
    ]


CROSS_PROMPT = [c for c in EDIT_CASES if c.sources]


@pytest.mark.parametrize("case", CROSS_PROMPT, ids=lambda c: c.id)
@pytest.mark.parametrize("arch", ARCHS)
def test_cross_prompt_edit_with_one_prompt_per_batch(
    arch: str, case: EditCase, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """With `batch_size: 1` the source prompts of `from:` / `mean_ablate.over` ride along
    as extra rows; results still equal the plain-hook edit, and only real prompts are
    written, once each, in order."""
    path = str(tiny_dir(arch, request))
    site, fns = reference_edit(case, arch, path)
    results = run_spec(tmp_path, _edit_spec(path, arch, case, site, batch_size=1))
    assert results.prompt_ids("logits") == list(PROMPTS)
    assert results.prompts() == PROMPTS
    logits = by_prompt(results, "logits")
    for prompt, text in PROMPTS.items():
        edited = hook_reference(
            hf_model(path), token_ids(path, text), ["output"], {site: fns[prompt]}
        )
        assert_close(logits[prompt], edited["output"], f"{arch} {case.id} bs=1 logits[{prompt}]")


@pytest.mark.parametrize("arch", ARCHS)
def test_noise_is_seeded_and_confined_to_its_selection(
    arch: str, request: pytest.FixtureRequest, tmp_path: Path, baseline: Callable[..., Results]
) -> None:
    """`noise` is deterministic for a seed, differs for another seed, and touches only the
    selected prompt and tokens."""
    path = str(tiny_dir(arch, request))
    site = f"{SITES[arch]['layers']}.1.output"
    case = EditCase(
        "noise",
        {"at": site, "prompts": ["long"], "tokens": "1:3", "noise": {"std": 0.1}},
        lambda x, i, s: x,
        prompts=("long",),
        tokens="1:3",
    )
    spec = _edit_spec(path, arch, case, site)
    first, again = run_spec(tmp_path, spec), run_spec(tmp_path, spec)
    other = run_spec(tmp_path, {**spec, "seed": 1})
    a, b, c = (by_prompt(r, "after") for r in (first, again, other))
    base = by_prompt(baseline(path, site), "after")
    for prompt, text in PROMPTS.items():
        assert torch.equal(a[prompt], b[prompt]), f"{prompt}: same seed, different noise"
        mask = _selected(case, prompt, len(token_ids(path, text)))
        assert torch.equal(a[prompt][~mask], base[prompt][~mask])
        if mask.any():
            assert not torch.equal(a[prompt][mask], base[prompt][mask])
            assert not torch.equal(a[prompt][mask], c[prompt][mask]), "seed 1 gave seed 0's noise"
    assert torch.equal(first["logits"].nan_to_num(), again["logits"].nan_to_num())


@pytest.mark.parametrize("arch", ARCHS)
def test_noise_does_not_depend_on_batch_size(
    arch: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """`batch_size` changes results only by floating-point noise (spec reference), noise
    edits included: the same seed gives each prompt the same noise in any batching."""
    path = str(tiny_dir(arch, request))
    site = f"{SITES[arch]['layers']}.1.output"
    spec = {
        "model": {"path": path},
        "prompts": PROMPTS,
        "edits": [{"at": site, "prompts": ["clean", "long"], "noise": {"std": 0.1}}],
        "save": {"after": {"at": site}},
    }
    together = by_prompt(run_spec(tmp_path, spec), "after")
    alone = by_prompt(run_spec(tmp_path, {**spec, "batch_size": 1}), "after")
    for prompt in PROMPTS:
        assert_close(alone[prompt], together[prompt], f"{arch} noise[{prompt}] bs=1 vs bs=8")
