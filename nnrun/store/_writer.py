"""Stream batches of saves and metrics into one HDF5 file, atomically.

The file is written under `<out>.partial.h5` with `status = partial` and only
renamed to `<out>` after the last batch, with `status = complete`. A run that
fails or is interrupted leaves at most the `.partial.h5` file, which says so; a
sweep's partial file records which points are done, so `--resume` continues it.
One whose disk fills up leaves nothing (see `_faults`).

Every dataset's leading axes are the sweep's (none without a sweep), then
`prompt`; each batch row is written to the (point, prompt) slots its plan gives
it, so a row shared by many sweep points is computed once and written to each.
A save whose token axis is ragged (`tokens: all`, slices) is stored packed by
default: only real tokens, on one flat axis with per-prompt offsets (`_packed`).
Batches are merged before they are written (`_buffer`): few, big HDF5 writes.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import dataclasses
import functools
import itertools
import json
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import h5py
import numpy as np

from nnrun.errors import NnrunError, OutputError
from nnrun.store._buffer import merge_results, result_bytes
from nnrun.store._faults import (
    abandon_hdf5,
    check_room,
    is_write_failure,
    quiet_failed_closes,
    write_failure_reason,
)
from nnrun.store._meta import PromptMeta
from nnrun.store._netcdf import add_netcdf_dimensions
from nnrun.store._packed import (
    FlatParts,
    PackedSave,
    flat_chunk,
    flat_pieces,
    pack,
    unit_offsets,
)
from nnrun.store._paths import partial_path
from nnrun.store._signals import check_interrupted, signals_deferred
from nnrun.store._text import storable_texts

if TYPE_CHECKING:
    from nnrun.compile.plan import MetricLayout, Plan, SaveLayout
    from nnrun.engine import BatchResult, SaveBatch

FORMAT_VERSION = 1
STR = h5py.string_dtype()
# Chunks of about 1 MiB (never more than the data): big enough to write fast, small
# enough to read a slice, and a small run's file stays about the size of its values.
_CHUNK_BYTES = 1 << 20
# Batches are kept and written together until one of these is reached (see _buffer).
_FLUSH_BYTES = 4 << 20
_FLUSH_ROWS = 1024
_FLUSH_SECONDS = 2.0
# HDF5's own flush (its metadata to disk, so a killed run's partial file stays readable)
# at most this often, at every point marked done and at the end: once per write it was
# an eighth of the store's time on a 2,000-prompt file.
_FILE_FLUSH_SECONDS = 1.0

# Point status in /sweep/status.
PENDING, DONE, FAILED = 0, 1, 2


@dataclass(frozen=True)
class SweepLayout:
    """What the file records about a sweep: its leading axes and its points."""

    dims: tuple[str, ...]  # names of the leading axes (the variables; zip: ("point",))
    shape: tuple[int, ...]
    mode: str  # grid | zip
    coords: dict[str, tuple[Any, ...]]  # variable -> its values (zip: one per point)
    labels: tuple[str, ...]  # per point, "layer=3, pos=2"
    hashes: tuple[str, ...]  # per point, sha256 of its resolved spec
    # Variables used as token positions -> the prompt whose tokens they count
    # (so plots can label positions with token text).
    positions: dict[str, str] = field(default_factory=dict)

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    def coords_of(self, point: int) -> tuple[int, ...]:
        return tuple(int(i) for i in np.unravel_index(point, self.shape))


class OutputWriter:
    """Context manager that owns one output file for the length of a run.

    >>> with OutputWriter(path, attrs, prompt_ids=plan.prompt_ids) as out:   # doctest: +SKIP
    ...     out.register(plan)
    ...     for result in engine.run():
    ...         out.write(result)
    """

    def __init__(
        self,
        path: Path,
        attrs: dict[str, Any],
        *,
        sizes: dict[str, int] | None = None,
        prompt_ids: tuple[str, ...] | None = None,
        sweep: SweepLayout | None = None,
        resume: bool = False,
        prompt_meta: Callable[[], Iterator[tuple[str, dict[str, Any]]]] | None = None,
        expected_rows: int | None = None,
    ) -> None:
        self.path = Path(path)
        self.tmp_path = partial_path(self.path)
        self.attrs = attrs
        # Known model sizes ({"hidden": 576, "vocab": 49152}) name a value's own axes.
        self.sizes = sizes or {}
        self.prompt_ids = prompt_ids  # None: prompts stream from a file and are appended
        self.sweep = sweep
        self.resume = resume
        self.lead: tuple[int, ...] = sweep.shape if sweep is not None else ()
        self.file: h5py.File | None = None
        self.saves: dict[str, SaveLayout] = {}
        self.metrics: dict[str, MetricLayout] = {}
        self._target_tables: dict[str, dict[str, Any]] = {}  # see register
        self.prompt_targets: dict[str, list[tuple[int, int]]] = {}
        self.done: set[int] = set()  # points already written (from a resumed file)
        # Streamed prompts (prompt_ids None): the point being written and, per dataset,
        # how many of its rows that point has written so far.
        self.point = 0
        self.appended: dict[str, int] = {}
        # Extra fields of a JSONL prompt file, kept under /prompts/meta (see _meta.py);
        # a sweep streams the same file for every point, so they are kept once.
        self.meta = PromptMeta(prompt_meta) if prompt_meta is not None and sweep is None else None
        # Streamed prompts: how many there will be (sizes the chunks of growing axes).
        self.expected_rows = expected_rows if prompt_ids is None else len(prompt_ids)
        # Batches not written yet (see _buffer), their bytes, and when the first came.
        self._pending: list[BatchResult] = []
        self._pending_bytes = 0
        self._pending_rows = 0
        self._pending_since = 0.0
        self._file_flushed = time.monotonic()
        self._unflushed = 0  # bytes written since HDF5's flush: maybe still in its cache
        # Packed saves: the next free index of each (dataset, point)'s flat axis, and
        # the widest padded batch seen (the padded view's token width).
        self._flat_next: dict[tuple[str, int], int] = {}
        self._widths: dict[str, int] = {}
        # Groups and datasets by path: an h5py lookup costs more than a small write.
        self._nodes: dict[str, Any] = {}

    # -- lifecycle -----------------------------------------------------------

    def __enter__(self) -> OutputWriter:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        resuming = self.resume and self.tmp_path.is_file()
        try:
            self.file = h5py.File(self.tmp_path, "r+" if resuming else "w")
        except OSError as e:
            raise OutputError(f"cannot create {self.tmp_path}: {write_failure_reason(e)}") from None
        try:
            if resuming:
                status = self.file["sweep/status"][()] if "sweep/status" in self.file else []
                self.done = {i for i, s in enumerate(status) if s == DONE}
                self.file.attrs["resumed_utc"] = _utc_now()
                return self
            for key, value in self.attrs.items():
                self.file.attrs[key] = value
            self.file.attrs["format"] = FORMAT_VERSION
            self.file.attrs["status"] = "partial"
            self.file.attrs["started_utc"] = _utc_now()
            self._create_prompt_groups()
            self.file.create_group("saves")
            self.file.create_group("axes")
            if self.sweep is not None:
                self._create_sweep_group()
        except BaseException as e:
            raise self._abandon(e) from None
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.file is None:  # abandoned after a failed write: nothing left to finish
            return
        if exc_type is None:
            self.flush()
            # What HDF5 still caches goes to disk here, where a failure is reported once.
            self._checked(self._flush_file)
        elif not isinstance(exc, OutputError):
            # Batches computed before an interrupt or a failing batch still go in the
            # partial file; if that cannot be done, the file holds what it holds.
            with contextlib.suppress(Exception):
                self.flush()
                self._checked(self._flush_file)
            if self.file is None:  # the flush failed to write and gave the file up
                return
        try:
            self._finish_axes()
            count = len(self.prompt_ids or ()) or self.appended.get("prompts", 0)
            self.file.attrs["prompt_count"] = count
            self.file.attrs["finished_utc"] = _utc_now()
            if exc_type is not None:
                self.file.attrs["error"] = f"{exc_type.__name__}: {exc}"
        except BaseException as e:  # a full disk, or an interrupt while finishing
            self._close_partial(e)
            raise
        if exc_type is not None:
            self._close_partial(None)
            return
        try:
            # The point of no return: a signal now waits until the output is complete.
            self._nodes.clear()
            with signals_deferred():
                self.file.attrs["status"] = "complete"
                self.file.close()
                os.replace(self.tmp_path, self.path)
        except BaseException as e:
            if self.tmp_path.exists():  # still unfinished: it must not claim otherwise
                self._unfinish(e)
            raise

    # -- failures ------------------------------------------------------------

    def _abandon(self, e: BaseException) -> BaseException:
        """The error to raise for `e`: a failed write gives the file up, else it closes partial."""
        if is_write_failure(e):
            return self._give_up(e)
        if self.file is not None:
            self._close_partial(e)
        return e

    def _give_up(self, failure: BaseException, doing: str = "write") -> OutputError:
        """Remove a file HDF5 can no longer write (see `_faults`); the error to raise."""
        self._nodes.clear()
        if self.file is not None:
            abandon_hdf5(self.file, self.tmp_path)
            self.file = None
        self.tmp_path.unlink(missing_ok=True)
        return OutputError(
            f"could not {doing} {self.tmp_path}: {write_failure_reason(failure)}; the "
            f"unfinished file was removed and {self.path} was not touched"
        )

    def _close_partial(self, e: BaseException | None) -> None:
        """Close the file as it stands (status partial), or give it up if that fails."""
        assert self.file is not None
        self._nodes.clear()
        try:
            if e is not None and "error" not in self.file.attrs:
                self.file.attrs["error"] = f"{type(e).__name__}: {e}"
            self.file.close()
        except (OSError, RuntimeError) as failure:
            raise self._give_up(failure) from e

    def _unfinish(self, e: BaseException) -> None:
        """Mark a file that failed between `status = complete` and its rename as partial."""
        try:
            if self.file is not None and self.file.id.valid:
                self.file.close()
            with h5py.File(self.tmp_path, "r+") as f:
                f.attrs["status"] = "partial"
                f.attrs["error"] = f"{type(e).__name__}: {e}"
        except (OSError, RuntimeError) as failure:
            # It cannot be marked partial, so it must not stay: it says complete.
            raise self._give_up(failure, "finish") from e

    # -- what the plan will write -------------------------------------------

    def register(self, plan: Plan) -> None:
        """Learn a plan's save and metric variants and where each of its rows goes."""
        self.flush()  # batches taken so far belong to the previous plan's layouts
        for layout in plan.saves:
            self.saves[layout.variant] = layout
        for metric in plan.metrics:
            self.metrics[metric.variant] = metric
        # Each variant's row -> slots, looked up at every write: made once per plan.
        self._target_tables.update(
            (layout.variant, dict(layout.targets))
            for layout in (*plan.saves, *plan.metrics)
            if layout.targets is not None
        )
        if plan.rows is None or self.prompt_ids is None:
            self.point = plan.points[0].index if plan.points else 0
            self.appended = {}
            return
        slot = {prompt: i for i, prompt in enumerate(self.prompt_ids)}
        for point in plan.points:
            for prompt, row in point.rows:
                targets = self.prompt_targets.setdefault(row, [])
                if (point.index, slot[prompt]) not in targets:
                    targets.append((point.index, slot[prompt]))

    # -- writing -------------------------------------------------------------

    def write(self, result: BatchResult) -> None:
        """Take one micro-batch: its prompts, each save's and each metric's values.

        Batches are written a few at a time (see `flush`); `mark_points` and the end
        of the run write whatever is left first.
        """
        check_interrupted()  # a signal swallowed where it arrived stops the run here
        wait = getattr(result, "wait", None)
        if wait is not None:  # values still on their way from the GPU
            wait()
        result = self._packed_on_arrival(result)
        if not self._pending:
            self._pending_since = time.monotonic()
        self._pending.append(result)
        self._pending_bytes += result_bytes(result)
        self._pending_rows += len(result.rows or result.prompt_ids)
        if (
            self._pending_bytes >= _FLUSH_BYTES
            or self._pending_rows >= _FLUSH_ROWS
            or time.monotonic() - self._pending_since >= _FLUSH_SECONDS
        ):
            self.flush()

    def _packed_on_arrival(self, result: BatchResult) -> BatchResult:
        """The batch with each save stored packed already packed (see PackedSave)."""
        packed = {}
        for key, save in result.saves.items():
            layout = self.saves.get(key)
            if layout is not None and is_packed(layout) and not isinstance(save, PackedSave):
                packed[key] = _pack_save(save, layout)
        if not packed:
            return result
        return dataclasses.replace(result, saves={**result.saves, **packed})

    def flush(self) -> None:
        """Write the batches taken so far, as one."""
        pending, self._pending = self._pending, []
        self._pending_bytes = self._pending_rows = 0
        if not pending or self.file is None:
            return
        result = merge_results(pending)
        try:
            # Before HDF5 is asked to write anything it may fail to write (see _faults);
            # what it still holds in its cache is not in the file's size yet.
            check_room(self.tmp_path, _batch_bytes(result) + self._unflushed)
        except OutputError:
            if len(pending) == 1:
                raise
            # Short of room for them all: as many as fit go in, one by one.
            for one in pending:
                self._pending = [one]
                self.flush()
            return
        del pending
        written = result_bytes(result)
        self._unflushed += written  # before: a flush of the file in the write clears it
        self._checked(self._write, result)
        del result
        release_memory()

    def _checked(self, write: Callable[..., None], *args: Any) -> None:
        """`write(*args)`; a failed write gives the file up with one clear error."""
        with quiet_failed_closes():
            try:
                write(*args)
            except (OSError, RuntimeError) as e:
                if not is_write_failure(e):
                    raise
                raise self._abandon(e) from None

    def _write(self, result: BatchResult) -> None:
        assert self.file is not None
        rows = result.rows or result.prompt_ids
        if self.prompt_ids is None:
            dests = self._append("prompts", len(rows))
        else:
            dests = [self.prompt_targets[row] for row in rows]
        prompts = self._node("prompts")
        self._write_token_rows(
            prompts, dests, result.token_ids, id=result.prompt_ids, text=result.texts
        )
        if self.meta is not None:
            self.meta.append(prompts, result.prompt_ids)
        if result.token_texts is not None:
            self._write_token_texts(dests, result.token_texts)
        if result.generated is not None:
            group = self.file.get("generation") or self._token_rows_group("generation")
            self._write_token_rows(group, dests, result.generated, text=result.generated_text or [])
        for key, save in result.saves.items():
            layout = self.saves[key]
            targets = self._targets(layout, save.prompt_ids)
            if isinstance(save, PackedSave):
                self._write_packed(layout.name, layout, save.values, save, targets)
                for suffix, values in save.extra.items():
                    self._write_packed(f"{layout.name}.{suffix}", layout, values, save, targets)
                continue
            self._write_save(layout.name, layout, save.data, save, targets)
            for suffix, tensor in save.extra.items():
                self._write_save(f"{layout.name}.{suffix}", layout, tensor, save, targets)
        for key, metric in result.metrics.items():
            layout = self.metrics[key]
            targets = self._targets(layout, metric.rows)
            self._write_metric(layout, metric.data.numpy(), targets, metric.rows)
        if time.monotonic() - self._file_flushed >= _FILE_FLUSH_SECONDS:
            self._flush_file()

    def _flush_file(self) -> None:
        assert self.file is not None
        self.file.flush()
        self._file_flushed = time.monotonic()
        self._unflushed = 0

    def mark_points(self, done: list[int], failed: dict[int, str] | None = None) -> None:
        """Record points as written (resume skips them) or failed, with their error."""
        self.flush()  # a point is done only once its rows are in the file
        if self.file is None or "sweep" not in self.file:
            return
        group = self.file["sweep"]
        for point in done:
            group["status"][point] = DONE
            self.done.add(point)
        for point, message in (failed or {}).items():
            group["status"][point] = FAILED
            group["error"][point] = message
        self._checked(self._flush_file)

    # -- pieces --------------------------------------------------------------

    def _targets(self, layout: Any, rows: list[str]) -> list[list[tuple[int, int]]]:
        if layout.targets is None:  # streamed prompts: rows go after the ones written
            return self._append(layout.name, len(rows))
        table = self._target_tables[layout.variant]
        return [list(table[row]) for row in rows]

    def _append(self, name: str, count: int) -> list[list[tuple[int, int]]]:
        """Slots for `count` more streamed rows of `name` at the current point."""
        start = self.appended.get(name, 0)
        self.appended[name] = start + count
        return [[(self.point, start + i)] for i in range(count)]

    def _node(self, path: str) -> Any:
        """The group or dataset at `path` (kept: the file's objects never move)."""
        found = self._nodes.get(path)
        if found is None:
            assert self.file is not None
            found = self._nodes[path] = self.file[path]
        return found

    def _exists(self, path: str) -> bool:
        assert self.file is not None
        return path in self._nodes or path in self.file

    def _dest(self, point: int, slot: int) -> tuple[int, ...]:
        lead = self.sweep.coords_of(point) if self.sweep is not None else ()
        return (*lead, slot)

    def _prompt_count(self, selected: tuple[str, ...] | None) -> int:
        if self.prompt_ids is None:
            return 0
        if selected is None:
            return len(self.prompt_ids)
        return sum(1 for p in self.prompt_ids if p in selected)

    def _write_save(
        self,
        name: str,
        layout: SaveLayout,
        tensor: Any,
        save: SaveBatch,
        targets: list[list[tuple[int, int]]],
    ) -> None:
        data, torch_dtype = _to_numpy(tensor)
        token_axis = layout.token_axis  # in data (R, [L], [S], T, ...)
        ragged = save.counts is not None
        if not self._exists(f"saves/{name}"):
            self._create_save(name, data, layout, ragged, torch_dtype)
        ds = self._node(f"saves/{name}")
        n = len(self.lead)
        width = data.shape[token_axis]
        # The token axis (ragged saves) and a pattern's key axis grow with the batches.
        for axis in range(token_axis, data.ndim):
            if data.shape[axis] > ds.shape[n + axis]:
                ds.resize(data.shape[axis], axis=n + axis)
        own = tuple(slice(0, size) for size in data.shape[token_axis + 1 :])
        lengths = None
        if name == layout.name and self._exists(f"axes/{layout.name}/length"):
            lengths = self._node(f"axes/{layout.name}/length")
        counts = save.counts.numpy() if ragged else None
        for (start, stop), (point, slot) in _runs(targets):
            self._ensure_rows(ds, slot + stop - start)
            where = self._dest(point, slot)
            block = (slice(where[-1], where[-1] + stop - start),)
            ds[
                where[:-1] + block + (slice(None),) * (token_axis - 1) + (slice(0, width),) + own
            ] = data[start:stop]
            if lengths is not None and counts is not None:
                self._ensure_rows(lengths, slot + stop - start)
                lengths[where[:-1] + block] = counts[start:stop]
            if name == layout.name:
                self._append_labels(layout.name, block, save.prompt_ids[start:stop])

    def _write_packed(
        self,
        name: str,
        layout: SaveLayout,
        flat: np.ndarray | FlatParts,
        save: PackedSave,
        targets: list[list[tuple[int, int]]],
    ) -> None:
        """Append each row's real tokens to its point's flat axis; record offsets, lengths."""
        counts = save.counts
        starts = np.concatenate([[0], np.cumsum(save.row_tokens)])
        if not self._exists(f"saves/{name}"):
            per_row = float(starts[-1]) / max(len(counts), 1)
            # A companion (topk indices) is stored in its own dtype, as torch names it.
            dtype = save.torch_dtype if name == layout.name else str(flat.dtype)
            self._create_packed(name, flat, layout, dtype, save.width, per_row)
        ds = self._node(f"saves/{name}")
        if save.width > self._widths.setdefault(name, int(ds.attrs["padded_width"])):
            ds.attrs["padded_width"] = self._widths[name] = save.width
        n = len(self.lead)
        for (start, stop), (point, slot) in _runs(targets):
            lo, hi = int(starts[start]), int(starts[stop])
            base = self._flat_next.get((name, point), 0)
            self._flat_next[(name, point)] = base + hi - lo
            if base + hi - lo > ds.shape[n]:
                ds.resize(base + hi - lo, axis=n)
            where = self._dest(point, slot)
            for offset, piece in flat_pieces(flat, lo, hi):
                at = base + offset
                ds[where[:-1] + (slice(at, at + len(piece)),)] = piece
            if name != layout.name:  # a companion (topk indices) shares the save's offsets
                continue
            block = (slice(where[-1], where[-1] + stop - start),)
            for column, values in (
                ("offset", unit_offsets(base, counts[start:stop])),
                ("length", counts[start:stop]),
            ):
                column_ds = self._node(f"axes/{layout.name}/{column}")
                self._ensure_rows(column_ds, slot + stop - start)
                column_ds[where[:-1] + block] = values
            self._append_labels(layout.name, block, save.prompt_ids[start:stop])

    def _write_metric(
        self,
        layout: MetricLayout,
        values: np.ndarray,
        targets: list[list[tuple[int, int]]],
        rows: list[str],
    ) -> None:
        group = self.file.require_group("metrics")
        if layout.name not in group:
            self._create_metric(layout)
        ds = group[layout.name]
        for (start, stop), (point, slot) in _runs(targets):
            self._ensure_rows(ds, slot + stop - start)
            where = self._dest(point, slot)
            block = (slice(where[-1], where[-1] + stop - start),)
            ds[where[:-1] + block] = values[start:stop]
            self._append_labels(layout.name, block, rows[start:stop])

    def _append_labels(self, name: str, block: tuple[slice], rows: list[str]) -> None:
        """Streamed prompts: label the new rows of /axes/<name>/prompt with their ids."""
        if self.prompt_ids is not None:
            return  # fixed prompt axes are labelled when created
        labels = self._node(f"axes/{name}/prompt")
        self._ensure_rows(labels, block[0].stop)
        labels[block] = rows

    def _ensure_rows(self, ds: h5py.Dataset, rows: int) -> None:
        """Grow the prompt axis of a dataset (streamed prompts only) to hold `rows`."""
        if self.prompt_ids is not None:
            return  # a fixed prompt axis, laid out in full when created
        axis = len(self.lead) if ds.ndim > len(self.lead) else 0  # /axes/<name>/prompt: 0
        if ds.shape[axis] < rows:
            ds.resize(rows, axis=axis)

    def _create_save(
        self, name: str, data: np.ndarray, layout: SaveLayout, ragged: bool, torch_dtype: str
    ) -> None:
        n = len(self.lead)
        token_axis = layout.token_axis
        own = data.shape[token_axis + 1 :]
        axes = [*self._lead_dims(), *layout.leading_axes, *self._own_axes(own, layout)]
        prompts = self._prompt_count(layout.prompts)
        shape = (*self.lead, prompts, *data.shape[1:])
        maxshape = [*self.lead, None if self.prompt_ids is None else prompts, *data.shape[1:]]
        if ragged:
            maxshape[n + token_axis] = None
        if layout.kind == "pattern":  # the key axis: as long as each batch's longest prompt
            maxshape[n + token_axis + 1 :] = [None] * len(own)
        fill = np.nan if data.dtype.kind == "f" else -1
        ds = self.file["saves"].create_dataset(
            name,
            shape=shape,
            maxshape=tuple(maxshape),
            dtype=data.dtype,
            chunks=_chunks(shape, data.dtype.itemsize, n, self.expected_rows),
            fillvalue=fill,
        )
        self._describe_save(ds, layout, axes, torch_dtype, fill, ragged)
        if name == layout.name:  # a companion dataset (topk indices) shares the save's axes
            self._create_axes_group(layout, prompts, lengths=ragged, offsets=False)

    def _create_packed(
        self,
        name: str,
        flat: np.ndarray | FlatParts,
        layout: SaveLayout,
        torch_dtype: str,
        width: int,
        tokens_per_row: float,
    ) -> None:
        """A packed save: (sweep..., packed, [layer], value...) plus offsets and lengths."""
        n = len(self.lead)
        own = flat.shape[1:]  # ([L], *value)
        value = own[1:] if layout.layered else own
        names = self._own_axes(value, layout)
        axes = [*self._lead_dims(), "packed", *(["layer"] if layout.layered else []), *names]
        prompts = self._prompt_count(layout.prompts)
        rows = prompts or self.expected_rows
        # An eighth of the expected tokens per chunk (up to ~1 MiB): a run that writes a
        # little more or less than expected wastes little of its last chunk.
        expected = None if not rows else max(1.0, tokens_per_row * rows / 8)
        per_token = flat.dtype.itemsize * math.prod(own)
        fill = np.nan if flat.dtype.kind == "f" else -1
        ds = self.file["saves"].create_dataset(
            name,
            shape=(*self.lead, 0, *own),
            maxshape=(*self.lead, None, *own),
            dtype=flat.dtype,
            chunks=(*(1,) * n, flat_chunk(per_token, expected, _CHUNK_BYTES), *own),
            fillvalue=fill,
        )
        self._describe_save(ds, layout, axes, torch_dtype, fill, True)
        ds.attrs["layout"] = "packed"
        # What the reader gives back: the padded layout's axes and token width.
        ds.attrs["padded_axes"] = json.dumps([*self._lead_dims(), *layout.leading_axes, *names])
        ds.attrs["padded_width"] = width
        ds.attrs["offsets"] = f"/axes/{layout.name}/offset"
        if name == layout.name:
            self._create_axes_group(layout, prompts, lengths=True, offsets=True)

    def _describe_save(
        self,
        ds: h5py.Dataset,
        layout: SaveLayout,
        axes: list[str],
        torch_dtype: str,
        fill: Any,
        ragged: bool,
    ) -> None:
        ds.attrs["axes"] = json.dumps(axes)
        ds.attrs["save"] = layout.name
        ds.attrs["at"] = layout.at
        ds.attrs["sites"] = json.dumps(list(layout.sites))
        ds.attrs["tokens"] = str(layout.tokens)
        ds.attrs["apply"] = json.dumps(
            [s.name if s.arg is None else {s.name: s.arg} for s in layout.apply]
        )
        ds.attrs["torch_dtype"] = torch_dtype
        ds.attrs["ragged"] = ragged
        ds.attrs["fill_value"] = fill
        ds.attrs["layout"] = "padded"
        if ragged:
            ds.attrs["lengths"] = f"/axes/{layout.name}/length"

    def _create_axes_group(
        self, layout: SaveLayout, prompts: int, *, lengths: bool, offsets: bool
    ) -> None:
        """/axes/<save>: prompt labels, real tokens per prompt (and packed offsets), layer
        sites, steps and listed token positions."""
        n = len(self.lead)
        group = self.file["axes"].require_group(layout.name)
        self._prompt_labels(group, layout.prompts)
        # (sweep..., prompt) or, when generating, (sweep..., prompt, step): real tokens
        steps = () if layout.steps is None else (len(layout.steps),)
        lead_max = (*self.lead, None if self.prompt_ids is None else prompts)
        shape = (*self.lead, prompts, *steps)
        columns = [("length", np.int32)] if lengths else []
        if offsets:
            columns.append(("offset", np.int64))
        for column, dtype in columns:
            ds = group.create_dataset(
                column,
                shape=shape,
                maxshape=(*lead_max, *steps),
                dtype=dtype,
                chunks=_chunks(shape, np.dtype(dtype).itemsize, n, self.expected_rows),
            )
            for i, axis in enumerate([*self._lead_dims(), "prompt", "step"][: ds.ndim]):
                ds.dims[i].label = axis
        if layout.steps is not None:
            group.create_dataset("step", data=np.array(layout.steps, dtype=np.int64))
        if layout.layered:
            group.create_dataset("layer", data=np.array(layout.sites, dtype=object), dtype=STR)
        if layout.tokens.kind == "list":
            group.create_dataset("token", data=np.array(layout.tokens.positions, dtype=np.int64))
        if layout.heads is not None:
            group.create_dataset("head", data=np.array(layout.heads.selected, dtype=np.int64))

    def _create_metric(self, layout: MetricLayout) -> None:
        prompts = self._prompt_count(layout.prompts)
        dtype = np.dtype(layout.dtype)
        fill = np.nan if dtype.kind == "f" else -1
        shape = (*self.lead, prompts)
        ds = self.file["metrics"].create_dataset(
            layout.name,
            shape=shape,
            maxshape=(*self.lead, None if self.prompt_ids is None else prompts),
            dtype=dtype,
            chunks=_chunks(shape, dtype.itemsize, len(self.lead), self.expected_rows),
            fillvalue=fill,
        )
        ds.attrs["axes"] = json.dumps([*self._lead_dims(), "prompt"])
        ds.attrs["metric"] = layout.name
        ds.attrs["kind"] = layout.kind
        ds.attrs["fill_value"] = fill
        group = self.file.require_group("axes").require_group(layout.name)
        self._prompt_labels(group, layout.prompts)

    def _prompt_labels(self, group: h5py.Group, selected: tuple[str, ...] | None) -> None:
        if self.prompt_ids is None:
            rows = min(1024, self.expected_rows or 1024)
            group.create_dataset("prompt", shape=(0,), maxshape=(None,), dtype=STR, chunks=(rows,))
            return
        labels = [p for p in self.prompt_ids if selected is None or p in selected]
        group.create_dataset("prompt", data=np.array(labels, dtype=object), dtype=STR)

    def _lead_dims(self) -> list[str]:
        return list(self.sweep.dims) if self.sweep is not None else []

    def _own_axes(self, own: tuple[int, ...], layout: SaveLayout) -> list[str]:
        names = [f"dim{i}" for i in range(len(own))]
        topk = bool(layout.apply) and layout.apply[-1].name == "topk"
        if layout.kind == "pattern" and not layout.apply:
            return ["key"][: len(own)]
        if layout.heads is not None and layout.kind != "pattern":
            # (head, head_dim); attribution has summed head_dim away, apply may reduce it
            split = ["head", "head_dim"] if layout.kind != "attribution" else ["head"]
            names[: len(split)] = split[: len(own)]
            if not topk:
                return names
        if own and topk:
            names[-1] = "k"
        elif own:
            for label, size in self.sizes.items():
                if own[-1] == size:
                    names[-1] = label
                    break
        return names

    def _create_sweep_group(self) -> None:
        sweep = self.sweep
        assert sweep is not None
        group = self.file.create_group("sweep")
        group.attrs["variables"] = json.dumps(list(sweep.coords))
        group.attrs["dims"] = json.dumps(list(sweep.dims))
        group.attrs["mode"] = sweep.mode
        group.attrs["shape"] = json.dumps(list(sweep.shape))
        n = sweep.size
        if sweep.mode == "zip":
            group.create_dataset("point", data=np.arange(n, dtype=np.int64))
        for name, values in sweep.coords.items():
            data, dtype = _coordinate(values)
            group.create_dataset(name, data=data, dtype=dtype)
            if name in sweep.positions:
                group[name].attrs["tokens_of"] = sweep.positions[name]
        group.create_dataset("status", data=np.zeros(n, dtype=np.int8))
        group["status"].attrs["meaning"] = "0 pending, 1 done, 2 failed"
        group.create_dataset("error", data=np.array([""] * n, dtype=object), dtype=STR)
        group.create_dataset("label", data=np.array(sweep.labels, dtype=object), dtype=STR)
        group.create_dataset("spec_sha256", data=np.array(sweep.hashes, dtype=object), dtype=STR)

    def _create_prompt_groups(self) -> None:
        self._token_rows_group("prompts", ids=True)

    def _token_rows_group(self, name: str, *, ids: bool = False) -> h5py.Group:
        """A group of token rows: `input_ids` or `ids` padded with -1, `text`, `length`."""
        group = self.file.create_group(name)
        count = 0 if self.prompt_ids is None else len(self.prompt_ids)
        lead = (*self.lead, count)
        lead_max = (*self.lead, None if self.prompt_ids is None else count)
        columns = (("id", STR),) if ids else ()
        n = len(self.lead)
        for column, dtype in (*columns, ("text", STR), ("length", np.int32)):
            group.create_dataset(
                column,
                shape=lead,
                maxshape=lead_max,
                dtype=dtype,
                chunks=_chunks(lead, 16, n, self.expected_rows),
            )
        tokens = group.create_dataset(
            "input_ids" if ids else "ids",
            shape=(*lead, 1),
            maxshape=(*lead_max, None),
            dtype=np.int64,
            chunks=_chunks((*lead, 64), 8, n, self.expected_rows),
            fillvalue=-1,
        )
        tokens.attrs["fill_value"] = -1
        for ds in group.values():
            for i, axis in enumerate([*self._lead_dims(), "prompt", "position"][: ds.ndim]):
                ds.dims[i].label = axis
            if self.sweep is not None:
                ds.attrs["axes"] = json.dumps([*self.sweep.dims, "prompt"])
        return group

    def _write_token_rows(
        self,
        group: h5py.Group,
        dests: list[list[tuple[int, int]]],
        rows: list[list[int]],
        **columns: list[Any],
    ) -> None:
        """Write token rows (widening the padded matrix as needed) and their columns."""
        base = group.name.strip("/")
        tokens = self._node(f"{base}/{'input_ids' if base == 'prompts' else 'ids'}")
        width = max(tokens.shape[-1], max((len(t) for t in rows), default=1))
        if width > tokens.shape[-1]:
            tokens.resize(width, axis=tokens.ndim - 1)
        lengths = np.fromiter(map(len, rows), dtype=np.int64, count=len(rows))
        block = np.full((len(rows), width), -1, dtype=np.int64)
        flat = np.fromiter(itertools.chain.from_iterable(rows), np.int64, int(lengths.sum()))
        block[np.arange(width) < lengths[:, None]] = flat  # each row's ids, then -1
        values = {**columns, "length": lengths}
        columns_ds = {name: self._node(f"{base}/{name}") for name in values}
        for (start, stop), (point, slot) in _runs(dests):
            where = self._dest(point, slot)
            index = where[:-1] + (slice(where[-1], where[-1] + stop - start),)
            for ds in (tokens, *columns_ds.values()):
                self._ensure_rows(ds, slot + stop - start)
            tokens[index] = block[start:stop]
            row = int(np.ravel_multi_index(where, tokens.shape[:-1]))  # `where`, counted flat
            for name, column in values.items():
                part = list(column[start:stop])
                if name != "length":  # strings: keep any text HDF5 cannot hold exactly beside it
                    part = storable_texts(group, name, row, part)
                columns_ds[name][index] = part

    def _write_token_texts(
        self, dests: list[list[tuple[int, int]]], texts: list[list[str]]
    ) -> None:
        """/prompts/tokens: each prompt's tokens as text, padded with "" (inline prompts)."""
        group = self.file["prompts"]
        width = max((len(t) for t in texts), default=1)
        if "tokens" not in group:
            count = len(self.prompt_ids or ())
            group.create_dataset(
                "tokens",
                shape=(*self.lead, count, width),
                maxshape=(*self.lead, count, None),
                dtype=STR,
                chunks=_chunks((*self.lead, count, 64), 16, len(self.lead)),
            )
            for i, axis in enumerate([*self._lead_dims(), "prompt", "position"]):
                group["tokens"].dims[i].label = axis
        ds = group["tokens"]
        if width > ds.shape[-1]:
            ds.resize(width, axis=ds.ndim - 1)
        # Display text only: a NUL (which HDF5 strings cannot hold) shows as U+FFFD.
        clean = [[t.replace("\x00", "\ufffd") for t in row] for row in texts]
        block = np.array([[*t, *[""] * (ds.shape[-1] - len(t))] for t in clean], dtype=object)
        for (start, stop), (point, slot) in _runs(dests):
            where = self._dest(point, slot)
            ds[where[:-1] + (slice(where[-1], where[-1] + stop - start),)] = block[start:stop]

    def _finish_axes(self) -> None:
        finish_axes(self.file, self.sweep)


def finish_axes(file: h5py.File, sweep: SweepLayout | None) -> None:
    """Label every axis and attach the coordinate scales (HDF5 dimension scales).

    Then every axis of every dataset gets a netCDF dimension, so the file opens
    with xarray as it is (see _netcdf.py). Safe on a file that already has them.
    """
    sweep_scales = {}
    if "sweep" in file and sweep is not None:
        group = file["sweep"]
        for dim in sweep.dims:
            scale = group[dim]
            if not scale.is_scale:
                scale.make_scale(dim)
            sweep_scales[dim] = scale
    for kind in ("saves", "metrics"):
        for ds in file.get(kind, {}).values():
            axes = json.loads(ds.attrs["axes"])
            group = file["axes"].get(ds.attrs.get("save", ds.attrs.get("metric")))
            for i, axis in enumerate(axes[: ds.ndim]):
                ds.dims[i].label = axis
                scale = sweep_scales.get(axis)
                if scale is None and group is not None and axis in group:
                    scale = group[axis]
                    if scale.ndim != 1 or scale.shape[0] != ds.shape[i]:
                        continue
                    if not scale.is_scale:
                        scale.make_scale(axis)
                if scale is not None and not ds.dims[i]:
                    ds.dims[i].attach_scale(scale)
    try:
        add_netcdf_dimensions(file)
    except Exception as e:  # never let the xarray view cost the run its output
        file.attrs["netcdf_error"] = f"{type(e).__name__}: {e}"


def read_partial(path: Path) -> dict[str, Any] | None:
    """What a partial sweep file holds: its spec, point hashes and statuses (None if none)."""
    tmp = partial_path(Path(path))
    if not tmp.is_file():
        return None
    try:
        with h5py.File(tmp, "r") as f:
            if "sweep" not in f:
                return {"spec": str(f.attrs.get("spec", "")), "hashes": [], "status": []}
            return {
                "spec": str(f.attrs.get("spec", "")),
                "hashes": [_str(h) for h in f["sweep/spec_sha256"][()]],
                "status": f["sweep/status"][()].tolist(),
            }
    except OSError as e:
        raise NnrunError(
            f"cannot resume from {tmp}: the file is damaged ({e}); remove it to start over"
        ) from None


@functools.cache
def _malloc_trim() -> Any:
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc: nothing to do
        return None


def release_memory() -> None:
    """Give the memory of batches just written back to the system (glibc only), when
    the process has grown since it last did.

    Batches come and go in sizes of megabytes, and glibc raises its threshold for
    giving such blocks back each time one is freed: without this, a long run's
    resident memory creeps up by tens of megabytes before it settles. Trimming costs
    (the pages are faulted in again for the next batches), so it happens only once the
    resident size is `_TRIM_GROWTH` above what it was after the last trim.
    """
    trim = _malloc_trim()
    if trim is None:
        return
    before = _resident_bytes()
    if before is not None and before < _TRIMMED[0] + _TRIM_GROWTH:
        return
    trim(0)
    after = _resident_bytes()
    _TRIMMED[0] = after if after is not None else 0


# Resident bytes after the last trim (process-wide: so is the allocator).
_TRIMMED = [0]
_TRIM_GROWTH = 16 << 20


def _resident_bytes() -> int | None:
    """The process's resident set size (Linux), without a system call per page."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE_SIZE
    except (OSError, ValueError, IndexError):
        return None


_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _pack_save(save: SaveBatch, layout: SaveLayout) -> PackedSave:
    """A save's rows of one batch, packed (see `_packed`)."""
    data, torch_dtype = _to_numpy(save.data)
    token_axis = layout.token_axis
    stepped = layout.steps is not None
    if save.counts is not None:
        counts = save.counts.numpy()
    else:  # a fixed selection stored packed on request: every slot is real
        counts = np.full(
            (data.shape[0], *([data.shape[token_axis - 1]] if stepped else [])),
            data.shape[token_axis],
        )
    values, counts = pack(data, counts, layered=layout.layered, stepped=stepped)
    extra = {
        k: pack(_to_numpy(t)[0], counts, layered=layout.layered, stepped=stepped)[0]
        for k, t in save.extra.items()
    }
    return PackedSave(
        values=values,
        counts=counts,
        prompt_ids=list(save.prompt_ids),
        width=data.shape[token_axis],
        torch_dtype=torch_dtype,
        extra=extra,
    )


def _batch_bytes(result: BatchResult) -> int:
    """About how many bytes a batch adds to the file (each save may also open a chunk)."""
    total = sum(len(t) * 8 for t in result.token_ids) + sum(len(t) * 4 for t in result.texts)
    for save in result.saves.values():
        if isinstance(save, PackedSave):
            nbytes = save.values.nbytes + sum(v.nbytes for v in save.extra.values())
            total += 2 * nbytes + _CHUNK_BYTES
            continue
        for tensor in (save.data, *save.extra.values()):
            nbytes = tensor.numel() * tensor.element_size()
            total += 2 * nbytes + _CHUNK_BYTES  # the values, and a chunk a batch may start
    if result.generated is not None:
        total += sum(len(t) * 8 for t in result.generated)
        total += sum(len(t) * 4 for t in result.generated_text or [])
    return total


def _runs(
    targets: list[list[tuple[int, int]]],
) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """Group (row -> slots) into writes: ((row start, row stop), (point, first slot)).

    Consecutive rows that go to consecutive slots of the same point become one
    block write; a row written to several slots (shared by sweep points) is written
    to each.
    """
    out: list[tuple[tuple[int, int], tuple[int, int]]] = []
    for row, slots in enumerate(targets):
        for point, slot in slots:
            if out and len(slots) == 1:
                (start, stop), (p, s) = out[-1]
                if stop == row and p == point and s + (stop - start) == slot:
                    out[-1] = ((start, row + 1), (p, s))
                    continue
            out.append(((row, row + 1), (point, slot)))
    return out


def is_packed(layout: Any) -> bool:
    """Whether a save is stored packed: on request, or by default when its token axis is
    ragged (`tokens: all`, a slice, `find`); a listed selection is exact when padded."""
    if getattr(layout, "kind", "value") == "pattern":
        return False  # its key axis is ragged too: stored padded (see the spec's check)
    choice = getattr(layout, "layout", None) or "auto"
    return choice == "packed" or (choice == "auto" and layout.tokens.kind != "list")


def _chunks(
    shape: tuple[int, ...], itemsize: int, lead: int, grow: int | None = None
) -> tuple[int, ...]:
    """About 1 MiB chunks: whole trailing axes, then prompts, then sweep points.

    Axes are filled from the prompt axis outwards (`lead` is its index) while the
    chunk stays under the target; once an axis does not fit whole, outer ones get 1.
    A growing prompt axis (size 0 when created) is sized for `grow` rows when the run
    knows how many it will write, so a small run never allocates a big chunk.
    """
    chunk = [max(1, d) for d in shape]
    size = itemsize * math.prod(chunk[lead + 1 :])
    whole = True
    for axis in range(lead, -1, -1):
        extent = shape[axis] if shape[axis] > 0 else (grow or 4096)  # a growing axis
        take = max(1, min(extent, _CHUNK_BYTES // max(size, 1))) if whole else 1
        chunk[axis] = take
        size *= take
        whole = whole and take >= extent
    return tuple(chunk)


def _coordinate(values: tuple[Any, ...]) -> tuple[np.ndarray, Any]:
    """A sweep variable's values and HDF5 dtype: numbers stay numbers, the rest is text."""
    if all(isinstance(v, bool) for v in values):
        return np.array(values, dtype=bool), bool
    if all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        return np.array(values, dtype=np.int64), np.int64
    if all(isinstance(v, int | float) and not isinstance(v, bool) for v in values):
        return np.array(values, dtype=np.float64), np.float64
    return np.array([str(v) for v in values], dtype=object), STR


def _to_numpy(tensor: Any) -> tuple[np.ndarray, str]:
    dtype = str(tensor.dtype).removeprefix("torch.")
    if dtype == "bfloat16":  # HDF5 has no bfloat16: widen losslessly to float32
        tensor = tensor.float()
    return tensor.detach().cpu().numpy(), dtype


def _str(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
