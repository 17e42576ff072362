"""Attention heads: which sites carry a heads x head_dim axis, and attention patterns.

Head counts come from the model's config (`num_attention_heads`, `num_key_value_heads`,
`head_dim`, else `hidden_size / num_attention_heads`), never from a value's size alone:
the residual stream of most models is as wide as heads x head_dim, and splitting it into
"heads" would mean nothing. A site carries heads when it sits inside an attention module
(a module whose class name says Attention) and is

- the input of its output projection (`o_proj`, `c_proj`, `out_proj`, BERT's
  `output.dense`; the standard name `@layers.N.attn.o.input`): every query head's
  output, concatenated;
- the output of a separate query / key / value projection (`q_proj`, `k_proj`,
  `v_proj`, BERT's `query` / `key` / `value`): keys and values count key/value heads,
  fewer than query heads under grouped-query attention;
- the attention weights, element [1] of an attention module's output, shaped
  (batch, heads, query, key): an attention pattern.

Fused projections (GPT-2's `c_attn`: q, k and v in one output) are refused with the site
to use instead.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from nnrun.compile._names import FUSED_NAMES, PART_NAMES
from nnrun.compile._resolve import ResolvedLocation
from nnrun.compile.plan import Heads
from nnrun.errors import CompileError

# The names standard names use for an attention module's projections (@layers.N.attn.o);
# heads also know an output projection called `out`, which the standard names leave alone.
_OUT_NAMES = (*PART_NAMES["o"], "out")
_QUERY_NAMES = PART_NAMES["q"]
_KV_NAMES = PART_NAMES["k"] + PART_NAMES["v"]


def head_counts(model: nn.Module) -> tuple[int, int, int] | None:
    """(query heads, key/value heads, head_dim) from the model's config; None if it has none."""
    config = getattr(model, "config", None)
    if config is None:
        return None
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = getattr(text, "num_attention_heads", None)
    if not isinstance(heads, int) or heads < 1:
        return None
    kv = getattr(text, "num_key_value_heads", None) or heads
    dim = getattr(text, "head_dim", None)
    if not isinstance(dim, int) or dim < 1:
        hidden = getattr(text, "hidden_size", None)
        if not isinstance(hidden, int) or hidden % heads:
            return None
        dim = hidden // heads
    return heads, int(kv), dim


def attention_module(model: nn.Module, name: str) -> str | None:
    """The nearest enclosing module (or `name` itself) whose class is an attention module."""
    parts = name.split(".") if name else []
    for depth in range(len(parts), 0, -1):
        path = ".".join(parts[:depth])
        if "Attention" in type(model.get_submodule(path)).__name__:
            return path
    return None


def is_pattern(model: nn.Module, site: ResolvedLocation) -> bool:
    """Whether a location is an attention module's weights: `attn.output[1]`."""
    if site.port not in ("output", "grad") or site.indices != (1,) or not site.module:
        return False
    return "Attention" in type(model.get_submodule(site.module)).__name__


def resolve_heads(
    model: nn.Module,
    site: ResolvedLocation,
    selection: Any,
    width: int | None,
    path: str,
) -> Heads:
    """The heads a save or edit selects at a site, checked against the model's config.

    `width` is the value's last axis from the probe pass (None for attention weights).
    Raises CompileError naming the site and its shape when heads make no sense there.
    """
    counts = head_counts(model)
    if counts is None:
        raise CompileError(
            f"{path}: heads need the model's head count, but its config has no "
            "num_attention_heads; select the value's slice yourself"
        )
    n_heads, n_kv, dim = counts
    count = _heads_at(model, site, width, n_heads, n_kv, dim, path)
    if selection == "all":
        selected = tuple(range(count))
    else:
        selected = tuple(int(h) for h in selection)
        beyond = [h for h in selected if h >= count]
        if beyond:
            raise CompileError(
                f"{path}: head {beyond[0]} does not exist at {site.label}: it has {count} heads "
                f"(0..{count - 1})"
            )
    return Heads(count=count, dim=dim, selected=selected)


def _heads_at(
    model: nn.Module,
    site: ResolvedLocation,
    width: int | None,
    n_heads: int,
    n_kv: int,
    dim: int,
    path: str,
) -> int:
    """How many heads the value at `site` holds (or a CompileError saying why none)."""
    label = site.label
    if is_pattern(model, site):
        return n_heads
    shown = (
        f"(batch, tokens, {width})" if width is not None else "not a (batch, tokens, ...) tensor"
    )
    attention = attention_module(model, site.module) if site.module else None
    last = site.module.rsplit(".", 1)[-1]
    where = (
        f"the input of an attention output projection (e.g. {attention}.o_proj.input), the "
        "output of a separate q/k/v projection, or attention weights (attn.output[1])"
    )
    if attention is not None and last in FUSED_NAMES:
        raise CompileError(
            f"{path}: {label} fuses queries, keys and values into one output {shown}, so it "
            f"has no single head axis; heads work at {where}"
        )
    role = None
    if attention is not None and attention != site.module and not site.indices:
        if site.port in ("input", "input.grad") and last in _OUT_NAMES:
            role = "query"
        elif site.port in ("output", "grad") and last in _QUERY_NAMES:
            role = "query"
        elif site.port in ("output", "grad") and last in _KV_NAMES:
            role = "kv"
    if role is None:
        raise CompileError(
            f"{path}: {label} has shape {shown}, which is not split into heads; heads work at "
            f"{where}"
        )
    count = n_heads if role == "query" else n_kv
    if width != count * dim:
        kind = "query heads" if role == "query" else "key/value heads"
        raise CompileError(
            f"{path}: {label} has shape {shown}, but the config says {count} {kind} of "
            f"head_dim {dim} ({count * dim}); heads cannot be split there"
        )
    return count
