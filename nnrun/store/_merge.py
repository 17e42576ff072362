"""Merge the shard files of a distributed run into the file a local run writes.

Every shard of a sweep is an ordinary output file with the sweep's full layout in
which only the shard's own points are written (the others keep their fill values,
which HDF5 does not store). Merging copies each shard's points into one file. Shards
of a prompt file (no sweep) each hold a window of the prompts; merging appends them
in order along the prompt axis. Either way, token axes that grew differently in
different shards (the longest prompt of each shard) grow to the widest, and the
result has the datasets, shapes, attributes and values of a local run of the spec.
"""

from __future__ import annotations

import math
import os
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py

from nnrun.errors import NnrunError
from nnrun.store._netcdf import remove_netcdf_dimensions
from nnrun.store._writer import FAILED, SweepLayout, _utc_now, finish_axes, partial_path

# Groups whose datasets lead with the sweep's axes, then the prompt axis.
_ROW_GROUPS = ("prompts", "generation", "saves", "metrics")
# HDF5 attributes that hold object references into their own file: never copied.
_REFERENCES = ("DIMENSION_LIST", "REFERENCE_LIST", "CLASS", "NAME")
_COPY_BYTES = 64 << 20  # copy big datasets in blocks of about this size


@dataclass(frozen=True)
class ShardPart:
    """One shard file to merge: the sweep points it holds (None: a window of prompts)."""

    path: Path
    points: tuple[int, ...] | None = None


@dataclass(frozen=True)
class FailedPoints:
    """Points no shard file holds, with the reason (their shard failed every try)."""

    points: tuple[int, ...]
    message: str


def merge_shards(
    parts: Sequence[ShardPart],
    output: Path,
    *,
    sweep: SweepLayout | None,
    attrs: dict[str, Any],
    failed: Sequence[FailedPoints] = (),
) -> None:
    """Write `output` from the shard files `parts` (in order), atomically.

    With a sweep, each part's points are copied into their slots and `failed` points
    are marked failed with their message; without one, the parts are windows of one
    prompt file and are appended in order. `attrs` replace root attributes (the
    driver's command and times); the result is `complete`.
    """
    if not parts:
        raise NnrunError("no shard finished, so there is nothing to merge")
    output = Path(output)
    tmp = partial_path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(parts[0].path, tmp)
    try:
        with h5py.File(tmp, "r+") as dst:
            remove_netcdf_dimensions(dst)  # sizes change below; made again at the end
            rows = _rows(dst)
            for part in parts[1:]:
                with h5py.File(part.path, "r") as src:
                    if sweep is not None:
                        _merge_points(dst, src, part.points or (), sweep)
                    else:
                        rows = _append_window(dst, src, rows)
            if sweep is not None:
                for failure in failed:
                    for point in failure.points:
                        dst["sweep/status"][point] = FAILED
                        dst["sweep/error"][point] = failure.message
            if "shard" in dst.attrs:  # the first shard's own label
                del dst.attrs["shard"]
            for key, value in attrs.items():
                dst.attrs[key] = value
            if sweep is None:
                dst.attrs["prompt_count"] = rows
            dst.attrs["status"] = "complete"
            dst.attrs["finished_utc"] = _utc_now()
            finish_axes(dst, sweep)  # and the netCDF dimensions, at their new sizes
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, output)


# -- sweeps: copy each point's slots -------------------------------------------------------


def _merge_points(
    dst: h5py.File, src: h5py.File, points: Sequence[int], sweep: SweepLayout
) -> None:
    lead = len(sweep.shape)
    for name, ds in _datasets(src):
        if _point_led(name, ds, sweep):
            target = _require_like(dst, name, ds)
            _grow(target, ds.shape, start=lead)
            _widest(target, ds)
            for point in points:
                where = sweep.coords_of(point)
                _copy(ds, target, where, where)
        else:
            _merge_whole(dst, name, ds)
    for point in points:
        for column in ("status", "error"):
            dst["sweep"][column][point] = src["sweep"][column][point]


def _point_led(name: str, ds: h5py.Dataset, sweep: SweepLayout) -> bool:
    """Datasets with one slot per sweep point: rows of every kind and their lengths."""
    top = name.split("/", 1)[0]
    # A packed save's offsets count from the start of each point's own flat axis.
    row_data = top in _ROW_GROUPS or (top == "axes" and name.endswith(("/length", "/offset")))
    return row_data and ds.shape[: len(sweep.shape)] == tuple(sweep.shape)


def _merge_whole(dst: h5py.File, name: str, ds: h5py.Dataset) -> None:
    """Labels (/axes/<save>/prompt, layer, token, step) are the same in every shard;
    prompt labels of a streamed file grow with the rows a shard wrote: keep the longest."""
    if name not in dst:
        target = _require_like(dst, name, ds)
        _copy(ds, target, (), ())
        return
    target = dst[name]
    if ds.shape != target.shape and all(a >= b for a, b in zip(ds.shape, target.shape)):
        _grow(target, ds.shape, start=0)
        _copy(ds, target, (), ())


# -- prompt-file windows: append rows ------------------------------------------------------


def _rows(file: h5py.File) -> int:
    return int(file["prompts/id"].shape[0]) if "prompts/id" in file else 0


def _append_window(dst: h5py.File, src: h5py.File, before: int) -> int:
    """Append a window's rows after the `before` rows already merged; the new row count."""
    added = _rows(src)
    # Packed saves: this window's tokens go after the tokens already merged, so its
    # offsets (/axes/<save>/offset) move on by that many.
    flat_before = {
        name.split("/", 1)[1]: ds.shape[0]
        for name, ds in _datasets(dst)
        if name.startswith("saves/") and ds.attrs.get("layout") == "packed"
    }
    for name, ds in _datasets(src):
        top = name.split("/", 1)[0]
        column = name.rsplit("/", 1)[-1]
        if top in _ROW_GROUPS or (top == "axes" and column in ("length", "prompt", "offset")):
            target = _require_like(dst, name, ds, rows=before)
            start = target.shape[0]
            target.resize(start + ds.shape[0], axis=0)
            _grow(target, ds.shape, start=1)
            _widest(target, ds)
            if top == "axes" and column == "offset":
                shift = flat_before.get(name.split("/")[1], 0)
                target[start : start + ds.shape[0]] = ds[()] + shift
            else:
                _copy(ds, target, (), (), dst_row=start, rows=ds.shape[0])
        elif name not in dst:
            _copy(ds, _require_like(dst, name, ds), (), ())
    # A column this window lacks (a JSONL field none of its records has) gets fill values
    # for its rows, as the writer gives records without the field.
    for name, ds in _datasets(dst):
        if name.startswith("prompts/meta/") and ds.shape[0] < before + added:
            ds.resize(before + added, axis=0)
    return before + added


# -- pieces --------------------------------------------------------------------------------


def _datasets(file: h5py.File) -> Iterator[tuple[str, h5py.Dataset]]:
    """Every dataset but the sweep's own group and the netCDF dimensions at the root."""
    found: list[tuple[str, h5py.Dataset]] = []

    def visit(name: str, obj: Any) -> None:
        if isinstance(obj, h5py.Dataset) and "/" in name and not name.startswith("sweep/"):
            found.append((name, obj))

    file.visititems(visit)
    yield from found


def _require_like(dst: h5py.File, name: str, src: h5py.Dataset, rows: int | None = None) -> Any:
    """`dst[name]`, created like `src` (no data) when missing; `rows`: its first axis."""
    if name in dst:
        return dst[name]
    shape = src.shape if rows is None else (rows, *src.shape[1:])
    target = dst.create_dataset(
        name,
        shape=shape,
        maxshape=src.maxshape,
        dtype=src.dtype,
        chunks=src.chunks,
        fillvalue=src.fillvalue,
        compression=src.compression,
        compression_opts=src.compression_opts,
    )
    for key, value in src.attrs.items():
        if key not in _REFERENCES:
            target.attrs[key] = value
    return target


def _widest(target: h5py.Dataset, src: h5py.Dataset) -> None:
    """A packed save's padded view is as wide as the widest shard's."""
    if "padded_width" in src.attrs:
        width = max(int(src.attrs["padded_width"]), int(target.attrs["padded_width"]))
        target.attrs["padded_width"] = width


def _grow(target: h5py.Dataset, shape: tuple[int, ...], *, start: int) -> None:
    """Widen the axes from `start` on to at least `shape` (padded token axes differ)."""
    for axis in range(start, len(shape)):
        if shape[axis] > target.shape[axis]:
            if target.maxshape[axis] is not None and target.maxshape[axis] < shape[axis]:
                raise NnrunError(
                    f"cannot merge shard files: /{target.name.lstrip('/')} has "
                    f"{shape[axis]} entries on axis {axis} in one shard and room for "
                    f"{target.maxshape[axis]} in the merged file"
                )
            target.resize(shape[axis], axis=axis)


def _copy(
    src: h5py.Dataset,
    dst: h5py.Dataset,
    src_lead: tuple[int, ...],
    dst_lead: tuple[int, ...],
    *,
    dst_row: int = 0,
    rows: int | None = None,
) -> None:
    """Copy `src[src_lead]` into `dst[dst_lead]` (its leading corner), in row blocks.

    The block's first axis after the lead goes to `dst_row` onwards; its other axes
    land at their start, so a narrower shard leaves the merged file's fill values
    beyond its width, as a local run leaves them beyond a short prompt.
    """
    n = len(src_lead)
    inner = src.shape[n:]
    if not inner:
        if src.shape and src.size:
            dst[dst_lead] = src[src_lead]
        return
    # Text reads back as bytes; as str it is written as the writer wrote it.
    reader = src.asstr() if h5py.check_string_dtype(src.dtype) is not None else src
    total = inner[0] if rows is None else rows
    row_bytes = max(1, math.prod(inner[1:]) * src.dtype.itemsize)
    step = max(1, _COPY_BYTES // row_bytes)
    tail = tuple(slice(0, s) for s in inner[1:])
    for a in range(0, total, step):
        b = min(total, a + step)
        dst[(*dst_lead, slice(dst_row + a, dst_row + b), *tail)] = reader[
            (*src_lead, slice(a, b), *tail)
        ]
