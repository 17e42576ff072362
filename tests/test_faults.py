"""Nothing is lost under faults: signals, a full disk, two runs at once, bad output paths.

Signals and limits are tested on real `nnrun run` processes: a small driver script
(DRIVER) runs the same entry point as the installed `nnrun`, after making one moment
of the run (model load, after the first batch, the final write) announce itself and
wait, so that the test can send SIGINT or SIGTERM exactly then.
"""

from __future__ import annotations

import hashlib
import json
import os
import pwd
import resource
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
from helpers import NNRUN, h5_str, one_torch_thread, write_jsonl, write_yaml

import nnrun
from nnrun.errors import Interrupted, OutputError
from nnrun.store import _writer, changed_inputs


@pytest.fixture(autouse=True)
def _one_torch_thread() -> Iterator[None]:
    with one_torch_thread():
        yield


FRANCE = "The capital of France is"

# Runs nnrun's CLI entry point; NNRUN_TEST_STAGE names the moment that announces itself
# (touching NNRUN_TEST_MARK) and then waits for NNRUN_TEST_GO to exist.
DRIVER = r"""
import os, sys, time
from pathlib import Path

stage = os.environ.get("NNRUN_TEST_STAGE", "")


def pause():
    Path(os.environ["NNRUN_TEST_MARK"]).touch()
    go = Path(os.environ["NNRUN_TEST_GO"])
    for _ in range(1200):
        if go.exists():
            return
        time.sleep(0.05)


if stage == "load":
    import nnrun.models as models
    load = models.load_model
    def paused_load(*a, **k):
        pause()
        return load(*a, **k)
    models.load_model = paused_load
elif stage == "batch":
    # Once the first batch is in the file (the writer thread has written it).
    import nnrun.store._background as b
    write = b.BackgroundWriter.write
    def paused_write(self, result):
        write(self, result)
        self.drain()
        pause()
    b.BackgroundWriter.write = paused_write
elif stage == "final":
    import nnrun.store._writer as w
    finish = w.OutputWriter._finish_axes
    def paused_finish(self):
        finish(self)
        pause()
    w.OutputWriter._finish_axes = paused_finish
if os.environ.get("NNRUN_TEST_NO_ROOM_CHECK"):
    import nnrun.store._writer as w
    w.check_room = lambda path, needed: None

from nnrun.cli import main
sys.argv = ["nnrun", *sys.argv[1:]]
main()
"""


def _spec(model: Path, prompts: Any = None, **extra: Any) -> dict[str, Any]:
    return {
        "nnrun": 1,
        "model": {"path": str(model)},
        "batch_size": 1,
        "prompts": prompts or {"a": FRANCE, "b": "Hi there", "c": "Paris is a city"},
        "save": {"resid": {"at": "transformer.h.*.output", "tokens": [-1]}},
        **extra,
    }


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    env.update(
        OMP_NUM_THREADS="1",
        NNRUN_TEST_MARK=str(tmp_path / "mark"),
        NNRUN_TEST_GO=str(tmp_path / "go"),
        **extra,
    )
    return env


def _default_signals(then: Any = None) -> Any:
    """A preexec_fn giving the child SIGINT's default handling (and then `then`).

    A test run started in the background by a non-interactive shell (a CI runner,
    `cmd &`) has SIGINT ignored, and children inherit that; nnrun rightly leaves an
    ignored signal ignored, so the tests that send SIGINT must undo it first.
    """

    def preexec() -> None:
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        if then is not None:
            then()

    return preexec


def _driver(tmp_path: Path, args: list[str], preexec: Any = None, **env: str) -> subprocess.Popen:
    script = tmp_path / "driver.py"
    script.write_text(DRIVER)
    return subprocess.Popen(
        [sys.executable, str(script), *args],
        cwd=tmp_path,
        env=_env(tmp_path, **env),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=_default_signals(preexec),
    )


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"the run ended before {path.name}: {out}{err}")
        assert time.monotonic() < deadline, f"no {path.name} after {timeout} s"
        time.sleep(0.05)


def _status(path: Path) -> str:
    with h5py.File(path, "r") as f:
        return h5_str(f.attrs["status"])


def _complete_earlier(model: Path, out: Path) -> bytes:
    nnrun.run(_spec(model, {"x": "earlier"}), output=out)
    assert _status(out) == "complete"
    return out.read_bytes()


# -- signals ---------------------------------------------------------------------------


@pytest.mark.parametrize("stage", ["load", "batch", "final"])
def test_sigint_and_sigterm_stop_cleanly_at_every_moment(
    stage: str, tiny_gpt2: Path, tmp_path: Path
) -> None:
    # One directory per signal, so that both runs go at once (each over an earlier output).
    runs = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        work = tmp_path / sig.name
        work.mkdir()
        out = work / "out.h5"
        earlier = _complete_earlier(tiny_gpt2, out)
        spec = write_yaml(work / "spec.yaml", _spec(tiny_gpt2))
        proc = _driver(
            work, ["run", str(spec), "-o", str(out), "--overwrite"], NNRUN_TEST_STAGE=stage
        )
        runs[sig] = (work, out, earlier, proc)
    for sig, (work, out, earlier, proc) in runs.items():
        partial = work / "out.partial.h5"
        _wait_for(work / "mark", proc)
        sent = time.monotonic()
        proc.send_signal(sig)
        stdout, stderr = proc.communicate(timeout=60)
        assert time.monotonic() - sent < 10, "the run did not stop within seconds"
        assert proc.returncode == 128 + sig, (stage, sig, stdout, stderr)  # 130, 143
        assert "Traceback" not in stderr and "internal error" not in stderr
        lines = [line for line in stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith(f"interrupted by {sig.name}"), stderr
        assert out.read_bytes() == earlier  # the complete output was never touched
        assert f"the earlier {out} was not touched" in lines[0]
        assert not (work / "out.h5.lock").exists()
        if stage == "load":
            assert not partial.exists() and "nothing was written" in lines[0]
            continue
        assert f"kept the unfinished output {partial} (status partial)" in lines[0]
        with h5py.File(partial, "r") as f:  # readable, and says what it is
            assert h5_str(f.attrs["status"]) == "partial"
            assert h5_str(f.attrs["error"]).startswith("Interrupted")
            # The prompt axis is laid out in full; rows not reached yet stay empty.
            rows = sum(1 for prompt in h5_str(f["prompts/id"][()]) if prompt)
        assert rows == (1 if stage == "batch" else 3)


def test_ctrl_c_through_the_installed_executable(tiny_gpt2: Path, tmp_path: Path) -> None:
    """The real `nnrun` process, interrupted once its partial file exists."""
    source = write_jsonl(tmp_path / "p.jsonl", [{"text": f"{FRANCE} {i}"} for i in range(3000)])
    spec = write_yaml(tmp_path / "spec.yaml", _spec(tiny_gpt2, {"file": str(source)}))
    partial = tmp_path / "ctrl-c.partial.h5"
    proc = subprocess.Popen(
        [NNRUN, "run", spec, "-o", tmp_path / "ctrl-c.h5"],
        env=_env(tmp_path),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=_default_signals(),
    )
    _wait_for(partial, proc)
    time.sleep(0.5)  # a few batches in
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert lines == [
        f"interrupted by SIGINT; kept the unfinished output {partial} (status partial)"
    ], stderr
    assert _status(partial) == "partial" and not (tmp_path / "ctrl-c.h5").exists()


def test_a_signal_at_the_point_of_no_return_waits_for_the_complete_file(
    tiny_gpt2: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Between `status = complete` and the rename a signal is held: the file is finished,
    renamed, and only then the run reports the interrupt."""
    out = tmp_path / "out.h5"
    replace = os.replace

    def replace_after_a_signal(src: Any, dst: Any) -> None:
        os.kill(os.getpid(), signal.SIGTERM)  # arrives while the writer is finishing
        replace(src, dst)

    monkeypatch.setattr(_writer.os, "replace", replace_after_a_signal)
    with pytest.raises(Interrupted) as caught:
        nnrun.run(_spec(tiny_gpt2), output=out)
    monkeypatch.undo()
    assert caught.value.signum == signal.SIGTERM
    assert "already complete" in caught.value.kept
    assert _status(out) == "complete" and not (tmp_path / "out.partial.h5").exists()
    assert nnrun.load(out)["resid"].shape[0] == 3
    # The handlers are gone again: the process's own SIGTERM handling is back.
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


# -- two runs, one output ------------------------------------------------------------------


def test_a_second_run_on_the_same_output_is_refused_before_touching_anything(
    tiny_gpt2: Path, tmp_path: Path
) -> None:
    out = tmp_path / "same.h5"
    partial = tmp_path / "same.partial.h5"
    earlier = _complete_earlier(tiny_gpt2, out)
    spec = write_yaml(tmp_path / "spec.yaml", _spec(tiny_gpt2))
    first = _driver(
        tmp_path, ["run", str(spec), "-o", str(out), "--overwrite"], NNRUN_TEST_STAGE="batch"
    )
    _wait_for(tmp_path / "mark", first)
    before = partial.stat()
    for extra in ([], ["--overwrite"]):
        started = time.monotonic()
        second = subprocess.run(
            [NNRUN, "run", spec, "-o", out, *extra],
            cwd=tmp_path,
            env=_env(tmp_path),
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert second.returncode == 1, second.stderr
        assert f"another run (process {first.pid}) is writing {out}" in second.stderr
        assert "Traceback" not in second.stderr
        assert time.monotonic() - started < 30  # refused before loading a model
    after = partial.stat()
    assert (after.st_ino, after.st_size, after.st_mtime_ns) == (
        before.st_ino,
        before.st_size,
        before.st_mtime_ns,
    )
    assert out.read_bytes() == earlier
    (tmp_path / "go").touch()
    stdout, stderr = first.communicate(timeout=120)
    assert first.returncode == 0, stderr
    assert _status(out) == "complete" and not partial.exists()
    with h5py.File(out, "r") as f:
        assert h5_str(f["prompts/id"][()]) == ["a", "b", "c"]
    assert not (tmp_path / "same.h5.lock").exists()


def test_a_lock_left_by_a_killed_run_does_not_block(tiny_gpt2: Path, tmp_path: Path) -> None:
    out = tmp_path / "k.h5"
    (tmp_path / "k.h5.lock").write_text("999999\n")  # the file stays; its flock died with it
    nnrun.run(_spec(tiny_gpt2), output=out)
    assert _status(out) == "complete"


# -- existing outputs ----------------------------------------------------------------------


def test_an_existing_output_is_replaced_only_with_overwrite(
    tiny_gpt2: Path, tmp_path: Path
) -> None:
    out = tmp_path / "o.h5"
    spec = write_yaml(tmp_path / "spec.yaml", _spec(tiny_gpt2))
    earlier = _complete_earlier(tiny_gpt2, out)
    refused = subprocess.run(
        [NNRUN, "run", spec, "-o", out], env=_env(tmp_path), capture_output=True, text=True
    )
    assert refused.returncode == 1
    assert f"{out} already exists; pass --overwrite" in " ".join(refused.stderr.split())
    assert out.read_bytes() == earlier
    replaced = subprocess.run(
        [NNRUN, "run", spec, "-o", out, "--overwrite"],
        env=_env(tmp_path),
        capture_output=True,
        text=True,
    )
    assert replaced.returncode == 0, replaced.stderr
    with h5py.File(out, "r") as f:
        assert h5_str(f["prompts/id"][()]) == ["a", "b", "c"]


def test_timestamp_makes_a_new_output_name(
    tiny_gpt2: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    spec = _spec(tiny_gpt2, output="runs/exp-${timestamp}.h5")
    results = nnrun.run(spec)
    name = results.path.name
    assert name.startswith("exp-") and name != "exp-${timestamp}.h5"
    stamp = name.removeprefix("exp-").removesuffix(".h5")
    assert len(stamp) == 15 and stamp[8] == "-" and stamp.replace("-", "").isdigit()
    with h5py.File(results.path, "r") as f:  # the stored spec names the file it wrote
        assert f"output: runs/{name}" in h5_str(f.attrs["spec"])


# -- output paths, before the model loads ---------------------------------------------------


@pytest.fixture
def no_model(monkeypatch: pytest.MonkeyPatch) -> None:
    """Loading the model fails the test: every check here must come first."""

    def fail(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the model was loaded before the output path was checked")

    monkeypatch.setattr("nnrun.api.load_model_for", fail)


@pytest.mark.usefixtures("no_model")
def test_bad_output_paths_are_refused_before_the_model_loads(
    tiny_gpt2: Path, tmp_path: Path
) -> None:
    spec = _spec(tiny_gpt2)
    (tmp_path / "adir").mkdir()
    (tmp_path / "afile").write_text("x")
    os.mkfifo(tmp_path / "fifo.h5")
    (tmp_path / "busy.partial.h5").mkdir()
    cases = {
        tmp_path / "adir": "is a directory",
        "/dev/null": "is a device, not a regular file",
        tmp_path / "fifo.h5": "is a named pipe",
        tmp_path / "busy.h5": "the partial file",
        tmp_path / "afile" / "x.h5": "afile is a file",
        tmp_path / ("x" * 300 + ".h5"): "file name too long",
        "": "the output path is empty",
    }
    for output, expected in cases.items():
        with pytest.raises(OutputError, match=expected):
            nnrun.run(spec, output=output)
    assert stat.S_ISFIFO((tmp_path / "fifo.h5").stat().st_mode)  # never replaced
    assert Path("/dev/null").is_char_device()


def test_output_ending_in_a_slash_is_a_directory(
    tiny_gpt2: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    spec = write_yaml(tmp_path / "exp.yaml", _spec(tiny_gpt2, output="runs/exp.h5"))
    from typer.testing import CliRunner

    from nnrun.cli import app

    result = CliRunner().invoke(app, ["run", str(spec), "-o", "o/newdir/", "-s", "seed=5"])
    assert result.exit_code == 0, result.output
    out = tmp_path / "o" / "newdir" / "exp.h5"
    assert _status(out) == "complete" and not (tmp_path / "o" / "newdir.h5").exists()
    with h5py.File(out, "r") as f:
        # The stored spec is what ran: -o and -s are in it, and listed as given.
        stored = h5_str(f.attrs["spec"])
        assert "output: o/newdir/exp.h5" in stored and "seed: 5" in stored
        assert json.loads(h5_str(f.attrs["overrides"])) == ["seed=5"]
    # A spec whose own output is a directory gets <name>.h5 in it.
    dir_spec = write_yaml(tmp_path / "d.yaml", _spec(tiny_gpt2, name="named", output="res/"))
    assert nnrun.run(dir_spec).path == Path("res/named.h5")
    assert _status(tmp_path / "res" / "named.h5") == "complete"
    refused = CliRunner().invoke(app, ["run", str(spec), "-o", "."])
    assert isinstance(refused.exception, OutputError)  # main() prints it, exit 1
    assert "the output path . is a directory" in str(refused.exception)


@pytest.mark.usefixtures("no_model")
def test_read_only_directory_is_refused_before_the_model_loads() -> None:
    """As a user without write permission. Root ignores permissions, so the check runs in a
    forked child that has become `nobody` (a fork: nobody cannot read this interpreter),
    in a directory under /tmp that nobody can reach (pytest's own are private to root)."""
    base = Path(tempfile.mkdtemp(prefix="nnrun-ro-"))
    base.chmod(0o755)
    readonly = base / "ro"
    readonly.mkdir()
    readonly.chmod(0o555)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        message = "no error"
        try:
            if os.geteuid() == 0:
                nobody = pwd.getpwnam("nobody")
                os.setgid(nobody.pw_gid)
                os.setuid(nobody.pw_uid)
            nnrun.run({"nnrun": 1, "prompts": ["hi"]}, output=readonly / "x.h5")
        except OutputError as e:
            message = str(e)
        except BaseException as e:  # noqa: BLE001 - reported to the parent
            message = f"{type(e).__name__}: {e}"
        os.write(write, message.encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read) as pipe:
        message = pipe.read()
    os.waitpid(pid, 0)
    readonly.chmod(0o755)
    leftovers = list(readonly.iterdir())
    shutil.rmtree(base)
    assert message == f"cannot write in {readonly}: permission denied"
    assert leftovers == []


# -- a full disk -------------------------------------------------------------------------------


def _file_size_limit(limit: int) -> Any:
    return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))


def test_file_size_limit_stops_with_a_readable_partial_file(
    tiny_gpt2: Path, tmp_path: Path
) -> None:
    out = tmp_path / "full.h5"
    earlier = _complete_earlier(tiny_gpt2, out)
    # 400 prompts of 7 tokens x 512 logits: 14 KB each, 5.7 MB in all, against 3 MB.
    prompts = {f"p{i}": f"{FRANCE} {i}" for i in range(400)}
    spec = write_yaml(
        tmp_path / "spec.yaml", _spec(tiny_gpt2, prompts, save={"logits": {"at": "output"}})
    )
    result = subprocess.run(
        [NNRUN, "run", spec, "-o", out, "--overwrite"],
        env=_env(tmp_path),
        capture_output=True,
        text=True,
        preexec_fn=_file_size_limit(3 << 20),
        timeout=300,
    )
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr and "Exception ignored" not in result.stderr
    assert "(ulimit -f); the run stops here" in " ".join(result.stderr.split())
    partial = tmp_path / "full.partial.h5"
    with h5py.File(partial, "r") as f:
        assert h5_str(f.attrs["status"]) == "partial"
        written = sum(1 for prompt in h5_str(f["prompts/id"][()]) if prompt)
        assert 0 < written < 400
    assert out.read_bytes() == earlier


def test_a_write_that_fails_anyway_removes_the_file_without_a_crash(
    tiny_gpt2: Path, tmp_path: Path
) -> None:
    """With the room check off, HDF5 itself hits the limit: one message, exit 1, no file."""
    prompts = {f"p{i}": f"{FRANCE} {i}" for i in range(40)}
    spec = write_yaml(
        tmp_path / "spec.yaml", _spec(tiny_gpt2, prompts, save={"logits": {"at": "output"}})
    )
    proc = _driver(
        tmp_path,
        ["run", str(spec), "-o", "o/full.h5"],
        preexec=_file_size_limit(256 << 10),
        NNRUN_TEST_NO_ROOM_CHECK="1",
    )
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 1, stderr  # not 139 (a segmentation fault)
    assert "Traceback" not in stderr and "Exception ignored" not in stderr
    assert "could not write o/full.partial.h5: file too large" in " ".join(stderr.split())
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == []


# -- text -----------------------------------------------------------------------------------


def test_generated_nul_characters_are_stored_exactly(tiny_gpt2: Path, tmp_path: Path) -> None:
    """A token that decodes to "\\x00" (forced here through the logits) never loses a run."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_gpt2)
    nul = next(i for i in range(tokenizer.vocab_size) if tokenizer.decode([i]) == "\x00")
    push = np.zeros(512, np.float32)
    push[nul] = 1e4
    with h5py.File(tmp_path / "push.h5", "w") as f:
        f["v"] = push
    spec = _spec(
        tiny_gpt2,
        {"a": FRANCE, "b": "Hi"},
        edits=[
            {
                "at": "lm_head.output",
                "tokens": -1,  # generating: lm_head only sees the last position
                "add": {"file": str(tmp_path / "push.h5"), "dataset": "v"},
            }
        ],
        generate={"max_new_tokens": 3},
    )
    results = nnrun.run(spec, output=tmp_path / "nul.h5")
    assert results.generation() == {"a": "\x00\x00\x00", "b": "\x00\x00\x00"}
    with h5py.File(tmp_path / "nul.h5", "r") as f:  # plain readers see a readable stand-in
        assert h5_str(f["generation/text"][()]) == ["\ufffd" * 3] * 2
        assert f["generation/ids"][()].tolist() == [[nul] * 3] * 2


def test_unicode_prompts_and_ids_round_trip(tiny_gpt2: Path, tmp_path: Path) -> None:
    texts = ["Ünïcödé 東京 🙂 ﷽", "e\u0301 \u202eRTL\u202c \u200b", "tab\tand \\ backslash"]
    source = write_jsonl(
        tmp_path / "p.jsonl",
        [{"text": t, "id": f"id-{i}-ß🙂"} for i, t in enumerate(texts)],
    )
    spec = _spec(tiny_gpt2, {"file": str(source), "id_field": "id"})
    results = nnrun.run(spec, output=tmp_path / "u.h5")
    assert results.prompts() == {f"id-{i}-ß🙂": t for i, t in enumerate(texts)}


# -- what the stored spec records --------------------------------------------------------------


def test_inputs_are_recorded_with_their_sha256(tiny_gpt2: Path, tmp_path: Path) -> None:
    source = write_jsonl(tmp_path / "p.jsonl", [{"text": FRANCE}, {"text": "Hi"}])
    with h5py.File(tmp_path / "vec.h5", "w") as f:
        f["v"] = np.ones(32, np.float32)
    spec = _spec(
        tiny_gpt2,
        {"file": str(source)},
        edits=[
            {
                "at": "transformer.h.0.output",
                "add": {"file": str(tmp_path / "vec.h5"), "dataset": "v"},
            }
        ],
    )
    nnrun.run(spec, output=tmp_path / "in.h5")
    with h5py.File(tmp_path / "in.h5", "r") as f:
        inputs = json.loads(h5_str(f.attrs["inputs"]))
    assert inputs == {
        "edits[0].add.file": {
            "file": str(tmp_path / "vec.h5"),
            "sha256": hashlib.sha256((tmp_path / "vec.h5").read_bytes()).hexdigest(),
            "bytes": (tmp_path / "vec.h5").stat().st_size,
        },
        "prompts.file": {
            "file": str(source),
            "sha256": hashlib.sha256(source.read_bytes()).hexdigest(),
            "bytes": source.stat().st_size,
        },
    }
    assert changed_inputs(inputs) == []
    source.write_text(source.read_text() + '{"text": "more"}\n')
    (tmp_path / "vec.h5").unlink()
    changes = changed_inputs(inputs)
    assert len(changes) == 2
    assert changes[0].startswith("edits[0].add.file:") and "missing" in changes[0]
    assert changes[1].startswith("prompts.file:") and "has changed" in changes[1]
