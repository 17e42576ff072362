"""Locate, load and cache the JSON Schema of spec format 1."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

SCHEMA_FILE = "nnrun-spec-1.schema.json"


def schema_path() -> Path:
    """The schema file: the copy packaged in the wheel, else the repository's ``schemas/``."""
    package_dir = Path(__file__).resolve().parent.parent  # nnrun/
    # An installed wheel carries nnrun/schemas/ (hatch force-include); a source checkout
    # has the single source of truth at <repo>/schemas/.
    for candidate in (
        package_dir / "schemas" / SCHEMA_FILE,
        package_dir.parent / "schemas" / SCHEMA_FILE,
    ):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"{SCHEMA_FILE} not found in {package_dir / 'schemas'} or {package_dir.parent / 'schemas'}"
    )


@functools.lru_cache(maxsize=1)
def _cached_schema() -> dict[str, Any]:
    with open(schema_path(), encoding="utf-8") as f:
        return json.load(f)


def load_schema() -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) as a dict; a fresh copy, safe to modify."""
    # A deep copy via JSON keeps the cache immune to callers that edit the result.
    return json.loads(json.dumps(_cached_schema()))


@functools.lru_cache(maxsize=1)
def validator() -> Any:
    """The cached ``Draft202012Validator`` for the schema."""
    from jsonschema import Draft202012Validator  # imported lazily: loading alone never needs it

    return Draft202012Validator(_cached_schema())


@functools.lru_cache(maxsize=1)
def section_validator() -> Any:
    """A validator for part of a spec: the schema with no top-level key required.

    A sweep's points differ in one place at a time; checking only the top-level section
    that holds it (``{"edits": [...]}``) costs a fraction of the whole document.
    """
    from jsonschema import Draft202012Validator

    return Draft202012Validator({**_cached_schema(), "required": []})
