"""Attention heads and patterns: split a value's last axis, pick heads, pick keys.

A value whose last axis is heads x head_dim (see nnrun.compile._heads) is viewed as
(..., heads, head_dim) and the selected heads are taken along the heads axis. An
attention pattern (batch, heads, query, key) is read query-first, like any value,
and its key axis is mapped from padded columns to each prompt's own positions, with
the columns past a prompt's end (padding) set to NaN.
"""

from __future__ import annotations

import torch

from nnrun.compile.plan import Heads
from nnrun.engine._batch import Batch
from nnrun.engine._select import TokenIndex
from nnrun.errors import RunError


def head_index(heads: Heads, device: torch.device) -> torch.Tensor:
    """The selected heads as an index tensor on `device`."""
    return torch.tensor(heads.selected, dtype=torch.long, device=device)


def split_heads(value: torch.Tensor, heads: Heads, label: str) -> torch.Tensor:
    """(..., heads * head_dim) -> (..., heads, head_dim): a view, no copy."""
    width = heads.count * heads.dim
    if value.shape[-1] != width:
        raise RunError(
            f"{label}: the value has shape {tuple(value.shape)}, but {heads.count} heads of "
            f"head_dim {heads.dim} need a last axis of {width}"
        )
    return value.reshape(*value.shape[:-1], heads.count, heads.dim)


def pick_heads(value: torch.Tensor, heads: Heads, label: str) -> torch.Tensor:
    """(..., heads * head_dim) -> (..., selected heads, head_dim)."""
    split = split_heads(value, heads, label)
    return split.index_select(-2, head_index(heads, value.device))


def pattern_rows(
    value: torch.Tensor,  # (batch, heads, query, key)
    index: TokenIndex,
    batch: Batch,
    heads: Heads | None,
    label: str,
) -> torch.Tensor:
    """The selected rows, query tokens and heads of attention weights: (R, K, h, keys).

    The key axis is each prompt's own positions 0 .. its length - 1; shorter prompts
    are padded with NaN (their keys past the end are padding, not tokens).
    """
    if value.dim() != 4 or value.shape[0] != batch.size or value.shape[2] != value.shape[3]:
        raise RunError(
            f"{label}: expected attention weights of shape (batch={batch.size}, heads, query, "
            f"key), but the value has shape {tuple(value.shape)}"
        )
    query_first = value.transpose(1, 2)  # (B, query, H, key)
    picked = query_first[index.rows[:, None], index.columns]  # (R, K, H, key)
    if heads is not None:
        picked = picked.index_select(2, head_index(heads, value.device))
    lengths = batch.lengths[index.rows]  # (R,)
    keys = int(lengths.max())
    own = torch.arange(keys, device=value.device)  # (keys,)
    columns = (batch.offsets[index.rows][:, None] + own[None, :]).clamp(max=value.shape[3] - 1)
    gathered = picked.gather(
        -1, columns[:, None, None, :].expand(*picked.shape[:3], keys)
    )  # (R, K, h, keys)
    real = (own[None, :] < lengths[:, None])[:, None, None, :]  # (R, 1, 1, keys)
    nan = torch.full((), float("nan"), dtype=gathered.dtype, device=gathered.device)
    return torch.where(real, gathered, nan)
