"""Batches merged before they are written: fewer, bigger HDF5 writes.

Every HDF5 write has a fixed cost (a selection, a chunk lookup, metadata), several
per batch (prompts, texts, lengths, each save and metric). A run of thousands of
one-prompt batches on a small model would spend more time there than in the model,
so the writer keeps a few batches (bounded by rows, bytes and seconds) and writes
them as one. Rows keep their order; each save and metric is concatenated on its own,
since a batch carries only the saves its rows select.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from nnrun.store._packed import PackedSave, concat_packed


def merge_results(results: list[Any], token_axes: dict[str, int]) -> Any:
    """One BatchResult holding the rows of `results`, in order.

    `token_axes` gives each save variant's token axis in its values (R, [L], [S], T, ...),
    along which batches of different widths are padded.
    """
    if len(results) == 1:
        return results[0]
    import torch  # only when batches are written: reading a file never needs it

    first = results[0]

    def joined(name: str) -> list[Any] | None:
        parts = [getattr(r, name) for r in results]
        if all(p is None for p in parts):
            return None
        return [item for p in parts for item in (p or [])]

    saves: dict[str, Any] = {}
    for key in dict.fromkeys(k for r in results for k in r.saves):
        parts = [r.saves[key] for r in results if key in r.saves]
        if isinstance(parts[0], PackedSave):  # packed on arrival: real tokens only
            saves[key] = concat_packed(parts)
        else:
            saves[key] = _merge_saves(parts, token_axes[key])
    metrics: dict[str, Any] = {}
    for key in dict.fromkeys(k for r in results for k in r.metrics):
        parts = [r.metrics[key] for r in results if key in r.metrics]
        metrics[key] = dataclasses.replace(
            parts[0],
            data=torch.cat([p.data for p in parts]),
            rows=[row for p in parts for row in p.rows],
        )
    return dataclasses.replace(
        first,
        prompt_ids=joined("prompt_ids"),
        texts=joined("texts"),
        token_ids=joined("token_ids"),
        saves=saves,
        generated=joined("generated"),
        generated_text=joined("generated_text"),
        rows=joined("rows") or [],
        metrics=metrics,
        token_texts=joined("token_texts"),
    )


def _merge_saves(parts: list[Any], token_axis: int) -> Any:
    """One save's values over several batches: ragged token axes padded to the widest."""
    import torch

    ragged = parts[0].counts is not None
    axis = token_axis if ragged else None
    return dataclasses.replace(
        parts[0],
        data=_cat([p.data for p in parts], axis),
        prompt_ids=[row for p in parts for row in p.prompt_ids],
        counts=torch.cat([p.counts for p in parts]) if ragged else None,
        extra={key: _cat([p.extra[key] for p in parts], axis) for key in parts[0].extra},
    )


def _cat(tensors: list[Any], token_axis: int | None) -> Any:
    import torch

    if token_axis is None:
        return torch.cat(tensors)
    width = max(t.shape[token_axis] for t in tensors)
    padded = []
    for t in tensors:
        if t.shape[token_axis] < width:
            shape = list(t.shape)
            shape[token_axis] = width
            fill = float("nan") if t.is_floating_point() else -1
            wide = torch.full(shape, fill, dtype=t.dtype)
            wide.narrow(token_axis, 0, t.shape[token_axis]).copy_(t)
            t = wide
        padded.append(t)
    return torch.cat(padded)


def result_bytes(result: Any) -> int:
    """The bytes a BatchResult's values hold (what the buffer keeps in memory)."""
    total = 0
    for save in result.saves.values():
        if isinstance(save, PackedSave):
            total += save.values.nbytes + sum(v.nbytes for v in save.extra.values())
            continue
        for tensor in (save.data, *save.extra.values()):
            total += tensor.numel() * tensor.element_size()
    return total
