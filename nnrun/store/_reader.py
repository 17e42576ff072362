"""Read an nnrun output file back: saves and metrics as arrays or tensors, with their axes.

Files may come from elsewhere (a published output, a crafted one): every read is
guarded, sizes are checked before anything is read whole, and nothing stored in
the file is ever executed or used to load code.
"""

from __future__ import annotations

import json
import os
import weakref
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from nnrun.errors import NnrunError
from nnrun.store._text import read_texts
from nnrun.store._view import (
    ReadCache,
    is_packed,
    packed_arrays,
    padded_values,
    read_block,
    save_view,
    view_axes,
    view_shape,
)

# What h5py raises on files it can open but not make sense of (crafted or damaged ones).
_FORMAT_ERRORS = (OSError, RuntimeError, KeyError, ValueError, TypeError, AttributeError)
# Labels and texts are read whole; a file from elsewhere may declare any number of them.
_MAX_LABELS = 1 << 24
_GROUPS = ("saves", "metrics")


class Results(Mapping[str, Any]):
    """The saves and metrics of one output file, read on access.

    `results["resid"]` acts as a torch tensor but reads lazily: its shape costs no
    read, `results["resid"][3:5]` reads only those prompts, and a save read whole
    is kept (up to 1 GiB per Results), so repeated access does not read again.
    `results.array("resid")` is the numpy array (`prompt="france"` for one prompt's
    rows); `results.axes("resid")` names its axes; `results.prompt_ids("resid")`
    says which prompt each row holds. Saves stored packed (ragged tokens) read back
    in the same padded view; `results.packed("resid")` gives the stored form.
    Metrics: `results.metric("p_paris")` (numpy),
    `results.metric_names`. A sweep's datasets lead with one axis per sweep
    variable: `results.coords("p_paris")` gives each one's values, and
    `results.failed_points()` the points that failed, with their errors.

    >>> r = nnrun.load("runs/demo.h5")          # doctest: +SKIP
    >>> r.axes("resid"), r["resid"].shape        # doctest: +SKIP
    (['prompt', 'layer', 'token', 'hidden'], torch.Size([2, 30, 1, 576]))
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not os.path.isfile(self.path):
            raise NnrunError(f"no such output file '{self.path}'")
        try:
            with h5py.File(self.path, "r") as f:
                self.attrs: dict[str, Any] = _read_attrs(f.attrs)
                found: dict[str, list[str]] = {}
                for group_name in _GROUPS:
                    group = f.get(group_name)
                    if group is not None and not isinstance(group, h5py.Group):
                        raise NnrunError(
                            f"'{self.path}' is not an nnrun output file: /{group_name} is not "
                            "a group"
                        )
                    # A member that is not a dataset (a group, a broken link) is no save.
                    found[group_name] = (
                        [] if group is None else [n for n in group if _is_dataset(group, n)]
                    )
                self._names = found["saves"]
                self.metric_names = found["metrics"]
                self._cache = ReadCache()
                # The same lazy tensor while a caller holds it (it keeps what it read).
                self._views: weakref.WeakValueDictionary[str, Any] = weakref.WeakValueDictionary()
        except OSError as e:
            raise NnrunError(f"cannot read '{self.path}' as an HDF5 file: {e}") from None
        except _FORMAT_ERRORS as e:
            raise NnrunError(f"cannot read '{self.path}': {e}") from None

    @property
    def status(self) -> str:
        return str(self.attrs.get("status", "unknown"))

    def __getitem__(self, name: str) -> Any:
        view = self._views.get(name)
        if view is None:
            self._check_name("saves", name)
            view = save_view(self, name)
            self._views[name] = view
        return view

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)

    def array(self, name: str, prompt: str | list[str] | None = None) -> np.ndarray:
        """The save's values as a numpy array (ragged tokens padded with NaN / -1).

        With `prompt` (an id, or a list of ids) only those prompts' rows are read; one
        id drops the prompt axis, as an integer index would. The whole array is kept
        once read (see the class doc): copy it before changing it in place.
        """
        if prompt is None:
            return self._read("saves", name)
        ids = self.prompt_ids(name)
        wanted = [prompt] if isinstance(prompt, str) else list(prompt)
        missing = [p for p in wanted if p not in ids]
        if missing:
            raise KeyError(
                f"save '{name}' has no prompt {missing[0]!r} (its prompts: {', '.join(ids[:10])}"
                f"{' ...' if len(ids) > 10 else ''})"
            )
        slots = [ids.index(p) for p in wanted]
        _, lead, _ = self._view_meta(name)
        key = (slice(None),) * (lead - 1) + (slots[0] if isinstance(prompt, str) else slots,)
        return self[name][key].numpy()

    def metric(self, name: str) -> np.ndarray:
        """A metric's values: axes (sweep variables..., prompt); NaN where a point failed."""
        return self._read("metrics", name)

    def packed(self, name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """A save's real tokens as stored packed: (values, offsets, lengths).

        values is (sweep..., packed token, [layer], value axes...); offsets and lengths
        are (sweep..., prompt[, step]): prompt i's tokens are values[..., o:o + n, ...].
        A save stored padded is packed here from its padded view (its lengths, or its
        whole token axis when it is not ragged), so the answer is the same for both.
        """
        from nnrun.store._packed import pack, unit_offsets

        self._check_name("saves", name)
        try:
            with h5py.File(self.path, "r") as f:
                ds = f["saves"][name]
                if is_packed(ds):
                    return packed_arrays(f, ds)
        except _FORMAT_ERRORS as e:
            raise NnrunError(f"cannot read save '{name}' of {self.path}: {e}") from None
        data, axes = self.array(name), self.axes(name)
        lengths = self.lengths(name)
        lead = axes.index("prompt")
        token = axes.index("token")
        stepped = "step" in axes
        if lengths is None:
            lengths = np.full(data.shape[: lead + 1 + int(stepped)], data.shape[token])
            if stepped:
                lengths = np.full(
                    (*data.shape[: lead + 1], data.shape[axes.index("step")]), data.shape[token]
                )
        points = data.shape[:lead]
        flat_parts, offsets = [], np.zeros(lengths.shape, dtype=np.int64)
        for q in np.ndindex(*points):
            values, counts = pack(data[q], lengths[q], layered="layer" in axes, stepped=stepped)
            flat_parts.append(values)
            offsets[q] = unit_offsets(0, counts)
        size = max((len(v) for v in flat_parts), default=0)
        rest = flat_parts[0].shape[1:]
        values = np.full(
            (*points, size, *rest), np.nan if data.dtype.kind == "f" else -1, data.dtype
        )
        for q, part in zip(np.ndindex(*points), flat_parts):
            values[q][: len(part)] = part
        return values, offsets, lengths.astype(np.int64)

    def axes(self, name: str) -> list[str]:
        """The axis names of a save or metric, outermost first (its `axes` attribute)."""
        with h5py.File(self.path, "r") as f:
            ds = self._dataset(f, name)
            try:
                axes = view_axes(ds)  # a packed save: the axes of its padded view
            except (*_FORMAT_ERRORS, json.JSONDecodeError):
                axes = None
        if not isinstance(axes, list) or not all(isinstance(a, str) for a in axes):
            raise NnrunError(
                f"'{name}' in {self.path} has no valid 'axes' attribute (a JSON list of names)"
            )
        return axes

    def prompt_ids(self, name: str) -> list[str]:
        values = self._axis(name, "prompt")
        return [] if values is None else [_plain(v) for v in np.atleast_1d(values)]

    def labels(self, name: str, axis: str) -> list[Any] | None:
        """The labels of one axis of a save (`layer` -> site names), as str / int; None if
        the axis has none."""
        values = self._axis(name, axis)
        return None if values is None else [_plain(v) for v in np.atleast_1d(values)]

    def lengths(self, name: str) -> np.ndarray | None:
        """Real tokens per row for a ragged token axis, else None."""
        values = self._axis(name, "length")
        return None if values is None else np.asarray(values)

    def coords(self, name: str | None = None) -> dict[str, list[Any]]:
        """Each sweep variable's values, in axis order ({} without a sweep).

        For a zip sweep the leading axis is `point` and every variable has one value
        per point. `name` (a save or metric) is accepted for symmetry with `axes`.
        """
        if name is not None:
            self.axes(name)  # a clear KeyError for a wrong name
        try:
            with h5py.File(self.path, "r") as f:
                group = f.get("sweep")
                if not isinstance(group, h5py.Group):
                    return {}
                names = json.loads(_plain(group.attrs["variables"]))
                out = {}
                for v in names:
                    _check_size(group[v], self.path)
                    out[v] = [_plain(x) for x in group[v][()]]
                return out
        except (*_FORMAT_ERRORS, json.JSONDecodeError) as e:
            raise NnrunError(f"cannot read the sweep coordinates of {self.path}: {e}") from None

    def points(self) -> list[dict[str, Any]]:
        """Every sweep point: index, label, status (pending/done/failed) and error."""
        names = {0: "pending", 1: "done", 2: "failed"}
        try:
            with h5py.File(self.path, "r") as f:
                group = f.get("sweep")
                if not isinstance(group, h5py.Group):
                    return []
                for column in ("label", "status", "error"):
                    _check_size(group[column], self.path)
                columns = (group["label"][()], group["status"][()], group["error"][()])
        except _FORMAT_ERRORS as e:
            raise NnrunError(f"cannot read the sweep points of {self.path}: {e}") from None
        return [
            {
                "index": i,
                "label": _plain(label),
                "status": names.get(int(s), "unknown"),
                "error": _plain(e),
            }
            for i, (label, s, e) in enumerate(zip(*columns))
        ]

    def failed_points(self) -> dict[str, str]:
        """Label -> error message of every point that failed (empty when none did)."""
        return {p["label"]: p["error"] for p in self.points() if p["status"] == "failed"}

    def prompts(self) -> dict[str, str]:
        """Every prompt of the run: id -> text, in run order (a sweep's first point)."""
        return self._texts("prompts")

    def generation(self) -> dict[str, str]:
        """Each prompt's generated text (empty when the run did not generate)."""
        return self._texts("generation")

    def prompt_meta(self) -> dict[str, list[Any]]:
        """Extra fields of a JSONL prompt file, one value per prompt (see /prompts/meta)."""
        out: dict[str, list[Any]] = {}
        with h5py.File(self.path, "r") as f:
            group = f.get("prompts/meta")
            for field, ds in (group or {}).items():
                _check_size(ds, self.path)
                values = [_plain(v) for v in ds[()]]
                if ds.attrs.get("encoding") == "json":
                    values = [json.loads(v) for v in values]
                out[field] = values
        return out

    def tokenizer(self) -> Any:
        """The run's tokenizer, loaded once from local files (never remote code)."""
        if getattr(self, "_tokenizer", None) is None:
            from nnrun.models._tokens import offline_tokenizer

            self._tokenizer = offline_tokenizer(self.attrs)
        return self._tokenizer

    def to_xarray(self, name: str, *, token_strings: bool = True) -> Any:
        """A save or metric as an `xarray.DataArray` with named dimensions and coordinates.

        A sweep's leading axes carry each variable's values as coordinates.
        Coordinates: prompt ids, layer numbers (and the real `site` of each), steps,
        token positions, and with `token_strings` each prompt's token at each position
        (`token_str`, from the file or decoded with the run's tokenizer, loaded locally).
        Needs the `analysis` extra: pip install 'nnrun[analysis]'.
        """
        from nnrun.store._xarray import to_xarray

        return to_xarray(self, name, token_strings=token_strings)

    def metrics_frame(self) -> Any:
        """Every metric as a pandas DataFrame, one row per sweep point and prompt.

        Columns: the sweep variables, `prompt`, then one column per metric.
        Needs the `analysis` extra: pip install 'nnrun[analysis]'.

        >>> nnrun.load("runs/activation-patching.h5").metrics_frame().head()  # doctest: +SKIP
           layer  pos   prompt  logit_diff
        0      0    0  corrupt   -4.78...
        """
        from nnrun.store._xarray import metrics_frame

        return metrics_frame(self)

    # -- pieces --------------------------------------------------------------

    def _texts(self, group_name: str) -> dict[str, str]:
        """prompt id -> the group's `text` column (NUL characters and all).

        A sweep records its prompts at every point; this is the first point's.
        """
        try:
            with h5py.File(self.path, "r") as f:
                group = f.get(group_name)
                if not isinstance(group, h5py.Group) or not _is_dataset(group, "text"):
                    return {}
                _check_size(group["text"], self.path)
                count = group["text"].shape[-1] if group["text"].ndim else 0
                texts = read_texts(group, "text")[:count]
                prompts = f.get("prompts")
                has_ids = isinstance(prompts, h5py.Group) and _is_dataset(prompts, "id")
                if has_ids:
                    _check_size(prompts["id"], self.path)
                ids = (
                    read_texts(prompts, "id")[:count]
                    if has_ids
                    else [str(i) for i in range(len(texts))]
                )
        except _FORMAT_ERRORS as e:
            raise NnrunError(f"cannot read /{group_name} of {self.path}: {e}") from None
        return dict(zip(ids, texts))

    def _check_name(self, group: str, name: str) -> None:
        names = self._names if group == "saves" else self.metric_names
        if name not in names:
            known = ", ".join(names) or "none"
            raise KeyError(f"no {group[:-1]} '{name}' in {self.path} ({group}: {known})")

    def _read(self, group: str, name: str) -> np.ndarray:
        """A save's padded view or a metric, whole; kept for the next read."""
        self._check_name(group, name)
        found = self._cache.get((group, name))
        if found is not None:
            return found
        try:
            with h5py.File(self.path, "r") as f:
                ds = f[group][name]
                values = padded_values(ds) if group == "saves" else ds[()]
        except _FORMAT_ERRORS as e:
            raise NnrunError(f"cannot read {group[:-1]} '{name}' of {self.path}: {e}") from None
        return self._cache.put((group, name), values)

    def _view_meta(self, name: str) -> tuple[tuple[int, ...], int, np.dtype]:
        """(padded shape, how many leading axes index rows, numpy dtype) of a save."""
        self._check_name("saves", name)
        try:
            with h5py.File(self.path, "r") as f:
                ds = f["saves"][name]
                axes = view_axes(ds)
                lead = axes.index("prompt") + 1 if "prompt" in axes else 0
                return view_shape(f, ds), lead, ds.dtype
        except (*_FORMAT_ERRORS, json.JSONDecodeError) as e:
            raise NnrunError(f"cannot read save '{name}' of {self.path}: {e}") from None

    def _rows(self, name: str, reads: tuple[slice, ...]) -> np.ndarray:
        """The padded view of the rows `reads` selects (a slice per leading axis)."""
        whole = self._cache.get(("saves", name))
        if whole is not None:
            return whole[reads]
        key = ("rows", name, tuple((r.start, r.stop) for r in reads))
        found = self._cache.get(key)
        if found is not None:
            return found
        try:
            with h5py.File(self.path, "r") as f:
                block = read_block(f, f["saves"][name], reads)
        except _FORMAT_ERRORS as e:
            raise NnrunError(f"cannot read save '{name}' of {self.path}: {e}") from None
        return self._cache.put(key, block)

    def _dataset(self, f: h5py.File, name: str) -> h5py.Dataset:
        for group, names in (("saves", self._names), ("metrics", self.metric_names)):
            if name in names:
                return f[group][name]
        known = ", ".join([*self._names, *self.metric_names]) or "none"
        raise KeyError(f"no save or metric '{name}' in {self.path} (known: {known})")

    def _axis(self, name: str, axis: str) -> Any:
        try:
            with h5py.File(self.path, "r") as f:
                ds = self._dataset(f, name)
                owner = _plain(ds.attrs.get("save", ds.attrs.get("metric", name)))
                group = f.get("axes")
                group = group.get(owner) if isinstance(group, h5py.Group) else None
                if not isinstance(group, h5py.Group) or not _is_dataset(group, axis):
                    return None
                _check_size(group[axis], self.path)
                return group[axis][()]
        except KeyError:
            raise
        except _FORMAT_ERRORS as e:
            raise NnrunError(f"cannot read the {axis} axis of '{name}': {e}") from None


def load(path: str | Path) -> Results:
    """Open an nnrun output file for reading."""
    return Results(path)


def _check_size(ds: h5py.Dataset, path: Path) -> None:
    size = int(np.prod(ds.shape)) if ds.shape is not None else 0
    if size > _MAX_LABELS:
        raise NnrunError(f"{ds.name} in {path} declares {size:,} entries; not read")


def _is_dataset(group: h5py.Group, name: str) -> bool:
    try:
        return isinstance(group.get(name), h5py.Dataset)
    except _FORMAT_ERRORS:  # a broken link, an unreadable object
        return False


def _read_attrs(attrs: Any) -> dict[str, Any]:
    """Attributes as plain values; one h5py cannot read becomes a note, not a failure."""
    out: dict[str, Any] = {}
    for key in list(attrs.keys()):
        try:
            out[key] = _plain(attrs[key])
        except _FORMAT_ERRORS as e:
            out[key] = f"<unreadable attribute: {type(e).__name__}>"
    return out


def _plain(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, np.generic):
        return value.item()
    return value
