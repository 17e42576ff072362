"""Execute a Plan: hooks on the planned sites, micro-batches, host copies."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import lru_cache
from itertools import islice
from typing import Any

import torch
from torch import nn

from nnrun.compile._limits import check_batch_lengths, max_positions
from nnrun.compile._probe import first_input, model_device
from nnrun.compile.plan import FileValue, LiteralValue, Plan, SaveAction, SiteActions
from nnrun.engine._apply import apply_steps, check_apply
from nnrun.engine._batch import Batch, iter_prompts, make_batch, takes_position_ids
from nnrun.engine._edits import EditContext, OperandCache, apply_edit, check_operand_shape
from nnrun.engine._ports import get_value, set_value
from nnrun.engine._select import TokenIndex, token_index
from nnrun.errors import RunError
from nnrun.spec import StepSelection


@dataclass
class SaveBatch:
    """One save's values for the prompts of one micro-batch, on the host."""

    data: torch.Tensor  # (R, [layer], token, *value axes); ragged tokens filled
    prompt_ids: list[str]
    counts: torch.Tensor | None  # (R,) real tokens per prompt when ragged, else None
    extra: dict[str, torch.Tensor] = field(default_factory=dict)  # e.g. topk indices


@dataclass
class BatchResult:
    """What one micro-batch produced: its prompts and every save's values."""

    prompt_ids: list[str]
    texts: list[str]
    token_ids: list[list[int]]
    saves: dict[str, SaveBatch]
    generated: list[list[int]] | None = None  # new token ids per prompt (up to EOS)
    generated_text: list[str] | None = None


class _BatchState:
    """Per-batch scratch shared by the hooks: token indices and device values."""

    def __init__(self, batch: Batch, edits: EditContext) -> None:
        self.batch = batch
        self.edits = edits
        # save name -> (layer, step) -> (values, token index) kept on the device
        # until the batch ends, so the host copy is one transfer per save.
        self.collected: dict[str, dict[tuple[int, int], tuple[Any, TokenIndex]]] = {}

    @property
    def step(self) -> int:
        """0 for the prompt pass, k for the pass over the k-th new token (-1 before)."""
        return self.edits.step

    def start_step(self, width: int) -> None:
        self.edits.step += 1
        self.edits.width = width

    def index_for(self, prompts: frozenset[str] | None, tokens, what: str) -> TokenIndex | None:
        """A save's rows and columns at this step (never the auxiliary source rows)."""
        return self.edits.index(prompts, tokens, what, include_aux=False)


class Engine:
    """Runs a compiled Plan on a loaded model, one micro-batch at a time.

    >>> for result in Engine(plan, model, tokenizer).run():   # doctest: +SKIP
    ...     write(result)
    """

    def __init__(self, plan: Plan, model: nn.Module, tokenizer: Any) -> None:
        self.plan = plan
        self.model = model
        self.tokenizer = tokenizer
        self.device = model_device(model)
        # Generation appends to the right, so it always left-pads; a single
        # forward pads right only for models that cannot take position ids.
        self.left_pad = plan.generate is not None or takes_position_ids(model)
        self.modules = dict(model.named_modules())
        self._max_steps = int(plan.generate["max_new_tokens"]) if plan.generate else 1
        self._positions = max_positions(model)
        self.operands = OperandCache()
        self._state: _BatchState | None = None
        inline = dict(plan.prompts.inline or ())
        self._sources = [(p, inline[p]) for p in plan.source_prompts]

    def preflight(self) -> None:
        """Check what can be checked before any forward pass or output file.

        Resolves every selection against every inline prompt (a token beyond a
        prompt's length fails here, naming the save or edit), reads every file
        operand once, and checks literal and file operands against the value
        shapes the compile-time probe saw.
        """
        like = next(self.model.parameters(), torch.zeros(()))
        for layout in self.plan.saves:
            check_apply(
                layout.apply, layout.value_shape, self.modules, like, f"save '{layout.name}'"
            )
        batch = None
        if self.plan.prompts.inline is not None:
            inline = list(self.plan.prompts.inline)
            batch = make_batch(inline, self.tokenizer, torch.device("cpu"), left_pad=self.left_pad)
        for actions in self.plan.sites:
            for save in actions.saves:
                if batch is not None:
                    token_index(batch, save.prompts, save.tokens, what=f"save '{save.name}'")
            for edit in actions.edits:
                index = None
                if batch is not None:
                    index = token_index(batch, edit.prompts, edit.tokens, what=edit.label)
                if isinstance(edit.operand, FileValue | LiteralValue):
                    operand = self.operands.host(edit)
                    selected = None if index is None else tuple(index.columns.shape)
                    check_operand_shape(edit, tuple(operand.shape), actions.site.label, selected)

    def run(self) -> Iterator[BatchResult]:
        """Yield one BatchResult per micro-batch; hooks are removed afterwards."""
        torch.manual_seed(self.plan.seed)
        prompts = iter_prompts(self.plan.prompts)
        with self._hooks():
            while chunk := list(islice(prompts, self.plan.batch_size)):
                yield self._run_batch(chunk)

    def _run_batch(self, chunk: list[tuple[str, str]]) -> BatchResult:
        present = {p for p, _ in chunk}
        extra = [s for s in self._sources if s[0] not in present]
        batch = make_batch(
            chunk + extra,
            self.tokenizer,
            self.device,
            left_pad=self.left_pad,
            aux=[False] * len(chunk) + [True] * len(extra),
        )
        new_tokens = self._max_steps if self.plan.generate else 0
        check_batch_lengths(
            batch.ids, [len(t) for t in batch.token_ids], self._positions, new_tokens
        )
        self._state = _BatchState(batch, EditContext(batch, self.operands, self.plan.seed))
        generated = None
        try:
            with torch.inference_mode():
                if self.plan.generate is None:
                    self.model(**batch.model_inputs())
                else:
                    generated = self._generate(batch)
            saves = self._gather(batch, generated)
        finally:
            self._state = None
        n = len(chunk)  # the auxiliary source rows come last and are not results
        return BatchResult(
            prompt_ids=batch.ids[:n],
            texts=batch.texts[:n],
            token_ids=batch.token_ids[:n],
            saves=saves,
            generated=None if generated is None else generated[:n],
            generated_text=None
            if generated is None
            else [self.tokenizer.decode(ids, skip_special_tokens=True) for ids in generated[:n]],
        )

    def _generate(self, batch: Batch) -> list[list[int]]:
        """Run `model.generate` on the batch; each row's new tokens up to its EOS."""
        args = {"do_sample": False, **(self.plan.generate or {})}
        output = self.model.generate(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            pad_token_id=self.tokenizer.pad_token_id,
            **args,
        )  # (batch, width + new)
        new = output[:, batch.width :].tolist()
        eos = self.model.generation_config.eos_token_id
        eos = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
        ends = [next((i + 1 for i, t in enumerate(row) if t in eos), len(row)) for row in new]
        return [row[:end] for row, end in zip(new, ends)]

    # -- hooks ---------------------------------------------------------------

    @contextmanager
    def _hooks(self) -> Iterator[None]:
        handles = [
            # Registered first so every other hook of a forward sees its step.
            self.model.register_forward_pre_hook(self._step_hook, with_kwargs=True)
        ]
        try:
            for actions in self.plan.sites:
                module = self.modules[actions.site.module]
                if actions.site.port == "output":
                    handles.append(
                        module.register_forward_hook(self._output_hook(actions), with_kwargs=True)
                    )
                else:
                    handles.append(
                        module.register_forward_pre_hook(
                            self._input_hook(actions), with_kwargs=True
                        )
                    )
            yield
        finally:
            for handle in handles:
                handle.remove()

    def _step_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if self._state is None:
            return
        ids = kwargs.get("input_ids", args[0] if args else None)
        width = ids.shape[1] if isinstance(ids, torch.Tensor) else self._state.batch.width
        self._state.start_step(width)

    def _output_hook(self, actions: SiteActions):
        root = actions.site.module == ""

        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
            return self._at_site(actions, output, root=root, inputs=(args, kwargs))

        return hook

    def _input_hook(self, actions: SiteActions):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> Any:
            if args:
                new = self._at_site(actions, args[0], root=False)
                return None if new is None else ((new, *args[1:]), kwargs)
            # Called with keywords only: the first keyword argument is the input.
            if not kwargs:
                raise RunError(f"{actions.site.label}: the module was called with no input")
            key = next(iter(kwargs))
            new = self._at_site(actions, kwargs[key], root=False)
            return None if new is None else (args, {**kwargs, key: new})

        return hook

    def _at_site(
        self, actions: SiteActions, container: Any, *, root: bool, inputs: Any = None
    ) -> Any:
        """Saves (before edits), edits in spec order, then saves; None if unchanged."""
        state = self._state
        if state is None:  # the module ran outside a planned forward (e.g. ad hoc)
            return None
        label = actions.site.label
        for save in actions.saves:
            if save.before_edits:
                self._save(state, save, container, root=root, label=label)
        changed = False
        for edit in actions.edits:
            if not _in_steps(edit.steps, state.step, self._max_steps):
                continue
            site_label = label + "".join(f"[{i}]" for i in edit.indices)
            value = get_value(container, edit.indices, root=root, label=site_label)
            new = apply_edit(
                edit,
                value,
                state.edits,
                label=site_label,
                site_key=(actions.site.module, actions.site.port, edit.indices),
                module_input=_tensor_or_none(first_input(*inputs)) if edit.op == "skip" else None,
            )
            if new is not value:
                container = set_value(container, edit.indices, new, root=root)
                changed = True
        for indices in actions.captures:
            key = (actions.site.module, actions.site.port, indices)
            state.edits.captured[key] = get_value(container, indices, root=root, label=label)
        for save in actions.saves:
            if not save.before_edits:
                self._save(state, save, container, root=root, label=label)
        return container if changed else None

    def _save(
        self, state: _BatchState, save: SaveAction, container: Any, *, root: bool, label: str
    ) -> None:
        wanted = _in_steps(save.steps, state.step, self._max_steps)
        # A generating save that skips step 0 still keeps a step-0 sample (step
        # -1 below) so a batch whose rows all stop early still gets its rows.
        if not wanted and not (self.plan.generate is not None and state.step == 0):
            return
        what = f"save '{save.name}'"
        index = state.index_for(save.prompts, save.tokens, what)
        if index is None:
            return
        value = get_value(container, save.indices, root=root, label=label)  # (B, T, ...)
        batch = state.batch
        if value.dim() < 2 or value.shape[0] != batch.size:
            raise RunError(
                f"{what} at {label}: expected a value of shape (batch={batch.size}, "
                f"tokens, ...) but it has shape {tuple(value.shape)}"
            )
        index = index.fit(value.shape[1], state.edits.width, f"{what} at {label}")
        if not wanted:  # only the sample's shape is used: one column is enough
            index = TokenIndex(index.rows, index.columns[:, :1], index.valid[:, :1], True)
        picked = value[index.rows[:, None], index.columns]  # (R, K, ...)
        picked = apply_steps(save.apply, picked, self.modules)
        step = state.step if wanted else -1
        state.collected.setdefault(save.name, {})[(save.layer, step)] = (picked, index)

    # -- results -------------------------------------------------------------

    def _gather(self, batch: Batch, generated: list[list[int]] | None) -> dict[str, SaveBatch]:
        """Stack each save's layers (and steps) and copy it to the host in one transfer."""
        state = self._state
        assert state is not None
        out: dict[str, SaveBatch] = {}
        for layout in self.plan.saves:
            entries = state.collected.get(layout.name, {})
            if not entries:
                state.edits.step = 0
                selected = state.index_for(
                    None if layout.prompts is None else frozenset(layout.prompts),
                    layout.tokens,
                    f"save '{layout.name}'",
                )
                if selected is None:
                    continue  # no prompt of this batch is in the save
                raise RunError(
                    f"save '{layout.name}': the site {layout.sites[0]} never ran in the forward "
                    f"pass, so there is nothing to save (is the module used by this model?)"
                )
            first = min(step for _, step in entries)
            missing = [s for i, s in enumerate(layout.sites) if (i, first) not in entries]
            if missing:
                raise RunError(
                    f"save '{layout.name}': site {missing[0]} never ran in the forward pass"
                )

            def assembled(step: int, entries=entries, layout=layout) -> SaveBatch:
                values = [entries[(i, step)][0] for i in range(len(layout.sites))]
                return _assemble(values, entries[(0, step)][1], layout.layered, batch)

            if layout.steps is None:
                out[layout.name] = _to_host(assembled(0))
                continue
            # None: every row had stopped before this step, so it never ran.
            per_step = [assembled(s) if (0, s) in entries else None for s in layout.steps]
            sample = assembled(first) if all(p is None for p in per_step) else None
            stacked = _stack_steps(per_step, layout, batch, generated, sample)
            out[layout.name] = _to_host(stacked)
        return out


def _in_steps(steps: StepSelection, step: int, total: int) -> bool:
    return steps.kind == "all" or step in _resolved(steps, total)


@lru_cache(maxsize=256)
def _resolved(steps: StepSelection, total: int) -> frozenset[int]:
    return frozenset(steps.resolve(total))


def _stack_steps(
    per_step: list[SaveBatch | None],
    layout: Any,
    batch: Batch,
    generated: list[list[int]] | None,
    sample: SaveBatch | None = None,
) -> SaveBatch:
    """Per-step values -> (R, [L], step, token, ...) on the device, masked after each row's end.

    A row's step k is real while k < the number of tokens it generated: the
    step after its EOS is a forward the batch ran for other rows only.
    """
    ref = next((p for p in per_step if p is not None), sample)
    assert ref is not None
    token_axis = 2 if layout.layered else 1
    width = max((p.data.shape[token_axis] for p in per_step if p is not None), default=1)
    parts: dict[str, list[torch.Tensor]] = {"values": []}
    parts.update({k: [] for k in ref.extra})
    counts = []
    for p in per_step:
        for key in parts:
            tensor = ref.data if key == "values" else ref.extra[key]
            if p is not None:
                tensor = p.data if key == "values" else p.extra[key]
            fill = float("nan") if tensor.is_floating_point() else -1
            shape = list(tensor.shape)
            shape[token_axis] = width
            padded = torch.full(shape, fill, dtype=tensor.dtype, device=tensor.device)
            if p is not None:
                padded.narrow(token_axis, 0, tensor.shape[token_axis]).copy_(tensor)
            parts[key].append(padded)
        n_rows, device = len(ref.prompt_ids), ref.data.device
        if p is None:
            counts.append(torch.zeros(n_rows, dtype=torch.long, device=device))
        elif p.counts is not None:
            counts.append(p.counts)
        else:
            counts.append(torch.full((n_rows,), p.data.shape[token_axis], device=device))
    stacked = {k: torch.stack(v, dim=token_axis) for k, v in parts.items()}  # (R, [L], S, K, ...)
    count = torch.stack([c.long() for c in counts], dim=1)  # (R, S)
    if generated is not None:
        rows = [batch.ids.index(p) for p in ref.prompt_ids]
        device = count.device
        made = torch.tensor([len(generated[r]) for r in rows], device=device)  # (R,)
        alive = torch.tensor(layout.steps, device=device)[None, :] < made[:, None]  # (R, S)
        count = torch.where(alive, count, torch.zeros_like(count))
        for key, tensor in stacked.items():
            mask = alive.view(*alive.shape[:1], *([1] * (token_axis - 1)), alive.shape[1])
            mask = mask.view(*mask.shape, *([1] * (tensor.dim() - mask.dim())))
            fill = float("nan") if tensor.is_floating_point() else -1
            fill_value = torch.full((), fill, dtype=tensor.dtype, device=device)
            stacked[key] = torch.where(mask, tensor, fill_value)
    return SaveBatch(
        data=stacked["values"],
        prompt_ids=ref.prompt_ids,
        counts=count,
        extra={k: v for k, v in stacked.items() if k != "values"},
    )


def _to_host(save: SaveBatch) -> SaveBatch:
    """The same save with its tensors on the host: one transfer per tensor per batch."""
    return SaveBatch(
        data=save.data.to("cpu"),
        prompt_ids=save.prompt_ids,
        counts=None if save.counts is None else save.counts.to("cpu"),
        extra={k: v.to("cpu") for k, v in save.extra.items()},
    )


def _assemble(values: list[Any], index: TokenIndex, layered: bool, batch: Batch) -> SaveBatch:
    """(R, K, ...) per layer -> one device tensor (R, [L], K, ...), padding masked."""
    extra_names: list[str] = []
    if isinstance(values[0], dict):  # ops such as topk give several tensors
        extra_names = [k for k in values[0] if k != "values"]
        parts = {k: [v[k] for v in values] for k in values[0]}
    else:
        parts = {"values": values}
    host: dict[str, torch.Tensor] = {}  # still on the device
    for key, tensors in parts.items():
        data = torch.stack(tensors, dim=1) if layered else tensors[0]  # (R, [L], K, ...)
        if index.ragged:
            valid = index.valid  # (R, K)
            shape = (valid.shape[0],) + (1,) * int(layered) + (valid.shape[1],)
            valid = valid.view(*shape, *([1] * (data.dim() - len(shape))))
            fill = float("nan") if data.is_floating_point() else -1
            data = torch.where(
                valid, data, torch.full((), fill, dtype=data.dtype, device=data.device)
            )
        host[key] = data
    rows = index.rows.tolist()
    return SaveBatch(
        data=host["values"],
        prompt_ids=[batch.ids[r] for r in rows],
        counts=index.counts if index.ragged else None,
        extra={k: host[k] for k in extra_names},
    )


def _tensor_or_none(value: Any) -> torch.Tensor | None:
    return value if isinstance(value, torch.Tensor) else None
