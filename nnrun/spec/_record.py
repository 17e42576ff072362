"""Changes to a loaded spec made outside the file, recorded so the stored spec is what ran."""

from __future__ import annotations

from dataclasses import replace

from ._load import LoadedSpec
from ._parse import dump_yaml


def with_output(spec: LoadedSpec, output: str) -> LoadedSpec:
    """The spec with `output:` set to `output` (as `nnrun run -o` does), text included."""
    data = dict(spec.data)
    data["output"] = output
    return replace(spec, data=data, text=dump_yaml(data))
