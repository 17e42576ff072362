"""Token and step selections: ``all``, an integer, a list of integers, or a ``"a:b"`` slice.

Tokens are counted within each prompt's own tokens (so padding never shifts them) and
steps within a generation (step 0 is the prompt pass). Tokens can also be chosen by
text: ``{find: " France"}`` selects the tokens that cover that text in each prompt
(``occurrence: first`` or ``last`` when it occurs more than once). The compiler reuses
these parsers; ``resolve`` turns a selection into concrete indices once the length
(and, for ``find``, the prompt) is known.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from ._messages import show

_SLICE = re.compile(r"(-?[0-9]*):(-?[0-9]*)\Z")


OCCURRENCES = ("first", "last")


@dataclass(frozen=True)
class _Selection:
    kind: Literal["all", "list", "slice", "find"]
    positions: tuple[int, ...] = ()
    start: int | None = None
    stop: int | None = None
    text: str | None = None  # find: the text whose tokens are selected
    occurrence: str | None = None  # find: "first", "last" or None (exactly one)

    def resolve(
        self, length: int, find: Callable[[str, str | None], list[int]] | None = None
    ) -> list[int]:
        """Concrete, non-negative indices into a sequence of ``length`` items.

        Negative positions count from the end; slices clip like Python slices; a listed
        position outside the sequence raises IndexError. A ``find`` selection needs
        ``find(text, occurrence)``, which searches the prompt (LookupError if absent).
        """
        if self.kind == "find":
            if find is None:
                raise ValueError("tokens: {find: ...} needs the prompt's text to resolve")
            return [p for p in find(str(self.text), self.occurrence) if p < length]
        if self.kind == "all":
            return list(range(length))
        if self.kind == "slice":
            return list(range(*slice(self.start, self.stop).indices(length)))
        out = []
        for p in self.positions:
            q = p + length if p < 0 else p
            if not 0 <= q < length:
                raise IndexError(f"position {p} is outside a sequence of length {length}")
            out.append(q)
        return out

    def __str__(self) -> str:
        if self.kind == "find":
            extra = f", occurrence: {self.occurrence}" if self.occurrence else ""
            return f"{{find: {self.text!r}{extra}}}"
        if self.kind == "all":
            return "all"
        if self.kind == "slice":
            start = "" if self.start is None else self.start
            stop = "" if self.stop is None else self.stop
            return f"{start}:{stop}"
        return str(list(self.positions)) if len(self.positions) != 1 else str(self.positions[0])


@dataclass(frozen=True)
class TokenSelection(_Selection):
    """Which token positions, counted within each prompt's own tokens (``-1`` = last)."""


@dataclass(frozen=True)
class StepSelection(_Selection):
    """Which generation steps (0 = the prompt pass, k = the pass over the k-th new token)."""


def _is_int(value: Any) -> bool:
    # bool is an int subclass in Python, but `tokens: true` is certainly a mistake.
    return isinstance(value, int) and not isinstance(value, bool)


def _parse(value: Any, what: str, allow_negative: bool) -> tuple[str, tuple[int, ...], Any, Any]:
    expected = (
        f"{what} must be 'all', an integer, a list of integers, a slice like '2:5' "
        "or {find: TEXT}"
        if allow_negative
        else f"{what} must be 'all', an integer >= 0, a list of them or a slice like '1:4'"
    )
    if isinstance(value, str):
        text = value
        if text == "all":
            return "all", (), None, None
        m = _SLICE.match(text)
        if m:
            start, stop = (int(g) if g else None for g in m.groups())
            return "slice", (), start, stop
        if text.count(":") >= 2:
            raise ValueError(
                f"slices with a step ({value!r}) are not supported; list the positions"
            )
        if re.fullmatch(r"-?[0-9]+", text):
            raise ValueError(f"write {what} {text} as a number, not the string {value!r}")
        raise ValueError(f"{expected}; got {show(value)}")
    if isinstance(value, dict) and allow_negative:
        return _find(value)
    if _is_int(value):
        positions: tuple[int, ...] = (value,)
    elif isinstance(value, list):
        if not value:
            raise ValueError(f"the list of {what}s is empty; leave {what}s out to select all")
        bad = [v for v in value if not _is_int(v)]
        if bad:
            raise ValueError(f"{what}s in a list must be integers; got {show(bad[0])}")
        seen: set[int] = set()
        for v in value:
            if v in seen:
                raise ValueError(f"{what} {v} is listed twice")
            seen.add(v)
        positions = tuple(value)
    else:
        raise ValueError(f"{expected}; got {show(value)}")
    if not allow_negative:
        neg = [p for p in positions if p < 0]
        if neg:
            raise ValueError(
                f"{what} {neg[0]} is negative; steps count up from 0 (the prompt pass)"
            )
    return "list", positions, None, None


def _find(value: dict) -> tuple[str, tuple[int, ...], Any, Any]:
    unknown = [k for k in value if k not in ("find", "occurrence")]
    if unknown:
        raise ValueError(
            f"unknown key {unknown[0]!r} in tokens; a text selection is "
            "{find: TEXT} with optional occurrence: first or last"
        )
    text = value.get("find")
    if not isinstance(text, str) or not text:
        raise ValueError(
            f"tokens: find takes the text to look for, e.g. {{find: ' France'}}; got {show(text)}"
        )
    occurrence = value.get("occurrence")
    if occurrence is not None and occurrence not in OCCURRENCES:
        raise ValueError(f"tokens: occurrence is first or last, not {show(occurrence)}")
    return "find", (), text, occurrence


def parse_token_selection(value: Any) -> TokenSelection:
    """Parse a ``tokens:`` value; raises ValueError with a one-line message if malformed."""
    kind, positions, start, stop = _parse(value, "token", allow_negative=True)
    if kind == "find":  # _find packs (text, occurrence) where a slice has (start, stop)
        return TokenSelection("find", text=start, occurrence=stop)
    return TokenSelection(kind, positions, start, stop)  # type: ignore[arg-type]


def parse_step_selection(value: Any) -> StepSelection:
    """Parse a ``steps:`` value; raises ValueError with a one-line message if malformed."""
    kind, positions, start, stop = _parse(value, "step", allow_negative=False)
    return StepSelection(kind, positions, start, stop)  # type: ignore[arg-type]
