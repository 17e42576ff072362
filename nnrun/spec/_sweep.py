"""Sweeps: variables whose values span a grid of points, each point a complete spec.

``sweep: {layer: {range: [0, 30]}, pos: [3, 4]}`` makes 60 points (the grid, row-major:
the last variable changes fastest); ``sweep_mode: zip`` pairs the i-th values instead.
Every ``${layer}`` in the spec takes the point's value. The sweep itself is plain data
here; the compiler decides which points share forward passes.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from ._constants import MAX_SWEEP_POINTS, SCALAR_VARIABLES
from ._messages import show
from ._paths import join_path

GRID, ZIP = "grid", "zip"


@dataclass(frozen=True)
class SweepAxis:
    """One sweep variable and its values, in order."""

    name: str
    values: tuple[Any, ...]


@dataclass(frozen=True)
class Sweep:
    """The sweep of a spec: its variables and how they combine into points."""

    axes: tuple[SweepAxis, ...]
    mode: str = GRID

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(a.name for a in self.axes)

    @property
    def shape(self) -> tuple[int, ...]:
        """The leading shape every output dataset gets (one axis per variable; zip: one)."""
        if self.mode == ZIP:
            return (len(self.axes[0].values),)
        return tuple(len(a.values) for a in self.axes)

    @property
    def dims(self) -> tuple[str, ...]:
        """Names of the leading axes: the variables, or `point` for a zip sweep."""
        return ("point",) if self.mode == ZIP else self.names

    def __len__(self) -> int:
        return math.prod(self.shape)

    def coords(self, index: int) -> tuple[int, ...]:
        """Position of flat point `index` along each leading axis (row-major)."""
        out = []
        for size in reversed(self.shape):
            index, i = divmod(index, size)
            out.append(i)
        return tuple(reversed(out))

    def values(self, index: int) -> dict[str, Any]:
        """Each variable's value at flat point `index`."""
        coords = self.coords(index)
        if self.mode == ZIP:
            return {a.name: a.values[coords[0]] for a in self.axes}
        return {a.name: a.values[i] for a, i in zip(self.axes, coords)}


def point_label(values: dict[str, Any]) -> str:
    """`layer=3, pos=2`: how messages and tables name a point."""
    return ", ".join(f"{k}={_text(v)}" for k, v in values.items())


def _text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


@dataclass(frozen=True)
class SweepPoint:
    """One point of a sweep: its values and the complete spec it stands for.

    `data` is what running this point alone would run: every `${var}` substituted,
    defaults filled, no `sweep:`; its `vars` record the point's values.
    """

    index: int  # flat, row-major over Sweep.shape
    coords: tuple[int, ...]
    values: dict[str, Any] = field(hash=False)
    data: dict[str, Any] = field(hash=False, repr=False)

    @property
    def label(self) -> str:
        return point_label(self.values)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def axis_values(spec: Any, path: str) -> tuple[tuple[Any, ...] | None, list[tuple[str, str]]]:
    """The values of one sweep variable, or None and the problems found.

    Lists are taken as written; `{range: [a, b(, step)]}` expands like Python's range.
    Wrong types are the schema's to report: they give None without an issue here.
    """
    if isinstance(spec, list):
        if not spec:
            return None, [(path, "the list of values is empty; give at least one value")]
        seen: set[tuple[str, Any]] = set()
        for value in spec:
            # Typed keys: 1, 1.0 and true are different values to a user.
            key = (
                type(value).__name__,
                value if isinstance(value, str | int | float) else id(value),
            )
            if key in seen:
                return None, [(path, f"lists {show(value)} more than once")]
            seen.add(key)
        return tuple(spec), []
    if isinstance(spec, dict) and isinstance(spec.get("range"), list):
        bounds = spec["range"]
        if not (2 <= len(bounds) <= 3) or not all(_is_int(b) for b in bounds):
            return None, []
        where = join_path(path, "range")
        if len(bounds) == 3 and bounds[2] == 0:
            return None, [(where, "the step of a range must not be 0")]
        span = range(*bounds)
        if len(span) == 0:
            stop = "stop is excluded" if bounds[0] == bounds[1] else "start must come before stop"
            return None, [(where, f"range {show(bounds)} is empty ({stop})")]
        if len(span) > MAX_SWEEP_POINTS:
            return None, [(where, f"range {show(bounds)} has {len(span):,} values; too many")]
        return tuple(span), []
    return None, []


def parse_sweep(data: dict[str, Any]) -> tuple[Sweep | None, list[tuple[str, str]]]:
    """The spec's sweep (None without one, or when it is malformed) and its problems."""
    spec = data.get("sweep")
    if spec is None or not isinstance(spec, dict) or not spec:
        return None, []
    mode = data.get("sweep_mode", GRID)
    issues: list[tuple[str, str]] = []
    axes: list[SweepAxis] = []
    declared = data.get("vars") if isinstance(data.get("vars"), dict) else {}
    for name, values in spec.items():
        path = join_path("sweep", name)
        if name in SCALAR_VARIABLES:
            issues.append(
                (path, f"{name!r} is a top-level key; sweep a variable instead ({name}: ${{x}})")
            )
            continue
        if name in declared:
            issues.append((path, f"variable {name!r} is also declared under vars: keep one"))
            continue
        found, problems = axis_values(values, path)
        issues += problems
        if found is not None:
            axes.append(SweepAxis(str(name), found))
    if issues or len(axes) != len(spec) or mode not in (GRID, ZIP):
        return None, issues
    if mode == ZIP:
        lengths = {a.name: len(a.values) for a in axes}
        if len(set(lengths.values())) > 1:
            shown = ", ".join(f"{k} has {n}" for k, n in lengths.items())
            return None, [
                (
                    "sweep",
                    f"sweep_mode zip pairs values, so all lists need the same length ({shown})",
                )
            ]
    sweep = Sweep(tuple(axes), mode)
    if len(sweep) > MAX_SWEEP_POINTS:
        return None, [
            (
                "sweep",
                f"the sweep has {len(sweep):,} points; at most {MAX_SWEEP_POINTS:,} are allowed",
            )
        ]
    return sweep, []


def sweep_points(sweep: Sweep) -> Iterator[tuple[int, tuple[int, ...], dict[str, Any]]]:
    """(flat index, coords, values) of every point, in row-major order."""
    for index in range(len(sweep)):
        yield index, sweep.coords(index), sweep.values(index)
