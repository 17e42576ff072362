"""Mistakes a user makes in a spec: each is one clear message, exit 1, no finished output.

Every case runs a small spec on the tiny Llama twice: through the CLI entry point
(`nnrun.cli.main`, in-process, so each case costs one model load rather than a new
interpreter) and through the Python API (`nnrun.run`). Both must report the problem
as an NnrunError whose message names the edit or save (its spec path or label) and
says what to change; the CLI prints it as a single `error:` message without a
traceback and exits 1. No output file may claim to be complete: the output path is
absent, and any file left behind says `status = partial`.

Two cases also go through the installed `nnrun` executable in a subprocess.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest

import nnrun
from nnrun.errors import NnrunError
from nnrun.spec import SpecError

NNRUN = Path(sys.executable).with_name("nnrun")

PROMPTS = """\
prompts:
  clean: The capital of France is
  corrupt: The capital of Germany is
"""

# id -> (the spec's edits/save section, fragments the message must contain).
# The tiny Llama prepends <s>: both prompts have 6 tokens; its hidden size is 32
# and its MLP's up_proj / gate_proj map 32 -> 64.
CASES: dict[str, tuple[str, list[str]]] = {
    "unknown-from-prompt": (
        "edits:\n  - at: model.layers.1.output\n    prompts: [corrupt]\n    set: {from: claen}\n",
        ["edits[0].set.from", "unknown prompt 'claen'", "did you mean 'clean'"],
    ),
    "missing-file": (
        "edits:\n  - at: model.layers.1.output\n    add: {file: missing.h5, dataset: v}\n",
        ["edits[0].add.file", "'missing.h5'", "not found"],
    ),
    "missing-dataset": (
        "edits:\n  - at: model.layers.1.output\n"
        "    add: {file: vectors.h5, dataset: saves/vector}\n",
        ["edits[0]", "no dataset 'saves/vector'", "vectors.h5", "saves/resid"],
    ),
    "shape-from-file": (
        "edits:\n  - at: model.layers.1.output\n    prompts: [corrupt]\n    tokens: [-1]\n"
        "    add: {file: vectors.h5, dataset: wrong}\n",
        ["edits[0]", "model.layers.1.output", "(7,)", "(1, 1, 32)", "broadcast"],
    ),
    "shape-literal": (
        "edits:\n  - at: model.layers.2.output\n    tokens: [0, -1]\n    mul: [1.0, 2.0, 3.0]\n",
        ["edits[0]", "model.layers.2.output", "(3,)", "(2, 2, 32)", "broadcast"],
    ),
    "skip-up-proj": (
        "edits:\n  - at: model.layers.0.mlp.up_proj.output\n    skip: true\n",
        ["edits[0]", "skip", "model.layers.0.mlp.up_proj.output", "32)", "64)"],
    ),
    "skip-gate-proj": (
        "edits:\n  - at: model.layers.1.mlp.gate_proj.output\n    prompts: [clean]\n"
        "    skip: true\n",
        ["edits[0]", "skip", "model.layers.1.mlp.gate_proj.output", "32)", "64)"],
    ),
    "site-never-runs": (
        # model.layers is the ModuleList: a container, never called itself.
        "edits:\n  - at: model.layers.output\n    zero: true\n",
        ["edits[0]", "model.layers.output", "never runs"],
    ),
    "save-site-never-runs": (
        "save:\n  resid: {at: model.layers.output}\n",
        ["save.resid", "model.layers.output", "never runs"],
    ),
    "tokens-beyond-prompt": (
        "edits:\n  - at: model.layers.1.output\n    tokens: [2, 40]\n    zero: true\n",
        ["edits[0]", "40", "beyond prompt 'clean'", "6 tokens", "-6..-1"],
    ),
    "save-tokens-beyond-prompt": (
        "save:\n  resid: {at: model.layers.1.output, tokens: -7}\n",
        ["save 'resid'", "-7", "beyond prompt", "6 tokens"],
    ),
    "wrong-module-path": (
        "edits:\n  - at: model.layer.1.output\n    zero: true\n",
        ["edits[0].at", "no module 'model.layer'", "did you mean", "'model.layers'"],
    ),
    "save-wrong-module-path": (
        "save:\n  mlp: {at: model.layers.1.mpl.output}\n",
        ["save.mlp.at", "'model.layers.1.mpl'", "did you mean", "'model.layers.1.mlp'"],
    ),
}

# Problems a spec has on its own (found by validation, before any model loads).
SPEC_ERRORS = {"unknown-from-prompt", "missing-file"}


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A working directory with vectors.h5: saves/resid (1, 1, 32) and wrong (7,)."""
    monkeypatch.chdir(tmp_path)
    with h5py.File(tmp_path / "vectors.h5", "w") as f:
        f["saves/resid"] = np.ones((1, 1, 32), np.float32)
        f["wrong"] = np.ones((7,), np.float32)
    return tmp_path


def write_spec(workdir: Path, tiny: Path, body: str, name: str = "bad") -> Path:
    spec = workdir / f"{name}.yaml"
    spec.write_text(f"nnrun: 1\nmodel: {{path: '{tiny}'}}\n{PROMPTS}{body}output: out/{name}.h5\n")
    return spec


def assert_nothing_complete(workdir: Path) -> None:
    """The output path is absent; every other .h5 nnrun left there says `partial`."""
    assert not (workdir / "out" / "bad.h5").exists()
    for path in workdir.rglob("*.h5"):
        if path.name == "vectors.h5":
            continue
        with h5py.File(path, "r") as f:
            assert f.attrs.get("status") == "partial", f"{path} claims {f.attrs.get('status')}"


def flat(text: str) -> str:
    """Rich wraps long lines at the console width: compare with whitespace collapsed."""
    return " ".join(text.split())


def run_main(args: list[str], monkeypatch: pytest.MonkeyPatch, capsys: Any) -> tuple[int, str, str]:
    from nnrun import cli

    monkeypatch.setattr(sys, "argv", ["nnrun", *args])
    with pytest.raises(SystemExit) as exit_:
        cli.main()
    out = capsys.readouterr()
    return exit_.value.code, out.out, out.err


@pytest.mark.parametrize("case", list(CASES))
def test_cli_reports_one_clear_error(
    case: str, tiny_llama: Path, workdir: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    body, fragments = CASES[case]
    spec = write_spec(workdir, tiny_llama, body)
    code, out, err = run_main(["run", str(spec)], monkeypatch, capsys)
    assert code == 1, err
    assert "Traceback" not in out + err and "internal error" not in err
    assert len(re.findall(r"^error", err, re.MULTILINE)) == 1, err
    message = flat(err)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in: {message}"
    assert_nothing_complete(workdir)


@pytest.mark.parametrize("case", list(CASES))
def test_api_raises_an_nnrun_error(case: str, tiny_llama: Path, workdir: Path) -> None:
    body, fragments = CASES[case]
    spec = write_spec(workdir, tiny_llama, body)
    with pytest.raises(NnrunError) as caught:
        nnrun.run(spec)
    if case in SPEC_ERRORS:
        assert isinstance(caught.value, SpecError)
    message = flat(str(caught.value))
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in: {message}"
    assert_nothing_complete(workdir)


def test_never_run_container_suggests_its_children(tiny_llama: Path, workdir: Path) -> None:
    spec = write_spec(workdir, tiny_llama, CASES["site-never-runs"][0])
    with pytest.raises(NnrunError) as caught:
        nnrun.run(spec)
    message = str(caught.value)
    assert "model.layers.*" in message or "model.layers.0" in message


THREE_MISTAKES = """\
nnrun: 1
prompts:
  clean: The capital of France is
  corrupt: The capital of Germany is
save:
  resid:
    at: model.layers.3.output
    tokns: [-1]
edits:
  - at: model.layers.3.output
    prompts: [corrupt]
    set: {from: claen}
  - at: model..layers.5.output
    zero: true
"""


def check_three_errors(code: int, err: str) -> None:
    assert code == 1
    lines = [line for line in err.splitlines() if line.startswith("error")]
    assert len(lines) == 3, err
    text = flat(err)
    assert "three.yaml:8: save.resid.tokns: unknown key 'tokns'" in text
    assert "did you mean 'tokens'" in text
    assert "three.yaml:12: edits[0].set.from: unknown prompt 'claen'" in text
    assert "three.yaml:13: edits[1].at:" in text
    assert "3 errors" in text
    assert "Traceback" not in err


def test_validate_reports_three_mistakes_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    spec = tmp_path / "three.yaml"
    spec.write_text(THREE_MISTAKES)
    code, _, err = run_main(["validate", str(spec)], monkeypatch, capsys)
    check_three_errors(code, err)


# -- the installed executable --------------------------------------------------------


def nnrun_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "300", "NO_COLOR": "1"}
    return subprocess.run(
        [str(NNRUN), *args], cwd=cwd, capture_output=True, text=True, env=env, timeout=120
    )


def test_executable_validate_three_mistakes(tmp_path: Path) -> None:
    spec = tmp_path / "three.yaml"
    spec.write_text(THREE_MISTAKES)
    done = nnrun_cli("validate", str(spec), cwd=tmp_path)
    check_three_errors(done.returncode, done.stderr)


def test_executable_run_wrong_module_path(tiny_llama: Path, workdir: Path) -> None:
    body, fragments = CASES["wrong-module-path"]
    spec = write_spec(workdir, tiny_llama, body)
    done = nnrun_cli("run", str(spec), cwd=workdir)
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    (line,) = [line for line in done.stderr.splitlines() if line.strip()]
    assert line.startswith("error: edits[0].at: no module 'model.layer'")
    assert all(f in line for f in fragments)
    assert_nothing_complete(workdir)
