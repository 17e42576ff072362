"""Read an nnrun output file back: saves as arrays or tensors, with their axes."""

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


class Results(Mapping[str, Any]):
    """The saves of one output file, read on access.

    `results["resid"]` is a torch tensor; `results.array("resid")` a numpy
    array; `results.axes("resid")` names its axes; `results.prompt_ids("resid")`
    says which prompt each row holds.

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
                saves = f.get("saves")
                if saves is not None and not isinstance(saves, h5py.Group):
                    raise NnrunError(
                        f"'{self.path}' is not an nnrun output file: /saves is not a group"
                    )
                # A member that is not a dataset (a group, a broken link) is no save.
                self._names = [] if saves is None else [n for n in saves if _is_dataset(saves, n)]
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
        self._check(name)
        with h5py.File(self.path, "r") as f:
            return f["saves"][name][()]

    def axes(self, name: str) -> list[str]:
        """The names of the save's axes, from its `axes` attribute."""
        self._check(name)
        with h5py.File(self.path, "r") as f:
            try:
                axes = json.loads(_plain(f["saves"][name].attrs["axes"]))
            except (*_FORMAT_ERRORS, json.JSONDecodeError):
                axes = None
        if not isinstance(axes, list) or not all(isinstance(a, str) for a in axes):
            raise NnrunError(
                f"save '{name}' in {self.path} has no valid 'axes' attribute (a JSON list of names)"
            )
        return axes

    def prompt_ids(self, name: str) -> list[str]:
        values = self._axis(name, "prompt")
        return [] if values is None else [_plain(v) for v in np.atleast_1d(values)]

    def lengths(self, name: str) -> np.ndarray | None:
        """Real tokens per row for a ragged token axis, else None."""
        values = self._axis(name, "length")
        return None if values is None else np.asarray(values)

    def prompts(self) -> dict[str, str]:
        """Every prompt of the run: id -> text, in run order."""
        return self._texts("prompts")

    def generation(self) -> dict[str, str]:
        """Each prompt's generated text (empty when the run did not generate)."""
        return self._texts("generation")

    def _texts(self, group_name: str) -> dict[str, str]:
        """prompt id -> the group's `text` column (NUL characters and all)."""
        try:
            with h5py.File(self.path, "r") as f:
                group = f.get(group_name)
                if not isinstance(group, h5py.Group) or not _is_dataset(group, "text"):
                    return {}
                _check_size(group["text"], self.path)
                texts = read_texts(group, "text")
                prompts = f.get("prompts")
                has_ids = isinstance(prompts, h5py.Group) and _is_dataset(prompts, "id")
                if has_ids:
                    _check_size(prompts["id"], self.path)
                ids = read_texts(prompts, "id") if has_ids else [str(i) for i in range(len(texts))]
        except _FORMAT_ERRORS as e:
            raise NnrunError(f"cannot read /{group_name} of {self.path}: {e}") from None
        return dict(zip(ids, texts))

    def _axis(self, name: str, axis: str) -> Any:
        self._check(name)
        try:
            with h5py.File(self.path, "r") as f:
                group = f.get("axes")
                save = _plain(f["saves"][name].attrs.get("save", name))
                group = group.get(save) if isinstance(group, h5py.Group) else None
                if not isinstance(group, h5py.Group) or not _is_dataset(group, axis):
                    return None
                _check_size(group[axis], self.path)
                return group[axis][()]
        except _FORMAT_ERRORS as e:
            raise NnrunError(f"cannot read the {axis} axis of save '{name}': {e}") from None

    def _check(self, name: str) -> None:
        if name not in self._names:
            known = ", ".join(self._names) or "none"
            raise KeyError(f"no save '{name}' in {self.path} (saves: {known})")


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
