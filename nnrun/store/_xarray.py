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
    group = "metrics" if name in results.metric_names else "saves"
    data = results.metric(name) if group == "metrics" else results.array(name)
    axes = results.axes(name)
    with h5py.File(results.path, "r") as f:
        attrs = {k: _text(v) for k, v in f[group][name].attrs.items() if k != "DIMENSION_LIST"}
        attrs.pop("DIMENSION_LABELS", None)
        prompts = _prompt_rows(f)
        file_tokens = _file_tokens(f)
    owner = str(attrs.get("save", attrs.get("metric", name)))
    coords: dict[str, Any] = _sweep_coords(results)
    lead = [d for d in coords if d in axes]
    for i, axis in enumerate(axes):
        if axis in coords:
            continue
        labels = results.labels(owner, axis)
        if labels is None or len(labels) != data.shape[i]:
            continue
        if axis == "layer":
            coords["layer"] = layer_numbers(labels) or list(range(len(labels)))
            coords["site"] = ("layer", labels)
        else:
            coords[axis] = labels
    lengths = results.lengths(owner)
    if lengths is not None:
        dims = tuple([*lead, "prompt", "step"][: lengths.ndim])
        if all(lengths.shape[i] == data.shape[axes.index(d)] for i, d in enumerate(dims)):
            coords["length"] = (dims, lengths)
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
                strings = _token_strings(results, positions, coords["prompt"], prompts, file_tokens)
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


def _sweep_coords(results: Any) -> dict[str, Any]:
    """Coordinates of the sweep axes: each variable's values (zip: all along `point`)."""
    with h5py.File(results.path, "r") as f:
        if "sweep" not in f:
            return {}
        dims = json.loads(f["sweep"].attrs["dims"])
    values = results.coords()
    if dims == ["point"]:
        n = len(next(iter(values.values())))
        return {"point": list(range(n)), **{k: ("point", v) for k, v in values.items()}}
    return dict(values)


def _first_point(values: np.ndarray, ndim: int) -> np.ndarray:
    """A /prompts dataset at a sweep's first point (prompts are the same at every point)."""
    while values.ndim > ndim:
        values = values[0]
    return values


def _prompt_rows(f: h5py.File) -> dict[str, tuple[int, list[int]]]:
    """prompt id -> (its token count, its token ids)."""
    if "prompts" not in f:
        return {}
    ids = [_text(v) for v in _first_point(f["prompts/id"][()], 1)]
    lengths = _first_point(f["prompts/length"][()], 1)
    tokens = _first_point(f["prompts/input_ids"][()], 2)
    return {p: (int(n), tokens[i, : int(n)].tolist()) for i, (p, n) in enumerate(zip(ids, lengths))}


def _file_tokens(f: h5py.File) -> dict[str, list[str]] | None:
    """prompt id -> its tokens as text, when the run stored them (/prompts/tokens)."""
    if "prompts/tokens" not in f:
        return None
    ids = [_text(v) for v in _first_point(f["prompts/id"][()], 1)]
    tokens = _first_point(f["prompts/tokens"][()], 2)
    return {p: [_text(t) for t in row] for p, row in zip(ids, tokens)}


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
    results: Any,
    positions: np.ndarray,
    prompt_ids: list[str],
    prompts: dict,
    file_tokens: dict[str, list[str]] | None = None,
) -> np.ndarray | None:
    from nnrun.models._tokens import token_strings

    if file_tokens is not None:  # the run stored each token's text: no tokenizer needed
        out = np.full(positions.shape, "", dtype=object)
        for row, prompt in enumerate(prompt_ids):
            texts = file_tokens.get(prompt, [])
            for k, p in enumerate(positions[row]):
                if 0 <= p < len(texts):
                    out[row, k] = texts[p]
        return out
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


def metrics_frame(results: Any) -> Any:
    """Every metric as a pandas DataFrame: one row per sweep point and prompt.

    Columns: the sweep variables (none without a sweep), `prompt`, then one column per
    metric (NaN where a metric does not cover that prompt, or its point failed).
    """
    try:
        import pandas as pd
    except ImportError:
        raise NnrunError(
            "metrics_frame needs pandas: pip install 'nnrun[analysis]' (xarray, pandas, h5netcdf)"
        ) from None
    coords = results.coords()
    frames = []
    for name in results.metric_names:
        array = to_xarray(results, name, token_strings=False)
        frame = array.to_dataframe(name=name).reset_index()
        keep = [c for c in frame.columns if c in coords or c in ("point", "prompt", name)]
        frames.append(frame[keep])
    if not frames:
        return pd.DataFrame()
    keys = [c for c in frames[0].columns if c in coords or c in ("point", "prompt")]
    merged = frames[0]
    for frame in frames[1:]:
        merged = merged.merge(frame, on=keys, how="outer")
    return merged.sort_values(keys, kind="stable").reset_index(drop=True)
