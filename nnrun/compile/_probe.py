"""What a model really does in a forward pass: module order and value shapes."""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

# A value's shape: a tensor's shape, a tuple of those for tuple outputs, or None.
Shape = tuple[int, ...] | tuple[Any, ...] | None


@dataclass(frozen=True)
class SiteInfo:
    """One (module, port) as seen in a probe pass: when it ran and what it carried."""

    rank: int
    shape: Shape


def probe_sites(
    model: nn.Module, input_ids: torch.Tensor | None = None, tokenizer: Any = None
) -> dict[tuple[str, str], SiteInfo]:
    """Run one forward pass with a hook on every module and record each site.

    Registration order is not execution order (Llama registers `rotary_emb`
    after the layers but runs it before them), and some registered modules
    never run at all; this pass says exactly. Sites that did not run are
    absent. Without `input_ids`, two copies of a special token are used.
    """
    sites: dict[tuple[str, str], SiteInfo] = {}
    handles = []

    def record(key: tuple[str, str], value: Any) -> None:
        if key not in sites:
            sites[key] = SiteInfo(rank=len(sites), shape=shape_of(value))

    for name, module in model.named_modules():
        handles.append(
            module.register_forward_pre_hook(
                lambda _m, args, kwargs, n=name: record((n, "input"), first_input(args, kwargs)),
                with_kwargs=True,
            )
        )
        handles.append(
            module.register_forward_hook(lambda _m, _a, out, n=name: record((n, "output"), out))
        )
    try:
        if input_ids is None:
            token = _probe_token(tokenizer)
            input_ids = torch.tensor([[token, token]])
        input_ids = input_ids.to(model_device(model))
        with torch.inference_mode():
            model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids))
    finally:
        for handle in handles:
            handle.remove()
    return sites


_PROBED: weakref.WeakKeyDictionary[nn.Module, dict[tuple[str, str], SiteInfo]] = (
    weakref.WeakKeyDictionary()
)


def cached_probe(model: nn.Module, tokenizer: Any = None) -> dict[tuple[str, str], SiteInfo]:
    """`probe_sites` once per loaded model, and once per model files on this machine.

    Every point of a sweep shares the answer of one probe pass. A model loaded by
    `load_model` also finds it on disk, under `$NNRUN_CACHE/probes/`, keyed by its
    class, module tree, config, dtype and the names, sizes, modification times and
    sampled bytes of its files (see `_probe_cache`): a second run of a spec skips the
    probe pass, and any change to the model files or class probes again.
    """
    if model not in _PROBED:
        from nnrun.compile._probe_cache import load_probe, probe_key, store_probe

        key = probe_key(model, _probe_token(tokenizer))
        found = None if key is None else load_probe(key, model)
        if found is None:
            found = probe_sites(model, tokenizer=tokenizer)
            if key is not None:
                store_probe(key, found)
        _PROBED[model] = found
    return _PROBED[model]


def first_input(args: tuple, kwargs: dict) -> Any:
    """A module call's input port: its first positional argument, else its first keyword one."""
    return args[0] if args else next(iter(kwargs.values()), None)


def shape_of(value: Any) -> Shape:
    """The shape of a tensor, or of each element of a tuple/ModelOutput."""
    if isinstance(value, torch.Tensor):
        return tuple(value.shape)
    if hasattr(value, "to_tuple"):
        value = value.to_tuple()
    if isinstance(value, tuple | list):
        return tuple(shape_of(v) for v in value)
    return None


def value_shape(shape: Shape, indices: tuple[int, ...], *, root: bool) -> tuple[int, ...] | None:
    """A probed site's value axes after (batch, tokens), at a location's tuple indices.

    None when the indices do not lead to a tensor.
    """
    path = list(indices)
    if root and not path and shape and not isinstance(shape[0], int):
        path = [0]  # a model output's main tensor comes first (logits / last_hidden_state)
    for i in path:
        if (
            not isinstance(shape, tuple)
            or isinstance(shape[0], int)
            or not -len(shape) <= i < len(shape)
        ):
            return None
        shape = shape[i]
    if not shape or not isinstance(shape[0], int):
        return None
    return tuple(shape[2:])


def model_device(model: nn.Module) -> torch.device:
    """Where inputs go: the model's own device, or the first shard's under a device map."""
    device = getattr(model, "device", None)
    if isinstance(device, torch.device):
        return device
    return next(model.parameters()).device


def _probe_token(tokenizer: Any) -> int:
    for attr in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = getattr(tokenizer, attr, None)
        if isinstance(value, int):
            return value
    return 0
