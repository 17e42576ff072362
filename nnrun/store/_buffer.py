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


def merge_results(results: list[Any]) -> Any:
    """One BatchResult holding the rows of `results`, in order; values of batches of
    different widths are padded to the widest."""
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
            saves[key] = _merge_saves(parts)
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


def _merge_saves(parts: list[Any]) -> Any:
    """One save's values over several batches: ragged token axes padded to the widest."""
    import torch

    ragged = parts[0].counts is not None
    return dataclasses.replace(
        parts[0],
        data=_cat([p.data for p in parts]),
        prompt_ids=[row for p in parts for row in p.prompt_ids],
        counts=torch.cat([p.counts for p in parts]) if ragged else None,
        extra={key: _cat([p.extra[key] for p in parts]) for key in parts[0].extra},
    )


def _cat(tensors: list[Any]) -> Any:
    """Rows of several batches; axes that differ (a ragged token axis, an attention
    pattern's key axis) padded to the widest with NaN (-1 for integers)."""
    import torch

    shape = [max(sizes) for sizes in zip(*(t.shape for t in tensors))]
    padded = []
    for t in tensors:
        if list(t.shape[1:]) != shape[1:]:
            fill = float("nan") if t.is_floating_point() else -1
            wide = torch.full((t.shape[0], *shape[1:]), fill, dtype=t.dtype)
            wide[tuple(slice(0, size) for size in t.shape)] = t
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
