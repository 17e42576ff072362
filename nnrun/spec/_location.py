"""The grammar of locations (``at:``): a module path, a port, then tuple indices.

Only the syntax is checked here; whether the modules exist is the compiler's business
(it reuses :func:`parse_location`). Grammar::

    location  := [['@'] module '.'] port index*
    module    := segment ('.' segment | '[' bracket ']')*
    segment   := identifier | digits | '*'
    bracket   := integer | '*' | [integer] ':' [integer]
    port      := 'output' | 'input' | 'grad' | 'input.grad'
    index     := '[' integer ']'

At most one wildcard or slice per location: it becomes one axis of the saved tensor.

A leading ``@`` makes the first segment a *standard name* that the compiler maps onto
each architecture's own modules (``@layers.5.output`` is ``model.layers.5.output`` on
Llama and ``transformer.h.5.output`` on GPT-2): ``@layers`` followed by a layer index,
wildcard or slice, then optionally ``attn`` or ``mlp``; or ``@embed``, ``@ln_final``,
``@lm_head``. Real child names may follow (``@layers.3.mlp.down_proj.input``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ._messages import did_you_mean

PORTS = ("output", "input", "grad", "input.grad")
# Gradient ports (need a `backward:` section): d loss / d the module's output or input.
GRAD_PORTS = ("grad", "input.grad")
# Standard names (after '@'), mapped per architecture by nnrun.compile._names.
STANDARD_NAMES = ("layers", "embed", "ln_final", "lm_head")
LAYER_PARTS = ("attn", "mlp")  # standard names inside a layer: @layers.N.attn


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
    # True for '@' locations: module_segments[0] is a standard name, not a module.
    standard: bool = False

    @property
    def is_grad(self) -> bool:
        """True for a gradient port (`grad`, `input.grad`)."""
        return self.port in GRAD_PORTS

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
        out = "@" if self.standard else ""
        for seg in self.module_segments:
            if isinstance(seg, str):
                out = f"{out}.{seg}" if out.strip("@") else out + seg
            elif isinstance(seg, int) and seg >= 0:
                out = f"{out}.{seg}" if out.strip("@") else out + str(seg)
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
    if text.startswith("@"):
        return _standard(text)

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
        raise ValueError(f"{text!r} has no port; add .output or .input (e.g. {text}.output)")
    if port == "grad" and last_name > 0 and tokens[last_name - 1] == ("name", "input"):
        # `mlp.down_proj.input.grad`: the gradient at the module's input
        port = "input.grad"
        del tokens[last_name - 1]
        last_name -= 1
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


_STANDARD_FORMS = "@layers.N, @layers.N.attn, @layers.N.mlp, @embed, @ln_final or @lm_head"


def _standard(text: str) -> Location:
    """Parse an '@' location: the grammar of a real path, checked against the standard names."""
    body = text[1:]
    if not body or body[0] in ".[":
        raise ValueError(f"{text!r}: a standard name follows the '@' ({_STANDARD_FORMS})")
    try:
        inner = parse_location(body)
    except ValueError as exc:  # the same grammar: name the location as written, '@' included
        message = str(exc).replace(repr(body), repr(text)).replace(f" {body}.", f" {text}.")
        raise ValueError(message) from None
    if inner.is_root:
        raise ValueError(
            f"{text!r}: the model's own {inner.port} is written without '@' ({inner.port})"
        )
    segments = inner.module_segments
    head = segments[0]
    if head not in STANDARD_NAMES:
        hint = did_you_mean(f"@{head}", [f"@{n}" for n in STANDARD_NAMES])
        raise ValueError(
            f"unknown standard name '@{head}' in {text!r}{hint} (standard names: {_STANDARD_FORMS})"
        )
    if head == "layers":
        if len(segments) < 2 or isinstance(segments[1], str):
            raise ValueError(
                f"{text!r}: @layers needs a layer after it: @layers.5, @layers[-1], @layers.* "
                "or @layers[0:4]"
            )
    elif any(isinstance(s, str) and s in LAYER_PARTS for s in segments[1:2]):
        raise ValueError(f"{text!r}: attn and mlp are parts of a layer (@layers.N.{segments[1]})")
    return Location(segments, inner.port, inner.indices, standard=True)
