"""Values no later stage could handle, taken out of a spec as issues before anything else runs.

A spec is untrusted data: it may nest thousands of levels deep, hold integers with
thousands of digits, NaN where a size is meant, lone surrogates (from a JSON ``\\ud800``
escape) or NUL characters. Each would otherwise surface much later as a RecursionError,
an OverflowError or an HDF5 error. Here each becomes one issue at its spec path, and the
value is replaced by ``None`` so that the schema reports nothing else there.
"""

from __future__ import annotations

import math
from typing import Any

from ._issues import SpecIssue
from ._paths import join_path

# No real spec comes near: a literal tensor with a few axes inside edits[i].add is ~6 deep.
MAX_DEPTH = 48
# Every integer a spec holds ends up as an int64 somewhere (seeds, sizes, positions).
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
# Integer literals longer than this are not even converted (Python refuses past 4300 digits).
MAX_INT_CHARS = 40


class HugeInt(str):
    """An integer literal too long to be a real value: kept as its text for the message."""


class UnsafeValue(SpecIssue):
    """An issue for a value replaced by None: checks of its container would only echo it."""


def is_huge_int_text(text: str) -> bool:
    """Whether an integer literal is too long to be converted at all."""
    return len(text.lstrip("+-").replace("_", "")) > MAX_INT_CHARS


def parse_int_text(text: str) -> int | HugeInt:
    """``int(text)`` for a decimal literal, or a HugeInt marker when it is absurdly long."""
    return HugeInt(text) if is_huge_int_text(text) else int(text)


def _describe_int(value: int | HugeInt) -> str:
    if isinstance(value, HugeInt):
        return f"an integer with {len(value.lstrip('+-').replace('_', ''))} digits"
    try:
        return f"an integer with {len(str(abs(value)))} digits"
    except ValueError:  # past Python's conversion limit: estimate
        return f"an integer with about {int(abs(value).bit_length() * math.log10(2)) + 1} digits"


def _text_problem(text: str) -> str | None:
    if "\x00" in text:
        return "contains a NUL character (\\0), which nnrun cannot store or pass on"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        bad = text[exc.start]
        return (
            f"contains a lone surrogate ({ascii(bad)}), which is not valid Unicode text; "
            "write the character itself or its full surrogate pair"
        )
    return None


def _value_problem(value: Any) -> str | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, HugeInt):
        return f"{_describe_int(value)} is out of range: numbers in a spec must fit in 64 bits"
    if isinstance(value, int) and not INT64_MIN <= value <= INT64_MAX:
        return f"{_describe_int(value)} is out of range: numbers in a spec must fit in 64 bits"
    if isinstance(value, float) and not math.isfinite(value):
        return f"must be a finite number, not {value}"
    if isinstance(value, str):
        return _text_problem(value)
    return None


def sanitize(data: Any) -> tuple[Any, list[SpecIssue]]:
    """A copy of parsed spec data without the values described above, and one issue each.

    Works without recursion, so any nesting depth is safe; containers deeper than
    MAX_DEPTH become ``None``.
    """
    issues: list[SpecIssue] = []
    root: list[Any] = [None]
    # (value, path, depth, container to put the copy in, key in that container)
    stack: list[tuple[Any, str, int, Any, Any]] = [(data, "", 0, root, 0)]
    while stack:
        value, path, depth, parent, key = stack.pop()
        if isinstance(value, dict | list) and depth > MAX_DEPTH:
            issues.append(
                SpecIssue(path, f"nested more than {MAX_DEPTH} levels deep; no spec needs that")
            )
            parent[key] = None
        elif isinstance(value, dict):
            copy: dict[Any, Any] = {}
            parent[key] = copy
            for k, v in value.items():
                if isinstance(k, str) and (problem := _text_problem(k)) is not None:
                    issues.append(UnsafeValue(path, f"a key {problem}"))
                    continue
                copy[k] = None
                stack.append((v, join_path(path, k), depth + 1, copy, k))
        elif isinstance(value, list):
            items: list[Any] = [None] * len(value)
            parent[key] = items
            for i, v in enumerate(value):
                stack.append((v, join_path(path, i), depth + 1, items, i))
        elif (problem := _value_problem(value)) is not None:
            issues.append(UnsafeValue(path, problem))
            parent[key] = None
        else:
            parent[key] = value
    # The stack runs last-in first-out; report in document order.
    return root[0], sorted(issues, key=lambda i: i.path)
