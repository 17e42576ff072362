"""Execute a Plan: hooks on the planned sites, micro-batches, host copies."""

from __future__ import annotations

import os
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import lru_cache, partial
from itertools import islice
from typing import Any

import torch
from torch import nn

from nnrun.compile._limits import check_batch_lengths, max_positions
from nnrun.compile._pack import connected_rows
from nnrun.compile._probe import first_input, model_device
from nnrun.compile.plan import (
    FileValue,
    LiteralValue,
    MetricAction,
    Plan,
    PromptRow,
    PromptValue,
    SaveAction,
    SiteActions,
)
from nnrun.engine._apply import apply_steps, check_apply
from nnrun.engine._backward import BackwardPass, GradRead
from nnrun.engine._batch import (
    Batch,
    count_prompts,
    iter_prompt_records,
    make_batch,
    takes_position_ids,
)
from nnrun.engine._edits import (
    EditContext,
    OperandCache,
    apply_edit,
    check_operand_shape,
    hold_source,
)
from nnrun.engine._heads import pattern_rows, pick_heads
from nnrun.engine._metrics import compute_metric
from nnrun.engine._ports import get_value, set_value
from nnrun.engine._seed import seed_generators
from nnrun.engine._select import TokenIndex, token_index
from nnrun.engine._transfer import copies_done, to_host
from nnrun.errors import RunError
from nnrun.spec import StepSelection


@dataclass
class SaveBatch:
    """One save's values for the rows of one micro-batch, on the host."""

    data: torch.Tensor  # (R, [layer], token, *value axes); ragged tokens filled
    prompt_ids: list[str]  # the row key of each of the R rows (the prompt id without a sweep)
    counts: torch.Tensor | None  # (R,) real tokens per prompt when ragged, else None
    extra: dict[str, torch.Tensor] = field(default_factory=dict)  # e.g. topk indices


@dataclass
class MetricBatch:
    """One metric's values for the rows of one micro-batch, on the host."""

    data: torch.Tensor  # (R,)
    rows: list[str]  # row keys


@dataclass
class BatchResult:
    """What one micro-batch produced: its rows, every save's and metric's values.

    `saves` and `metrics` are keyed by variant (SaveLayout.variant); without a sweep
    that is the save's name.
    """

    prompt_ids: list[str]
    texts: list[str]
    token_ids: list[list[int]]
    saves: dict[str, SaveBatch]
    generated: list[list[int]] | None = None  # new token ids per prompt (up to EOS)
    generated_text: list[str] | None = None
    rows: list[str] = field(default_factory=list)  # row keys (= prompt_ids without a sweep)
    metrics: dict[str, MetricBatch] = field(default_factory=dict)
    # Each prompt's tokens as text (inline prompts only): what `tokens:` positions mean.
    token_texts: list[list[str]] | None = None
    # On CUDA: an event set once every value of the batch has reached the host (the
    # copies do not wait for it; see _transfer). None: the values are there.
    ready: Any = None

    def wait(self) -> None:
        """Return once the batch's values are on the host (read them only after this)."""
        if self.ready is not None:
            self.ready.synchronize()
            self.ready = None


class _BatchState:
    """Per-batch scratch shared by the hooks: token indices and device values."""

    def __init__(self, batch: Batch, edits: EditContext) -> None:
        self.batch = batch
        self.edits = edits
        # save variant -> (layer, step) -> (values, token index) kept on the device
        # until the batch ends, so the host copy is one transfer per save.
        self.collected: dict[str, dict[tuple[int, int], tuple[Any, TokenIndex]]] = {}
        # metric variant -> (values (R,), row indices (R,)) on the device
        self.metrics: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        # ids of the actions that select a row of this batch (the others are skipped)
        self.active: set[int] = set()
        self.backward: BackwardPass | None = None  # with backward: this batch's pass

    def collect(self, variant: str, where: tuple[int, int], picked: Any, index: TokenIndex) -> None:
        """Keep a save's values (R, K, ...) for (layer, step); several actions feeding one
        variant there (attributions of different sweep points) are joined row-wise."""
        entries = self.collected.setdefault(variant, {})
        if where in entries:
            picked, index = _join_rows(entries[where], (picked, index))
        entries[where] = (picked, index)

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


_MODULES: weakref.WeakKeyDictionary[nn.Module, dict[str, nn.Module]] = weakref.WeakKeyDictionary()


def modules_of(model: nn.Module) -> dict[str, nn.Module]:
    """`dict(model.named_modules())`, built once per model (sweeps ask for it per point)."""
    if model not in _MODULES:
        _MODULES[model] = dict(model.named_modules())
    return _MODULES[model]


@contextmanager
def deterministic_algorithms(enabled: bool) -> Iterator[None]:
    """Torch picks deterministic kernels while this lasts (the spec's `deterministic:`).

    cuBLAS needs its workspace size fixed before the first CUDA matmul for that; an op
    without a deterministic version then raises, naming itself, instead of varying.
    The process's own setting comes back afterwards.
    """
    before = torch.are_deterministic_algorithms_enabled()
    if enabled:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        if enabled and not before:
            torch.use_deterministic_algorithms(False)


def uses_left_padding(plan: Plan, model: nn.Module) -> bool:
    """Generation appends to the right, so it always left-pads; a single forward
    pads right only for models that cannot take position ids."""
    return plan.generate is not None or takes_position_ids(model)


def preflight(
    plan: Plan, model: nn.Module, tokenizer: Any, operands: OperandCache | None = None
) -> None:
    """Check what can be checked before any forward pass or output file.

    Resolves every selection against every inline prompt (a token beyond a
    prompt's length fails here, naming the save, edit or metric), reads every
    file operand once, and checks literal and file operands against the value
    shapes the compile-time probe saw. Raises RunError.
    """
    operands = operands or OperandCache()
    modules = modules_of(model)
    # A sample on the device the model takes inputs on (its first weight may be offloaded
    # to `meta` under a device map), in the model's dtype.
    weight = next(model.parameters(), None)
    dtype = weight.dtype if weight is not None else torch.float32
    like = torch.zeros((), dtype=dtype, device=model_device(model))
    for layout in plan.saves:
        check_apply(layout.apply, layout.value_shape, modules, like, f"save '{layout.name}'")
    rows = _plan_rows(plan)
    batch = None
    if rows is not None:
        batch = make_batch(
            [(r.key, r.text) for r in rows.values()],
            tokenizer,
            torch.device("cpu"),
            left_pad=uses_left_padding(plan, model),
            prompt_ids=[r.prompt for r in rows.values()],
        )
    for actions in plan.sites:
        for save in actions.saves:
            if save.kind == "loss":
                check_loss(plan, save, actions.site.label, modules)
            if batch is not None:
                token_index(batch, save.prompts, save.tokens, what=f"save '{save.name}'")
                if save.source is not None:
                    token_index(
                        batch,
                        frozenset([save.source.prompt]),
                        save.source.tokens or save.tokens,
                        what=f"save '{save.name}' attribution from '{save.source.prompt}'",
                        include_aux=True,
                    )
        for metric in actions.metrics:
            if batch is not None:
                token_index(batch, metric.prompts, metric.tokens, what=f"metric '{metric.key}'")
        for edit in actions.edits:
            index = None
            if batch is not None:
                index = token_index(batch, edit.prompts, edit.tokens, what=edit.label)
            if isinstance(edit.operand, FileValue | LiteralValue):
                operand = operands.host(edit)
                selected = None if index is None else tuple(index.columns.shape)
                check_operand_shape(edit, tuple(operand.shape), actions.site.label, selected)


def check_loss(plan: Plan, save: SaveAction, site: str, modules: dict[str, nn.Module]) -> None:
    """A site loss's apply chain must leave one number per token (they are then summed)."""
    own = plan.backward.value_shape if plan.backward is not None else None
    if own is None:
        raise RunError(f"backward.loss.at: {site} does not carry a (batch, tokens, ...) tensor")
    weight = next((p for m in modules.values() for p in m.parameters()), None)
    dtype = weight.dtype if weight is not None else torch.float32
    sample = torch.zeros((1, 1, *own), dtype=dtype)
    with torch.no_grad():
        out = apply_steps(save.apply, sample, modules)
    if isinstance(out, dict):
        raise RunError("backward.loss.apply: topk gives several numbers, not one loss")
    if out.numel() == 1:
        return
    steps = ", ".join(s.name for s in save.apply) or "none"
    raise RunError(
        f"backward.loss: the loss must be one number per token (summed over tokens and "
        f"prompts), but {site} with apply [{steps}] gives shape {tuple(out.shape[2:])} per "
        "token; reduce the value's axes (apply: [..., sum] or [..., norm])"
    )


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
        self.left_pad = uses_left_padding(plan, model)
        self.modules = modules_of(model)
        self._max_steps = int(plan.generate["max_new_tokens"]) if plan.generate else 1
        self._positions = _max_positions(model)
        self.operands = OperandCache()
        self._state: _BatchState | None = None
        self._rows, self._by_row, self._always, self._indices, self._batches = _prepared(plan)
        self.current_rows: list[str] = []  # the rows of the batch under way (for error reports)
        self._loss_scale = _loss_scale(plan)
        self._field_tokens: dict[str, int] = {}  # `{field: ...}` metric texts -> token ids
        self._fixed_ids: dict[tuple[str, torch.device], torch.Tensor] = {}  # see _fixed_tokens
        # Each result's values are on the host when it is yielded. The run loop turns
        # this off: its writer thread waits for them (BatchResult.wait), so on a GPU the
        # next batch computes while the copies of this one are on their way.
        self.wait_for_host = True

    def preflight(self) -> None:
        """Check what can be checked before any forward pass (see `preflight`)."""
        preflight(self.plan, self.model, self.tokenizer, self.operands)

    def run(self, rows: list[str] | None = None) -> Iterator[BatchResult]:
        """Yield one BatchResult per micro-batch; hooks are removed afterwards.

        `rows` restricts the run to those row keys (in plan order); by default every
        row of the plan runs (or every prompt of the prompt file).
        """
        seed_generators(self.plan.seed)
        if self._rows is None:
            source: Iterator[PromptRow] = (
                PromptRow(key, key, text, fields=record)
                for key, text, record in iter_prompt_records(self.plan.prompts, self.tokenizer)
            )
            chunks = iter(lambda: list(islice(source, self.plan.batch_size)), [])
        else:
            wanted = None if rows is None else set(rows)
            chosen = [r for r in self._rows.values() if wanted is None or r.key in wanted]
            chunks = iter(self._chunks(chosen))
        with self._hooks(), self._attention(), deterministic_algorithms(self.plan.deterministic):
            for chunk in chunks:
                yield self._run_batch(chunk)

    def _chunks(self, rows: list[PromptRow]) -> list[list[PromptRow]]:
        """Micro-batches of rows; with backward, rows that read each other stay together."""
        size = self.plan.batch_size
        if self.plan.backward is None:
            return [rows[i : i + size] for i in range(0, len(rows), size)]
        by_key = {r.key: r for r in rows}
        chunks: list[list[PromptRow]] = []
        for group in connected_rows(by_key):
            members = [by_key[key] for key in group]
            if chunks and len(chunks[-1]) + len(members) <= size:
                chunks[-1] += members
            else:
                chunks.append(members)
        return chunks

    @contextmanager
    def _attention(self) -> Iterator[None]:
        """Switch the model's attention implementation for the run (and back after it)."""
        wanted = self.plan.attn_implementation
        config = getattr(self.model, "config", None)
        before = getattr(config, "_attn_implementation", None)
        if wanted is None or before == wanted:
            yield
            return
        setter = getattr(self.model, "set_attn_implementation", None)
        if setter is None:
            raise RunError(
                f"attention weights need {wanted} attention, and {type(self.model).__name__} "
                "cannot switch its attention implementation; load it with "
                f"model.attn_implementation: {wanted}"
            )
        setter(wanted)
        try:
            yield
        finally:
            setter(before)

    def _run_batch(self, chunk: list[PromptRow]) -> BatchResult:
        extra = self._source_rows(chunk)
        rows = chunk + extra
        self.current_rows = [r.key for r in rows]
        batch = self._batch(chunk, extra)
        state = _BatchState(batch, EditContext(batch, self.operands, self.plan.seed, self._indices))
        state.active = set(self._always)
        for key in batch.ids:
            state.active.update(self._by_row.get(key, ()))
        self._state = state
        generated = None
        try:
            if self.plan.backward is not None:
                state.backward = BackwardPass()
                state.start_step(batch.width)
                with torch.enable_grad():
                    self.model(**batch.model_inputs())
                    state.backward.run(_loss_name(self.plan))
                state.backward = None  # frees the graph before the host copies
            else:
                with torch.inference_mode():
                    if self.plan.generate is None:
                        state.start_step(batch.width)
                        self.model(**batch.model_inputs())
                    else:
                        generated = self._generate(batch)
            saves = self._gather(batch, generated)
            metrics = self._gather_metrics(batch, generated)
        finally:
            self._state = None
            state.edits.captured.clear()  # the batch's activations go with the batch
        n = len(chunk)  # the auxiliary source rows come last and are not results
        result = BatchResult(
            ready=copies_done(self.device),
            prompt_ids=[r.prompt for r in chunk],
            texts=batch.texts[:n],
            token_ids=batch.token_ids[:n],
            saves=saves,
            generated=None if generated is None else generated[:n],
            generated_text=None
            if generated is None
            else [self.tokenizer.decode(ids, skip_special_tokens=True) for ids in generated[:n]],
            rows=batch.ids[:n],
            metrics=metrics,
            token_texts=None if self._rows is None else _token_texts(self.tokenizer, batch, n),
        )
        if self.wait_for_host:
            result.wait()
        return result

    def _batch(self, chunk: list[PromptRow], extra: list[PromptRow]) -> Batch:
        """The rows tokenized and padded; a plan's inline rows once per plan and device.

        A notebook loop or a sweep runs the same rows again and again, and tokenizing
        costs about what a small model's pass does. Batches are never changed in place.
        """
        rows = chunk + extra
        key = None
        if self._rows is not None:  # inline rows: the same keys are the same texts
            key = (tuple(r.key for r in rows), len(chunk), self.device, self.left_pad)
            if key in self._batches:
                return self._batches[key]
        batch = make_batch(
            [(r.key, r.text) for r in rows],
            self.tokenizer,
            self.device,
            left_pad=self.left_pad,
            aux=[False] * len(chunk) + [True] * len(extra),
            prompt_ids=[r.prompt for r in rows],
        )
        new_tokens = self._max_steps if self.plan.generate else 0
        check_batch_lengths(
            batch.ids, [len(t) for t in batch.token_ids], self._positions, new_tokens
        )
        batch.fields = [r.fields or {} for r in rows]  # JSONL records, for {field: ...}
        if key is not None:
            if len(self._batches) >= _CACHED_BATCHES:
                self._batches.pop(next(iter(self._batches)))
            self._batches[key] = batch
        return batch

    def _source_rows(self, chunk: list[PromptRow]) -> list[PromptRow]:
        """Rows the chunk's edits read that are not in it (and what those read, in turn)."""
        if self._rows is None:
            return []
        present = {r.key for r in chunk}
        extra: list[PromptRow] = []
        todo = [s for r in chunk for s in r.sources]
        while todo:
            key = todo.pop(0)
            if key in present:
                continue
            present.add(key)
            row = self._rows[key]
            extra.append(row)
            todo += row.sources
        return extra

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
        handles = []
        if self.plan.generate is not None:
            # Registered first so every other hook of a forward sees its step. A single
            # forward pass is step 0, set before it runs (one hook fewer per pass).
            handles.append(self.model.register_forward_pre_hook(self._step_hook, with_kwargs=True))
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
        """Saves (before edits), edits in spec order, gradient reads, then saves; None if unchanged."""
        state = self._state
        if state is None:  # the module ran outside a planned forward (e.g. ad hoc)
            return None
        label = actions.site.label
        active = state.active
        saves = [s for s in actions.saves if id(s) in active]
        for save in saves:
            if save.before_edits and save.kind in ("value", "pattern"):
                self._save(state, save, container, root=root, label=label)
        changed = False
        for edit in actions.edits:
            if id(edit) not in active:
                continue
            site_label = label + "".join(f"[{i}]" for i in edit.indices)
            site_key = (actions.site.module, actions.site.port, edit.indices)
            running = _in_steps(edit.steps, state.step, self._max_steps)
            operand = edit.operand
            if isinstance(operand, PromptValue) and operand.step == state.step and not running:
                value = get_value(container, edit.indices, root=root, label=site_label)
                hold_source(edit, value, state.edits, site_key=site_key, label=site_label)
            if not running:
                continue
            value = get_value(container, edit.indices, root=root, label=site_label)
            new = apply_edit(
                edit,
                value,
                state.edits,
                label=site_label,
                site_key=site_key,
                module_input=_tensor_or_none(first_input(*inputs)) if edit.op == "skip" else None,
            )
            if new is not value:
                container = set_value(container, edit.indices, new, root=root)
                changed = True
        if state.backward is not None:
            tracked = self._read_grads(state, actions, saves, container, root=root, label=label)
            if tracked is not container:
                container, changed = tracked, True
        for indices in actions.captures:
            key = (actions.site.module, actions.site.port, indices)
            state.edits.captured[key] = get_value(container, indices, root=root, label=label)
        for save in saves:
            if save.kind in ("value", "pattern") and not save.before_edits:
                self._save(state, save, container, root=root, label=label)
            elif save.kind == "loss" and state.backward is not None:
                self._loss(state, save, container, root=root, label=label)
        for metric in actions.metrics:
            if id(metric) in active and metric.step == state.step:
                self._metric(state, metric, container, root=root, label=label)
        return container if changed else None

    def _read_grads(
        self,
        state: _BatchState,
        actions: SiteActions,
        saves: list[SaveAction],
        container: Any,
        *,
        root: bool,
        label: str,
    ) -> Any:
        """Make the site's value carry gradients and register each gradient save's read."""
        backward = state.backward
        assert backward is not None
        for save in saves:
            if save.kind not in ("grad", "attribution"):
                continue
            what = f"save '{save.name}'"
            index = state.index_for(save.prompts, save.tokens, what)
            if index is None:
                continue
            value = get_value(container, save.indices, root=root, label=label)
            site = label + "".join(f"[{i}]" for i in save.indices)
            self._check_rows(value, state.batch, f"{what} at {site}")
            tracked = backward.track(value)
            if tracked is not value:
                container = set_value(container, save.indices, tracked, root=root)
            index = index.fit(value.shape[1], state.edits.width, f"{what} at {site}")
            diff = None
            if save.kind == "attribution":
                diff = self._attribution_diff(state, save, tracked.detach(), index, site)
            backward.read(
                tracked,
                GradRead(
                    label=f"{what} at {site}",
                    on_grad=partial(self._on_grad, state, save, index, diff, site),
                    shape=tracked.shape,
                    dtype=tracked.dtype,
                    device=tracked.device,
                ),
            )
        return container

    def _attribution_diff(
        self,
        state: _BatchState,
        save: SaveAction,
        value: torch.Tensor,
        index: TokenIndex,
        site: str,
    ) -> torch.Tensor:
        """(R, K, ...) the source prompt's value minus each selected row's, at the same tokens."""
        source = save.source
        assert source is not None
        what = f"save '{save.name}' attribution from '{source.prompt}'"
        found = state.edits.index(
            frozenset([source.prompt]), source.tokens or save.tokens, what, value.shape[1]
        )
        if found is None:
            raise RunError(f"{what}: prompt '{source.prompt}' is not in this batch")
        own = value[index.rows[:, None], index.columns]  # (R, K, ...)
        theirs = value[found.rows[:1, None], found.columns[:1]]  # (1, Ks, ...)
        if theirs.shape[1] != own.shape[1] and theirs.shape[1] != 1:
            raise RunError(
                f"{what} at {site}: '{source.prompt}' gives {theirs.shape[1]} tokens for "
                f"{own.shape[1]} selected; the prompts must have the same length (or select "
                "tokens both have, e.g. a list)"
            )
        if save.heads is not None:
            own = pick_heads(own, save.heads, f"{what} at {site}")
            theirs = pick_heads(theirs, save.heads, f"{what} at {site}")
        return (theirs - own).float()

    def _on_grad(
        self,
        state: _BatchState,
        save: SaveAction,
        index: TokenIndex,
        diff: torch.Tensor | None,
        site: str,
        grad: torch.Tensor,
    ) -> None:
        """Keep a save's selection of d loss / d value (or its attribution) for the batch."""
        picked = grad[index.rows[:, None], index.columns]  # (R, K, ...)
        if save.heads is not None:
            picked = pick_heads(picked, save.heads, f"save '{save.name}' at {site}")
        if diff is not None:  # attribution: (source - value) . grad over the last axis
            picked = (diff * picked.float()).sum(dim=-1).to(grad.dtype)
        else:
            picked = apply_steps(save.apply, picked, self.modules)
        state.collect(save.variant, (save.layer, 0), picked, index)

    def _loss(
        self, state: _BatchState, save: SaveAction, container: Any, *, root: bool, label: str
    ) -> None:
        """Add each selected row's loss: its tokens' numbers summed (see check_loss)."""
        index = state.index_for(save.prompts, save.tokens, "backward.loss")
        if index is None:
            return
        value = get_value(container, save.indices, root=root, label=label)
        self._check_rows(value, state.batch, f"backward.loss at {label}")
        index = index.fit(value.shape[1], state.edits.width, f"backward.loss at {label}")
        picked = apply_steps(save.apply, value[index.rows[:, None], index.columns], self.modules)
        assert isinstance(picked, torch.Tensor)
        per_token = picked.reshape(*index.valid.shape).float()  # (R, K): one number each
        per_row = torch.where(index.valid, per_token, torch.zeros_like(per_token)).sum(dim=-1)
        assert state.backward is not None
        state.backward.add_loss(per_row * self._loss_scale)

    @staticmethod
    def _check_rows(value: torch.Tensor, batch: Batch, what: str) -> None:
        if value.dim() < 2 or value.shape[0] != batch.size:
            raise RunError(
                f"{what}: expected a value of shape (batch={batch.size}, tokens, ...) but it "
                f"has shape {tuple(value.shape)}"
            )

    def _metric(
        self, state: _BatchState, metric: MetricAction, container: Any, *, root: bool, label: str
    ) -> None:
        what = f"metric '{metric.key}'"
        index = state.index_for(metric.prompts, metric.tokens, what)
        if index is None:
            return
        logits = get_value(container, (), root=root, label=label)  # (B, T, V)
        index = index.fit(logits.shape[1], state.edits.width, f"{what} at {label}")
        index = index.to(logits.device)
        picked = logits[index.rows, index.columns[:, 0]]  # (R, V)
        reference = None
        if metric.reference is not None:
            found = state.edits.index(
                frozenset([metric.reference]), metric.tokens, f"{what} reference"
            )
            if found is None:
                raise RunError(f"{what}: reference row '{metric.reference}' is not in the batch")
            found = found.fit(logits.shape[1], state.edits.width, f"{what} at {label}")
            found = found.to(logits.device)
            reference = logits[found.rows[:1], found.columns[:1, 0]]  # (1, V)
        if any(name is not None for name in metric.fields):  # each prompt's own answer
            ids = self._metric_tokens(metric, index.rows.tolist(), state.batch, what)  # (R, k)
        else:  # the same tokens for every row: made once, never waiting for the device
            ids = self._fixed_tokens(metric, logits.device).expand(index.rows.shape[0], -1)
        values = compute_metric(metric.kind, picked, ids, reference)  # (R,)
        backward = self.plan.backward
        if state.backward is not None and backward is not None and backward.metric is not None:
            if metric.key.split("#")[0] == backward.metric:  # every variant of that metric
                state.backward.add_loss(values * self._loss_scale)
        state.metrics.setdefault(metric.key, []).append((values.detach(), index.rows))

    def _fixed_tokens(self, metric: MetricAction, device: torch.device) -> torch.Tensor:
        """(1, k) the metric's own token ids on `device` (cached per metric and device)."""
        key = (metric.key, device)
        if key not in self._fixed_ids:
            ids = torch.tensor([list(metric.token_ids)], dtype=torch.long)
            self._fixed_ids[key] = ids.reshape(1, -1).to(device)
        return self._fixed_ids[key]

    def _metric_tokens(
        self, metric: MetricAction, rows: list[int], batch: Batch, what: str
    ) -> torch.Tensor:
        """(R, k) token ids per selected row: the metric's own, or each prompt's field."""
        per_row = []
        for row in rows:
            ids = list(metric.token_ids)
            for j, name in enumerate(metric.fields):
                if name is not None:
                    record = (batch.fields or [{}] * batch.size)[row]
                    ids[j] = self._field_token(record, name, batch.prompts[row], what)
            per_row.append(ids)
        return torch.tensor(per_row, dtype=torch.long).reshape(len(rows), -1)

    def _field_token(self, record: dict[str, Any], name: str, prompt: str, what: str) -> int:
        """The single token a prompt's record names in field `name` (cached per text)."""
        if name not in record:
            raise RunError(f"{what}: prompt '{prompt}' has no field '{name}' in its record")
        value = record[name]
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if not isinstance(value, str) or not value:
            raise RunError(
                f"{what}: prompt '{prompt}' field '{name}' must be a token text or id, "
                f"not {value!r}"
            )
        if value not in self._field_tokens:
            ids = self.tokenizer.encode(value, add_special_tokens=False)
            if len(ids) != 1:
                pieces = [self.tokenizer.decode([i]) for i in ids]
                raise RunError(
                    f"{what}: prompt '{prompt}' field '{name}' is {value!r}, which is "
                    f"{len(ids)} tokens: {pieces!r}; a metric reads exactly one token"
                )
            self._field_tokens[value] = int(ids[0])
        return self._field_tokens[value]

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
        site = label + "".join(f"[{i}]" for i in save.indices)
        value = get_value(container, save.indices, root=root, label=site).detach()
        batch = state.batch
        if save.kind == "pattern":  # (B, heads, query, key): query tokens are the token axis
            if value.dim() == 4:
                value = value.transpose(1, 2)  # fit and the checks below see (B, query, ...)
        self._check_rows(value, batch, f"{what} at {site}")
        if value.shape[1] != state.edits.width:
            index = index.fit(value.shape[1], state.edits.width, f"{what} at {site}")
        index = index.to(value.device)  # a device map may put this site elsewhere
        if not wanted:  # only the sample's shape is used: one column is enough
            index = TokenIndex(index.rows, index.columns[:, :1], index.valid[:, :1], True)
        if save.kind == "pattern":
            picked = pattern_rows(value.transpose(1, 2), index, batch, save.heads, site)
        else:
            if index.span is not None:  # a copy: the model may change its tensor in place
                picked = value[:, index.span[0] : index.span[1]].clone()  # (R, K, ...)
            else:
                picked = value[index.row_column, index.columns]  # (R, K, ...)
            if save.heads is not None:
                picked = pick_heads(picked, save.heads, f"{what} at {site}")  # (R, K, h, d)
        with torch.no_grad():
            picked = apply_steps(save.apply, picked, self.modules)
        step = state.step if wanted else -1
        state.collect(save.variant, (save.layer, step), picked, index)

    # -- results -------------------------------------------------------------

    def _gather(self, batch: Batch, generated: list[list[int]] | None) -> dict[str, SaveBatch]:
        """Stack each save's layers (and steps) and copy it to the host in one transfer."""
        state = self._state
        assert state is not None
        out: dict[str, SaveBatch] = {}
        for layout in self.plan.saves:
            entries = state.collected.get(layout.variant, {})
            if not entries:
                state.edits.step = 0
                selected = state.index_for(
                    _layout_rows(layout), layout.tokens, f"save '{layout.name}'"
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
                out[layout.variant] = _to_host(_heads_first(assembled(0), layout))
                continue
            # None: every row had stopped before this step, so it never ran.
            per_step = [assembled(s) if (0, s) in entries else None for s in layout.steps]
            sample = assembled(first) if all(p is None for p in per_step) else None
            stacked = _stack_steps(per_step, layout, batch, generated, sample)
            out[layout.variant] = _to_host(_heads_first(stacked, layout))
        return out

    def _gather_metrics(
        self, batch: Batch, generated: list[list[int]] | None
    ) -> dict[str, MetricBatch]:
        """Each metric's values with their row keys, on the host (NaN after a row's end)."""
        state = self._state
        assert state is not None
        out: dict[str, MetricBatch] = {}
        steps = None
        for key, parts in state.metrics.items():
            if steps is None:
                steps = {m.key: m.step for actions in self.plan.sites for m in actions.metrics}
            values = torch.cat([v for v, _ in parts])  # (R,)
            rows = torch.cat([r for _, r in parts]).tolist()
            if generated is not None and steps[key] > 0:
                # step k reads the k-th new token: rows that stopped before it have none
                alive = torch.tensor(
                    [len(generated[r]) >= steps[key] for r in rows], device=values.device
                )
                fill = float("nan") if values.is_floating_point() else -1
                values = torch.where(alive, values, torch.full_like(values, fill))
            out[key] = MetricBatch(data=to_host(values), rows=[batch.ids[r] for r in rows])
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


def _join_rows(
    first: tuple[Any, TokenIndex], second: tuple[Any, TokenIndex]
) -> tuple[Any, TokenIndex]:
    """Two (values (R, K, ...), index) of one save variant as one, token axes padded."""
    (a, ia), (b, ib) = first, second
    width = max(ia.columns.shape[1], ib.columns.shape[1])

    def pad(x: torch.Tensor, fill: Any) -> torch.Tensor:
        extra = width - x.shape[1]
        if extra == 0:
            return x
        filler = torch.full((x.shape[0], extra, *x.shape[2:]), fill, dtype=x.dtype, device=x.device)
        return torch.cat([x, filler], dim=1)

    def join(x: Any, y: Any) -> Any:
        if isinstance(x, dict):
            return {k: join(x[k], y[k]) for k in x}
        return torch.cat([pad(x, 0), pad(y, 0)])

    index = TokenIndex(
        rows=torch.cat([ia.rows, ib.rows]),
        columns=torch.cat([pad(ia.columns, 0), pad(ib.columns, 0)]),
        valid=torch.cat([pad(ia.valid, False), pad(ib.valid, False)]),
        ragged=ia.ragged or ib.ragged or ia.columns.shape[1] != ib.columns.shape[1],
    )
    return join(a, b), index


def _heads_first(save: SaveBatch, layout: Any) -> SaveBatch:
    """A pattern's (..., token, head, key) as stored: (..., head, token, key)."""
    if layout.kind != "pattern":
        return save
    token = layout.token_axis - 1  # the head axis comes first in the layout
    return SaveBatch(
        data=save.data.movedim(token + 1, token),
        prompt_ids=save.prompt_ids,
        counts=save.counts,
        extra={k: v.movedim(token + 1, token) for k, v in save.extra.items()},
    )


def _loss_scale(plan: Plan) -> float:
    """Each row's weight in the loss: 1, or 1 / the prompts averaged over (`reduce: mean`)."""
    backward = plan.backward
    if backward is None or backward.reduce != "mean":
        return 1.0
    if backward.prompts is not None:
        return 1.0 / len(backward.prompts)
    if plan.prompt_ids is not None:
        return 1.0 / len(plan.prompt_ids)
    return 1.0 / max(count_prompts(plan.prompts), 1)


def _loss_name(plan: Plan) -> str:
    backward = plan.backward
    assert backward is not None
    return f"metric {backward.metric}" if backward.metric is not None else backward.at


def _to_host(save: SaveBatch) -> SaveBatch:
    """The same save with its tensors on the host: one transfer per tensor per batch."""
    return SaveBatch(
        data=to_host(save.data),
        prompt_ids=save.prompt_ids,
        counts=None if save.counts is None else to_host(save.counts),
        extra={k: to_host(v) for k, v in save.extra.items()},
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
        if layered:  # under a device map the layers may sit on different devices
            device = tensors[0].device
            data = torch.stack([t.to(device) for t in tensors], dim=1)  # (R, L, K, ...)
        else:
            data = tensors[0]  # (R, K, ...)
        if index.ragged and not index.full:
            valid = index.valid.to(data.device)  # (R, K)
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


_POSITIONS: weakref.WeakKeyDictionary[nn.Module, int | None] = weakref.WeakKeyDictionary()


def _max_positions(model: nn.Module) -> int | None:
    """`max_positions`, read once per model (config attribute reads are slow in transformers)."""
    if model not in _POSITIONS:
        _POSITIONS[model] = max_positions(model)
    return _POSITIONS[model]


_PREPARED: dict[int, tuple[weakref.ref, Any]] = {}
# Tokenized batches a plan keeps at most (see Engine._batch).
_CACHED_BATCHES = 64


def _prepared(plan: Plan) -> tuple[Any, ...]:
    """The plan's rows and per-row actions, worked out once per plan (not per Engine):
    a notebook or a sweep makes an Engine per call."""
    key = id(plan)
    entry = _PREPARED.get(key)
    if entry is not None and entry[0]() is plan:
        return entry[1]
    rows = _plan_rows(plan)
    # Selections are worked out once per batch of rows, and kept (see token_index).
    indices: dict[tuple, Any] = {}
    batches: dict[tuple, Batch] = {}  # see Engine._batch
    value = (rows, *_actions_by_row(plan), indices, batches)
    _PREPARED[key] = (weakref.ref(plan, lambda _ref: _PREPARED.pop(key, None)), value)
    return value


def _plan_rows(plan: Plan) -> dict[str, PromptRow] | None:
    """The plan's rows by key (None when prompts stream from a file)."""
    if plan.rows is not None:
        return {row.key: row for row in plan.rows}
    if plan.prompts.inline is not None:  # a plan built by hand, not by compile
        sources = tuple(plan.source_prompts)
        return {
            key: PromptRow(key, key, text, tuple(s for s in sources if s != key))
            for key, text in plan.prompts.inline
        }
    return None


def _actions_by_row(plan: Plan) -> tuple[dict[str, set[int]], set[int]]:
    """Row key -> ids of the actions that select it; and the ids of actions on every row.

    A batch then touches only the actions of its own rows: a sweep of thousands of
    points puts thousands of edits on a site, but each batch runs a handful.
    """
    by_row: dict[str, set[int]] = {}
    always: set[int] = set()
    for actions in plan.sites:
        for action in (*actions.saves, *actions.edits, *actions.metrics):
            if action.prompts is None:
                always.add(id(action))
                continue
            for row in action.prompts:
                by_row.setdefault(row, set()).add(id(action))
    return by_row, always


def _layout_rows(layout: Any) -> frozenset[str] | None:
    """The row keys a save variant writes (None: every row)."""
    if layout.targets is not None:
        return frozenset(row for row, _ in layout.targets)
    return None if layout.prompts is None else frozenset(layout.prompts)


_TOKEN_TEXTS: weakref.WeakKeyDictionary[Any, dict[tuple[int, ...], list[str]]] = (
    weakref.WeakKeyDictionary()
)


def _token_texts(tokenizer: Any, batch: Batch, n: int) -> list[list[str]]:
    """Each of the first `n` rows' tokens decoded one by one (" Paris", not "ĠParis").

    Inline prompts come back run after run (a notebook, a sweep): each row is decoded
    once per tokenizer.
    """
    known = _TOKEN_TEXTS.setdefault(tokenizer, {})
    out = []
    for ids in batch.token_ids[:n]:
        key = tuple(ids)
        if key not in known:
            if len(known) >= 4096:  # inline prompts only, but keep it bounded
                known.clear()
            known[key] = tokenizer.batch_decode(
                [[t] for t in ids], clean_up_tokenization_spaces=False
            )
        out.append(known[key])
    return out
