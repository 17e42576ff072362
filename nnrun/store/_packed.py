"""The packed layout of a ragged save: only real tokens, one after another.

A save over `tokens: all` (or a slice) of prompts of different lengths holds a
different number of tokens per prompt. The padded layout gives every prompt the
longest prompt's token axis (NaN beyond its end); the packed layout stores the real
tokens alone on one flat axis, prompt after prompt (and, when generating, step after
step within a prompt), and records where each prompt's tokens start:

    /saves/<name>                (sweep..., packed, [layer], value axes...)
    /axes/<name>/offset          (sweep..., prompt[, step])   first flat index
    /axes/<name>/length          (sweep..., prompt[, step])   how many tokens

The reader turns it back into the padded view (`padded_view`), for all prompts or for
a few, reading only the flat range those prompts cover.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np


def pack(
    data: np.ndarray, counts: np.ndarray, *, layered: bool, stepped: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Rows of a padded save -> (flat values, tokens per unit).

    `data` is (R, [L], [S], T, *value) with each unit's real tokens first along T;
    `counts` is (R,) or, when stepped, (R, S). Returns the flat values (N, [L], *value)
    in row, step, token order, and `counts` as int64 (N = its sum).
    """
    token_axis = 1 + int(layered) + int(stepped)
    order = [0]
    if stepped:
        order.append(token_axis - 1)
    order.append(token_axis)
    if layered:
        order.append(1)
    order += list(range(token_axis + 1, data.ndim))
    moved = data.transpose(order)  # (R, [S], T, [L], *value)
    counts = np.asarray(counts, dtype=np.int64)
    width = data.shape[token_axis]
    mask = np.arange(width) < counts[..., None]  # (R, [S], T)
    return moved[mask], counts


def unit_offsets(start: int, counts: np.ndarray) -> np.ndarray:
    """Flat start of each unit of rows written from `start` on, in row, step order."""
    flat = counts.reshape(-1)
    return (start + np.concatenate([[0], np.cumsum(flat)[:-1]])).reshape(counts.shape)


def padded_view(
    block: np.ndarray,
    offsets: np.ndarray,
    lengths: np.ndarray,
    *,
    width: int,
    layered: bool,
    stepped: bool,
    fill: Any,
) -> np.ndarray:
    """Scatter packed values back into the padded layout.

    `block` is (Q, F, [L], *value): the flat values of Q sweep points (Q = 1 without a
    sweep), read from flat index `base` on, where `offsets` (Q, P[, S]) are already
    taken relative to that base; `lengths` has the same shape. Returns
    (Q, P, [L], [S], width, *value) with `fill` beyond each unit's tokens.
    """
    q, p = offsets.shape[:2]
    units = offsets.shape[1:]  # (P[, S])
    value = block.shape[2:]  # ([L], *value)
    lengths = np.minimum(np.asarray(lengths, dtype=np.int64), width)
    out = np.full((q, *units, width, *value), fill, dtype=block.dtype)
    mask = np.arange(width) < lengths[..., None]  # (Q, P, [S], T)
    if mask.any():
        point = np.broadcast_to(np.arange(q).reshape((q,) + (1,) * (mask.ndim - 1)), mask.shape)
        source = offsets[..., None].astype(np.int64) + np.arange(width)
        out[mask] = block[point[mask], source[mask]]
    # (Q, P, [S], T, [L], *value) -> (Q, P, [L], [S], T, *value)
    if layered:
        token_axis = 2 + int(stepped)
        order = [0, 1, token_axis + 1]
        if stepped:
            order.append(2)
        order.append(token_axis)
        order += list(range(token_axis + 2, out.ndim))
        out = out.transpose(order)
    return np.ascontiguousarray(out)


def flat_chunk(per_token: int, expected: int | None, target: int) -> int:
    """Tokens per chunk of the flat axis: about `target` bytes, never more than the data.

    `per_token` is the bytes one token takes ([L] x value x item size); `expected` the
    tokens the run is expected to write (None when unknown).
    """
    fit = max(1, target // max(per_token, 1))
    if expected is not None:
        fit = min(fit, max(1, math.ceil(expected)))
    return fit


class FlatParts:
    """Packed values of several batches, kept as the batches came.

    Joining them into one array would copy every value once more before HDF5 copies
    it again; the writer writes the parts one after the other instead.
    """

    def __init__(self, parts: list[np.ndarray]) -> None:
        self.parts = parts  # each (N_i, [L], *value)
        self.starts = np.concatenate([[0], np.cumsum([len(p) for p in parts])])
        self.dtype = parts[0].dtype
        self.shape = (int(self.starts[-1]), *parts[0].shape[1:])
        self.nbytes = sum(p.nbytes for p in parts)

    def __len__(self) -> int:
        return self.shape[0]


def flat_pieces(flat: np.ndarray | FlatParts, lo: int, hi: int) -> Iterator[tuple[int, Any]]:
    """The values lo..hi-1 of the flat axis as (offset from lo, array) pieces."""
    if not isinstance(flat, FlatParts):
        if hi > lo:
            yield 0, flat[lo:hi]
        return
    for part, start in zip(flat.parts, flat.starts[:-1]):
        a, b = max(lo, int(start)), min(hi, int(start) + len(part))
        if b > a:
            yield a - lo, part[a - int(start) : b - int(start)]


def _joined(arrays: list[np.ndarray | FlatParts]) -> FlatParts:
    return FlatParts([p for a in arrays for p in (a.parts if isinstance(a, FlatParts) else [a])])


@dataclass
class PackedSave:
    """One save variant's rows of a batch (or of several), packed as they arrived.

    The writer packs each batch when it takes it, so batches kept to be written
    together hold real tokens only, never a batch padded to another batch's width.
    """

    values: np.ndarray | FlatParts  # (N, [L], *value): real tokens, row after row
    counts: np.ndarray  # (R,) or (R, S): tokens of each unit
    prompt_ids: list[str]  # the row key of each row
    width: int  # the widest token axis of the padded batches (the padded view's width)
    torch_dtype: str
    extra: dict[str, np.ndarray | FlatParts] = field(default_factory=dict)  # topk indices

    @property
    def row_tokens(self) -> np.ndarray:
        """(R,) tokens of each row over its steps."""
        return self.counts.reshape(len(self.counts), -1).sum(axis=1)


def concat_packed(parts: list[PackedSave]) -> PackedSave:
    """Several batches' packed rows as one, in order."""
    if len(parts) == 1:
        return parts[0]
    return PackedSave(
        values=_joined([p.values for p in parts]),
        counts=np.concatenate([p.counts for p in parts]),
        prompt_ids=[row for p in parts for row in p.prompt_ids],
        width=max(p.width for p in parts),
        torch_dtype=parts[0].torch_dtype,
        extra={k: _joined([p.extra[k] for p in parts]) for k in parts[0].extra},
    )
