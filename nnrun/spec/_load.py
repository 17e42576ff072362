"""load_spec: parse, apply overrides, substitute ${vars}, fill defaults."""

from __future__ import annotations

import copy
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ._constants import TOP_LEVEL_KEYS
from ._defaults import default_name, fill_defaults, normalise_prompts
from ._issues import SpecError, SpecIssue
from ._overrides import apply_overrides
from ._parse import dump_yaml, parse_json, parse_yaml
from ._sanitize import sanitize
from ._semantic import source_step_warnings
from ._substitute import referenced_names, substitute
from ._sweep import Sweep, SweepPoint, parse_sweep


@dataclass
class LoadedSpec:
    """A loaded spec.

    ``data`` is the resolved spec (overrides applied, ``${var}`` substituted, defaults
    filled in), ``text`` the same as YAML, ``source`` the file it came from, and ``lines``
    maps spec paths (``save.resid.tokens[0]``) to 1-based lines in that file.
    ``load_issues`` holds problems found while loading (undefined variables, ...) that
    :func:`validate_spec` reports; ``overridden`` maps paths set by ``-s`` to the override.

    A spec with ``sweep:`` is a template: in ``data`` and ``text`` the sweep variables
    are left as ``${name}``, and :meth:`points` gives each point's complete spec.
    ``warnings`` are problems that do not stop a run (a sweep variable used nowhere).
    """

    data: dict[str, Any]
    text: str
    source: Path | None
    lines: dict[str, int]
    load_issues: list[SpecIssue] = field(default_factory=list, repr=False)
    overridden: dict[str, str] = field(default_factory=dict, repr=False)
    raw: dict[str, Any] = field(default_factory=dict, repr=False)  # before substitution
    sweep: Sweep | None = None
    warnings: list[SpecIssue] = field(default_factory=list, repr=False)
    deferred: frozenset[str] = frozenset()  # the sweep's variable names
    _points: list[SweepPoint] | None = field(default=None, repr=False)

    def points(self) -> list[SweepPoint]:
        """Every point's complete spec (one point, index 0, for a spec without a sweep)."""
        if self._points is None:
            if self.sweep is None:
                self._points = [SweepPoint(0, (), {}, self.data)]
            else:
                stem = self.source.stem if self.source is not None else None
                self._points = [
                    SweepPoint(i, self.sweep.coords(i), values, _point_data(self.raw, values, stem))
                    for i, values in ((i, self.sweep.values(i)) for i in range(len(self.sweep)))
                ]
        return self._points


# Inline spec text rather than a file name: several lines, a JSON object, or `nnrun: ...`.
_LOOKS_LIKE_TEXT = re.compile(r"\s*(\{|nnrun\s*:)|.*\n", re.DOTALL)


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except (OSError, ValueError):  # a name too long for the OS, a NUL byte, ...
        return False


def _read(source: str | Path) -> tuple[Any, dict[str, int], Path | None]:
    if isinstance(source, str) and not _is_file(Path(source)) and _LOOKS_LIKE_TEXT.match(source):
        return (*parse_yaml(source, None), None)
    path = Path(source)
    shown = str(path)
    if not _is_file(path):
        problem = "is a directory, not a spec file" if os.path.isdir(path) else "not found"
        raise SpecError([SpecIssue("", f"spec file {problem}", None, shown)])
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise SpecError([SpecIssue("", f"not UTF-8 text ({exc.reason})", None, shown)]) from None
    except OSError as exc:
        raise SpecError([SpecIssue("", f"cannot read: {exc.strerror}", None, shown)]) from None
    if path.suffix.lower() == ".json":
        data, lines = parse_json(text, shown)
    else:  # .yaml, .yml and anything else: YAML (which also reads most JSON)
        data, lines = parse_yaml(text, shown)
    return data, lines, path


def _describe(value: Any) -> str:
    if value is None:
        return "nothing (the spec is empty)"
    if isinstance(value, list):
        return "a list"
    return f"{type(value).__name__} {value!r}"[:60]


def _drop_overridden_lines(lines: dict[str, int], overridden: Mapping[str, str]) -> None:
    # An overridden value is not what the file says at that line; pointing there misleads.
    for path in overridden:
        for key in [k for k in lines if k == path or k.startswith((path + ".", path + "["))]:
            del lines[key]


def _resolve(
    raw: dict[str, Any],
    stem: str | None,
    lines: dict[str, int],
    *,
    extra: dict[str, Any] | None = None,
    deferred: frozenset[str] = frozenset(),
) -> tuple[dict[str, Any], list[SpecIssue]]:
    """Substitute variables and fill defaults: the spec as it will run."""
    data, issues = substitute(
        copy.deepcopy(raw), default_name(stem), extra=extra, deferred=deferred
    )
    normalise_prompts(data, lines)
    fill_defaults(data, stem)
    # Canonical key order makes the stored spec text easy to read and to compare.
    order = {key: i for i, key in enumerate(TOP_LEVEL_KEYS)}
    return dict(sorted(data.items(), key=lambda kv: order.get(kv[0], len(order)))), issues


def _point_data(raw: dict[str, Any], values: dict[str, Any], stem: str | None) -> dict[str, Any]:
    """One sweep point's spec: running it alone gives that point's results."""
    point = {k: v for k, v in raw.items() if k not in ("sweep", "sweep_mode")}
    data, _ = _resolve(point, stem, {}, extra=values)
    declared = data.get("vars") if isinstance(data.get("vars"), dict) else {}
    data["vars"] = {**declared, **values}
    return data


def _unused_sweep_variables(
    raw: dict[str, Any], sweep: Sweep, shown: str | None
) -> list[SpecIssue]:
    used = referenced_names({k: v for k, v in raw.items() if k != "sweep"})
    return [
        SpecIssue(
            f"sweep.{name}",
            f"sweep variable {name!r} is used nowhere (no ${{{name}}} in the spec), "
            "so its points are all the same",
            None,
            shown,
        )
        for name in sweep.names
        if name not in used
    ]


def load_spec(source: str | Path | dict, overrides: Sequence[str] = ()) -> LoadedSpec:
    """Load a spec from a file path, inline YAML/JSON text or a dict.

    A ``str`` naming an existing file is read as a file (``.json`` as JSON, anything else
    as YAML); a ``str`` that is several lines, a JSON object or starts with ``nnrun:`` is
    parsed as text; a dict is deep-copied. Then ``overrides`` (``key.path=value``) are
    applied, ``${var}`` references substituted and defaults filled in.

    Raises SpecError only when the input cannot be parsed or an override is malformed;
    everything else is reported by :func:`validate_spec`.
    """
    if isinstance(source, dict):
        data: Any = source  # sanitize() below copies it
        lines: dict[str, int] = {}
        path: Path | None = None
    elif isinstance(source, str | Path):
        data, lines, path = _read(source)
    else:
        raise TypeError(f"load_spec takes a path, spec text or a dict, not {type(source).__name__}")
    shown = str(path) if path is not None else None
    if not isinstance(data, dict):
        raise SpecError(
            [
                SpecIssue(
                    "",
                    f"a spec must be a mapping of keys (nnrun: 1, prompts: ...), not {_describe(data)}",
                    None,
                    shown,
                )
            ]
        )

    # Twice: the copy must be safe to walk before overrides, and override values are data too.
    data, unsafe = sanitize(data)
    overridden = apply_overrides(data, overrides)
    _drop_overridden_lines(lines, overridden)
    data, unsafe_overrides = sanitize(data)
    unsafe += unsafe_overrides
    stem = path.stem if path is not None else None
    raw = copy.deepcopy(data)
    sweep, sweep_issues = parse_sweep(raw)
    # Sweep variables stay `${name}` in the template even when the sweep itself is broken,
    # so that its problems are reported once, at sweep:, not at every use.
    declared = raw.get("sweep")
    deferred = (
        frozenset(k for k in declared if isinstance(k, str))
        if isinstance(declared, dict)
        else frozenset()
    )
    data, issues = _resolve(raw, stem, lines, deferred=deferred)
    issues += [SpecIssue(p, m) for p, m in sweep_issues]
    issues = [replace(i, source=shown) for i in unsafe + issues]
    warnings = _unused_sweep_variables(raw, sweep, shown) if sweep is not None else []
    warnings += [SpecIssue(p, m, lines.get(p), shown) for p, m in source_step_warnings(data)]
    return LoadedSpec(
        data, dump_yaml(data), path, lines, issues, overridden, raw, sweep, warnings, deferred
    )
