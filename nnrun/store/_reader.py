"""Read an nnrun output file back: saves as arrays or tensors, with their axes."""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from nnrun.errors import NnrunError


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
        if not self.path.is_file():
            raise NnrunError(f"no such output file '{self.path}'")
        try:
            with h5py.File(self.path, "r") as f:
                self.attrs: dict[str, Any] = {k: _plain(v) for k, v in f.attrs.items()}
                self._names = list(f["saves"].keys()) if "saves" in f else []
        except OSError as e:
            raise NnrunError(f"cannot read '{self.path}' as an HDF5 file: {e}") from None

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
        self._check(name)
        with h5py.File(self.path, "r") as f:
            return json.loads(f["saves"][name].attrs["axes"])

    def prompt_ids(self, name: str) -> list[str]:
        return [_plain(v) for v in self._axis(name, "prompt")]

    def labels(self, name: str, axis: str) -> list[Any] | None:
        """The labels of one axis of a save (`layer` -> site names), as str / int; None if
        the axis has none."""
        values = self._axis(name, axis)
        return None if values is None else [_plain(v) for v in values]

    def prompt_meta(self) -> dict[str, list[Any]]:
        """Extra fields of a JSONL prompt file, one value per prompt (see /prompts/meta)."""
        out: dict[str, list[Any]] = {}
        with h5py.File(self.path, "r") as f:
            group = f.get("prompts/meta")
            for field, ds in (group or {}).items():
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
        """The save as an `xarray.DataArray` with named dimensions and coordinates.

        Coordinates: prompt ids, layer numbers (and the real `site` of each), steps,
        token positions, and with `token_strings` each prompt's token at each position
        (`token_str`, decoded with the run's tokenizer when it can be loaded locally).
        Needs the `analysis` extra: pip install 'nnrun[analysis]'.
        """
        from nnrun.store._xarray import to_xarray

        return to_xarray(self, name, token_strings=token_strings)

    def lengths(self, name: str) -> np.ndarray | None:
        """Real tokens per row for a ragged token axis, else None."""
        values = self._axis(name, "length")
        return None if values is None else np.asarray(values)

    def prompts(self) -> dict[str, str]:
        """Every prompt of the run: id -> text, in run order."""
        with h5py.File(self.path, "r") as f:
            ids = [_plain(v) for v in f["prompts/id"][()]]
            texts = [_plain(v) for v in f["prompts/text"][()]]
        return dict(zip(ids, texts))

    def generation(self) -> dict[str, str]:
        """Each prompt's generated text (empty when the run did not generate)."""
        with h5py.File(self.path, "r") as f:
            if "generation" not in f:
                return {}
            ids = [_plain(v) for v in f["prompts/id"][()]]
            texts = [_plain(v) for v in f["generation/text"][()]]
        return dict(zip(ids, texts))

    def _axis(self, name: str, axis: str) -> Any:
        self._check(name)
        with h5py.File(self.path, "r") as f:
            group = f["axes"].get(f["saves"][name].attrs.get("save", name))
            return None if group is None or axis not in group else group[axis][()]

    def _check(self, name: str) -> None:
        if name not in self._names:
            known = ", ".join(self._names) or "none"
            raise KeyError(f"no save '{name}' in {self.path} (saves: {known})")


def load(path: str | Path) -> Results:
    """Open an nnrun output file for reading."""
    return Results(path)


def _plain(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.generic):
        return value.item()
    return value
