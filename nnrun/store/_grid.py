"""A sweep's results as a grid of numbers with labelled axes (for plots and tables).

A run without a sweep has a grid too when a save has layer, head or token axes (an
attribution-patching grid is layer x token).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import h5py
import numpy as np

from nnrun.errors import NnrunError
from nnrun.store._reader import Results, _plain

REDUCTIONS = ("norm", "mean", "sum", "max", "min")


@dataclass
class GridAxis:
    """One sweep variable as a plot axis: its name and a label per value."""

    name: str
    ticks: list[str]


@dataclass
class SweepGrid:
    """One number per sweep point (for one prompt): 1-D (x) or 2-D (y by x)."""

    name: str
    prompt: str
    title: str  # what one number is: "logit_diff", "norm of resid"
    x: GridAxis
    y: GridAxis | None
    values: np.ndarray  # (len(y.ticks), len(x.ticks)), or (len(x.ticks),) without y


def sweep_grid(
    results: Results, name: str, *, prompt: str | None = None, reduce: str = "norm"
) -> SweepGrid:
    """A metric, or a save reduced to one number per point, over one or two sweep axes.

    Without a sweep, a save is drawn over its own layer / head / token axes instead.

    A sweep variable used as a token position goes on the x axis, labelled with the
    tokens it selects (`3 ' Germany'`); the other variable (a layer, say) goes on y.
    `prompt` picks the row of a metric or save that has several prompts (default:
    the first); `reduce` (norm, mean, sum, max, min) turns a save's own axes into one
    number, NaN padding ignored.

    >>> grid = sweep_grid(nnrun.load("runs/activation-patching.h5"), "logit_diff")  # doctest: +SKIP
    >>> grid.y.name, grid.x.name, grid.values.shape                                 # doctest: +SKIP
    ('layer', 'pos', (30, 5))
    """
    if reduce not in REDUCTIONS:
        raise NnrunError(f"reduce must be one of {', '.join(REDUCTIONS)}, not {reduce!r}")
    is_metric = name in results.metric_names
    if not is_metric and name not in results:
        known = ", ".join([*results.metric_names, *results]) or "none"
        raise NnrunError(f"no metric or save '{name}' in {results.path} (known: {known})")
    coords = results.coords()
    with h5py.File(results.path, "r") as f:
        dims = json.loads(f["sweep"].attrs["dims"]) if "sweep" in f else []
        positions = {
            d: str(f["sweep"][d].attrs["tokens_of"])
            for d in dims
            if "sweep" in f and d in f["sweep"] and "tokens_of" in f["sweep"][d].attrs
        }
        tokens = _prompt_tokens(f)
        labels = [_plain(x) for x in f["sweep/label"][()]] if "sweep" in f else []
    if not dims:
        if is_metric:
            raise NnrunError(f"'{name}' has no sweep axis to plot: the run has no sweep")
        return _save_grid(results, name, prompt, reduce, tokens)
    if len(dims) > 2:
        raise NnrunError(
            f"'{name}' has {len(dims)} sweep axes ({', '.join(dims)}); a plot shows one or two"
        )
    values = results.metric(name) if is_metric else results.array(name)
    prompts = results.prompt_ids(name)
    if prompt is None:
        prompt = prompts[0]
    elif prompt not in prompts:
        raise NnrunError(f"'{name}' has no prompt '{prompt}' (its prompts: {', '.join(prompts)})")
    values = np.take(values, prompts.index(prompt), axis=len(dims))  # (sweep..., own...)
    title = name
    if values.ndim > len(dims):
        own = tuple(range(len(dims), values.ndim))
        values = _reduce(values.astype(np.float64), own, reduce)
        title = f"{reduce} of {name}"

    def axis(dim: str) -> GridAxis:
        if dim == "point":
            return GridAxis("point", labels)
        ticks = [str(v) for v in coords[dim]]
        source = positions.get(dim)
        if source is not None and source in tokens:
            row = tokens[source]
            ticks = [
                f"{v} {row[int(v)]!r}" if _is_index(v, len(row)) else str(v) for v in coords[dim]
            ]
        return GridAxis(dim, ticks)

    if len(dims) == 1:
        return SweepGrid(name, prompt, title, axis(dims[0]), None, values)
    # Positions read left to right: put a position variable on x.
    y_dim, x_dim = dims
    if y_dim in positions and x_dim not in positions:
        y_dim, x_dim = x_dim, y_dim
        values = values.T
    return SweepGrid(name, prompt, title, axis(x_dim), axis(y_dim), values)


# Without a sweep, a save is drawn over these of its leading axes (y first, x last).
_SAVE_AXES = ("layer", "head", "token")


def _save_grid(
    results: Results, name: str, prompt: str | None, reduce: str, tokens: dict[str, list[str]]
) -> SweepGrid:
    """A save of a run without a sweep over its layer / head / token axes, for one prompt.

    An attribution-patching grid (prompt, layer, token) is a layer x token heatmap with
    the token axis labelled by the prompt's own tokens; other own axes are reduced.
    """
    from nnrun.store._xarray import layer_numbers

    axes = results.axes(name)
    shown = [a for a in _SAVE_AXES if a in axes]
    if not shown or "step" in axes:
        raise NnrunError(
            f"'{name}' has no sweep axis to plot, and no layer, head or token axis of its own "
            f"to draw instead (axes: {', '.join(axes)})"
        )
    if len(shown) > 2:
        raise NnrunError(
            f"'{name}' has {', '.join(shown)} axes; a plot shows two (save fewer layers, "
            "heads or tokens)"
        )
    prompts = results.prompt_ids(name)
    prompt = prompt or prompts[0]
    if prompt not in prompts:
        raise NnrunError(f"'{name}' has no prompt '{prompt}' (its prompts: {', '.join(prompts)})")
    row = prompts.index(prompt)
    values = np.asarray(results.array(name)[row], dtype=np.float64)  # (axes after prompt...)
    own = axes[1:]
    lengths = results.lengths(name)
    if lengths is not None and "token" in own:  # ragged tokens: this prompt's own only
        values = np.take(values, range(int(lengths[row])), axis=own.index("token"))
    title = name
    extra = tuple(i for i, a in enumerate(own) if a not in shown)
    if extra:
        values = _reduce(values, extra, reduce)
        title = f"{reduce} of {name}"
    owner = name.split(".")[0]

    def axis(dim: str, size: int) -> GridAxis:
        labels = results.labels(owner, dim)
        if dim == "layer":
            labels = layer_numbers([str(x) for x in labels or []]) or labels
        if dim == "token":
            row_tokens = tokens.get(prompt, [])
            labels = labels if labels is not None else list(range(size))
            labels = [
                f"{p} {row_tokens[int(p)]!r}" if _is_index(p, len(row_tokens)) else str(p)
                for p in labels
            ]
        return GridAxis(dim, [str(x) for x in (labels or range(size))][:size])

    if len(shown) == 1:
        return SweepGrid(name, prompt, title, axis(shown[0], values.shape[0]), None, values)
    y_dim, x_dim = shown  # in _SAVE_AXES order: tokens read left to right
    return SweepGrid(
        name, prompt, title, axis(x_dim, values.shape[1]), axis(y_dim, values.shape[0]), values
    )


def _reduce(values: np.ndarray, axes: tuple[int, ...], how: str) -> np.ndarray:
    with np.errstate(all="ignore"):
        if how == "norm":
            return np.sqrt(np.nansum(values**2, axis=axes))
        return {"mean": np.nanmean, "sum": np.nansum, "max": np.nanmax, "min": np.nanmin}[how](
            values, axis=axes
        )


def _is_index(value: Any, length: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and -length <= value < length


def _prompt_tokens(f: h5py.File) -> dict[str, list[str]]:
    """Each prompt's tokens as text (the first sweep point's), if the file has them."""
    if "prompts/tokens" not in f:
        return {}
    ids, tokens, lengths = f["prompts/id"][()], f["prompts/tokens"][()], f["prompts/length"][()]
    while ids.ndim > 1:  # a sweep: prompts are recorded per point
        ids, tokens, lengths = ids[0], tokens[0], lengths[0]
    return {_plain(i): [_plain(t) for t in row[:n]] for i, row, n in zip(ids, tokens, lengths)}
