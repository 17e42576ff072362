"""Spec paths: the ``save.resid.tokens[0]`` strings that name a place in a spec."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable

# Keys that read unambiguously after a dot; anything else (dots, spaces, ...) is quoted
# in brackets so that a path can always be split back into its parts.
_PLAIN_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*\Z")


def join_path(parent: str, part: str | int) -> str:
    """Append one key (str) or list index (int) to a spec path."""
    if isinstance(part, int) and not isinstance(part, bool):
        return f"{parent}[{part}]"
    key = str(part)
    if not _PLAIN_KEY.match(key):
        return f"{parent}[{json.dumps(key)}]"
    return f"{parent}.{key}" if parent else key


def format_path(parts: Iterable[str | int]) -> str:
    """Build a spec path from its parts: ``("edits", 1, "at")`` -> ``"edits[1].at"``."""
    path = ""
    for part in parts:
        path = join_path(path, part)
    return path


_TOKEN = re.compile(
    r"""
      \[\s*(?P<index>-?[0-9]+)\s*\]          # [3]
    | \[\s*(?P<quoted>"(?:[^"\\]|\\.)*")\s*\] # ["a.b"]
    | (?P<dot>\.)
    | (?P<key>[^.\[\]]+)
    """,
    re.VERBOSE,
)


def parse_path(text: str) -> list[str | int]:
    """Split a spec path into keys and indices; the inverse of :func:`format_path`.

    Bracketed integers become ``int``; a dotted all-digit segment (``edits.0.mul``) also
    becomes ``int`` because overrides use it to index lists. Raises ValueError when the
    text is not a path.
    """
    parts: list[str | int] = []
    pos = 0
    expect_key = True  # at the start and after a dot a key must follow
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None:
            raise ValueError(f"unexpected {text[pos]!r} at position {pos + 1}")
        pos = m.end()
        if m.group("dot") is not None:
            if expect_key:
                raise ValueError(f"empty key before the dot at position {pos}")
            expect_key = True
        elif m.group("key") is not None:
            if not expect_key:
                raise ValueError(f"missing dot before {m.group('key')!r}")
            key = m.group("key").strip()
            parts.append(int(key) if key.isdigit() else key)
            expect_key = False
        else:
            if expect_key and parts:
                raise ValueError(f"a dot cannot be followed by '[' (position {m.start() + 1})")
            if m.group("index") is not None:
                parts.append(int(m.group("index")))
            else:
                parts.append(json.loads(m.group("quoted")))
            expect_key = False
    if expect_key:
        raise ValueError("the path is empty" if not parts else "the path ends with a dot")
    return parts
