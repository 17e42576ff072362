"""The order in which a model really runs its modules, found by a probe pass."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def execution_order(model: nn.Module, tokenizer: Any = None) -> dict[tuple[str, str], int]:
    """Rank of every (module, port) that runs, from a one-token forward pass.

    Registration order is not execution order (Llama registers `rotary_emb`
    after the layers but runs it before them), and some registered modules
    never run at all; a probe pass with a hook on every module says exactly.
    Sites that did not run are absent from the result.
    """
    rank: dict[tuple[str, str], int] = {}
    handles = []

    def record(key: tuple[str, str]) -> None:
        rank.setdefault(key, len(rank))

    for name, module in model.named_modules():
        handles.append(module.register_forward_pre_hook(lambda *_, n=name: record((n, "input"))))
        handles.append(module.register_forward_hook(lambda *_, n=name: record((n, "output"))))
    try:
        device = _first_device(model)
        token = 0 if tokenizer is None else _probe_token(tokenizer)
        input_ids = torch.tensor([[token, token]], device=device)
        with torch.inference_mode():
            model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids))
    finally:
        for handle in handles:
            handle.remove()
    return rank


def _probe_token(tokenizer: Any) -> int:
    for attr in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = getattr(tokenizer, attr, None)
        if isinstance(value, int):
            return value
    return 0


def _first_device(model: nn.Module) -> torch.device:
    device = getattr(model, "device", None)
    if isinstance(device, torch.device):
        return device
    return next(model.parameters()).device
