"""The `nnrun` command line: run, validate, schema, show; exit codes and error display."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import h5py
import pytest
import yaml
from helpers import NNRUN, REPO, h5_str, one_torch_thread, write_yaml
from typer.testing import CliRunner

import nnrun
from nnrun.cli import app, main
from nnrun.errors import CompileError


@pytest.fixture(autouse=True)
def _one_torch_thread() -> Iterator[None]:
    with one_torch_thread():
        yield


# Wide enough that rich never wraps or elides a table cell or a message.
runner = CliRunner(env={"COLUMNS": "250"})

INVALID = """\
nnrun: 1
batch_size: 0
prompts:
  clean: The capital of France is
  corrupt: The capital of Germany is
save:
  resid:
    at: model.layers.0.output
    tokns: [-1]
edits:
  - at: model.layers.0.output
    prompts: [corupt]
    zero: true
"""
INVALID_ERRORS = [  # (line, spec path) of each of the three mistakes above
    (2, "batch_size"),
    (9, "save.resid.tokns"),
    (12, "edits[0].prompts[0]"),
]


def _spec(model: Path, **extra: Any) -> dict[str, Any]:
    return {
        "nnrun": 1,
        "model": {"path": str(model)},
        "batch_size": 8,
        "output": "runs/default.h5",
        "prompts": {"a": "The capital of France is", "b": "Hi"},
        "save": {
            "resid": {"at": "transformer.h.*.output", "tokens": [-1]},
            "logits": {"at": "output", "tokens": -1},
        },
        **extra,
    }


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _subprocess_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    env["OMP_NUM_THREADS"] = "1"
    return env


# -- run ---------------------------------------------------------------------------------


def test_run_with_typed_overrides_and_output(
    tiny_gpt2: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    spec = write_yaml(tmp_path / "exp.yaml", _spec(tiny_gpt2))
    result = runner.invoke(
        app,
        ["run", str(spec), "-s", "batch_size=1", "-s", "save.resid.tokens=[0, -1]", "-o", "out.h5"],
    )
    assert result.exit_code == 0, result.output
    assert not (tmp_path / "runs" / "default.h5").exists()  # -o wins over the spec's output
    with h5py.File(tmp_path / "out.h5", "r") as f:
        resolved = yaml.safe_load(h5_str(f.attrs["spec"]))
        assert f.attrs["status"] == "complete"
        assert f["saves/resid"].shape == (2, 3, 2, 32)  # the list override took effect
        assert f["saves/logits"].shape == (2, 1, 512)
        assert f["axes/resid/token"][()].tolist() == [0, -1]
    assert resolved["batch_size"] == 1  # an integer, not the string "1"
    assert resolved["save"]["resid"]["tokens"] == [0, -1]
    lines = result.stdout.splitlines()
    resid = next(line for line in lines if " resid " in line)
    assert "prompt, layer, token, hidden" in resid and "(2, 3, 2, 32)" in resid
    assert "float32" in resid
    logits = next(line for line in lines if " logits " in line)
    assert "prompt, token, vocab" in logits and "(2, 1, 512)" in logits
    assert "complete" in result.stdout


def test_real_process_exit_codes_and_no_traceback(tiny_gpt2: Path, tmp_path: Path) -> None:
    good = write_yaml(tmp_path / "good.yaml", _spec(tiny_gpt2))
    (tmp_path / "bad.yaml").write_text(INVALID)
    runs = {  # at once: the run mostly waits on imports
        "good": [str(NNRUN), "run", str(good), "-o", str(tmp_path / "good.h5")],
        "bad": [str(NNRUN), "validate", "bad.yaml"],
    }
    procs = {
        name: subprocess.Popen(
            argv,
            cwd=tmp_path,
            env=_subprocess_env(),
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for name, argv in runs.items()
    }
    streams = {name: p.communicate(timeout=120) for name, p in procs.items()}
    done = {name: (procs[name].returncode, *streams[name]) for name in procs}

    code, out, err = done["good"]
    assert code == 0, out + err
    assert "Traceback" not in out + err
    assert "resid" in out and "(2, 3, 1, 32)" in out
    with h5py.File(tmp_path / "good.h5", "r") as f:
        assert f.attrs["status"] == "complete"

    code, out, err = done["bad"]
    assert code == 1, out + err
    assert "Traceback" not in out + err
    # one line per error, unwrapped although stderr is a pipe of unknown width
    lines = err.strip().splitlines()
    assert [line.split(":")[0] for line in lines] == ["error bad.yaml"] * 3 + ["bad.yaml"]
    assert lines[-1] == "bad.yaml: 3 errors"


def test_debug_shows_the_traceback_and_default_does_not(
    tiny_gpt2: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.delenv("COLUMNS", raising=False)  # captured stderr: rich assumes 80 columns
    spec = _spec(tiny_gpt2)
    spec["save"]["resid"]["at"] = "transformer.h.0.attnn.output"
    path = write_yaml(tmp_path / "typo.yaml", spec)
    out = str(tmp_path / "o.h5")

    monkeypatch.setattr(sys, "argv", ["nnrun", "run", str(path), "-o", out])
    with pytest.raises(SystemExit) as exited:
        main()
    assert exited.value.code == 1
    captured = capsys.readouterr()
    assert "Traceback" not in captured.out + captured.err
    err = captured.err.strip()
    assert "\n" not in err  # one line, however long
    assert err.startswith("error: save.resid.at:")
    assert "'transformer.h.0.attnn'" in err
    assert "did you mean 'transformer.h.0.attn'" in err  # the nearest real module first

    monkeypatch.setattr(sys, "argv", ["nnrun", "--debug", "run", str(path), "-o", out])
    # With --debug the error propagates, so the interpreter prints its traceback.
    with pytest.raises(CompileError, match=r"save\.resid\.at: .*transformer\.h\.0\.attn"):
        main()
    monkeypatch.setattr(sys, "argv", ["nnrun", "schema"])  # reset the --debug flag
    with pytest.raises(SystemExit):
        main()


def test_show_a_missing_file_is_a_user_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.setattr(sys, "argv", ["nnrun", "show", str(tmp_path / "nope.h5")])
    with pytest.raises(SystemExit) as exited:
        main()
    err = capsys.readouterr().err
    assert "nope.h5" in err
    assert "internal error" not in err and "bug in nnrun" not in err
    assert exited.value.code == 1


# -- validate ------------------------------------------------------------------------------


def test_validate_reports_every_error_with_its_path(tmp_path: Path) -> None:
    (tmp_path / "bad.yaml").write_text(INVALID)
    good = write_yaml(tmp_path / "good.yaml", {"nnrun": 1, "prompts": {"a": "Hello"}})

    ok = runner.invoke(app, ["validate", str(good)])
    assert ok.exit_code == 0, ok.output
    assert ok.stdout.strip() == f"ok {good}"

    result = runner.invoke(app, ["validate", str(good), str(tmp_path / "bad.yaml")])
    assert result.exit_code == 1
    assert f"ok {good}" in result.stdout
    errors = [line for line in result.stderr.splitlines() if line.startswith("error ")]
    assert len(errors) == 3, result.stderr
    for line, (number, path) in zip(errors, INVALID_ERRORS):
        assert line.startswith(f"error {tmp_path / 'bad.yaml'}:{number}: {path}: "), line
    assert "did you mean 'tokens'" in errors[1]
    assert "did you mean 'corrupt'" in errors[2]
    assert result.stderr.strip().endswith("bad.yaml: 3 errors")


def test_validate_is_fast_and_never_imports_torch(tmp_path: Path) -> None:
    spec = write_yaml(
        tmp_path / "valid.yaml",
        {
            "nnrun": 1,
            "model": {"path": "models/whatever"},
            "prompts": {"a": "The capital of France is"},
            "save": {"resid": {"at": "model.layers.*.output", "tokens": -1}},
        },
    )
    best = float("inf")
    for _ in range(5):  # the best of at least three: a busy machine should not fail this
        cpu_before = _children_cpu()
        start = time.perf_counter()
        done = subprocess.run(
            [str(NNRUN), "validate", str(spec)],
            cwd=tmp_path,
            env=_subprocess_env(),
            capture_output=True,
            text=True,
        )
        wall = time.perf_counter() - start
        cpu = _children_cpu() - cpu_before
        assert done.returncode == 0, done.stdout + done.stderr
        assert done.stdout.strip() == f"ok {spec}"
        assert cpu < 0.5, f"`nnrun validate` used {cpu:.2f} s of CPU"  # importing torch: ~2 s
        best = min(best, wall)
        if best < 0.5:
            break
    assert best < 0.5, f"`nnrun validate` took {best:.2f} s at best"

    code = textwrap.dedent(
        f"""
        import sys
        from nnrun.cli import app
        code = app(["validate", {str(spec)!r}], standalone_mode=False)
        heavy = [m for m in ("torch", "transformers", "h5py", "numpy") if m in sys.modules]
        print(code, heavy)
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env=_subprocess_env(),
        capture_output=True,
        text=True,
        check=True,
    )
    assert done.stdout.splitlines()[-1] == "0 []"


# -- schema, show ---------------------------------------------------------------------------


def test_schema_prints_the_json_schema() -> None:
    from jsonschema import Draft202012Validator

    from nnrun.spec import schema_path

    result = runner.invoke(app, ["schema"])
    assert result.exit_code == 0
    printed = json.loads(result.stdout)
    assert printed == json.loads(schema_path().read_text())
    assert printed == json.loads((REPO / "schemas" / "nnrun-spec-1.schema.json").read_text())
    Draft202012Validator.check_schema(printed)
    validator = Draft202012Validator(printed)
    assert validator.is_valid({"nnrun": 1, "prompts": {"a": "Hello"}})
    assert not validator.is_valid({"nnrun": 1, "prompts": {"a": "Hello"}, "bogus": 1})


def test_show_a_partial_file_says_why(tiny_gpt2: Path, tmp_path: Path) -> None:
    def interrupt(state: nnrun.RunProgress) -> None:
        if state.stage != "running" or not state.rows_done:
            return
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        nnrun.run(
            {**_spec(tiny_gpt2), "batch_size": 1}, output=tmp_path / "x.h5", progress=interrupt
        )
    result = runner.invoke(app, ["show", str(tmp_path / "x.partial.h5")])
    assert result.exit_code == 0, result.output
    assert "partial" in result.stdout
    assert "KeyboardInterrupt" in result.stdout


def test_show_prints_provenance_and_saves(tiny_gpt2: Path, tmp_path: Path) -> None:
    out = tmp_path / "shown.h5"
    nnrun.run({**_spec(tiny_gpt2), "seed": 11}, output=out)
    with h5py.File(out, "r") as f:
        sha = h5_str(f.attrs["spec_sha256"])
    result = runner.invoke(app, ["show", str(out)])
    assert result.exit_code == 0, result.output
    rows = {
        line.split()[0]: line.split(maxsplit=1)[1].strip()
        for line in result.stdout.splitlines()
        if len(line.split()) >= 2
    }
    assert rows["status"] == "complete"
    assert rows["nnrun_version"] == nnrun.__version__
    assert rows["model_name"] == str(tiny_gpt2)
    assert rows["seed"] == "11"
    assert rows["device"] == "cpu"
    assert rows["spec_sha256"] == sha  # the whole hash, not elided
    lines = result.stdout.splitlines()
    resid = next(line for line in lines if " resid " in line)
    assert "prompt, layer, token, hidden" in resid and "(2, 3, 1, 32)" in resid
    logits = next(line for line in lines if " logits " in line)
    assert "(2, 1, 512)" in logits


def test_show_names_the_model_class(tiny_gpt2: Path, tmp_path: Path) -> None:
    out = tmp_path / "cls.h5"
    nnrun.run(_spec(tiny_gpt2), output=out)
    with h5py.File(out, "r") as f:
        assert h5_str(f.attrs["model_model_class"]) == "GPT2LMHeadModel"
    result = runner.invoke(app, ["show", str(out)])
    assert result.exit_code == 0, result.output
    assert "GPT2LMHeadModel" in result.stdout
