"""Edit ops on the selected rows and tokens of a site's value.

Every op computes new values for the selection (R, K, ...) and writes them
into a copy of the site's value, so rows and tokens outside the selection are
bit-identical to an unedited run and the module's own tensor is never changed
in place.
"""

from __future__ import annotations

import hashlib
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nnrun.compile.plan import EditAction, FileValue, LiteralValue, PromptValue
from nnrun.engine._batch import Batch
from nnrun.engine._heads import head_index, pick_heads, split_heads
from nnrun.engine._select import TokenIndex, token_index
from nnrun.errors import RunError
from nnrun.spec import TokenSelection


class OperandCache:
    """Operands that do not change between batches: literals and file tensors."""

    def __init__(self) -> None:
        self._host: dict[Any, torch.Tensor] = {}
        self._device: dict[Any, torch.Tensor] = {}

    def host(self, edit: EditAction) -> torch.Tensor:
        """The operand of a literal or file value, on the host, as written or read."""
        operand = edit.operand
        key = _operand_key(edit)
        if key not in self._host:
            if isinstance(operand, FileValue):
                self._host[key] = read_file_tensor(operand, edit.label)
            else:
                assert isinstance(operand, LiteralValue)
                try:
                    self._host[key] = torch.tensor(operand.data, dtype=torch.float64)
                except (TypeError, ValueError):
                    raise RunError(
                        f"{edit.label}: the value is not a number or a nested list of numbers"
                    ) from None
        return self._host[key]

    def on_device(self, edit: EditAction, like: torch.Tensor) -> torch.Tensor:
        """The operand in `like`'s dtype and on its device (converted once)."""
        key = (_operand_key(edit), like.dtype, like.device)
        if key not in self._device:
            self._device[key] = self.host(edit).to(device=like.device, dtype=like.dtype)
        return self._device[key]


def _operand_key(edit: EditAction) -> Any:
    """What an operand is cached under: the file, or the literal itself.

    Not the edit's index alone: the points of a sweep share one plan, and their edit
    at one index may each carry another literal (`mul: ${alpha}`). A literal is keyed by
    its object, which the plan keeps alive as long as the engine and its cache: its text
    (lists are not hashable) cost 1.5 ms per call for a 2,048-number vector, and this
    runs for every edit at every site, step and batch.
    """
    operand = edit.operand
    if isinstance(operand, FileValue):
        return operand
    assert isinstance(operand, LiteralValue)
    return ("literal", id(operand))


# An operand is a vector or a few; a dataset declaring more than this is a mistake (or a
# crafted file) and would only exhaust memory.
MAX_OPERAND_ELEMENTS = 1 << 28


def read_file_tensor(operand: FileValue, what: str) -> torch.Tensor:
    """A dataset of an HDF5 file as a tensor (NaN padding of ragged saves kept).

    Only real or integer arrays are operands: strings, compound, variable-length and
    reference datasets, complex values, empty dataspaces, links that lead nowhere and
    datasets of absurd size are refused with the reason.
    """
    import h5py

    from nnrun.store import padded_shape, padded_values

    path = Path(operand.file)
    where = f"{what}: {operand.dataset!r} in {path}"
    if not os.path.isfile(path):  # os.path: False, not an error, for a name too long
        raise RunError(
            f"{what}: no such file '{path}' (relative paths start at the current directory)"
        )
    try:
        with h5py.File(path, "r") as f:
            try:
                ds = f.get(operand.dataset)
            except (KeyError, ValueError, RuntimeError, OSError):
                ds = None  # a link that leads nowhere, a name h5py cannot parse
            if not isinstance(ds, h5py.Dataset):
                found: list[str] = []
                f.visititems(lambda n, o: found.append(n) if isinstance(o, h5py.Dataset) else None)
                listed = ", ".join(found[:12]) + (" ..." if len(found) > 12 else "")
                raise RunError(
                    f"{what}: no dataset '{operand.dataset}' in {path} (datasets: {listed or 'none'})"
                )
            kind = ds.dtype.kind
            if kind == "c":
                raise RunError(
                    f"{where} holds complex numbers; an operand must be real (store its real part)"
                )
            if kind not in "biuf":
                raise RunError(
                    f"{where} has dtype {ds.dtype}, not numbers; an operand must be a real or "
                    "integer array"
                )
            if ds.shape is None:
                raise RunError(f"{where} is empty (no dataspace); an operand needs values")
            shape = padded_shape(ds)  # a packed save (ragged tokens): its padded view
            size = math.prod(shape)
            if size > MAX_OPERAND_ELEMENTS:
                raise RunError(
                    f"{where} has shape {shape} ({size:,} values); an operand of "
                    f"more than {MAX_OPERAND_ELEMENTS:,} values is not supported"
                )
            values = padded_values(ds)
    except (OSError, RuntimeError, ValueError, TypeError, KeyError) as e:
        raise RunError(
            f"{what}: cannot read '{path}' as HDF5: {' '.join(str(e).split())}"
        ) from None
    # Native byte order (a file may store big-endian), and integers as float64 like literals.
    native = values.dtype.newbyteorder("=") if values.dtype.kind == "f" else np.dtype(np.float64)
    return torch.from_numpy(np.ascontiguousarray(values, dtype=native))


def check_operand_shape(
    edit: EditAction, shape: tuple[int, ...], site: str, selected: tuple[int, int] | None
) -> None:
    """Fail before the run when an operand cannot broadcast to the selection.

    The selection is (prompts, tokens, *value axes): `selected` gives the first
    two for the inline prompts (None for streamed prompts: then only the value
    axes, known from the compile-time probe, are checked here, and the whole
    shape again when the edit runs).
    """
    own = edit.value_shape
    if own is None:
        return
    label = site + "".join(f"[{i}]" for i in edit.indices)
    target = (*selected, *own) if selected is not None else own
    checked = shape if selected is not None else shape[-len(own) :] if own else ()
    try:
        fits = torch.broadcast_shapes(checked, target) == target
    except RuntimeError:
        fits = False
    if selected is None and len(shape) > len(own) + 2:
        fits = False
    if not fits:
        wanted = target if selected is not None else ("prompts", "tokens", *own)
        raise RunError(
            f"{edit.label} at {label}: the value has shape {shape}, which does not broadcast "
            f"to the selection's shape {_shape_text(wanted)} (prompts, tokens, then the "
            f"value's own axes)"
        )


def _shape_text(shape: tuple[Any, ...]) -> str:
    return "(" + ", ".join(str(s) for s in shape) + ")"


class EditContext:
    """What an edit needs besides its own selection: the batch and captured sources."""

    def __init__(
        self,
        batch: Batch,
        operands: OperandCache,
        seed: int,
        indices: dict[tuple, TokenIndex | None] | None = None,
    ):
        self.batch = batch
        self.operands = operands
        self.seed = seed
        self.captured: dict[tuple[str, str, tuple[int, ...]], torch.Tensor] = {}
        self.step = -1  # the generation step of the forward pass under way (-1: none yet)
        self.width = batch.width  # how many tokens per row that forward takes
        self._indices = indices  # kept across batches of a plan (see token_index)
        self._index: dict[Any, TokenIndex | None] = {}
        # `{from: P, step: S}` operands kept from step S, by edit (see hold_source).
        self.held: dict[int, torch.Tensor] = {}

    def index(
        self,
        prompts: frozenset[str] | None,
        tokens,
        what: str,
        value_tokens: int | None = None,
        *,
        include_aux: bool = True,
    ) -> TokenIndex | None:
        """Rows and columns of a selection at this step, fitted to a value's token axis.

        Edits reach the auxiliary source rows too (so a source that is itself
        edited reads as it would alone); saves pass `include_aux=False`.
        """
        # The selection by identity: a TokenSelection hashes all its fields on every
        # call, and this runs at every hooked site of every pass.
        key = (prompts, id(tokens), self.step, include_aux)
        if key not in self._index:
            self._index[key] = token_index(
                self.batch,
                prompts,
                tokens,
                what=what,
                include_aux=include_aux,
                step=max(self.step, 0),
                cache=self._indices,
            )
        found = self._index[key]
        if found is None or value_tokens is None:
            return found
        return found.fit(value_tokens, self.width, what)


def apply_edit(
    edit: EditAction,
    value: torch.Tensor,  # (batch, tokens, ...)
    ctx: EditContext,
    *,
    site_key: tuple[str, str, tuple[int, ...]],
    label: str,
    module_input: torch.Tensor | None,
) -> torch.Tensor:
    """The site's value with `edit` applied to its selection.

    With `heads:` the edit sees the value as (batch, tokens, selected heads, head_dim)
    and only those heads are written back.
    """
    if edit.heads is not None and value.dim() >= 2:
        split = split_heads(value, edit.heads, f"{edit.label} at {label}")  # (B, T, H, D)
        chosen = head_index(edit.heads, value.device)
        part = split.index_select(-2, chosen)  # (B, T, h, D)
        new = _apply(edit, part, ctx, site_key, label, module_input)
        if new is part:
            return value
        out = split.clone()
        out.index_copy_(-2, chosen, new.to(out.dtype))
        return out.reshape(value.shape)
    return _apply(edit, value, ctx, site_key, label, module_input)


def hold_source(
    edit: EditAction,
    value: torch.Tensor,
    ctx: EditContext,
    *,
    site_key: tuple[str, str, tuple[int, ...]],
    label: str,
) -> None:
    """Keep an edit's `{from: P, step: S}` operand at step S, for the steps after it.

    Called at step S whether or not the edit itself runs then.
    """
    if edit.heads is not None:
        value = pick_heads(value, edit.heads, f"{edit.label} at {label}")
    ctx.held[id(edit)] = _source_values(edit, value, ctx, site_key, label, edit.tokens)[0]


def _apply(
    edit: EditAction,
    value: torch.Tensor,  # (batch, tokens, ...)
    ctx: EditContext,
    site_key: tuple[str, str, tuple[int, ...]],
    label: str,
    module_input: torch.Tensor | None,
) -> torch.Tensor:
    batch = ctx.batch
    if value.dim() < 2 or value.shape[0] != batch.size:
        raise RunError(
            f"{edit.label} at {label}: expected a value of shape (batch={batch.size}, "
            f"tokens, ...) but it has shape {tuple(value.shape)}"
        )
    index = ctx.index(edit.prompts, edit.tokens, edit.label, value.shape[1])
    if index is None or not bool(index.valid.any()):
        return value  # nothing selected at this step
    index = index.to(value.device)  # a device map may put this site on another device
    selected = value[index.rows[:, None], index.columns]  # (R, K, ...)
    new = _compute(edit, selected, value, index, ctx, site_key, label, module_input)
    rows, columns = index.valid_entries()
    out = value.clone()
    out[rows, columns] = new[index.valid].to(out.dtype)
    return out


def _compute(
    edit: EditAction,
    selected: torch.Tensor,  # (R, K, ...)
    value: torch.Tensor,  # (batch, tokens, ...)
    index: TokenIndex,
    ctx: EditContext,
    site_key: tuple[str, str, tuple[int, ...]],
    label: str,
    module_input: torch.Tensor | None,
) -> torch.Tensor:
    op = edit.op
    if op == "zero":
        return torch.zeros_like(selected)
    if op == "clamp":
        return selected.clamp(min=edit.params["min"], max=edit.params["max"])
    if op == "noise":
        return selected + edit.params["std"] * _noise(edit, selected, index, ctx, label)
    if op == "mean_ablate":
        return _broadcast(edit, _mean_over(edit, value, ctx), selected, label)
    if op == "skip":
        if module_input is None or module_input.shape != value.shape:
            got = (
                "no tensor input"
                if module_input is None
                else f"input shape {tuple(module_input.shape)}"
            )
            raise RunError(
                f"{edit.label} at {label}: skip passes the module's input through, but it has "
                f"{got} and output shape {tuple(value.shape)}; skip needs the two to match"
            )
        # the input may still be on the previous module's device (accelerate moves it later)
        return module_input.to(value.device)[index.rows[:, None], index.columns]
    operand = _operand(edit, selected, value, index, ctx, site_key, label)
    operand = _broadcast(edit, operand, selected, label)
    if op == "set":
        return operand
    if op == "add":
        return selected + edit.alpha * operand
    if op == "mul":
        return selected * operand
    if op == "project_out":
        unit = operand / operand.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        return selected - (selected * unit).sum(dim=-1, keepdim=True) * unit
    raise RunError(f"{edit.label}: unknown edit op '{op}'")


def _operand(
    edit: EditAction,
    selected: torch.Tensor,
    value: torch.Tensor,
    index: TokenIndex,
    ctx: EditContext,
    site_key: tuple[str, str, tuple[int, ...]],
    label: str,
) -> torch.Tensor:
    operand = edit.operand
    if isinstance(operand, LiteralValue | FileValue):
        return ctx.operands.on_device(edit, selected)
    assert isinstance(operand, PromptValue)
    if operand.step is not None and ctx.step != operand.step:
        held = ctx.held.get(id(edit))
        if held is None:
            raise RunError(
                f"{edit.label}: step {operand.step} of prompt '{operand.prompt}' has not run "
                f"yet at step {ctx.step}"
            )
        return held
    found, ragged = _source_values(edit, value, ctx, site_key, label, edit.tokens)
    if ragged and index.ragged and found.shape[1] != selected.shape[1]:
        raise RunError(
            f"{edit.label} at {label}: prompt '{operand.prompt}' gives {found.shape[1]} "
            f"tokens for a selection of {selected.shape[1]}; select the same number of tokens "
            f"(e.g. tokens: [-1] or a list) or give from.tokens"
        )
    if operand.step is not None:
        ctx.held[id(edit)] = found
    return found


def _source_values(
    edit: EditAction,
    value: torch.Tensor,
    ctx: EditContext,
    site_key: tuple[str, str, tuple[int, ...]],
    label: str,
    tokens: TokenSelection,
) -> tuple[torch.Tensor, bool]:
    """(1, Ks, ...) the source prompt's values a `{from: ...}` operand reads at this step,
    and whether the source's selection is ragged (its width varies between prompts)."""
    operand = edit.operand
    assert isinstance(operand, PromptValue)
    source = value if operand.key == site_key else ctx.captured.get(operand.key)
    if source is None:
        raise RunError(f"{edit.label}: the source site of prompt '{operand.prompt}' did not run")
    if operand.key != site_key and edit.heads is not None:
        source = pick_heads(source, edit.heads, f"{edit.label} from '{operand.prompt}'")
    found = ctx.index(
        frozenset([operand.prompt]),
        operand.tokens or tokens,
        f"{edit.label} from '{operand.prompt}'",
        source.shape[1],
    )
    if found is None:
        raise RunError(f"{edit.label}: prompt '{operand.prompt}' is not in this batch")
    found = found.to(source.device)
    # the source site may run on another device than this one (device maps)
    picked = source[found.rows[:1, None], found.columns[:1]].to(value.device)  # (1, Ks, ...)
    return picked, found.ragged


def _noise(
    edit: EditAction, selected: torch.Tensor, index: TokenIndex, ctx: EditContext, label: str
) -> torch.Tensor:
    """Gaussian noise (R, K, ...) drawn per prompt from a seed of its own.

    Each prompt's noise depends only on the spec's seed, the edit, the prompt
    id, the site and the step, so it is the same whatever the batch size or
    the prompt's batch-mates.
    """
    noise = torch.zeros(selected.shape, dtype=torch.float32, device=selected.device)
    for i, (row, count) in enumerate(zip(index.rows.tolist(), index.counts.tolist())):
        key = f"{ctx.seed}/{edit.index}/{ctx.batch.prompts[row]}/{label}/{ctx.step}"
        seed = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little")
        generator = torch.Generator(device=selected.device).manual_seed(seed)
        noise[i, index.valid[i]] = torch.randn(
            (count, *selected.shape[2:]), generator=generator, device=selected.device
        )
    return noise.to(selected.dtype)


def _mean_over(edit: EditAction, value: torch.Tensor, ctx: EditContext) -> torch.Tensor:
    over = frozenset(edit.params["over"])
    found = ctx.index(over, edit.tokens, f"{edit.label} over {sorted(over)}", value.shape[1])
    if found is None:
        raise RunError(f"{edit.label}: none of the prompts {sorted(over)} is in this batch")
    found = found.to(value.device)
    picked = value[found.rows[:, None], found.columns]  # (Ro, Ko, ...)
    return picked[found.valid].float().mean(dim=0).to(value.dtype)  # (...)


def _broadcast(
    edit: EditAction, operand: torch.Tensor, selected: torch.Tensor, label: str
) -> torch.Tensor:
    try:
        shape = torch.broadcast_shapes(operand.shape, selected.shape)
    except RuntimeError:
        shape = None
    if shape != selected.shape:
        raise RunError(
            f"{edit.label} at {label}: the value has shape {tuple(operand.shape)}, which does "
            f"not broadcast to the selection's shape {tuple(selected.shape)} "
            f"(prompts, tokens, then the value's own axes)"
        )
    return operand.expand(selected.shape)
