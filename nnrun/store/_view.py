"""Reading saves lazily: only the prompts asked for, in the padded view, whatever the layout.

`Results["resid"]` is a `SaveView`: it knows its shape and dtype without reading any
values; indexing its leading axes (sweep variables, then prompts) with integers or
slices reads only those rows (`results["resid"][3:5]`); anything else reads the
whole save once. Both layouts read back the same: a packed save (see `_packed`) is
scattered into the padded layout, reading only the flat range its rows cover.
"""

from __future__ import annotations

import functools
import json
import math
from collections import OrderedDict
from typing import Any

import h5py
import numpy as np

from nnrun.store._packed import padded_view

# What the reader may keep of values already read, per open Results (bytes).
CACHE_BYTES = 1 << 30


class ReadCache:
    """The most recently read arrays, up to a byte budget; bigger ones are not kept."""

    def __init__(self, budget: int = CACHE_BYTES) -> None:
        self.budget = budget
        self._items: OrderedDict[Any, np.ndarray] = OrderedDict()
        self._bytes = 0

    def get(self, key: Any) -> np.ndarray | None:
        found = self._items.get(key)
        if found is not None:
            self._items.move_to_end(key)
        return found

    def put(self, key: Any, value: np.ndarray) -> np.ndarray:
        if value.nbytes > self.budget or key in self._items:
            return value
        self._items[key] = value
        self._bytes += value.nbytes
        while self._bytes > self.budget:
            _, dropped = self._items.popitem(last=False)
            self._bytes -= dropped.nbytes
        return value


def is_packed(ds: h5py.Dataset) -> bool:
    return _text(ds.attrs.get("layout", "padded")) == "packed"


def view_axes(ds: h5py.Dataset) -> Any:
    """The axis names of the padded view (a packed save records them apart)."""
    return json.loads(_text(ds.attrs["padded_axes" if is_packed(ds) else "axes"]))


def view_shape(f: h5py.File, ds: h5py.Dataset) -> tuple[int, ...]:
    """The shape of the padded view, read from metadata only."""
    if not is_packed(ds):
        return tuple(ds.shape)
    offsets = f[_text(ds.attrs["offsets"])]
    layered = "layer" in view_axes(ds)
    stepped = _stepped(ds)
    lead = offsets.ndim - int(stepped)  # offsets: (sweep..., prompt[, step])
    flat = lead - 1  # the packed axis of (sweep..., packed, [layer], value...)
    shape = list(offsets.shape[:lead])
    if layered:
        shape.append(ds.shape[flat + 1])
    if stepped:
        shape.append(offsets.shape[-1])
    shape.append(int(ds.attrs["padded_width"]))
    shape += list(ds.shape[flat + 1 + int(layered) :])
    return tuple(shape)


def read_block(f: h5py.File, ds: h5py.Dataset, lead: tuple[slice, ...]) -> np.ndarray:
    """The padded view of the rows `lead` selects: one slice per sweep axis and prompts."""
    if not is_packed(ds):
        return np.asarray(ds[lead])
    offsets_ds, lengths_ds = f[_text(ds.attrs["offsets"])], f[_text(ds.attrs["lengths"])]
    offsets = np.asarray(offsets_ds[lead], dtype=np.int64)  # (*sweep, P[, S])
    lengths = np.asarray(lengths_ds[lead], dtype=np.int64)
    n = len(lead) - 1  # sweep axes
    points = offsets.shape[:n]
    q = math.prod(points)
    offsets = offsets.reshape(q, *offsets.shape[n:])
    lengths = lengths.reshape(q, *lengths.shape[n:])
    real = lengths > 0
    lo = int(offsets[real].min()) if real.any() else 0
    hi = int((offsets + lengths)[real].max()) if real.any() else 0
    block = np.asarray(ds[lead[:-1] + (slice(lo, hi),)])  # (*sweep, F, [L], *value)
    block = block.reshape(q, hi - lo, *block.shape[n + 1 :])
    fill = ds.fillvalue if ds.dtype.kind == "f" else -1
    out = padded_view(
        block,
        np.where(real, offsets - lo, 0),
        np.where(real, lengths, 0),
        width=int(ds.attrs["padded_width"]),
        layered="layer" in view_axes(ds),
        stepped=_stepped(ds),
        fill=fill,
    )  # (Q, P, [L], [S], W, *value)
    return out.reshape(*points, *out.shape[1:])


def padded_shape(ds: h5py.Dataset) -> tuple[int, ...]:
    """The shape of a save's padded view (its own shape when stored padded)."""
    return view_shape(ds.file, ds) if is_packed(ds) else tuple(ds.shape)


def padded_values(ds: h5py.Dataset) -> np.ndarray:
    """A save's values in the padded layout, whichever layout the file stores."""
    if not is_packed(ds):
        return np.asarray(ds[()])
    f = ds.file
    shape = view_shape(f, ds)
    lead = view_axes(ds).index("prompt") + 1
    return read_block(f, ds, tuple(slice(0, d) for d in shape[:lead]))


def packed_arrays(f: h5py.File, ds: h5py.Dataset) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(values, offsets, lengths) of a packed save, as stored."""
    offsets = np.asarray(f[_text(ds.attrs["offsets"])][()])
    lengths = np.asarray(f[_text(ds.attrs["lengths"])][()])
    return np.asarray(ds[()]), offsets, lengths


def _stepped(ds: h5py.Dataset) -> bool:
    return "step" in view_axes(ds)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


# -- indexing ---------------------------------------------------------------------------


def split_key(
    key: Any, shape: tuple[int, ...], lead: int
) -> tuple[tuple[slice, ...], list[Any], tuple[Any, ...]] | None:
    """An index into the padded view -> (a slice per leading axis to read, what to take
    from each of those axes afterwards, the index of the remaining axes).

    `lead` is how many leading axes (sweep variables and the prompt axis) can be read
    in part. None when the key needs the whole save (a mask, a tensor, `...` or None
    among the leading axes).
    """
    if not isinstance(key, tuple):
        key = (key,)
    head, rest = key[:lead], key[lead:]
    reads: list[slice] = []
    posts: list[Any] = []
    for axis, item in enumerate(head):
        size = shape[axis]
        if isinstance(item, bool | np.bool_):
            return None
        if isinstance(item, int | np.integer):
            i = int(item) + size if item < 0 else int(item)
            if not 0 <= i < size:
                raise IndexError(f"index {item} is out of bounds for axis {axis} with size {size}")
            reads.append(slice(i, i + 1))
            posts.append(0)
        elif isinstance(item, slice):
            if item.step is not None and item.step <= 0:
                return None  # torch refuses it, and says so
            picked = range(size)[item]
            if not picked:
                reads.append(slice(0, 0))
                posts.append(slice(None))
            else:
                lo, hi = min(picked), max(picked) + 1
                reads.append(slice(lo, hi))
                posts.append(slice(None, None, picked.step))
        elif isinstance(item, list) and item and all(isinstance(i, int) for i in item):
            picked_list = [i + size if i < 0 else i for i in item]
            if not all(0 <= i < size for i in picked_list):
                raise IndexError(f"index {item} is out of bounds for axis {axis} with size {size}")
            lo = min(picked_list)
            reads.append(slice(lo, max(picked_list) + 1))
            posts.append(np.array(picked_list) - lo)
        else:
            return None
    for axis in range(len(head), lead):
        reads.append(slice(0, shape[axis]))
        posts.append(slice(None))
    return tuple(reads), posts, rest


def take(block: np.ndarray, posts: list[Any], rest: tuple[Any, ...]) -> np.ndarray:
    """Apply the per-axis selections of `split_key`, then the index of the other axes."""
    out = block
    axis = 0
    for post in posts:
        if isinstance(post, int):
            out = np.take(out, post, axis=axis)
            continue
        if isinstance(post, np.ndarray):
            out = np.take(out, post, axis=axis)
        else:
            out = out[(slice(None),) * axis + (post,)]
        axis += 1
    if rest:
        out = out[(slice(None),) * axis + rest]
    return out


# -- the view -------------------------------------------------------------------------


def save_view(results: Any, name: str) -> Any:
    """A lazily read tensor of one save (see `LazySave`)."""
    shape, lead, dtype = results._view_meta(name)
    return _lazy_class()(results, name, shape, lead, dtype)


@functools.cache
def _lazy_class() -> type:
    """The LazySave class, made on first use: reading a file's metadata (`nnrun show`)
    must not pay for importing torch."""
    import torch
    from torch.utils._pytree import tree_map

    class LazySave(torch.Tensor):
        """One save of an output file: a torch tensor whose values are read on demand.

        Its shape and dtype cost no read. Indexing its leading axes (sweep variables,
        then prompts) with integers, slices or lists of integers reads only those rows
        and returns a plain tensor; any other use (torch functions, operators, methods,
        printing) reads the whole save once, and this object keeps it.
        """

        @staticmethod
        def __new__(cls, results: Any, name: str, shape: Any, lead: int, dtype: Any) -> Any:
            torch_dtype = torch.from_numpy(np.empty(0, dtype=dtype)).dtype
            view = torch.Tensor._make_wrapper_subclass(cls, shape, dtype=torch_dtype)
            view._results, view._name, view._lead, view._whole = results, name, lead, None
            return view

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            pass

        # Every op reaches __torch_dispatch__ with this wrapper, which has no storage
        # of its own: it is swapped for the values, read once.
        __torch_function__ = torch._C._disabled_torch_function_impl

        @classmethod
        def __torch_dispatch__(cls, func: Any, types: Any, args: Any = (), kwargs: Any = None):
            def values(x: Any) -> Any:
                return x.tensor() if isinstance(x, LazySave) else x

            return func(*tree_map(values, args), **tree_map(values, kwargs or {}))

        def tensor(self) -> Any:
            """The whole save as a plain tensor (read once)."""
            if self._whole is None:
                self._whole = torch.from_numpy(self._results.array(self._name))
            return self._whole

        def numpy(self, *, force: bool = False) -> np.ndarray:
            return self.tensor().numpy()

        def tolist(self) -> Any:
            return self.tensor().tolist()

        def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
            values = self.tensor().numpy()
            return values if dtype is None else values.astype(dtype)

        def __getitem__(self, key: Any) -> Any:
            if self._whole is None and not isinstance(key, torch.Tensor):
                split = split_key(key, tuple(self.shape), self._lead)
                if split is not None:
                    reads, posts, rest = split
                    block = self._results._rows(self._name, reads)
                    # A copy: the block may be kept for the next read.
                    return torch.from_numpy(np.array(take(block, posts, rest)))
            return self.tensor()[key]

        def __reduce_ex__(self, protocol: Any) -> Any:
            return self.tensor().__reduce_ex__(protocol)

        def __repr__(self, **kwargs: Any) -> str:
            return repr(self.tensor())

    return LazySave
