"""Pack sweep points into batch rows: one plan whose forward passes serve every point.

Each point is compiled on its own first (prompts by id). Packing then gives every
(point, prompt) pair a batch row, and pairs whose computation is the same (same text,
same edits with the same sources) share one row: the clean prompt of a patching sweep
runs once for all points. Actions then name rows, so each point's edits act on its own
rows only, and identical actions of different points merge into one.
"""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from nnrun.compile.plan import (
    EditAction,
    HookSite,
    MetricAction,
    MetricLayout,
    Plan,
    PointInfo,
    PromptRow,
    PromptValue,
    SaveAction,
    SaveLayout,
    SiteActions,
)
from nnrun.errors import CompileError
from nnrun.spec import SweepPoint

_Site = tuple[str, str]


def point_sha256(data: dict[str, Any]) -> str:
    """A point's identity for resume: the hash of its resolved spec, output aside."""
    clean = {k: v for k, v in data.items() if k != "output"}
    text = json.dumps(clean, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def pack_points(compiled: Sequence[tuple[SweepPoint, Plan]], *, spec_text: str) -> Plan:
    """One plan for several points compiled against the same model.

    The points must agree on everything that is not per row (model, batch size,
    generation, seed): `group_points` makes sure of that. Points with prompts from a
    file cannot share rows and come one at a time.
    """
    first_point, first = compiled[0]
    infos = []
    if first.prompts.inline is None:
        assert len(compiled) == 1, "points with prompt files run one at a time"
        info = PointInfo(
            first_point.index,
            first_point.coords,
            first_point.label,
            (),
            point_sha256(first_point.data),
        )
        return replace(first, spec_text=spec_text, points=(info,), rows=None)

    single = len(compiled) == 1
    # With a backward pass a row's gradient must be its own point's: a row shared by
    # several points (or read by several points' rows) would sum their losses' gradients.
    keys = _row_keys(compiled, share=first.backward is None)
    rows: dict[str, PromptRow] = {}
    sources: dict[str, list[str]] = defaultdict(list)
    # site -> action description -> action (merged over points)
    edits: dict[_Site, dict[str, EditAction]] = defaultdict(dict)
    saves: dict[_Site, dict[str, SaveAction]] = defaultdict(dict)
    metrics: dict[_Site, dict[str, MetricAction]] = defaultdict(dict)
    captures: dict[_Site, set[tuple[int, ...]]] = defaultdict(set)
    ranks: dict[_Site, int] = {}
    save_variants: dict[str, list[tuple[str, SaveLayout, list[int]]]] = defaultdict(list)
    metric_variants: dict[str, list[tuple[str, MetricLayout, list[int]]]] = defaultdict(list)

    for n, (point, plan) in enumerate(compiled):
        own = {prompt: keys[(n, prompt)] for prompt, _ in plan.prompts.inline or ()}
        for prompt, text in plan.prompts.inline or ():
            rows.setdefault(own[prompt], PromptRow(own[prompt], prompt, text))

        def rows_of(selected: frozenset[str] | None, own=own) -> frozenset[str] | None:
            # "every prompt" must stay within this point's rows once points share a batch
            if selected is None:
                return None if single else frozenset(own.values())
            return frozenset(own[p] for p in selected)

        variant_of = {
            layout.name: _variant(save_variants[layout.name], layout, n) for layout in plan.saves
        }
        metric_of = {
            layout.name: _variant(metric_variants[layout.name], layout, n)
            for layout in plan.metrics
        }
        for actions in plan.sites:
            site = (actions.site.module, actions.site.port)
            ranks[site] = actions.site.order
            captures[site].update(actions.captures)
            for edit in actions.edits:
                mapped = _map_edit(edit, own, rows_of(edit.prompts))
                for row in mapped.prompts or own.values():
                    sources[row] += _edit_sources(mapped)
                _merge(edits[site], _describe(mapped), mapped)
            for save in actions.saves:
                source = save.source
                if source is not None:  # attribution: the prompt it would patch in
                    source = replace(source, prompt=own[source.prompt])
                mapped = replace(
                    save,
                    prompts=rows_of(save.prompts),
                    key=variant_of.get(save.name, ""),  # the backward loss has no dataset
                    source=source,
                )
                if source is not None:
                    for row in mapped.prompts or own.values():
                        sources[row].append(source.prompt)
                _merge(saves[site], _describe(mapped), mapped)
            for metric in actions.metrics:
                reference = None if metric.reference is None else own[metric.reference]
                mapped = replace(
                    metric,
                    prompts=rows_of(metric.prompts),
                    key=metric_of[metric.key],
                    reference=reference,
                )
                if reference is not None:
                    for row in mapped.prompts or own.values():
                        sources[row].append(reference)
                _merge(metrics[site], _describe(mapped), mapped)
        infos.append(
            PointInfo(
                index=point.index,
                coords=point.coords,
                label=point.label,
                rows=tuple(own.items()),
                spec_sha256=point_sha256(point.data),
            )
        )

    prompt_ids = first.prompt_ids or ()
    save_layouts = [
        _with_targets(layout, key, points, compiled, keys, prompt_ids)
        for variants in save_variants.values()
        for key, layout, points in variants
    ]
    metric_layouts = [
        _with_targets(layout, key, points, compiled, keys, prompt_ids)
        for variants in metric_variants.values()
        for key, layout, points in variants
    ]
    rows = {
        key: replace(row, sources=tuple(dict.fromkeys(s for s in sources[key] if s != key)))
        for key, row in rows.items()
    }
    sites = tuple(
        SiteActions(
            site=HookSite(module=m, port=p, order=ranks[(m, p)]),
            saves=tuple(saves[(m, p)].values()),
            edits=tuple(sorted(edits[(m, p)].values(), key=lambda e: e.index)),
            captures=tuple(sorted(captures[(m, p)])),
            metrics=tuple(metrics[(m, p)].values()),
        )
        for m, p in sorted(ranks, key=ranks.__getitem__)
    )
    if first.backward is not None:
        check_backward_batches(rows, first.batch_size)
    plans = [plan for _, plan in compiled]
    return replace(
        first,
        spec_text=spec_text,
        sites=sites,
        saves=tuple(save_layouts),
        metrics=tuple(metric_layouts),
        rows=tuple(rows.values()),
        points=tuple(infos),
        source_prompts=tuple(dict.fromkeys(s for row in rows.values() for s in row.sources)),
        # Any point's attention weights need eager attention for the whole shared pass.
        attn_implementation=next(
            (p.attn_implementation for p in plans if p.attn_implementation), None
        ),
        warnings=tuple(dict.fromkeys(w for p in plans for w in p.warnings)),
    )


def connected_rows(rows: dict[str, PromptRow]) -> list[list[str]]:
    """Rows grouped so that no row reads (or is read by) a row of another group.

    A backward pass needs each group in one micro-batch: a source row's gradient
    includes what flows back through the rows that read it. Groups keep plan order.
    """
    parent = {key: key for key in rows}

    def root(key: str) -> str:
        while parent[key] != key:
            parent[key] = parent[parent[key]]
            key = parent[key]
        return key

    for key, row in rows.items():
        for source in row.sources:
            if source in parent:
                parent[root(source)] = root(key)
    groups: dict[str, list[str]] = {}
    for key in rows:
        groups.setdefault(root(key), []).append(key)
    return list(groups.values())


def check_backward_batches(rows: dict[str, PromptRow], batch_size: int) -> None:
    """Refuse a backward plan whose connected rows cannot fit in one micro-batch."""
    for group in connected_rows(rows):
        if len(group) > batch_size:
            raise CompileError(
                f"backward: prompts {', '.join(group[:4])}{' ...' if len(group) > 4 else ''} "
                f"read each other's values ({len(group)} rows), and a backward pass needs "
                f"them in one batch so that each gradient is complete, but batch_size is "
                f"{batch_size}; raise batch_size to {len(group)}"
            )


def _describe(action: Any) -> str:
    """An action without its rows: equal descriptions act the same way on any row."""
    return repr(replace(action, prompts=None))


def _merge(into: dict[Any, Any], key: Any, action: Any) -> None:
    """Add an action; one with the same description gets the union of the rows."""
    found = into.get(key)
    if found is None:
        into[key] = action
    elif found.prompts is not None:
        rows = None if action.prompts is None else found.prompts | action.prompts
        into[key] = replace(found, prompts=rows)


def _map_edit(edit: EditAction, own: dict[str, str], rows: frozenset[str] | None) -> EditAction:
    operand = edit.operand
    if isinstance(operand, PromptValue):
        operand = replace(operand, prompt=own[operand.prompt])
    params = edit.params
    if "over" in params:
        params = {**params, "over": [own[p] for p in params["over"]]}
    return replace(edit, prompts=rows, operand=operand, params=params)


def _edit_sources(edit: EditAction) -> list[str]:
    found = list(edit.params.get("over", []))
    if isinstance(edit.operand, PromptValue):
        found.append(edit.operand.prompt)
    return found


def _variant(variants: list[tuple[str, Any, list[int]]], layout: Any, point: int) -> str:
    """The variant key of a point's save (or metric) layout, adding a new one if needed."""
    plain = replace(layout, key="", targets=None)
    for key, known, points in variants:
        if known == plain:
            points.append(point)
            return key
    # Names cannot contain '#', so `resid#1` never clashes with another save's name.
    key = layout.name if not variants else f"{layout.name}#{len(variants)}"
    variants.append((key, plain, [point]))
    return key


def _with_targets(
    layout: Any,
    key: str,
    points: list[int],
    compiled: Sequence[tuple[SweepPoint, Plan]],
    keys: dict[tuple[int, str], str],
    prompt_ids: tuple[str, ...],
) -> Any:
    """A variant's layout with the output slots of each of its rows."""
    axis = prompt_axis(layout.prompts, prompt_ids)
    targets: dict[str, list[tuple[int, int]]] = defaultdict(list)
    for n in points:
        point = compiled[n][0]
        for slot, prompt in enumerate(axis):
            targets[keys[(n, prompt)]].append((point.index, slot))
    return replace(
        layout,
        key=key,
        targets=tuple((row, tuple(slots)) for row, slots in targets.items()),
    )


def prompt_axis(selected: tuple[str, ...] | None, prompt_ids: tuple[str, ...]) -> tuple[str, ...]:
    """A save's or metric's prompt axis: its prompts in the spec's prompt order."""
    return prompt_ids if selected is None else tuple(p for p in prompt_ids if p in selected)


def _row_keys(
    compiled: Sequence[tuple[SweepPoint, Plan]], *, share: bool = True
) -> dict[tuple[int, str], str]:
    """(point number, prompt id) -> row key; equal computations share a key (if `share`)."""
    if not share and len(compiled) > 1:
        return {
            (n, prompt): f"{prompt}@{n}"
            for n, (_, plan) in enumerate(compiled)
            for prompt, _ in plan.prompts.inline or ()
        }
    signatures: dict[tuple[int, str], Any] = {}
    for n, (_, plan) in enumerate(compiled):
        texts = dict(plan.prompts.inline or ())
        edits_of: dict[str, list[tuple[_Site, EditAction]]] = defaultdict(list)
        for actions in plan.sites:
            site = (actions.site.module, actions.site.port)
            for edit in actions.edits:
                for prompt in texts if edit.prompts is None else edit.prompts:
                    edits_of[prompt].append((site, edit))
        memo: dict[str, Any] = {}
        for prompt in texts:
            signatures[(n, prompt)] = _signature(prompt, texts, edits_of, memo, ()) or (
                "point",
                n,
                prompt,
            )
    counts: dict[Any, int] = defaultdict(int)
    first: dict[Any, int] = {}
    for (n, _), sig in signatures.items():
        counts[sig] += 1
        first.setdefault(sig, n)
    total = len(compiled)
    return {
        (n, prompt): prompt if counts[sig] == total else f"{prompt}@{first[sig]}"
        for (n, prompt), sig in signatures.items()
    }


def _signature(
    prompt: str,
    texts: dict[str, str],
    edits_of: dict[str, list[tuple[_Site, EditAction]]],
    memo: dict[str, Any],
    stack: tuple[str, ...],
) -> Any:
    """What a row computes: its prompt, text and edits, with its sources' signatures.

    None when sources read each other in a cycle: such rows are never shared.
    """
    if prompt in memo:
        return memo[prompt]
    if prompt in stack:
        return None
    parts: list[Any] = [prompt, texts[prompt]]
    for site, edit in edits_of.get(prompt, []):
        reads = _edit_sources(edit)
        read = []
        for source in reads:
            sig = (
                "self"
                if source == prompt
                else _signature(source, texts, edits_of, memo, (*stack, prompt))
            )
            if sig is None:
                memo[prompt] = None
                return None
            read.append(sig)
        parts.append((site, repr(replace(edit, prompts=None)), tuple(read)))
    memo[prompt] = hashlib.sha256(repr(parts).encode()).hexdigest()
    return memo[prompt]
