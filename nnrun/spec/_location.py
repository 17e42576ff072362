"""The grammar of locations (``at:``): a module path, a port, then tuple indices.

Only the syntax is checked here; whether the modules exist is the compiler's business
(it reuses :func:`parse_location`). Grammar::

    location  := [module '.'] port index*
    module    := segment ('.' segment | '[' bracket ']')*
    segment   := identifier | digits | '*'
    bracket   := integer | '*' | [integer] ':' [integer]
    port      := 'output' | 'input'
    index     := '[' integer ']'

At most one wildcard or slice per location: it becomes one axis of the saved tensor.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

PORTS = ("output", "input")
# Ports users may know from other tools; named in the message instead of "no port".
_FUTURE_PORTS = ("grad",)


@dataclass(frozen=True)
class Wildcard:
    """``*`` / ``[*]``: every child of the module before it."""

    def __str__(self) -> str:
        return "*"


@dataclass(frozen=True)
class SliceSel:
    """``[a:b]``: the children ``a`` up to (not including) ``b``, Python slice rules."""

    start: int | None
    stop: int | None

    def __str__(self) -> str:
        start = "" if self.start is None else str(self.start)
        stop = "" if self.stop is None else str(self.stop)
        return f"{start}:{stop}"


Segment = str | int | Wildcard | SliceSel


@dataclass(frozen=True)
class Location:
    """A parsed location.

    ``module_segments`` is empty for the model itself (``output`` / ``input``); integer
    segments index a module's children (``-1`` is the last); ``indices`` pick an element
    of a tuple the port carries (``self_attn.output[0]``).
    """

    module_segments: tuple[Segment, ...]
    port: str
    indices: tuple[int, ...] = ()

    @property
    def is_root(self) -> bool:
        """True for the model's own input or output."""
        return not self.module_segments

    @property
    def expands(self) -> bool:
        """True when a wildcard or slice makes this location stand for several modules."""
        return any(isinstance(s, Wildcard | SliceSel) for s in self.module_segments)

    @property
    def module_path(self) -> str:
        """The module part in canonical form (``model.layers[*]``); ``""`` for the root."""
        out = ""
        for seg in self.module_segments:
            if isinstance(seg, str):
                out = f"{out}.{seg}" if out else seg
            elif isinstance(seg, int) and seg >= 0:
                out = f"{out}.{seg}" if out else str(seg)
            else:
                out = f"{out}[{seg}]"
        return out

    def __str__(self) -> str:
        base = f"{self.module_path}.{self.port}" if self.module_segments else self.port
        return base + "".join(f"[{i}]" for i in self.indices)


_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_DOTTED = re.compile(r"[A-Za-z_][A-Za-z0-9_]*|[0-9]+|\*")
_BRACKET = re.compile(r"\[([^\]]*)\]")
_INT = re.compile(r"-?[0-9]+\Z")
_SLICE = re.compile(r"(-?[0-9]*):(-?[0-9]*)\Z")


def _bracket(content: str, text: str) -> int | Wildcard | SliceSel:
    inner = content.strip()
    if _INT.match(inner):
        return int(inner)
    if inner == "*":
        return Wildcard()
    m = _SLICE.match(inner)
    if m:
        start, stop = (int(g) if g else None for g in m.groups())
        return SliceSel(start, stop)
    if inner.count(":") >= 2:
        raise ValueError(f"[{content}] in {text!r}: slices with a step are not supported")
    raise ValueError(
        f"[{content}] in {text!r} is not an index; use [3], [-1], [*] or a slice like [0:10]"
    )


def parse_location(text: str) -> Location:
    """Parse a location string such as ``model.layers[0:10].self_attn.output[0]``.

    Raises ValueError with a one-line, human message when the syntax is wrong.
    """
    if not isinstance(text, str):
        raise ValueError(f"a location is a string like model.layers.5.output, not {text!r}")
    if not text.strip():
        raise ValueError("the location is empty; write e.g. model.layers.5.output")
    if any(c.isspace() for c in text):
        raise ValueError(f"{text!r} contains spaces; a location has none")

    # Tokenise into ("name", str) for dotted segments and ("br", value) for brackets.
    tokens: list[tuple[str, object]] = []
    pos = 0
    n = len(text)
    while pos < n:
        if text[pos] == "[":
            m = _BRACKET.match(text, pos)
            if m is None:
                raise ValueError(f"unclosed '[' in {text!r}")
            tokens.append(("br", _bracket(m.group(1), text)))
            pos = m.end()
            continue
        if tokens:
            if text[pos] != ".":
                raise ValueError(f"unexpected {text[pos]!r} at position {pos + 1} of {text!r}")
            pos += 1
        m = _DOTTED.match(text, pos)
        if m is None:
            if pos >= n or text[pos] in ".[":
                raise ValueError(f"empty name at position {pos + 1} of {text!r}")
            if text[pos] == "-":
                raise ValueError(f"negative indices go in brackets, e.g. layers[-1], in {text!r}")
            raise ValueError(f"unexpected {text[pos]!r} at position {pos + 1} of {text!r}")
        tokens.append(("name", m.group(0)))
        pos = m.end()

    if tokens[0][0] == "br":
        raise ValueError(f"{text!r} starts with a bracket; start with a module name")

    # The port is the last dotted name; only integer tuple indices may follow it.
    last_name = max(i for i, (kind, _) in enumerate(tokens) if kind == "name")
    trailing = tokens[last_name + 1 :]
    port = tokens[last_name][1]
    if port not in PORTS:
        if port in _FUTURE_PORTS:
            raise ValueError(f"port {port!r} is not supported yet; use .output or .input")
        raise ValueError(f"{text!r} has no port; add .output or .input (e.g. {text}.output)")
    indices: list[int] = []
    for _, value in trailing:
        if not isinstance(value, int):
            raise ValueError(
                f"after the port only tuple indices like [0] may follow, not [{value}], in {text!r}"
            )
        indices.append(value)

    segments: list[Segment] = []
    for kind, value in tokens[:last_name]:
        if kind == "name":
            segments.append(
                int(value) if value.isdigit() else Wildcard() if value == "*" else value
            )  # type: ignore[arg-type]
        else:
            segments.append(value)  # type: ignore[arg-type]
    if sum(isinstance(s, Wildcard | SliceSel) for s in segments) > 1:
        raise ValueError(f"{text!r} has more than one wildcard or slice; at most one is allowed")
    return Location(tuple(segments), port, tuple(indices))
