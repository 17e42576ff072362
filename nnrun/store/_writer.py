"""Stream batches of saves into one HDF5 file, atomically.

The file is written under `<out>.partial.h5` with `status = partial` and only
renamed to `<out>` after the last batch, with `status = complete`. A run that
fails or is interrupted leaves at most the `.partial.h5` file, which says so;
one whose disk fills up leaves nothing (see `_faults`).
"""

from __future__ import annotations

import json
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import h5py
import numpy as np

from nnrun.errors import OutputError
from nnrun.store._faults import (
    abandon_hdf5,
    check_room,
    is_write_failure,
    quiet_failed_closes,
    write_failure_reason,
)
from nnrun.store._paths import partial_path
from nnrun.store._signals import signals_deferred
from nnrun.store._text import storable_texts

if TYPE_CHECKING:
    from nnrun.compile.plan import SaveLayout
    from nnrun.engine import BatchResult, SaveBatch

FORMAT_VERSION = 1
STR = h5py.string_dtype()
_CHUNK_BYTES = 4 << 20  # measured in the brief: big contiguous-ish slabs write near raw speed


class OutputWriter:
    """Context manager that owns one output file for the length of a run.

    >>> with OutputWriter(path, attrs, plan.saves) as out:    # doctest: +SKIP
    ...     for result in engine.run():
    ...         out.write(result)
    """

    def __init__(
        self,
        path: Path,
        attrs: dict[str, Any],
        layouts: tuple[SaveLayout, ...],
        sizes: dict[str, int] | None = None,
    ) -> None:
        self.path = Path(path)
        self.tmp_path = partial_path(self.path)
        self.attrs = attrs
        self.layouts = {layout.name: layout for layout in layouts}
        # Known model sizes ({"hidden": 576, "vocab": 49152}) name a value's own axes.
        self.sizes = sizes or {}
        self.file: h5py.File | None = None
        self.prompt_count = 0

    def __enter__(self) -> OutputWriter:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.file = h5py.File(self.tmp_path, "w")
        except OSError as e:
            raise OutputError(f"cannot create {self.tmp_path}: {write_failure_reason(e)}") from None
        try:
            for key, value in self.attrs.items():
                self.file.attrs[key] = value
            self.file.attrs["format"] = FORMAT_VERSION
            self.file.attrs["status"] = "partial"
            self.file.attrs["started_utc"] = _utc_now()
            _token_rows_group(self.file, "prompts", ids=True)
            self.file.create_group("saves")
            self.file.create_group("axes")
        except BaseException as e:
            raise self._abandon(e) from None
        return self

    def write(self, result: BatchResult) -> None:
        """Append one micro-batch: its prompts and each save's values."""
        # Before HDF5 is asked to write anything it may fail to write (see _faults).
        check_room(self.tmp_path, _batch_bytes(result))
        with quiet_failed_closes():
            try:
                self._write(result)
            except (OSError, RuntimeError) as e:
                if not is_write_failure(e):
                    raise
                raise self._abandon(e) from None

    def _write(self, result: BatchResult) -> None:
        assert self.file is not None
        _append_token_rows(
            self.file["prompts"], result.token_ids, id=result.prompt_ids, text=result.texts
        )
        self.prompt_count += len(result.prompt_ids)
        if result.generated is not None:
            # Prompt ids label the rows: /generation rows follow /prompts rows.
            group = self.file.get("generation") or _token_rows_group(self.file, "generation")
            _append_token_rows(group, result.generated, text=result.generated_text or [])
        for name, save in result.saves.items():
            layout = self.layouts[name]
            self._append_save(name, layout, save.data, save)
            for suffix, tensor in save.extra.items():
                self._append_save(f"{name}.{suffix}", layout, tensor, save, scales=False)
        self.file.flush()

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.file is None:  # abandoned after a failed write: nothing left to finish
            return
        try:
            self._finish_axes()
            self.file.attrs["prompt_count"] = self.prompt_count
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

    # -- pieces --------------------------------------------------------------

    def _append_save(
        self, name: str, layout: SaveLayout, tensor: Any, save: SaveBatch, *, scales: bool = True
    ) -> None:
        data, torch_dtype = _to_numpy(tensor)
        token_axis = layout.token_axis
        saves = self.file["saves"]
        if name not in saves:
            self._create_save(name, data, layout, save, torch_dtype, token_axis)
        ds = saves[name]
        n, r = ds.shape[0], data.shape[0]
        if save.counts is not None and data.shape[token_axis] > ds.shape[token_axis]:
            ds.resize(data.shape[token_axis], axis=token_axis)
        ds.resize(n + r, axis=0)
        target = (slice(n, n + r),) + (slice(None),) * (token_axis - 1)
        target += (slice(0, data.shape[token_axis]),)
        ds[target] = data
        if scales:
            self._append_axis(name, "prompt", save.prompt_ids, STR)
            if save.counts is not None:
                self._append_axis(name, "length", save.counts.numpy(), np.int32)

    def _create_save(
        self,
        name: str,
        data: np.ndarray,
        layout: SaveLayout,
        save: SaveBatch,
        torch_dtype: str,
        token_axis: int,
    ) -> None:
        ragged = save.counts is not None
        own = data.shape[token_axis + 1 :]
        axes = list(layout.leading_axes) + self._own_axes(own, layout)
        maxshape = [None] + list(data.shape[1:])
        if ragged:
            maxshape[token_axis] = None
        row_bytes = max(1, int(np.prod(data.shape[1:])) * data.dtype.itemsize)
        chunks = (max(1, min(4096, _CHUNK_BYTES // row_bytes)),) + tuple(
            max(1, d) for d in data.shape[1:]
        )
        fill = np.nan if data.dtype.kind == "f" else -1
        ds = self.file["saves"].create_dataset(
            name,
            shape=(0,) + data.shape[1:],
            maxshape=tuple(maxshape),
            dtype=data.dtype,
            chunks=chunks,
            fillvalue=fill,
        )
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
        if ragged:
            ds.attrs["lengths"] = f"/axes/{name}/length"
        if name != layout.name:  # a companion dataset (topk indices) shares the save's axes
            return
        group = self.file["axes"].require_group(name)
        group.create_dataset("prompt", shape=(0,), maxshape=(None,), dtype=STR, chunks=(1024,))
        if ragged:
            # (prompt,) or, when generating, (prompt, step): real tokens per entry
            steps = () if layout.steps is None else (len(layout.steps),)
            group.create_dataset(
                "length",
                shape=(0, *steps),
                maxshape=(None, *steps),
                dtype=np.int32,
                chunks=(1024, *steps),
            )
        if layout.steps is not None:
            group.create_dataset("step", data=np.array(layout.steps, dtype=np.int64))
        if layout.layered:
            group.create_dataset("layer", data=np.array(layout.sites, dtype=object), dtype=STR)
        if layout.tokens.kind == "list":
            group.create_dataset("token", data=np.array(layout.tokens.positions, dtype=np.int64))

    def _own_axes(self, own: tuple[int, ...], layout: SaveLayout) -> list[str]:
        names = [f"dim{i}" for i in range(len(own))]
        if own and layout.apply and layout.apply[-1].name == "topk":
            names[-1] = "k"
        elif own:
            for label, size in self.sizes.items():
                if own[-1] == size:
                    names[-1] = label
                    break
        return names

    def _append_axis(self, name: str, axis: str, values: Any, dtype: Any) -> None:
        ds = self.file["axes"][name][axis]
        n = ds.shape[0]
        ds.resize(n + len(values), axis=0)
        ds[n:] = values

    def _finish_axes(self) -> None:
        """Label every axis and attach the prompt/layer/token scales (HDF5 dimension scales)."""
        for ds in self.file["saves"].values():
            axes = json.loads(ds.attrs["axes"])
            group = self.file["axes"].get(ds.attrs["save"])
            for i, axis in enumerate(axes[: ds.ndim]):
                ds.dims[i].label = axis
                if group is not None and axis in group and group[axis].shape[0] == ds.shape[i]:
                    scale = group[axis]
                    if not scale.is_scale:
                        scale.make_scale(axis)
                    ds.dims[i].attach_scale(scale)


def _batch_bytes(result: BatchResult) -> int:
    """About how many bytes a batch adds to the file (each save may also open a chunk)."""
    total = sum(len(t) * 8 for t in result.token_ids) + sum(len(t) * 4 for t in result.texts)
    for save in result.saves.values():
        for tensor in (save.data, *save.extra.values()):
            nbytes = tensor.numel() * tensor.element_size()
            row = max(1, nbytes // max(1, tensor.shape[0] if tensor.dim() else 1))
            # A batch may start a new chunk, which is stored whole (see _create_save).
            total += nbytes + max(1, min(4096, _CHUNK_BYTES // row)) * row
    if result.generated is not None:
        total += sum(len(t) * 8 for t in result.generated)
        total += sum(len(t) * 4 for t in result.generated_text or [])
    return total


def _token_rows_group(file: h5py.File, name: str, *, ids: bool = False) -> h5py.Group:
    """A group of token rows: `input_ids` or `ids` padded with -1, `text`, `length`."""
    group = file.create_group(name)
    columns = (("id", STR),) if ids else ()
    for column, dtype in (*columns, ("text", STR), ("length", np.int32)):
        group.create_dataset(column, shape=(0,), maxshape=(None,), dtype=dtype, chunks=(1024,))
    tokens = group.create_dataset(
        "input_ids" if ids else "ids",
        shape=(0, 1),
        maxshape=(None, None),
        dtype=np.int64,
        chunks=(256, 64),
        fillvalue=-1,
    )
    tokens.attrs["fill_value"] = -1
    return group


def _append_token_rows(group: h5py.Group, rows: list[list[int]], **columns: list[Any]) -> None:
    """Append token rows (widening the padded matrix as needed) and their columns."""
    tokens = group["input_ids" if "input_ids" in group else "ids"]
    n, r = tokens.shape[0], len(rows)
    width = max(tokens.shape[1], max((len(t) for t in rows), default=1))
    tokens.resize((n + r, width))
    block = np.full((r, width), -1, dtype=np.int64)
    for row, toks in enumerate(rows):
        block[row, : len(toks)] = toks
    tokens[n : n + r] = block
    for name, values in {**columns, "length": [len(t) for t in rows]}.items():
        group[name].resize((n + r,))
        if name != "length":  # strings: keep any text HDF5 cannot hold exactly beside it
            values = storable_texts(group, name, n, list(values))
        group[name][n : n + r] = values


def _to_numpy(tensor: Any) -> tuple[np.ndarray, str]:
    dtype = str(tensor.dtype).removeprefix("torch.")
    if dtype == "bfloat16":  # HDF5 has no bfloat16: widen losslessly to float32
        tensor = tensor.float()
    return tensor.detach().cpu().numpy(), dtype


def _utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
