"""validate_spec and check_spec: every problem in a spec, each with its path and line."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ._issues import SpecError, SpecIssue
from ._load import LoadedSpec, load_spec
from ._paths import format_path, join_path, parse_path
from ._sanitize import UnsafeValue
from ._schema import validator
from ._schema_errors import convert
from ._semantic import semantic_issues


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


def validate_spec(spec: LoadedSpec) -> list[SpecIssue]:
    """Every problem in a loaded spec (schema and semantic checks), in file order.

    Never raises for problems in the spec; an empty list means the spec is valid.
    """
    found: list[tuple[str, str]] = []
    data = _string_keys(spec.data, "", found)

    load_paths = {issue.path for issue in spec.load_issues}
    # A value taken out as unsafe is None now: its container's checks would only echo that.
    load_paths |= {
        parent
        for issue in spec.load_issues
        if isinstance(issue, UnsafeValue) and (parent := _parent(issue.path))
    }
    schema: list[tuple[str, str]] = []
    for error in validator().iter_errors(data):
        schema += convert(error)
    # A value that still holds an undefined ${var} fails the schema too; report the cause only.
    schema = [(p, m) for p, m in schema if p not in load_paths]
    covered = {p for p, _ in schema} | load_paths
    semantic = [(p, m) for p, m in semantic_issues(data, covered) if p not in load_paths]

    found += [(i.path, i.message) for i in spec.load_issues] + schema + semantic
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
