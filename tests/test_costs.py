"""The costs a user feels: fixed cost per pass, the writer thread, the probe cache, small
files, bounded memory, the progress display."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import h5py
import pytest
import torch
from helpers import PRINT_PEAK_RSS, h5_str, one_torch_thread, write_jsonl

import nnrun
from nnrun.compile import _probe, compile_plan
from nnrun.engine import Engine
from nnrun.engine import _engine as engine_module
from nnrun.errors import OutputError
from nnrun.models import load_model
from nnrun.spec import check_spec
from nnrun.store import _background, _writer


@pytest.fixture(autouse=True)
def _one_torch_thread() -> Iterator[None]:
    with one_torch_thread():
        yield


PROMPTS = {f"p{i}": f"The number {i} is" + " big" * (i % 5) for i in range(24)}


def _spec(model: Path, **extra: Any) -> dict[str, Any]:
    return {
        "nnrun": 1,
        "model": {"path": str(model)},
        "batch_size": 2,
        "prompts": PROMPTS,
        "save": {
            "h": {"at": "transformer.h.*.output"},
            "last": {"at": "output", "tokens": -1},
        },
        **extra,
    }


# -- the writer thread -------------------------------------------------------------------


def test_a_slow_writer_overlaps_the_run_keeps_order_and_bounds_the_queue(
    tiny_gpt2: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    expected = nnrun.run(_spec(tiny_gpt2), output=tmp_path / "plain.h5")
    # One batch per handover and two calls queued at most: the run may be this far ahead.
    monkeypatch.setattr(_background, "HANDOVER_ROWS", 1)
    monkeypatch.setattr(_background, "QUEUE_DEPTH", 2)
    monkeypatch.setattr(_writer, "_FLUSH_ROWS", 1)  # and the writer writes each at once
    computed, written, ahead = [0], [], []
    threads = set()
    write = _writer.OutputWriter.write

    def slow_write(self: Any, result: Any) -> None:
        threads.add(threading.current_thread().name)
        time.sleep(0.05)
        write(self, result)
        written.extend(result.rows)

    def progress(state: nnrun.RunProgress) -> None:
        computed[0] = state.rows_done
        ahead.append(state.rows_done - len(written))

    monkeypatch.setattr(_writer.OutputWriter, "write", slow_write)
    results = nnrun.run(_spec(tiny_gpt2), output=tmp_path / "slow.h5", progress=progress)
    assert threads == {"nnrun-writer"}
    assert written == list(PROMPTS)  # in order, each once
    assert max(ahead) > 2  # the model went on while batches were written...
    assert max(ahead) <= 2 * (2 + 2)  # ...but at most the queue's depth ahead (2 rows each)
    for name in ("h", "last"):
        torch.testing.assert_close(results[name], expected[name], equal_nan=True)
    with h5py.File(results.path) as f:
        assert h5_str(f["prompts/id"][()]) == list(PROMPTS)


def test_a_failing_writer_stops_the_run_with_one_clear_error(
    tiny_gpt2: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_background, "HANDOVER_ROWS", 1)
    monkeypatch.setattr(_writer, "_FLUSH_ROWS", 1)
    calls = []
    original = _writer.OutputWriter._write

    def failing(self: Any, result: Any) -> None:
        calls.append(result.rows)
        if len(calls) > 2:
            raise RuntimeError("the disk caught fire")
        original(self, result)

    monkeypatch.setattr(_writer.OutputWriter, "_write", failing)
    out = tmp_path / "o.h5"
    with pytest.raises(OutputError, match="writing .*o.partial.h5 failed: RuntimeError: the disk"):
        nnrun.run(_spec(tiny_gpt2), output=out)
    assert not out.exists()
    with h5py.File(tmp_path / "o.partial.h5") as f:
        assert h5_str(f.attrs["status"]) == "partial"
        assert h5_str(f.attrs["error"]).startswith("OutputError")
        assert h5_str(f["prompts/id"][()])[:4] == list(PROMPTS)[:4]  # what was written stays
    assert len(calls) == 3  # nothing after the failure


# -- the probe pass -----------------------------------------------------------------------


def test_the_probe_answer_is_kept_per_model_files(
    tiny_gpt2: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NNRUN_CACHE", str(tmp_path / "cache"))
    probes = []
    probe = _probe.probe_sites

    def counted(*args: Any, **kwargs: Any) -> Any:
        probes.append(1)
        return probe(*args, **kwargs)

    monkeypatch.setattr(_probe, "probe_sites", counted)
    spec = check_spec(_spec(tiny_gpt2))

    def plan_with_a_fresh_model(**model: Any) -> Any:
        loaded = load_model({"path": str(tiny_gpt2), **model})
        return compile_plan(spec, loaded.model, loaded.tokenizer)

    first = plan_with_a_fresh_model()
    assert len(probes) == 1 and list((tmp_path / "cache" / "probes").glob("*.json"))
    second = plan_with_a_fresh_model()  # a new process would load the model afresh too
    assert len(probes) == 1  # read from the disk
    assert [s.site for s in second.sites] == [s.site for s in first.sites]
    assert [s.value_shape for s in second.saves] == [s.value_shape for s in first.saves]
    weights = next(tiny_gpt2.glob("*.safetensors"))
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # a changed file
    plan_with_a_fresh_model()
    assert len(probes) == 2
    plan_with_a_fresh_model(dtype="bfloat16")  # another dtype, another entry
    assert len(probes) == 3
    for stale in (tmp_path / "cache" / "probes").glob("*.json"):
        stale.write_text('{"format": 1, "sites": [["nowhere", "output", 0, [1]]]}')
    plan_with_a_fresh_model()  # an entry that does not fit the model: probed again
    assert len(probes) == 4


# -- fixed cost per pass ------------------------------------------------------------------


def test_seeding_grows_no_state_and_plans_are_prepared_once(
    tiny_gpt2: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    loaded = load_model({"path": str(tiny_gpt2)})
    plan = compile_plan(check_spec(_spec(tiny_gpt2)), loaded.model, loaded.tokenizer)
    prepared = []
    actions_by_row = engine_module._actions_by_row

    def counted(*args: Any) -> Any:
        prepared.append(1)
        return actions_by_row(*args)

    monkeypatch.setattr(engine_module, "_actions_by_row", counted)
    queued = len(torch.cuda._queued_calls)
    runs = [list(Engine(plan, loaded.model, loaded.tokenizer).run()) for _ in range(5)]
    assert len(torch.cuda._queued_calls) == queued  # torch.manual_seed queues one per call
    assert len(prepared) == 1
    for run in runs[1:]:
        for a, b in zip(run, runs[0]):
            torch.testing.assert_close(a.saves["h"].data, b.saves["h"].data, equal_nan=True)


# -- small files, big datasets ------------------------------------------------------------

# What an output file holds besides its values, at most: labels, provenance, the spec,
# netCDF dimensions, HDF5's own metadata (about 40-70 KB for the specs in specs/).
FIXED_OVERHEAD = 96 * 1024


def test_small_runs_write_small_files(spec_runs: dict[str, tuple[Path, list[str], Path]]) -> None:
    for name, (_, _, out) in spec_runs.items():
        with h5py.File(out) as f:
            values = sum(
                ds.nbytes for group in ("saves", "metrics") for ds in f.get(group, {}).values()
            )
        size = os.path.getsize(out)
        assert size <= 1.5 * values + FIXED_OVERHEAD, (name, size, values)


_PEAK = (
    r"""
import json, sys
import torch
torch.set_num_threads(1)
import nnrun
from nnrun.store import _background, _writer
# Small write buffers, so that a small run reaches the steady state of a big one.
_background.HANDOVER_ROWS, _writer._FLUSH_ROWS = 16, 64
spec = json.loads(sys.argv[1])
nnrun.run(spec, output=sys.argv[2])
"""
    + PRINT_PEAK_RSS
)


def test_memory_stays_flat_as_a_prompt_file_grows(tiny_gpt2: Path, tmp_path: Path) -> None:
    """Peak RSS of a 2,000-prompt `tokens: all` run within 10% of a 500-prompt run (the
    benchmark measures 2,000 against 20,000 with the usual write buffers)."""
    peaks = {}
    for count in (500, 2000):
        source = write_jsonl(
            tmp_path / f"{count}.jsonl",
            [{"text": f"The number {i} is" + " big" * (i % 9)} for i in range(count)],
        )
        spec = _spec(tiny_gpt2, prompts={"file": str(source)}, batch_size=16)
        done = subprocess.run(
            [sys.executable, "-c", _PEAK, json.dumps(spec), str(tmp_path / f"{count}.h5")],
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
        peaks[count] = int(done.stdout.split()[-1])  # KiB
    assert peaks[2000] <= 1.1 * peaks[500], peaks
    with h5py.File(tmp_path / "2000.h5") as f:
        assert f["axes/h/length"].shape == (2000,) and f["saves/h"].attrs["layout"] == "packed"


# -- what the terminal shows --------------------------------------------------------------


def test_progress_says_loading_model_not_zero_of_unknown() -> None:
    from nnrun.cli import progress_fields

    loading = progress_fields(nnrun.RunProgress(stage="loading model"))
    assert loading["description"] == "loading model ..." and loading["count"] == ""
    assert loading["total"] is None
    compiling = progress_fields(nnrun.RunProgress(stage="compiling", rows_total=40))
    assert compiling["count"] == "" and compiling["total"] is None
    running = progress_fields(nnrun.RunProgress(stage="running", rows_done=8, rows_total=40))
    assert running == {
        "completed": 8,
        "total": 40,
        "description": "rows",
        "points": "",
        "count": "8/40",
    }
    # A distributed run counts shards.
    ray = nnrun.RunProgress(stage="running", shards_total=4, shards_done=1, retries=1)
    assert progress_fields(ray)["description"] == "shards"
    assert progress_fields(ray)["count"] == "1/4" and "1 retried" in progress_fields(ray)["points"]
    sweep = nnrun.RunProgress(stage="running", rows_done=3, points_total=5, points_done=2)
    assert (
        progress_fields(sweep)["points"] == "points 2/5"
        and progress_fields(sweep)["count"] == "3/?"
    )
