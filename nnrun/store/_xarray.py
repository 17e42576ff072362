"""Results.to_xarray: one save as an xarray.DataArray with named dimensions and labels.

xarray is an optional dependency (`pip install 'nnrun[analysis]'`), imported here only.
Coordinates come from the file: /axes/<save>/<axis> labels every axis that has them
(prompt ids, layer sites, steps, listed token positions, and any axis a later format
adds there, such as sweep variables); layer sites also give layer numbers; token
positions are resolved per prompt from /prompts, and decoded into `token_str` with
the run's tokenizer when asked and loadable.
"""

from __future__ import annotations

import json
import re
from typing import Any

import h5py
import numpy as np

from nnrun.errors import NnrunError


def to_xarray(results: Any, name: str, *, token_strings: bool = True) -> Any:
    """See `Results.to_xarray`."""
    try:
        import xarray as xr
    except ImportError:
        raise NnrunError(
            "to_xarray needs xarray: pip install 'nnrun[analysis]' (xarray, pandas, h5netcdf)"
        ) from None
    data = results.array(name)
    axes = results.axes(name)
    with h5py.File(results.path, "r") as f:
        attrs = {k: _text(v) for k, v in f["saves"][name].attrs.items() if k != "DIMENSION_LIST"}
        attrs.pop("DIMENSION_LABELS", None)
        prompts = _prompt_rows(f)
    owner = str(attrs.get("save", name))
    coords: dict[str, Any] = {}
    for i, axis in enumerate(axes):
        labels = results.labels(owner, axis)
        if labels is None or len(labels) != data.shape[i]:
            continue
        if axis == "layer":
            coords["layer"] = layer_numbers(labels) or list(range(len(labels)))
            coords["site"] = ("layer", labels)
        else:
            coords[axis] = labels
    lengths = results.lengths(owner)
    if lengths is not None and len(lengths) == data.shape[0]:
        coords["length"] = (("prompt", "step")[: lengths.ndim], lengths)
    if "token" in axes and "prompt" in axes and "step" not in axes:
        token_axis = axes.index("token")
        positions = _positions(
            str(attrs.get("tokens", "all")),
            [prompts.get(p, (0, []))[0] for p in coords.get("prompt", [])],
            data.shape[token_axis],
        )
        if positions is not None:
            if "token" not in coords:
                coords["token"] = list(range(data.shape[token_axis]))
            coords["position"] = (("prompt", "token"), positions)
            if token_strings:
                strings = _token_strings(results, positions, coords["prompt"], prompts)
                if strings is not None:
                    coords["token_str"] = (("prompt", "token"), strings)
    return xr.DataArray(data, dims=axes, coords=coords, name=name, attrs=attrs)


def layer_numbers(sites: list[str]) -> list[int] | None:
    """The layer index in each site label (`model.layers.3.output` -> 3), when the labels
    differ in exactly one dotted part and that part is a number."""
    parts = [re.split(r"[.\[\]]+", s) for s in sites]
    if len(sites) < 2 or len({len(p) for p in parts}) != 1:
        return None
    differ = [i for i in range(len(parts[0])) if len({p[i] for p in parts}) > 1]
    if len(differ) != 1 or not all(p[differ[0]].isdigit() for p in parts):
        return None
    return [int(p[differ[0]]) for p in parts]


def _prompt_rows(f: h5py.File) -> dict[str, tuple[int, list[int]]]:
    """prompt id -> (its token count, its token ids)."""
    if "prompts" not in f:
        return {}
    ids = [_text(v) for v in f["prompts/id"][()]]
    lengths = f["prompts/length"][()]
    tokens = f["prompts/input_ids"][()]
    return {p: (int(n), tokens[i, : int(n)].tolist()) for i, (p, n) in enumerate(zip(ids, lengths))}


def _positions(selection: str, lengths: list[int], width: int) -> np.ndarray | None:
    """(prompt, token) positions in each prompt's own tokens; -1 where a row is padded.

    None for selections whose positions depend on the text (`find`).
    """
    out = np.full((len(lengths), width), -1, dtype=np.int64)
    for row, n in enumerate(lengths):
        if selection == "all":
            own = list(range(n))
        elif selection.startswith("{"):
            return None
        elif ":" in selection:
            start, stop = (int(x) if x else None for x in selection.split(":"))
            own = list(range(*slice(start, stop).indices(n)))
        else:
            listed = json.loads(selection) if selection.startswith("[") else [int(selection)]
            own = [p + n if p < 0 else p for p in listed]
        own = own[:width]
        out[row, : len(own)] = own
    return out


def _token_strings(
    results: Any, positions: np.ndarray, prompt_ids: list[str], prompts: dict
) -> np.ndarray | None:
    from nnrun.models._tokens import token_strings

    try:
        tokenizer = results.tokenizer()
    except NnrunError:
        return None  # the model's files are gone: the coordinate is left out
    out = np.full(positions.shape, "", dtype=object)
    for row, prompt in enumerate(prompt_ids):
        ids = prompts.get(prompt, (0, []))[1]
        wanted = [(k, ids[p]) for k, p in enumerate(positions[row]) if 0 <= p < len(ids)]
        for (k, _), text in zip(wanted, token_strings(tokenizer, [i for _, i in wanted])):
            out[row, k] = text
    return out


def _text(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.generic):
        return value.item()
    return value
