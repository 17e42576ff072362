"""A save's `apply:` chain: modules run ad hoc and named tensor ops."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from nnrun.compile._probe import module_device
from nnrun.compile.plan import ApplyStep
from nnrun.errors import RunError


def apply_steps(
    steps: tuple[ApplyStep, ...], value: torch.Tensor, modules: dict[str, nn.Module]
) -> torch.Tensor | dict[str, torch.Tensor]:
    """Run a save's apply chain on selected values (R, K, ...), on their device.

    Modules run through `forward` directly, so no hook fires: applying
    `lm_head` to layer 3's residual (a logit lens) does not also count as a
    pass through `lm_head` for the plan. Ops act on the last axis; `topk`
    returns {"values", "indices"} and ends the chain.
    """
    for i, step in enumerate(steps):
        if step.kind == "module":
            module = modules[step.name]
            device = module_device(module)
            if device is not None and device != value.device:
                value = value.to(device)  # under a device map the module may live elsewhere
            try:
                value = module.forward(value)
            except RunError:
                raise
            except Exception as e:  # any module's own code: a missing argument, a shape, ...
                first = (str(e).splitlines() or [""])[0][:200]
                raise RunError(
                    f"apply: running {step.name} ({type(module).__name__}) on a value of shape "
                    f"{tuple(value.shape)} failed ({type(e).__name__}: {first}); apply takes "
                    "modules that map one tensor to one tensor, such as a norm or lm_head"
                ) from None
            if not isinstance(value, torch.Tensor):
                value = value[0]
            continue
        if step.name == "topk":
            if i != len(steps) - 1:
                raise RunError("apply: topk must be the last step of a save's apply list")
            top = torch.topk(value, k=min(int(step.arg or 1), value.shape[-1]), dim=-1)
            return {"values": top.values, "indices": top.indices}
        value = _OPS[step.name](value)
    return value


def check_apply(
    steps: tuple[ApplyStep, ...],
    value_shape: tuple[int, ...] | None,
    modules: dict[str, nn.Module],
    like: torch.Tensor,
    what: str,
) -> None:
    """Run an apply chain once on zeros of the saved value's shape, before any prompt runs.

    A module that cannot take the value alone (a decoder layer needs its position
    embeddings, rotary_emb its positions) fails here, naming the save.
    """
    if value_shape is None or not any(step.kind == "module" for step in steps):
        return
    sample = torch.zeros((1, 1, *value_shape), dtype=like.dtype, device=like.device)
    with torch.inference_mode():
        try:
            apply_steps(steps, sample, modules)
        except RunError as e:
            raise RunError(f"{what}: {e}") from None


_OPS: dict[str, Any] = {
    "softmax": lambda x: torch.softmax(x.float(), dim=-1).to(x.dtype),
    "log_softmax": lambda x: torch.log_softmax(x.float(), dim=-1).to(x.dtype),
    "argmax": lambda x: x.argmax(dim=-1),
    "norm": lambda x: torch.linalg.vector_norm(x.float(), dim=-1).to(x.dtype),
    "mean": lambda x: x.mean(dim=-1),
    "sum": lambda x: x.sum(dim=-1),
    "float": lambda x: x.float(),
}
