"""load_spec: parse, apply overrides, substitute ${vars}, fill defaults."""

from __future__ import annotations

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
from ._substitute import substitute


@dataclass
class LoadedSpec:
    """A loaded spec.

    ``data`` is the resolved spec (overrides applied, ``${var}`` substituted, defaults
    filled in), ``text`` the same as YAML, ``source`` the file it came from, and ``lines``
    maps spec paths (``save.resid.tokens[0]``) to 1-based lines in that file.
    ``load_issues`` holds problems found while loading (undefined variables, ...) that
    :func:`validate_spec` reports; ``overridden`` maps paths set by ``-s`` to the override.
    """

    data: dict[str, Any]
    text: str
    source: Path | None
    lines: dict[str, int]
    load_issues: list[SpecIssue] = field(default_factory=list, repr=False)
    overridden: dict[str, str] = field(default_factory=dict, repr=False)


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
    data, issues = substitute(data, default_name(stem))
    normalise_prompts(data, lines)
    fill_defaults(data, stem)
    # Canonical key order makes the stored spec text easy to read and to compare.
    order = {key: i for i, key in enumerate(TOP_LEVEL_KEYS)}
    data = dict(sorted(data.items(), key=lambda kv: order.get(kv[0], len(order))))
    issues = [replace(i, source=shown) for i in unsafe + issues]
    return LoadedSpec(data, dump_yaml(data), path, lines, issues, overridden)
