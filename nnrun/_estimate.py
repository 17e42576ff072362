"""What `nnrun plan` says a run will write: each save's shape and bytes, before it runs.

The shape is the padded view a reader gets back (`Results["name"].shape`); the bytes
are what the file stores (for a packed save, only the real tokens). Both come from
the compiled plans and each prompt's tokens: inline prompts are tokenized here, as
are a prompt file's (the first `_MAX_TOKENIZED`; beyond that a prompt is counted as
its UTF-8 bytes plus the special tokens, which no tokenizer exceeds). Estimates for
prompt files and for generation (a row may stop at its end-of-sequence token) are
upper bounds, marked as such; the others are exact.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

# Prompts of a file tokenized for the estimate at most (then bytes are counted).
_MAX_TOKENIZED = 100_000


@dataclass
class SaveEstimate:
    """One save's dataset as the run will write it."""

    shape: tuple[int, ...]  # the padded view: (sweep..., prompt, [layer], [step], token, ...)
    bytes: int  # stored: packed saves count their real tokens only
    layout: str  # packed | padded
    exact: bool  # False: an upper bound (prompt files; generation may stop early)


class _Lengths:
    """Each prompt text's token ids (tokenized once per text, in batches)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.ids: dict[str, list[int]] = {}

    def add(self, texts: list[str]) -> None:
        todo = [t for t in dict.fromkeys(texts) if t not in self.ids]
        for start in range(0, len(todo), 1024):
            part = todo[start : start + 1024]
            found = self.tokenizer(part, add_special_tokens=True)["input_ids"]
            self.ids.update(zip(part, (list(i) for i in found)))


def estimate_saves(
    plans: list[Any], model: Any, lead: tuple[int, ...]
) -> tuple[dict[str, SaveEstimate], int]:
    """Every save's estimate over the plans of a run's groups, and the prompt count."""
    from nnrun.engine import iter_prompts
    from nnrun.store._writer import is_packed

    lengths = _Lengths(model.tokenizer)
    units: dict[str, list[tuple[int, int]]] = {}  # save -> per written unit: (step-0, later)
    widths: dict[str, int] = {}
    layouts: dict[str, Any] = {}
    exact: dict[str, bool] = {}
    count = 0
    for plan in plans:
        if plan.rows is not None:
            rows = {row.key: row.text for row in plan.rows}
            lengths.add(list(rows.values()))
            count = max(count, len(plan.prompt_ids or ()))
            points = None
        else:  # a prompt file: every point of the plan writes every prompt
            rows = dict(iter_prompts(plan.prompts, model.tokenizer))
            lengths.add(list(rows.values())[:_MAX_TOKENIZED])
            count = max(count, len(rows))
            points = len(plan.points) or 1
        for layout in plan.saves:
            layouts.setdefault(layout.name, layout)
            exact[layout.name] = (
                exact.get(layout.name, True) and points is None and layout.steps is None
            )
            keys = _rows_of(layout, rows)
            for key in keys:
                step0, later, width = _selected(layout, rows[key], lengths)
                widths[layout.name] = max(widths.get(layout.name, 1), width)
                copies = points if points is not None else len(_targets(layout, key))
                units.setdefault(layout.name, []).extend([(step0, later)] * copies)
    longest = max((len(ids) for ids in lengths.ids.values()), default=1)
    out = {}
    for name, layout in layouts.items():
        prompts = len(layout.prompts) if layout.prompts is not None else count
        axes = (*lead, prompts)
        axes += (len(layout.sites),) if layout.layered else ()
        axes += (len(layout.steps),) if layout.steps is not None else ()
        if layout.kind == "pattern":  # (head, query token, key token): keys padded
            value, itemsize = _value_shape(
                layout, model, (_pattern_heads(layout, model.model), longest)
            )
            shape = (*axes, value[0], widths.get(name, 1), *value[1:])
        else:
            value, itemsize = _value_shape(layout, model)
            shape = (*axes, widths.get(name, 1), *value)
        packed = is_packed(layout)
        if packed:
            per_token = itemsize * math.prod(value) * (len(layout.sites) if layout.layered else 1)
            tokens = sum(a + b for a, b in units.get(name, []))
            size = tokens * per_token
        else:
            size = math.prod(shape) * itemsize
        out[name] = SaveEstimate(shape, size, "packed" if packed else "padded", exact[name])
    return out, count


def _rows_of(layout: Any, rows: dict[str, str]) -> list[str]:
    """The rows a save writes: its targets' (inline prompts), else its prompts'."""
    if layout.targets is not None:
        return [key for key, _ in layout.targets if key in rows]
    if layout.prompts is not None:
        return [key for key in rows if key in layout.prompts]
    return list(rows)


def _targets(layout: Any, key: str) -> tuple[Any, ...]:
    if layout.targets is None:
        return (None,)
    return dict(layout.targets).get(key, ())


def _selected(layout: Any, text: str, lengths: _Lengths) -> tuple[int, int, int]:
    """(tokens at step 0, tokens at the later steps, padded width) of one prompt."""
    from nnrun.models._tokens import find_tokens

    ids = lengths.ids.get(text)
    if ids is None:  # beyond the tokenized prompts: no tokenizer makes more than this
        n = len(text.encode("utf-8")) + len(lengths.tokenizer("")["input_ids"])
        ids = [0] * n

    def find(needle: str, occurrence: str | None) -> list[int]:
        return find_tokens(lengths.tokenizer, text, ids, needle, occurrence)

    try:
        first = len(layout.tokens.resolve(len(ids), find))
    except (IndexError, LookupError):
        first = 0  # the point fails its preflight and writes nothing
    if layout.steps is None:
        return first, 0, first
    later_steps = sum(1 for s in layout.steps if s >= 1)
    slots = len(layout.tokens.positions) if layout.tokens.kind == "list" else 1
    step0 = first if 0 in layout.steps else 0
    width = max(step0, slots if later_steps else 0, 1)
    return step0, later_steps, width


def _value_shape(
    layout: Any, model: Any, own: tuple[int, ...] | None = None
) -> tuple[tuple[int, ...], int]:
    """The stored value's own axes (after `apply`) and its item size in the file."""
    import torch

    from nnrun.engine._apply import apply_steps
    from nnrun.engine._engine import modules_of

    own = own or layout.value_shape or ()
    sample = torch.zeros((1, 1, *own), dtype=model.model.dtype)
    with torch.inference_mode():
        out = apply_steps(layout.apply, sample, modules_of(model.model))
    out = out["values"] if isinstance(out, dict) else out
    itemsize = 4 if out.dtype == torch.bfloat16 else out.element_size()  # bf16 is widened
    return tuple(out.shape[2:]), itemsize


def _pattern_heads(layout: Any, model: Any) -> int:
    from nnrun.compile._heads import head_counts

    if layout.heads is not None:
        return len(layout.heads.selected)
    counts = head_counts(model)
    return counts[0] if counts else 1
