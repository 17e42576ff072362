"""The files a run read besides its model, each with a sha256, for the output's provenance.

Prompt files (`prompts: {file: ...}`) and tensor operands (`{file: x.h5, dataset: ...}`)
are recorded in the root attribute `inputs` as JSON: spec path -> {file, sha256, bytes}.
A re-run can then tell whether it reads the same data.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

_BLOCK = 1 << 20


def sha256_file(path: str | Path) -> str:
    """The sha256 of a file's bytes, read in blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def _file_keys(data: Any) -> list[tuple[str, str]]:
    """(spec path of a `file:` key, the file) for every mapping in the spec that has one."""
    from nnrun.spec import format_path

    found: list[tuple[str, str]] = []
    stack: list[tuple[Any, list[str | int]]] = [(data, [])]
    while stack:
        value, parts = stack.pop()
        if isinstance(value, dict):
            if isinstance(value.get("file"), str):
                found.append((format_path([*parts, "file"]), value["file"]))
            stack += [(v, [*parts, str(k)]) for k, v in value.items() if k != "file"]
        elif isinstance(value, list):
            stack += [(v, [*parts, i]) for i, v in enumerate(value)]
    return sorted(found)


def input_files(
    spec_data: dict[str, Any], points: list[tuple[str, dict[str, Any]]] | None = None
) -> dict[str, dict[str, Any]]:
    """Spec path -> {file, sha256, bytes} for every file the spec reads (not the model).

    For a sweep pass `points` as (label, resolved spec) pairs: a file that differs
    between points is recorded once per file, as `PATH [label of its first point]`.
    Each file is hashed once.
    """
    found: dict[str, dict[str, str]] = {}  # spec path -> file -> first point's label
    for label, data in points or [("", spec_data)]:
        for where, file in _file_keys({k: v for k, v in data.items() if k != "model"}):
            found.setdefault(where, {}).setdefault(file, label)
    hashed: dict[str, dict[str, Any]] = {}
    record: dict[str, dict[str, Any]] = {}
    for where, files in found.items():
        for file, label in files.items():
            if file not in hashed:
                entry: dict[str, Any] = {"file": file}
                try:
                    entry["sha256"] = sha256_file(file)
                    entry["bytes"] = Path(file).stat().st_size
                except OSError:  # the run itself reports a missing file, with its spec path
                    entry["sha256"] = None
                hashed[file] = entry
            record[where if len(files) == 1 else f"{where} [{label}]"] = dict(hashed[file])
    return record


def changed_inputs(recorded: str | dict[str, Any]) -> list[str]:
    """The recorded inputs that are now missing or have other contents, in words."""
    entries = json.loads(recorded) if isinstance(recorded, str) else recorded
    changes = []
    for where, entry in sorted(entries.items()):
        file = entry.get("file")
        try:
            now = sha256_file(file)
        except (OSError, TypeError):
            changes.append(f"{where}: {file} is missing")
            continue
        if now != entry.get("sha256"):
            recorded_hash = str(entry.get("sha256"))[:12]
            changes.append(
                f"{where}: {file} has changed (sha256 {now[:12]}..., recorded {recorded_hash}...)"
            )
    return changes
