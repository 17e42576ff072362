"""Standard names (`@layers.5.output`, `@ln_final`, ...) mapped onto a model's own modules.

One spec should run unchanged on GPT-2 (`transformer.h.5`), Llama/Mistral/Qwen2/Gemma
(`model.layers.5`) and BERT (`encoder.layer.5`). The mapping is read from the model's
structure, not from a list of architectures:

- `layers`: the ModuleList of identical blocks whose length is the config's layer count
  (`num_hidden_layers`, `n_layer`, `num_layers`); when several qualify, the one that
  sits closest to the input embeddings;
- `attn` / `mlp`: the child of a block that is its (self-)attention / feed-forward
  module, by its usual name or its class name;
- `attn.q` / `attn.k` / `attn.v` / `attn.o`: inside that attention module, the query,
  key and value projections and the output projection, by their usual names (`q_proj`,
  BERT's `self.query`, GPT-2's `c_proj`, ...); fused projections (GPT-2's `c_attn`) have
  no q / k / v;
- `embed`: `model.get_input_embeddings()`;
- `lm_head`: the top-level module holding `model.get_output_embeddings()`;
- `ln_final`: the norm registered beside the layer list, after it.

`_TABLE` names modules only for architectures where that structure is ambiguous
(encoder-decoder models have two layer lists). A name that cannot be mapped is an
error that lists what could and could not be mapped; it never falls back to a guess.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field

from torch import nn

from nnrun.errors import CompileError
from nnrun.spec import Location

# Names a block's attention / feed-forward child usually has, in order of preference.
_ATTN_NAMES = ("self_attn", "attn", "attention", "self_attention")
_MLP_NAMES = ("mlp", "feed_forward", "ffn", "block_sparse_moe", "feedforward")
_MLP_CLASS_WORDS = ("MLP", "FeedForward", "MoE", "FFN")
_NORM_NAMES = ("norm", "ln_f", "final_layer_norm", "final_layernorm", "norm_f", "final_norm")
_LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers")

# config.model_type -> standard name -> module path (attn/mlp relative to a layer).
# Only where the structure alone is ambiguous: T5 has an encoder and a decoder stack of
# equal length, and its blocks wrap attention and MLP in a ModuleList of sub-layers.
_TABLE: dict[str, dict[str, str]] = {
    "t5": {
        "layers": "decoder.block",
        "attn": "layer.0.SelfAttention",
        "mlp": "layer.2.DenseReluDense",
        "ln_final": "decoder.final_layer_norm",
    },
}

STANDARD = ("layers", "attn", "mlp", "embed", "ln_final", "lm_head")
# Inside the attention module (paths relative to it): @layers.N.attn.q, ...
ATTN_PARTS = ("q", "k", "v", "o")
PART_NAMES = {
    "q": ("q_proj", "query", "q", "wq"),
    "k": ("k_proj", "key", "k", "wk"),
    "v": ("v_proj", "value", "v", "wv"),
    "o": ("o_proj", "out_proj", "c_proj", "o", "wo", "dense"),
}
FUSED_NAMES = ("c_attn", "qkv_proj", "query_key_value", "Wqkv", "qkv", "in_proj")


@dataclass(frozen=True)
class StandardNames:
    """Where each standard name points in one model; None with a reason where it cannot.

    `attn` and `mlp` are relative to a layer (`self_attn`); the rest are full paths.
    """

    model_class: str
    paths: dict[str, str | None]
    reasons: dict[str, str] = field(default_factory=dict)  # why a name is not mapped
    layer_count: int = 0

    def path(self, name: str) -> str | None:
        return self.paths.get(name)

    def describe(self) -> dict[str, str]:
        """'@layers.N.attn' -> 'model.layers.N.self_attn' for every mapped name."""
        out = {}
        layers = self.paths.get("layers")
        for name in STANDARD:
            path = self.paths.get(name)
            if path is None:
                continue
            if name == "layers":
                out["@layers.N"] = f"{path}.N"
            elif name in ("attn", "mlp"):
                out[f"@layers.N.{name}"] = f"{layers}.N.{path}"
                if name == "attn":
                    for part in ATTN_PARTS:
                        inner = self.paths.get(f"attn.{part}")
                        if inner is not None:
                            out[f"@layers.N.attn.{part}"] = f"{layers}.N.{path}.{inner}"
            else:
                out[f"@{name}"] = path
        return out

    def labels(self) -> dict[str, str]:
        """Real module path -> its standard name, for every module a standard name reaches."""
        out: dict[str, str] = {}
        layers = self.paths.get("layers")
        for name in ("embed", "ln_final", "lm_head"):
            path = self.paths.get(name)
            if path is not None:
                out[path] = f"@{name}"
        if layers is not None:
            out[layers] = "@layers"
            for i in range(self.layer_count):
                out[f"{layers}.{i}"] = f"@layers.{i}"
                for part in ("attn", "mlp"):
                    if self.paths.get(part) is not None:
                        out[f"{layers}.{i}.{self.paths[part]}"] = f"@layers.{i}.{part}"
                for part in ATTN_PARTS:
                    inner = self.paths.get(f"attn.{part}")
                    if inner is not None:
                        real = f"{layers}.{i}.{self.paths['attn']}.{inner}"
                        out[real] = f"@layers.{i}.attn.{part}"
        return out

    def unmapped_message(self, wanted: str) -> str:
        """Why `wanted` (a standard name) cannot be used, with what can."""
        mapped = ", ".join(f"{k} -> {v}" for k, v in self.describe().items()) or "none"
        every = [*STANDARD, *(f"attn.{p}" for p in ATTN_PARTS)]
        missing = "; ".join(
            f"@{n if n not in ('attn', 'mlp') and not n.startswith('attn.') else 'layers.N.' + n}"
            f": {self.reasons[n]}"
            for n in every
            if self.paths.get(n) is None and n in self.reasons
        )
        return (
            f"the standard name '{wanted}' has no module in {self.model_class}. "
            f"Mapped here: {mapped}. Not mapped: {missing}. Write the real module path "
            f"instead (`nnrun modules` lists them)"
        )


_CACHE: weakref.WeakKeyDictionary[nn.Module, StandardNames] = weakref.WeakKeyDictionary()


def standard_names(model: nn.Module) -> StandardNames:
    """The standard names of this model (computed once per model object)."""
    found = _CACHE.get(model)
    if found is None:
        found = _map(model)
        _CACHE[model] = found
    return found


def expand_standard(location: Location, model: nn.Module, spec_path: str) -> tuple:
    """A standard location's module segments as the real ones of this model.

    `@layers.*.mlp.down_proj` on Llama -> ("model", "layers", *, "mlp", "down_proj").
    """
    return expand_with(location, standard_names(model), spec_path)


def expand_with(location: Location, names: StandardNames, spec_path: str) -> tuple:
    """`expand_standard` with the names already known."""
    head, *rest = location.module_segments

    def real(name: str, shown: str) -> list:
        path = names.path(name)
        if path is None:
            raise CompileError(f"{spec_path}: {names.unmapped_message(shown)}")
        return [int(p) if p.isdigit() else p for p in path.split(".")]

    if head != "layers":
        return (*real(str(head), f"@{head}"), *rest)
    layer, *rest = rest
    out = [*real("layers", "@layers"), layer]
    if rest and rest[0] in ("attn", "mlp"):
        part = rest.pop(0)
        out += real(part, f"@layers.N.{part}")
        if part == "attn" and rest and rest[0] in ATTN_PARTS:
            inner = rest.pop(0)
            out += real(f"attn.{inner}", f"@layers.N.attn.{inner}")
    return (*out, *rest)


# -- the mapping -------------------------------------------------------------------------


def _map(model: nn.Module) -> StandardNames:
    named = dict(model.named_modules())
    ids = {id(m): n for n, m in named.items()}
    config = getattr(model, "config", None)
    table = _TABLE.get(str(getattr(config, "model_type", "")), {})
    paths: dict[str, str | None] = {}
    reasons: dict[str, str] = {}

    def put(name: str, result: tuple[str | None, str]) -> None:
        path, reason = result
        if name in table and table[name] in named | _relative(named, paths.get("layers")):
            path = table[name]
        paths[name] = path
        if path is None:
            reasons[name] = reason

    put("embed", _embedding(model, ids, "get_input_embeddings"))
    count = _layer_count(config)
    put("layers", _layers(named, count, paths.get("embed")))
    layer0 = named.get(f"{paths['layers']}.0") if paths.get("layers") else None
    for name, finder in (("attn", _attention), ("mlp", _mlp)):
        if layer0 is None:
            put(name, (None, "no layer list"))
        else:
            put(name, finder(layer0))
    attn = layer0.get_submodule(paths["attn"]) if layer0 is not None and paths.get("attn") else None
    for part in ATTN_PARTS:
        if attn is None:
            put(f"attn.{part}", (None, "no attention module"))
        else:
            put(f"attn.{part}", _attention_part(attn, part))
    put("ln_final", _final_norm(named, paths.get("layers")))
    put("lm_head", _head(model, ids, paths))
    layers = paths.get("layers")
    return StandardNames(
        model_class=type(model).__name__,
        paths=paths,
        reasons=reasons,
        layer_count=len(named[layers]) if layers else 0,
    )


def _relative(named: dict[str, nn.Module], layers: str | None) -> dict[str, nn.Module]:
    """Paths relative to layer 0 (`self_attn`), where table entries for attn/mlp live."""
    if not layers:
        return {}
    prefix = f"{layers}.0."
    return {n[len(prefix) :]: m for n, m in named.items() if n.startswith(prefix)}


def _layer_count(config: object) -> int | None:
    if config is None:
        return None
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for key in _LAYER_COUNT_KEYS:
        value = getattr(text, key, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def _embedding(model: nn.Module, ids: dict[int, str], getter: str) -> tuple[str | None, str]:
    try:
        module = getattr(model, getter)()
    except (AttributeError, NotImplementedError):
        module = None
    if module is None or id(module) not in ids:
        return None, f"the model has no {getter.removeprefix('get_').replace('_', ' ')}"
    return ids[id(module)], ""


def _layers(
    named: dict[str, nn.Module], count: int | None, embed: str | None
) -> tuple[str | None, str]:
    lists = [
        (name, m)
        for name, m in named.items()
        if isinstance(m, nn.ModuleList)
        and len(m) > 0
        and len({type(c) for c in m}) == 1
        and any(True for _ in m[0].parameters())
    ]
    if count is not None:
        lists = [(n, m) for n, m in lists if len(m) == count]
    if not lists:
        wanted = f"of {count} blocks " if count is not None else ""
        return None, f"no list of identical blocks {wanted}(is it a transformer?)"
    if len(lists) > 1 and embed is not None:
        # Several stacks (encoder and decoder, a vision tower): keep the one that shares
        # the deepest ancestor with the token embeddings.
        depth = {n: _common_depth(n, embed) for n, _ in lists}
        best = max(depth.values())
        lists = [(n, m) for n, m in lists if depth[n] == best]
    if len(lists) > 1:
        return None, f"several layer lists ({', '.join(n for n, _ in lists)}); it is ambiguous"
    return lists[0][0], ""


def _common_depth(a: str, b: str) -> int:
    depth = 0
    for x, y in zip(a.split("."), b.split(".")):
        if x != y:
            break
        depth += 1
    return depth


def _attention(layer: nn.Module) -> tuple[str | None, str]:
    children = dict(layer.named_children())
    by_name = [n for n in _ATTN_NAMES if n in children]
    if by_name:
        return by_name[0], ""
    by_class = [
        n
        for n, m in children.items()
        if "Attention" in type(m).__name__ and "cross" not in n.lower()
    ]
    if len(by_class) == 1:
        return by_class[0], ""
    if by_class:
        return None, f"several attention modules in a layer ({', '.join(by_class)})"
    return None, f"no attention module among a layer's children ({', '.join(children)})"


def _attention_part(attn: nn.Module, part: str) -> tuple[str | None, str]:
    """The query / key / value / output projection inside an attention module.

    Searched among its descendants by their usual names (BERT nests them: `self.query`,
    `output.dense`); a fused q/k/v projection leaves q, k and v unmapped, with the reason.
    """
    named = [(n, m) for n, m in attn.named_modules() if n]
    found = [
        n for n, m in named if n.rsplit(".", 1)[-1] in PART_NAMES[part] and not list(m.children())
    ]
    if len(found) == 1:
        return found[0], ""
    if len(found) > 1:
        return None, f"several {part} projections in the attention module ({', '.join(found)})"
    fused = [n for n, _ in named if n.rsplit(".", 1)[-1] in FUSED_NAMES]
    if fused and part != "o":
        return None, f"queries, keys and values are fused in one projection ({fused[0]})"
    return None, f"no {part} projection among the attention module's children"


def _mlp(layer: nn.Module) -> tuple[str | None, str]:
    children = dict(layer.named_children())
    by_name = [n for n in _MLP_NAMES if n in children]
    if by_name:
        return by_name[0], ""
    by_class = [
        n for n, m in children.items() if any(w in type(m).__name__ for w in _MLP_CLASS_WORDS)
    ]
    if len(by_class) == 1:
        return by_class[0], ""
    return None, (
        f"no single feed-forward module among a layer's children ({', '.join(children)}); "
        "in BERT-style layers the MLP is split over intermediate and output"
    )


def _final_norm(named: dict[str, nn.Module], layers: str | None) -> tuple[str | None, str]:
    if layers is None:
        return None, "no layer list"
    parent_name = layers.rsplit(".", 1)[0] if "." in layers else ""
    siblings = list(named[parent_name].named_children())
    after = [n for n, _ in siblings[[n for n, _ in siblings].index(layers.split(".")[-1]) + 1 :]]
    norms = [
        n for n, m in siblings if n in after and ("Norm" in type(m).__name__ or n in _NORM_NAMES)
    ]
    if len(norms) == 1:
        return (f"{parent_name}.{norms[0]}" if parent_name else norms[0]), ""
    if norms:
        return None, f"several norms after the layers ({', '.join(norms)})"
    return None, (
        f"no norm module after {layers} (post-norm models such as BERT normalise inside each layer)"
    )


def _head(model: nn.Module, ids: dict[int, str], paths: dict) -> tuple[str | None, str]:
    out, reason = _embedding(model, ids, "get_output_embeddings")
    if out is None:
        return (
            None,
            f"{reason} (load it with a class that has one, model.class: AutoModelForCausalLM or AutoModelForMaskedLM)",
        )
    # A head may be more than its final projection (BERT's cls: transform, then decoder):
    # take the top-level module holding it, unless that also holds the layers.
    top = out.split(".")[0]
    inside = [p for p in (paths.get("layers"), paths.get("embed")) if p]
    if any(p == top or p.startswith(top + ".") for p in inside):
        return out, ""
    return top, ""
