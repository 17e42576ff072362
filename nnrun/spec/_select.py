"""Token and step selections: ``all``, an integer, a list of integers, or a ``"a:b"`` slice.

Tokens are counted within each prompt's own tokens (so padding never shifts them) and
steps within a generation (step 0 is the prompt pass). The compiler reuses these parsers;
``resolve`` turns a selection into concrete indices once the length is known.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal

from ._messages import show

_SLICE = re.compile(r"(-?[0-9]*):(-?[0-9]*)\Z")


@dataclass(frozen=True)
class _Selection:
    kind: Literal["all", "list", "slice"]
    positions: tuple[int, ...] = ()
    start: int | None = None
    stop: int | None = None

    def resolve(self, length: int) -> list[int]:
        """Concrete, non-negative indices into a sequence of ``length`` items.

        Negative positions count from the end; slices clip like Python slices; a listed
        position outside the sequence raises IndexError.
        """
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
        f"{what} must be 'all', an integer, a list of integers or a slice like '2:5'"
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


def parse_token_selection(value: Any) -> TokenSelection:
    """Parse a ``tokens:`` value; raises ValueError with a one-line message if malformed."""
    kind, positions, start, stop = _parse(value, "token", allow_negative=True)
    return TokenSelection(kind, positions, start, stop)  # type: ignore[arg-type]


def parse_step_selection(value: Any) -> StepSelection:
    """Parse a ``steps:`` value; raises ValueError with a one-line message if malformed."""
    kind, positions, start, stop = _parse(value, "step", allow_negative=False)
    return StepSelection(kind, positions, start, stop)  # type: ignore[arg-type]
