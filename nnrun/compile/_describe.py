"""A Plan as rows of text, in the order things happen (what `nnrun plan` prints)."""

from __future__ import annotations

from dataclasses import dataclass

from nnrun.compile.plan import EditAction, FileValue, Heads, Plan, PromptValue, SaveAction


@dataclass(frozen=True)
class PlanRow:
    """One action at one site: `order` is the site's rank in the forward pass."""

    order: int
    site: str
    action: str  # "save resid [layer 3]", "edit edits[0] (set) from 'clean' at ..."
    prompts: str
    tokens: str
    steps: str


def describe_plan(plan: Plan) -> list[PlanRow]:
    """Every action of the plan, site by site, in the order the engine runs them."""
    layered = {layout.name for layout in plan.saves if layout.layered}
    rows: list[PlanRow] = []
    for actions in plan.sites:

        def row(text: str, action: SaveAction | EditAction | None, site=actions.site) -> PlanRow:
            return PlanRow(
                order=site.order,
                site=site.label + "".join(f"[{i}]" for i in getattr(action, "indices", ())),
                action=text,
                prompts="all"
                if action is None or action.prompts is None
                else ", ".join(sorted(action.prompts)),
                tokens="" if action is None else str(action.tokens),
                steps="" if action is None else str(action.steps),
            )

        rows += [row(_save_text(s, layered), s) for s in actions.saves if s.before_edits]
        rows += [
            row(f"edit {e.label}{_operand_text(e)}{_heads_text(e.heads)}", e) for e in actions.edits
        ]
        rows += [
            row(f"capture{''.join(f'[{i}]' for i in c)} for a later edit", None)
            for c in actions.captures
        ]
        rows += [row(_save_text(s, layered), s) for s in actions.saves if not s.before_edits]
    return rows


def _save_text(save: SaveAction, layered: set[str]) -> str:
    if save.kind == "loss":
        return "loss for backward"
    layer = f" [layer {save.layer}]" if save.name in layered else ""
    before = " (before edits)" if save.before_edits else ""
    what = {
        "grad": " gradient",
        "pattern": " attention pattern",
        "attribution": "",
    }.get(save.kind, "")
    if save.kind == "attribution" and save.source is not None:
        what = f" attribution from '{save.source.prompt}'"
    return f"save {save.name}{layer}{what}{before}{_heads_text(save.heads)}"


def _heads_text(heads: Heads | None) -> str:
    if heads is None:
        return ""
    chosen = "all" if len(heads.selected) == heads.count else ", ".join(map(str, heads.selected))
    return f" heads {chosen} of {heads.count}"


def _operand_text(edit: EditAction) -> str:
    operand = edit.operand
    if isinstance(operand, PromptValue):
        site = f"{operand.module}.{operand.port}" if operand.module else operand.port
        step = "" if operand.step is None else f" step {operand.step}"
        return f" from '{operand.prompt}'{step} at {site}"
    if isinstance(operand, FileValue):
        return f" from {operand.file}:{operand.dataset}"
    if operand is not None:
        text = repr(operand.data)
        return f" {text if len(text) <= 30 else text[:27] + '...'}"
    return ""
