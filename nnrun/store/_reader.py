"""Read an nnrun output file back: saves and metrics as arrays or tensors, with their axes.

Files may come from elsewhere (a published output, a crafted one): every read is
guarded, sizes are checked before anything is read whole, and nothing stored in
the file is ever executed or used to load code.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from nnrun.errors import NnrunError
from nnrun.store._text import read_texts

# What h5py raises on files it can open but not make sense of (crafted or damaged ones).
_FORMAT_ERRORS = (OSError, RuntimeError, KeyError, ValueError, TypeError, AttributeError)
# Labels and texts are read whole; a file from elsewhere may declare any number of them.
_MAX_LABELS = 1 << 24
_GROUPS = ("saves", "metrics")


class Results(Mapping[str, Any]):
    """The saves and metrics of one output file, read on access.

    `results["resid"]` is a torch tensor; `results.array("resid")` a numpy
    array; `results.axes("resid")` names its axes; `results.prompt_ids("resid")`
    says which prompt each row holds. Metrics: `results.metric("p_paris")` (numpy),
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
        except OSError as e:
            raise NnrunError(f"cannot read '{self.path}' as an HDF5 file: {e}") from None
        except _FORMAT_ERRORS as e:
            raise NnrunError(f"cannot read '{self.path}': {e}") from None

    @property
    def status(self) -> str:
        return str(self.attrs.get("status", "unknown"))

    def __getitem__(self, name: str) -> Any:
        import torch

        return torch.from_numpy(self.array(name))

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)

    def array(self, name: str) -> np.ndarray:
        """The save's values as a numpy array (ragged tokens padded with NaN / -1)."""
        return self._read("saves", name)

    def metric(self, name: str) -> np.ndarray:
        """A metric's values: axes (sweep variables..., prompt); NaN where a point failed."""
        return self._read("metrics", name)

    def axes(self, name: str) -> list[str]:
        """The axis names of a save or metric, outermost first (its `axes` attribute)."""
        with h5py.File(self.path, "r") as f:
            ds = self._dataset(f, name)
            try:
                axes = json.loads(_plain(ds.attrs["axes"]))
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

    def _read(self, group: str, name: str) -> np.ndarray:
        names = self._names if group == "saves" else self.metric_names
        if name not in names:
            known = ", ".join(names) or "none"
            raise KeyError(f"no {group[:-1]} '{name}' in {self.path} ({group}: {known})")
        try:
            with h5py.File(self.path, "r") as f:
                return f[group][name][()]
        except _FORMAT_ERRORS as e:
            raise NnrunError(f"cannot read {group[:-1]} '{name}' of {self.path}: {e}") from None

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
