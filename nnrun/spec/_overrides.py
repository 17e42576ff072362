"""Command-line overrides: ``-s key.path=value`` applied to the parsed spec."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import yaml

from ._constants import TOP_LEVEL_KEYS
from ._issues import SpecError, SpecIssue
from ._parse import SpecLoader
from ._paths import format_path, parse_path


def _fail(override: str, problem: str) -> SpecError:
    return SpecError([SpecIssue("", f"override -s {override!r}: {problem}")])


def _parse_value(override: str, raw: str) -> Any:
    # Parsed as YAML so that numbers, booleans and flow lists/mappings get their types.
    try:
        return yaml.load(raw, Loader=SpecLoader)
    except yaml.YAMLError as exc:
        problem = getattr(exc, "problem", None) or str(exc)
        raise _fail(override, f"the value is not valid YAML ({problem}); quote it") from None


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, str]:
    """Apply overrides in order, creating missing mappings on the way.

    Returns spec path -> override text for every path set, so that messages about those
    values can say where they came from. Raises SpecError for malformed overrides.
    """
    applied: dict[str, str] = {}
    for override in overrides:
        key, sep, raw = override.partition("=")
        key = key.strip()
        if not sep:
            raise _fail(override, "missing '='; write -s key.path=value")
        if not key:
            raise _fail(override, "missing the key before '='")
        try:
            parts = parse_path(key)
        except ValueError as exc:
            raise _fail(override, f"bad key path ({exc})") from None
        value = _parse_value(override, raw)
        declared = data.get("vars")
        swept = data.get("sweep")
        if isinstance(parts[0], str) and parts[0] not in TOP_LEVEL_KEYS:
            if isinstance(declared, dict) and parts[0] in declared:
                # `-s layer=5` sets the declared variable vars.layer.
                parts = ["vars", *parts]
            elif isinstance(swept, dict) and parts[0] in swept and len(parts) == 1:
                # `-s layer=5` on a sweep variable runs that one value; a list runs those.
                parts = ["sweep", *parts]
                if not isinstance(value, list | dict):
                    value = [value]
        if not isinstance(parts[0], str):
            raise _fail(override, "the key must start with a name, not an index")
        _set(data, parts, value, override)
        applied[format_path(parts)] = override
    return applied


def _kind(value: Any) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    return "a list" if isinstance(value, list) else f"a {type(value).__name__}"


def _set(data: dict[str, Any], parts: list[str | int], value: Any, override: str) -> None:
    container: Any = data
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        where = format_path(parts[:i]) or "the spec"
        if isinstance(container, dict):
            key = str(part)
            if last:
                container[key] = value
                return
            if not isinstance(container.get(key), dict | list):
                if key in container and container[key] is not None:
                    shown = format_path(parts[: i + 1])
                    raise _fail(override, f"{shown} is {_kind(container[key])}, not a mapping")
                container[key] = {}
            container = container[key]
        elif isinstance(container, list):
            if not isinstance(part, int):
                raise _fail(override, f"{where} is a list; index it with a number, e.g. {where}.0")
            n = len(container)
            if part == n and last:  # one past the end appends, like a new list item
                container.append(value)
                return
            if not -n <= part < n:
                raise _fail(override, f"{where} has {n} item(s); index {part} is out of range")
            if part < 0:  # record the path with the index counted from the start
                part = parts[i] = part + n
            if last:
                container[part] = value
                return
            if container[part] is None:
                container[part] = {}
            container = container[part]
        else:
            raise _fail(override, f"{where} is {_kind(container)}, not a mapping or a list")
