"""`nnrun init`: ready-made experiments (the specs in specs/) copied into a project.

The wheel carries specs/ inside the package (nnrun/specs, like the schema), so the
templates are there wherever nnrun is installed; a source checkout reads specs/.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nnrun.errors import NnrunError
from nnrun.spec import parse_location, schema_path

MODELINE = "# yaml-language-server: $schema="


@dataclass(frozen=True)
class Template:
    """One ready-made spec: its name (file stem), one-line description and file."""

    name: str
    description: str
    path: Path


def templates_dir() -> Path:
    """specs/ as installed (nnrun/specs in a wheel) or in the source checkout."""
    package = Path(__file__).resolve().parent
    for candidate in (package / "specs", package.parent / "specs"):
        if candidate.is_dir() and any(candidate.glob("*.yaml")):
            return candidate
    raise NnrunError(f"no templates found in {package / 'specs'} or {package.parent / 'specs'}")


def list_templates() -> list[Template]:
    """Every template with its `description:` line."""
    import yaml

    found = []
    for path in sorted(templates_dir().glob("*.yaml")):
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        description = str(data.get("description", "")).strip()
        found.append(Template(path.stem, description, path))
    return found


def template(name: str) -> Template:
    """The template called `name` (with or without .yaml)."""
    from nnrun.spec._messages import did_you_mean

    name = name.removesuffix(".yaml")
    known = {t.name: t for t in list_templates()}
    if name not in known:
        raise NnrunError(
            f"no template {name!r}{did_you_mean(name, list(known))} "
            f"(templates: {', '.join(known)}; `nnrun init` lists them)"
        )
    return known[name]


def with_schema_line(text: str, schema: str) -> str:
    """The spec text with its first line pointing editors at `schema`."""
    lines = text.splitlines(keepends=True)
    if lines and lines[0].startswith(MODELINE):
        lines = lines[1:]
    return f"{MODELINE}{schema}\n" + "".join(lines)


def render(name: str, model: dict[str, Any] | None = None, names: Any = None) -> str:
    """The template's text, ready to save in the user's project.

    The schema line points at the installed schema. With `model` (a `model:` mapping)
    the template's model is replaced; with `names` (that model's StandardNames) every
    standard name is written as the model's real module path.
    """
    text = with_schema_line(template(name).path.read_text(encoding="utf-8"), str(schema_path()))
    if model is not None:
        text = _replace_model(text, model)
    if names is not None:
        head, _, rest = text.partition("\n")
        note = f"# (from nnrun init for {names.model_class}: standard names written as its paths)"
        text = f"{head}\n{note}\n{rest}"
        text = "".join(_real_paths(line, names) for line in text.splitlines(keepends=True))
    return text


def starter(model: dict[str, Any], names: Any, target: Path) -> str:
    """A new spec for one model, written with its real module paths."""
    layers = names.path("layers")
    if layers is None:
        raise NnrunError(
            f"cannot write a starter spec for {names.model_class}: {names.unmapped_message('@layers')}"
        )
    count, model_class = names.layer_count, names.model_class
    norm, head = names.path("ln_final"), names.path("lm_head")
    lines = [
        f"{MODELINE}{schema_path()}",
        f"# A first experiment on {model_class} ({count} layers: {layers}.0 .. {layers}.{count - 1}).",
        "# Its standard names (usable in any spec instead of the paths below):",
        *(f"#   {k:<16} {v}" for k, v in names.describe().items()),
        "#",
        f"# Run:     nnrun run {target}",
        "# Output:  /saves/resid  every layer's output at the last token",
        "#          /saves/logits the next-token logits there"
        if head
        else "#          /saves/final  the model's output at the last token",
        "nnrun: 1",
        "name: first-experiment",
        "description: Every layer's residual stream at the last token of each prompt.",
        f"model: {_flow(model)}",
        "prompts:",
        '  france: "The capital of France is"',
        "save:",
        "  resid:",
        f"    at: {layers}.*.output",
        "    tokens: [-1]",
    ]
    if norm and head:
        lines += [
            "  lens:",
            f"    at: {layers}.*.output",
            "    tokens: [-1]",
            f"    apply: [{norm}, {head}, softmax, {{topk: 5}}]",
        ]
    lines += ["  logits:" if head else "  final:", "    at: output", "    tokens: [-1]"]
    return "\n".join(lines) + "\n"


def _real_paths(line: str, names: Any) -> str:
    """A spec line with its standard names written as real paths (comments left alone)."""
    if line.lstrip().startswith("#"):
        return line
    code, hash_, comment = line.partition(" #")
    code = re.sub(r"([\"']?)(@[A-Za-z_][^\s\"',\]}]*)\1", lambda m: _real(m, names), code)
    return code + hash_ + comment


def _real(match: re.Match[str], names: Any) -> str:
    from nnrun.compile._names import expand_with
    from nnrun.spec import Location

    written = match.group(2)
    port = "" if re.search(r"\.(output|input|grad)(\[\d+\])*$", written) else ".output"
    try:
        location = parse_location(written + port)
        segments = expand_with(location, names, "template")
    except (ValueError, NnrunError):
        return match.group(0)
    real = str(Location(segments, location.port, location.indices)).replace("[*]", ".*")
    return real.removesuffix(port) if port else real


def _replace_model(text: str, model: dict[str, Any]) -> str:
    lines = text.splitlines(keepends=True)
    out, skipping = [], False
    for line in lines:
        if re.match(r"model\s*:", line):
            out.append(f"model: {_flow(model)}\n")
            skipping = True
            continue
        if skipping and (line.startswith((" ", "\t")) or not line.strip()):
            continue
        skipping = False
        out.append(line)
    return "".join(out)


def _flow(mapping: dict[str, Any]) -> str:
    import json

    return "{" + ", ".join(f"{k}: {json.dumps(v)}" for k, v in mapping.items()) + "}"
