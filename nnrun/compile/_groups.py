"""Which sweep points can share forward passes, and why the others cannot."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from nnrun.spec import SweepPoint, is_prompt_file

# Spec keys that every row of a forward pass must agree on.
SHARED_KEYS = ("model", "batch_size", "seed", "generate", "backward")


@dataclass(frozen=True)
class PointGroup:
    """Points that run packed together, on one model."""

    points: tuple[SweepPoint, ...]
    model: dict[str, Any]
    reason: str = ""  # why these points are not packed with the first group ("" if first)


def _key(data: dict[str, Any]) -> str:
    return json.dumps({k: data.get(k) for k in SHARED_KEYS}, sort_keys=True, default=str)


def _model_key(data: dict[str, Any]) -> str:
    return json.dumps(data.get("model"), sort_keys=True, default=str)


def group_points(points: Sequence[SweepPoint]) -> list[PointGroup]:
    """Split points into groups that can be packed into the same batches.

    Points share passes when they agree on the model, batch size, seed and generation
    arguments. Sampled generation and prompts streamed from a file run each point on
    its own (random draws and file rows are per pass, not per row).
    """
    if not points:
        return []
    first = points[0].data
    alone = _alone_reason(first)
    groups: dict[str, list[SweepPoint]] = {}
    for point in points:
        key = f"{point.index}" if alone else _key(point.data)
        groups.setdefault(key, []).append(point)
    # Groups on the same model run one after another, so each model loads once even
    # when the sweep varies something else faster than the model.
    model_order: dict[str, int] = {}
    for members in groups.values():
        model_order.setdefault(_model_key(members[0].data), len(model_order))
    ordered = sorted(groups.values(), key=lambda m: model_order[_model_key(m[0].data)])
    out = []
    for members in ordered:
        data = members[0].data
        reason = ""
        if members[0] is not points[0]:
            reason = alone or _difference(first, data)
        out.append(PointGroup(tuple(members), dict(data.get("model", {})), reason))
    return out


def _alone_reason(data: dict[str, Any]) -> str:
    generate = data.get("generate") or {}
    if generate.get("do_sample"):
        return "sampled generation runs each point on its own, so its draws equal a run of that point alone"
    if is_prompt_file(data.get("prompts")):
        return "prompts stream from a file, so each point streams it on its own"
    return ""


def _difference(first: dict[str, Any], other: dict[str, Any]) -> str:
    """`model.dtype is bfloat16 (float32 in the first group)` for the first differing keys."""
    found = []
    for key in SHARED_KEYS:
        a, b = first.get(key), other.get(key)
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            for sub in sorted(set(a) | set(b)):
                if a.get(sub) != b.get(sub):
                    found.append(f"{key}.{sub} is {b.get(sub)} ({a.get(sub)} in the first group)")
        else:
            found.append(f"{key} is {b} ({a} in the first group)")
    return "; ".join(found[:3]) or "its shared settings differ"
