"""The wheel carries the JSON Schema, and an installed nnrun validates from it."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.real
def test_wheel_ships_schema_and_validates_without_the_repo(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp_path), str(ROOT)],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("nnrun-*.whl")
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as zf:
        zf.extractall(site)
    packaged = site / "nnrun" / "schemas" / "nnrun-spec-1.schema.json"
    assert json.loads(packaged.read_text()) == json.loads(
        (ROOT / "schemas" / "nnrun-spec-1.schema.json").read_text()
    )
    spec = tmp_path / "s.yaml"
    spec.write_text('nnrun: 1\nprompts: {a: "hi"}\nsave: {x: {at: output, tokns: [-1]}}\n')
    # Run from an empty directory with only the unpacked wheel on the path.
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]);"
        "from nnrun.spec import schema_path, load_spec, validate_spec;"
        "print(schema_path()); print([i.path for i in validate_spec(load_spec(sys.argv[2]))])"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(site), str(spec)],
        cwd=tmp_path,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.splitlines()
    assert Path(out[0]).resolve() == packaged.resolve()
    assert "save.x" in out[1]
