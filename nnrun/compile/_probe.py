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


def module_device(module: nn.Module) -> torch.device | None:
    """Where a module computes: accelerate's execution device under a device map (its
    weights may wait on `meta` for it), else its parameters' device; None without any."""
    hook = getattr(module, "_hf_hook", None)
    executes = getattr(hook, "execution_device", None)
    if executes is not None and not isinstance(executes, dict):
        return torch.device(executes)
    param = next(module.parameters(), None)
    return None if param is None else param.device


def model_device(model: nn.Module) -> torch.device:
    """Where inputs go: the model's own device, or where accelerate runs it under a device map.

    Under a device map, weights offloaded to cpu or disk sit on the `meta` device
    between forwards, so `model.device` may say `meta`; accelerate's hook on the
    root module knows where the model executes.
    """
    if getattr(model, "_hf_hook", None) is not None:
        found = module_device(model)
        if found is not None and found.type != "meta":
            return found
    device = getattr(model, "device", None)
    if isinstance(device, torch.device) and device.type != "meta":
        return device
    return next(
        (p.device for p in model.parameters() if p.device.type != "meta"), torch.device("cpu")
    )


def _probe_token(tokenizer: Any) -> int:
    for attr in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = getattr(tokenizer, attr, None)
        if isinstance(value, int):
            return value
    return 0


def backward_bytes(
    model: nn.Module,
    first: tuple[str, str],
    rows: int,
    width: int,
    tokenizer: Any = None,
) -> int:
    """Bytes of activations a backward pass keeps for a batch of `rows` x `width` tokens.

    Measured, not guessed: probe forward passes of one row of 8, 16 and 32 tokens run
    with gradients tracked from the first site a gradient is read at, `first` (module,
    port), as the engine does, and count the tensors autograd saves for the backward
    pass (parameters excluded: they are in memory anyway). A quadratic in the length
    (attention keeps (tokens x tokens) weights) fitted to the three is scaled to the batch.
    """
    params = {p.data_ptr() for p in model.parameters()} | {b.data_ptr() for b in model.buffers()}
    module = model.get_submodule(first[0]) if first[0] else model
    lengths = (8, 16, 32)
    measured = []
    for length in lengths:
        seen: dict[int, int] = {}

        def pack(tensor: torch.Tensor, seen: dict[int, int] = seen) -> torch.Tensor:
            storage = tensor.untyped_storage()
            if storage.data_ptr() not in params:
                seen[storage.data_ptr()] = storage.nbytes()
            return tensor

        def leaf(value: Any) -> Any:
            if isinstance(value, torch.Tensor) and value.is_floating_point():
                return value.detach().requires_grad_()
            if isinstance(value, tuple) and value and isinstance(value[0], torch.Tensor):
                return (leaf(value[0]), *value[1:])
            return value

        if first[1] == "input":
            handle = module.register_forward_pre_hook(
                lambda _m, args: (leaf(args[0]), *args[1:]) if args else None
            )
        else:
            handle = module.register_forward_hook(lambda _m, _a, out: leaf(out))
        ids = torch.full((1, length), _probe_token(tokenizer), device=model_device(model))
        try:
            with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                model(input_ids=ids, attention_mask=torch.ones_like(ids))
        finally:
            handle.remove()
        measured.append(float(sum(seen.values())))
    # bytes(T) = a + b T + c T^2 through the three points, at T = width
    x = torch.tensor([[1.0, t, t * t] for t in lengths], dtype=torch.float64)
    a, b, c = torch.linalg.solve(x, torch.tensor(measured, dtype=torch.float64)).tolist()
    return int(max(a + b * width + c * width * width, 0.0) * rows)
