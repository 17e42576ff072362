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
        if not self.path.is_file():
            raise NnrunError(f"no such output file '{self.path}'")
        try:
            with h5py.File(self.path, "r") as f:
                self.attrs: dict[str, Any] = {k: _plain(v) for k, v in f.attrs.items()}
                self._names = list(f["saves"].keys()) if "saves" in f else []
                self.metric_names = list(f["metrics"].keys()) if "metrics" in f else []
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
        return self._read("saves", name)

    def metric(self, name: str) -> np.ndarray:
        """A metric's values: axes (sweep variables..., prompt); NaN where a point failed."""
        return self._read("metrics", name)

    def axes(self, name: str) -> list[str]:
        """The axis names of a save or metric, outermost first."""
        with h5py.File(self.path, "r") as f:
            return json.loads(self._dataset(f, name).attrs["axes"])

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
        """A save or metric as an `xarray.DataArray` with named dimensions and coordinates.

        A sweep's leading axes carry each variable's values as coordinates.

        Coordinates: prompt ids, layer numbers (and the real `site` of each), steps,
        token positions, and with `token_strings` each prompt's token at each position
        (`token_str`, decoded with the run's tokenizer when it can be loaded locally).
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
        with h5py.File(self.path, "r") as f:
            if "sweep" not in f:
                return {}
            group = f["sweep"]
            names = json.loads(group.attrs["variables"])
            return {v: [_plain(x) for x in group[v][()]] for v in names}

    def points(self) -> list[dict[str, Any]]:
        """Every sweep point: index, label, status (pending/done/failed) and error."""
        with h5py.File(self.path, "r") as f:
            if "sweep" not in f:
                return []
            group = f["sweep"]
            names = {0: "pending", 1: "done", 2: "failed"}
            return [
                {"index": i, "label": _plain(label), "status": names[int(s)], "error": _plain(e)}
                for i, (label, s, e) in enumerate(
                    zip(group["label"][()], group["status"][()], group["error"][()])
                )
            ]

    def failed_points(self) -> dict[str, str]:
        """Label -> error message of every point that failed (empty when none did)."""
        return {p["label"]: p["error"] for p in self.points() if p["status"] == "failed"}

    def prompts(self) -> dict[str, str]:
        """Every prompt of the run: id -> text, in run order (a sweep's first point)."""
        with h5py.File(self.path, "r") as f:
            ids = _first_point(f["prompts/id"])
            texts = _first_point(f["prompts/text"])
        return dict(zip(ids, texts))

    def generation(self) -> dict[str, str]:
        """Each prompt's generated text (empty when the run did not generate)."""
        with h5py.File(self.path, "r") as f:
            if "generation" not in f:
                return {}
            ids = _first_point(f["prompts/id"])
            texts = _first_point(f["generation/text"])
        return dict(zip(ids, texts))

    def _read(self, group: str, name: str) -> np.ndarray:
        with h5py.File(self.path, "r") as f:
            if group not in f or name not in f[group]:
                known = ", ".join(f[group].keys()) if group in f else "none"
                raise KeyError(f"no {group[:-1]} '{name}' in {self.path} ({group}: {known})")
            return f[group][name][()]

    def _dataset(self, f: h5py.File, name: str) -> h5py.Dataset:
        for group in ("saves", "metrics"):
            if group in f and name in f[group]:
                return f[group][name]
        known = ", ".join([*self._names, *self.metric_names]) or "none"
        raise KeyError(f"no save or metric '{name}' in {self.path} (known: {known})")

    def _axis(self, name: str, axis: str) -> Any:
        with h5py.File(self.path, "r") as f:
            ds = self._dataset(f, name)
            key = ds.attrs.get("save", ds.attrs.get("metric", name))
            group = f["axes"].get(key) if "axes" in f else None
            return None if group is None or axis not in group else group[axis][()]


def load(path: str | Path) -> Results:
    """Open an nnrun output file for reading."""
    return Results(path)


def _first_point(ds: h5py.Dataset) -> list[Any]:
    """A /prompts column as a list; for a sweep, the first point's (prompts rarely vary)."""
    values = ds[()]
    while values.ndim > 1:
        values = values[0]
    return [_plain(v) for v in values]


def _plain(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.generic):
        return value.item()
    return value
