"""Resolve spec locations (`model.layers.*.output`) against a real module tree."""

from __future__ import annotations

import difflib
from dataclasses import dataclass

from torch import nn

from nnrun.compile._names import expand_standard
from nnrun.errors import CompileError
from nnrun.spec import Location, SliceSel, Wildcard, parse_location


@dataclass(frozen=True)
class ResolvedLocation:
    """One concrete site a location names: module name, port, tuple indices."""

    module: str  # dotted name from named_modules(); "" is the model itself
    port: str
    indices: tuple[int, ...]

    @property
    def label(self) -> str:
        base = f"{self.module}.{self.port}" if self.module else self.port
        return base + "".join(f"[{i}]" for i in self.indices)


def resolve_location(
    model: nn.Module, text: str, *, spec_path: str = "at"
) -> tuple[list[ResolvedLocation], bool]:
    """Expand a location into the sites it names, in module order.

    Returns the sites and whether the location had a wildcard or slice (a
    layer axis). Standard names (`@layers.5.output`) are mapped onto this
    model's modules first (see nnrun.compile._names). Raises CompileError naming the nearest real module paths when
    a segment does not exist.

    >>> resolve_location(model, "model.layers[0:2].output")   # doctest: +SKIP
    ([ResolvedLocation("model.layers.0", "output", ()), ...], True)
    """
    try:
        location: Location = parse_location(text)
    except ValueError as e:
        raise CompileError(f"{spec_path}: {e}") from None
    segments = location.module_segments
    if location.standard:  # @layers.5 -> model.layers.5 on this model
        segments = expand_standard(location, model, spec_path)
    names = [""]  # dotted names reached so far
    modules = [model]
    layered = False
    for depth, segment in enumerate(segments):
        next_names, next_modules = [], []
        for name, module in zip(names, modules):
            children = list(module.named_children())
            if isinstance(segment, Wildcard):
                layered, chosen = True, children
            elif isinstance(segment, SliceSel):
                layered, chosen = True, children[segment.start : segment.stop]
            else:
                chosen = _child(module, children, segment)
                if chosen is None and isinstance(segment, int) and children:
                    raise CompileError(
                        f"{spec_path}: {_join(name, str(segment))} does not exist; "
                        f"{name or 'the model'} has {len(children)} entries, "
                        f"0..{len(children) - 1} (or -{len(children)}..-1 from the end)"
                    )
                if chosen is None:
                    wanted = _join(name, str(segment))
                    # Match the whole intended path too: model.layer.5 -> model.layers.5.
                    rest = [_plain(s) for s in segments[depth + 1 :]]
                    whole = ".".join([wanted, *rest])
                    raise CompileError(
                        f"{spec_path}: no module '{wanted}' in {type(model).__name__}"
                        f"{_nearest(model, whole, wanted)}"
                    )
            for child_name, child in chosen:
                next_names.append(_join(name, child_name))
                next_modules.append(child)
        if not next_names:
            raise CompileError(f"{spec_path}: '{text}' selects no module (empty slice)")
        names, modules = next_names, next_modules
    return [ResolvedLocation(n, location.port, location.indices) for n in names], layered


def _child(
    module: nn.Module, children: list[tuple[str, nn.Module]], segment: str | int
) -> list[tuple[str, nn.Module]] | None:
    if isinstance(segment, int):
        # Integer segments index a container's children, so [-1] is the last layer.
        if not children:
            return None
        try:
            return [children[segment]]
        except IndexError:
            return None
    sub = module._modules.get(segment)
    return None if sub is None else [(segment, sub)]


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _plain(segment: object) -> str:
    """A segment as a plain path piece, for matching: wildcards and slices as '0'."""
    if isinstance(segment, Wildcard):
        return "0"
    if isinstance(segment, SliceSel):
        return str(segment.start or 0)
    return str(segment)


def _nearest(model: nn.Module, whole: str, wanted: str) -> str:
    """' did you mean ...' naming the real module paths closest to what was written."""
    names = [n for n, _ in model.named_modules() if n]
    # The whole intended path first, then what the failing prefix should have been.
    close = difflib.get_close_matches(whole, names, n=2, cutoff=0.5)
    for name in difflib.get_close_matches(wanted, names, n=2, cutoff=0.5):
        if name not in close:
            close.append(name)
    if not close:
        # Fall back to siblings of the deepest prefix that exists.
        parent = wanted.rsplit(".", 1)[0] if "." in wanted else ""
        depth = parent.count(".") + 1 if parent else 0
        close = [n for n in names if n.startswith(parent) and n.count(".") == depth][:5] or [
            n for n in names if "." not in n
        ][:5]
    if not close:
        return ""
    suggestions = ", ".join(f"'{c}'" for c in close)
    return f"; did you mean {suggestions}? (`nnrun modules` lists every path)"
