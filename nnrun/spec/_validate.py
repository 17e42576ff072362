"""validate_spec and check_spec: every problem in a spec, each with its path and line."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ._issues import SpecError, SpecIssue
from ._load import LoadedSpec, load_spec
from ._paths import format_path, join_path, parse_path
from ._sanitize import UnsafeValue
from ._schema import section_validator, validator
from ._schema_errors import convert
from ._semantic import semantic_issues
from ._substitute import referenced_names
from ._sweep import point_label


def _string_keys(value: Any, path: str, out: list[tuple[str, str]]) -> Any:
    """A copy with every mapping key a string (a dict passed by a caller may have others;
    jsonschema cannot match patterns against them)."""
    if isinstance(value, dict):
        copy = {}
        for key, item in value.items():
            child = join_path(path, str(key))
            if not isinstance(key, str):
                out.append((child, f"key {key!r} must be a string"))
            copy[str(key)] = _string_keys(item, child, out)
        return copy
    if isinstance(value, list):
        return [_string_keys(item, join_path(path, i), out) for i, item in enumerate(value)]
    return value


def _parent(path: str) -> str | None:
    if not path:
        return None
    try:
        return format_path(parse_path(path)[:-1])
    except ValueError:
        return ""


def _line(path: str, lines: dict[str, int]) -> int | None:
    # The nearest enclosing key with a line: a missing key is reported at its parent.
    current: str | None = path
    while current is not None:
        if current in lines:
            return lines[current]
        current = _parent(current)
    return None


def _override_for(path: str, overridden: dict[str, str]) -> str | None:
    for target, override in overridden.items():
        if path == target or path.startswith((target + ".", target + "[")):
            return override
    return None


def _data_issues(
    data: dict[str, Any], skip: set[str], section: str | None = None
) -> list[tuple[str, str]]:
    """Schema and semantic problems of one resolved spec (paths in ``skip`` excluded).

    With ``section`` (a top-level key), the schema checks only that section: the rest
    is known to be the same as a document already checked whole.
    """
    found: list[tuple[str, str]] = []
    data = _string_keys(data, "", found)
    schema: list[tuple[str, str]] = []
    if section is None:
        errors = validator().iter_errors(data)
    else:
        errors = section_validator().iter_errors({section: data[section]})
    for error in errors:
        schema += convert(error)
    # A value that still holds an undefined ${var} fails the schema too; report the cause only.
    schema = [(p, m) for p, m in schema if p not in skip]
    covered = {p for p, _ in schema} | skip
    semantic = [(p, m) for p, m in semantic_issues(data, covered) if p not in skip]
    return found + schema + semantic


def _related(path: str, leaf: str) -> bool:
    """Whether an issue at ``path`` is about the value at ``leaf`` (or inside or above it)."""
    if path == leaf:
        return True
    inner, outer = (path, leaf) if len(path) > len(leaf) else (leaf, path)
    return inner.startswith(outer) and inner[len(outer)] in ".[" if outer else True


def _varying_leaves(value: Any, names: frozenset[str], path: str = "") -> dict[str, set[str]]:
    """Paths of the template's strings that use sweep variables -> the variables used."""
    out: dict[str, set[str]] = {}
    if isinstance(value, str):
        used = referenced_names(value) & names
        if used:
            out[path] = used
    elif isinstance(value, dict):
        for key, item in value.items():
            out.update(_varying_leaves(item, names, join_path(path, str(key))))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            out.update(_varying_leaves(item, names, join_path(path, i)))
    return out


def _get(data: Any, path: str) -> Any:
    for part in parse_path(path):
        data = data[part]
    return data


def _with(data: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    """A copy of ``data`` with ``value`` at ``path``; only the containers on the path
    are copied (the rest is shared, and never modified)."""
    parts = parse_path(path)
    copy = dict(data)
    target: Any = copy
    for part in parts[:-1]:
        inner = target[part]
        inner = dict(inner) if isinstance(inner, dict) else list(inner)
        target[part] = inner
        target = inner
    target[parts[-1]] = value
    return copy


_MAX_LABELS = 3


def _sweep_issues(spec: LoadedSpec, skip: set[str]) -> list[tuple[str, str]]:
    """Problems of every sweep point, each checked once per distinct value.

    Points differ only where the template uses a sweep variable. The first point is
    checked whole; then each such place is checked once for each value it takes, in the
    first point's context, and its problems are labelled with the points that have that
    value (``layer=31: ...``).
    """
    assert spec.sweep is not None
    points = spec.points()
    base = points[0].data
    leaves = _varying_leaves(spec.data, spec.deferred)
    base_issues = _data_issues(base, skip)
    found = [(p, m) for p, m in base_issues if not any(_related(p, leaf) for leaf in leaves)]
    for leaf, names in leaves.items():
        if leaf in ("name", "output"):
            continue  # one file per sweep: reported once by validate_spec
        by_value: dict[str, list[str]] = {}
        values: dict[str, Any] = {}
        for point in points:
            try:
                value = _get(point.data, leaf)
            except (KeyError, IndexError, TypeError):
                continue
            key = json.dumps(value, sort_keys=True, default=str)
            values[key] = value
            label = point_label({n: point.values[n] for n in point.values if n in names})
            labels = by_value.setdefault(key, [])
            if label not in labels:
                labels.append(label)
        for key, labels in by_value.items():
            section = parse_path(leaf)[0]
            checked = _data_issues(_with(base, leaf, values[key]), skip, str(section))
            problems = [(p, m) for p, m in checked if _related(p, leaf)]
            if not problems:
                continue
            shown = "; ".join(labels[:_MAX_LABELS])
            if len(labels) > _MAX_LABELS:
                shown += f" (and {len(labels) - _MAX_LABELS} more points)"
            found += [(p, f"{shown}: {m}") for p, m in problems]
    return found


def validate_spec(spec: LoadedSpec) -> list[SpecIssue]:
    """Every problem in a loaded spec (schema and semantic checks), in file order.

    A spec with a sweep is checked at every point; a problem that only some points have
    names them. Never raises for problems in the spec; an empty list means it is valid.
    """
    skip = {issue.path for issue in spec.load_issues}
    # A value taken out as unsafe is None now: its container's checks would only echo that.
    skip |= {
        parent
        for issue in spec.load_issues
        if isinstance(issue, UnsafeValue) and (parent := _parent(issue.path))
    }
    if spec.sweep is not None and not spec.load_issues:
        found = _sweep_issues(spec, skip)
    else:
        leaves = _varying_leaves(spec.data, spec.deferred)
        found = [
            (p, m)
            for p, m in _data_issues(spec.data, skip)
            if not any(_related(p, leaf) for leaf in leaves)
        ]
    for key in ("name", "output"):
        used = _varying_leaves(spec.data.get(key), spec.deferred, key).get(key)
        if used:
            found.append(
                (
                    key,
                    f"a sweep writes one file, so {key} cannot use the sweep variable "
                    f"{', '.join(sorted(used))}; every point lands in that file",
                )
            )
    found = [(i.path, i.message) for i in spec.load_issues] + found
    source = str(spec.source) if spec.source is not None else None
    issues: list[SpecIssue] = []
    seen: set[tuple[str, str]] = set()
    for path, message in found:
        if (path, message) in seen:
            continue
        seen.add((path, message))
        override = _override_for(path, spec.overridden)
        if override is not None:
            issues.append(SpecIssue(path, f"{message} (set by -s {override})", None, source))
        else:
            issues.append(SpecIssue(path, message, _line(path, spec.lines), source))
    # File order; issues without a line (whole document, overrides) first.
    return sorted(issues, key=lambda issue: issue.line or 0)


def check_spec(source: str | Path | dict, overrides: Sequence[str] = ()) -> LoadedSpec:
    """Load and validate a spec; raises SpecError listing every issue if there is any."""
    spec = load_spec(source, overrides)
    issues = validate_spec(spec)
    if issues:
        raise SpecError(issues)
    return spec
