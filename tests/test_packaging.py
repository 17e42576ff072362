"""The wheel carries the JSON Schema and the templates: an installed nnrun validates
from it and `nnrun init` copies templates from it, with no repository around."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel built from this checkout, unpacked into a folder (no repository beside it)."""
    tmp = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp), str(ROOT)],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp.glob("nnrun-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        zf.extractall(tmp / "site")
    return tmp / "site"


@pytest.mark.real
def test_wheel_ships_schema_and_validates_without_the_repo(site: Path, tmp_path: Path) -> None:
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


@pytest.mark.real
def test_init_from_the_wheel_outside_the_repository(site: Path, tmp_path: Path) -> None:
    work = tmp_path / "project"
    work.mkdir()
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); sys.argv = ['nnrun', *sys.argv[2:]];"
        "from nnrun.cli import main; main()"
    )

    def nnrun(*args: str) -> str:
        done = subprocess.run(
            [sys.executable, "-c", code, str(site), *args],
            cwd=work,
            capture_output=True,
            text=True,
            env={**os.environ, "COLUMNS": "200"},
        )
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout

    listed = nnrun("init")
    packaged = sorted(p.stem for p in (site / "nnrun" / "specs").glob("*.yaml"))
    assert packaged == sorted(p.stem for p in (ROOT / "specs").glob("*.yaml"))
    for name in packaged:
        assert name in listed
    nnrun("init", "logit-lens", "-o", "lens.yaml")
    text = (work / "lens.yaml").read_text()
    schema = Path(text.splitlines()[0].split("$schema=", 1)[1])
    assert schema.resolve() == (site / "nnrun" / "schemas" / "nnrun-spec-1.schema.json").resolve()
    assert (
        text.splitlines()[1:] == (ROOT / "specs" / "logit-lens.yaml").read_text().splitlines()[1:]
    )
    assert "ok lens.yaml" in nnrun("validate", "lens.yaml")
    nnrun("schema", "--write", "schemas")
    assert json.loads((work / "schemas" / "nnrun-spec-1.schema.json").read_text()) == json.loads(
        schema.read_text()
    )
