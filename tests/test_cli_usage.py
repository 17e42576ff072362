"""The first things a new user types, through the installed `nnrun` executable.

A usage error is typer's usage message and exit 2, never "internal error ... this is a
bug"; `--help`/`-h` and `--version` answer and exit 0; `--debug` works anywhere on the
line. (Ctrl-C during a run is tested in test_faults.py.)
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from helpers import NNRUN

import nnrun

# argv -> (exit code, text that must appear in stdout + stderr)
CASES: dict[tuple[str, ...], tuple[int, str]] = {
    (): (2, "Usage: nnrun [OPTIONS] COMMAND [ARGS]..."),
    ("foo",): (2, "No such command 'foo'"),
    ("run",): (2, "Missing argument 'spec'"),
    ("-h",): (0, "Usage: nnrun [OPTIONS] COMMAND [ARGS]..."),
    ("--help",): (0, "diff"),
    ("--version",): (0, f"nnrun {nnrun.__version__}"),
    ("run", "x.yaml", "--bogus"): (2, "No such option: --bogus"),
    ("run", "x.yaml", "-s"): (2, "Option '-s' requires an argument"),
    ("run", "-h"): (0, "--overwrite"),
    ("diff", "a.h5"): (2, "Missing argument 'b'"),
    ("diff", "a.h5", "b.h5", "--rtol", "x"): (2, "Invalid value for '--rtol'"),
    ("run", "x.yaml"): (1, "error: x.yaml: spec file not found"),
    ("--debug", "foo"): (2, "No such command 'foo'"),
}


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    env["COLUMNS"] = "200"
    return env


def test_usage_errors_are_usage_errors(tmp_path: Path) -> None:
    procs = {
        args: subprocess.Popen(
            [NNRUN, *args],
            cwd=tmp_path,
            env=_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for args in CASES
    }
    for args, proc in procs.items():
        out, err = proc.communicate(timeout=120)
        code, expected = CASES[args]
        text = out + err
        assert proc.returncode == code, (args, text)
        assert expected in text, (args, text)
        assert "internal error" not in text and "bug in nnrun" not in text, (args, text)
        assert "Traceback" not in text, (args, text)


@pytest.mark.parametrize("where", ["after", "before"])
def test_debug_anywhere_on_the_line_shows_the_traceback(where: str, tmp_path: Path) -> None:
    args = ["run", "spec.yaml"]
    args = [*args, "--debug"] if where == "after" else ["--debug", *args]
    proc = subprocess.run(
        [NNRUN, *args], cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 1
    assert "Traceback" in proc.stderr and "SpecError" in proc.stderr
    assert "No such option" not in proc.stderr and "internal error" not in proc.stderr


def test_debug_after_a_double_dash_is_an_argument(tmp_path: Path) -> None:
    proc = subprocess.run(
        [NNRUN, "validate", "--", "--debug"],
        cwd=tmp_path,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1
    assert "--debug: spec file not found" in proc.stderr and "Traceback" not in proc.stderr
