"""Editor support: every shipped spec names the schema on its first line, and the schema
explains every key (what an editor shows on hover) and accepts every shipped spec."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from jsonschema import Draft202012Validator

from nnrun.spec import load_spec

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = ROOT / "schemas" / "nnrun-spec-1.schema.json"
SPECS = sorted([*(ROOT / "specs").glob("*.yaml"), *(ROOT / "examples").glob("*.yaml")])
MODELINE = "# yaml-language-server: $schema="
# Being rewritten as a sweep on main; it gets its schema line there.
ELSEWHERE: set[str] = set()


def _schema() -> dict[str, Any]:
    return json.loads(SCHEMA.read_text())


@pytest.mark.parametrize("spec", SPECS, ids=lambda p: p.name)
def test_spec_starts_with_the_schema_line(spec: Path) -> None:
    if spec.name in ELSEWHERE:
        pytest.skip("rewritten on main")
    first = spec.read_text().splitlines()[0]
    assert first.startswith(MODELINE), f"{spec.name}: first line is {first!r}"
    target = (spec.parent / first.removeprefix(MODELINE)).resolve()
    assert target == SCHEMA.resolve()  # a relative path that reaches the schema


def _properties(node: Any, path: str = "") -> list[tuple[str, dict[str, Any]]]:
    found = []
    if isinstance(node, dict):
        for key, value in node.get("properties", {}).items():
            found.append((f"{path}/{key}", value))
        for key, value in node.items():
            found += _properties(value, f"{path}/{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            found += _properties(value, f"{path}/{i}")
    return found


def test_every_property_has_a_description() -> None:
    props = _properties(_schema())
    assert len(props) > 60
    missing = [path for path, value in props if not value.get("description")]
    assert missing == []


def test_main_keys_have_examples_enums_and_tables() -> None:
    schema = _schema()
    top = schema["properties"]
    for key in ("model", "prompts", "save", "edits", "generate", "output", "vars"):
        assert top[key].get("examples"), key
    defs = schema["$defs"]
    assert "@layers.5.output" in defs["Location"]["examples"]
    assert {"find": " France"} in defs["TokenSelection"]["examples"]
    model = defs["Model"]["properties"]
    assert "bfloat16" in model["dtype"]["enum"] and "AutoModel" in model["class"]["enum"]
    assert "cuda:0" in model["device"]["examples"]
    ops = defs["ApplyOp"]["anyOf"][0]["enum"]
    assert {"softmax", "argmax", "norm"} <= set(ops)
    for name in ("Location", "TokenSelection", "Edit", "ApplyOp", "Model"):
        table = defs[name]["markdownDescription"]
        assert "| --- |" in table, name
    # Every edit op is in the Edit table.
    for op in ("set", "add", "mul", "zero", "noise", "mean_ablate", "project_out", "clamp", "skip"):
        assert f"| `{op}` |" in defs["Edit"]["markdownDescription"], op
    Draft202012Validator.check_schema(schema)


@pytest.mark.parametrize("spec", SPECS, ids=lambda p: p.name)
def test_schema_accepts_every_shipped_spec(spec: Path) -> None:
    validator = Draft202012Validator(_schema())
    # As nnrun validates it (variables substituted, defaults filled in; a sweep at
    # each of its points) ...
    for point in load_spec(spec).points():
        assert list(validator.iter_errors(point.data)) == [], point.label
    # ... and as an editor sees the file. A ${var} may stand in a location, but a
    # number field holding ${var} is a string until nnrun substitutes it.
    for error in validator.iter_errors(yaml.safe_load(spec.read_text())):
        assert isinstance(error.instance, str) and error.instance.startswith("${"), (
            f"{spec.name}: {'.'.join(map(str, error.absolute_path))}: {error.message}"
        )


def test_readme_says_how_to_point_editors_at_the_schema() -> None:
    readme = (ROOT / "README.md").read_text()
    assert "yaml-language-server: $schema=" in readme
    assert "VS Code" in readme and "neovim" in readme
    assert "nnrun schema --write" in readme
