"""The Ray executor on a real local Ray cluster (two CPUs, started once for this file).

A sweep, a generating sweep and a prompt-file run through `executor="ray"` write the
file a local run writes; a worker killed mid-shard has its shard retried; a driver
interrupted after some shards (in-process, or killed with SIGKILL) resumes and runs
only the shards without a complete file; a shard that fails every try is recorded as
failed points. Marker `ray`: CI runs these, the fast tier (-m "not real and not ray")
does not.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import h5py
import pytest
import shard_cases
import yaml
from helpers import assert_same_output, one_torch_thread

import nnrun
from nnrun.executor import RayOptions, run_ray, shard_dir
from nnrun.spec import check_spec

pytestmark = pytest.mark.ray
NNRUN = Path(sys.executable).with_name("nnrun")


@pytest.fixture(scope="module")
def cluster() -> Any:
    """A local Ray cluster with two CPUs: room for two one-CPU workers."""
    import ray  # the test extra installs it: a missing Ray must fail here, not skip

    ray.init(
        address="local",  # never a cluster that happens to run on this machine
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        logging_level=logging.WARNING,
    )
    yield ray
    ray.shutdown()


@pytest.fixture(autouse=True)
def _one_thread():
    with one_torch_thread():
        yield


def ray_run(
    spec: Any, out: Path, *, progress: Any = None, resume: bool = False, **options: Any
) -> Any:
    """run_ray with two workers (unless `options` say otherwise); returns its report."""
    loaded = spec if not isinstance(spec, dict) else check_spec(spec)
    settings = RayOptions(**{"workers": 2, **options})
    return run_ray(loaded, out, settings, progress=progress, resume=resume)


@pytest.mark.parametrize("case", ["patching", "steering"])
def test_sweep_through_ray_equals_local_run(
    cluster: Any, tiny_llama: Path, tmp_path: Path, case: str
) -> None:
    spec = getattr(shard_cases, case)(tiny_llama)
    local = nnrun.run(spec, output=tmp_path / "local.h5").path
    seen: list[tuple[int, int, int]] = []
    report = ray_run(
        spec,
        tmp_path / "ray.h5",
        shard_size=2,
        progress=lambda s: seen.append((s.shards_done, s.shards_total, s.points_done)),
    )
    assert_same_output(local, tmp_path / "ray.h5")
    shards = 3 if case == "patching" else 2  # 6 or 4 points, two per shard
    assert (report.shards, report.workers, report.retries, report.failed) == (shards, 2, 0, 0)
    total = len(check_spec(spec).points())
    assert seen[-1] == (report.shards, report.shards, total)  # progress: shards done/total
    assert not shard_dir(tmp_path / "ray.h5").exists()  # merged, then cleared
    with h5py.File(tmp_path / "ray.h5") as f:
        assert '"executor": "ray"' in f.attrs["executor"]


def test_prompt_file_through_ray_equals_local_run(
    cluster: Any, tiny_llama: Path, tmp_path: Path
) -> None:
    spec = shard_cases.prompt_file(tiny_llama, tmp_path)
    local = nnrun.run(spec, output=tmp_path / "local.h5").path
    report = ray_run(spec, tmp_path / "ray.h5", shard_size=3)
    assert report.shards == 3  # windows of 4, 4 and 3 prompts
    assert_same_output(local, tmp_path / "ray.h5")


def _shard_workers() -> list[int]:
    """Pids of this process's Ray shard workers (descendants running ShardWorker)."""
    me = os.getpid()

    def ancestors(pid: int) -> set[int]:
        found = set()
        while pid > 1:
            try:
                stat = Path(f"/proc/{pid}/stat").read_text()
            except OSError:
                break
            pid = int(stat.rsplit(")", 1)[1].split()[1])
            found.add(pid)
        return found

    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if cmdline.startswith(b"ray::ShardWorker") and me in ancestors(int(entry.name)):
            pids.append(int(entry.name))
    return pids


def test_a_killed_workers_shard_is_retried(cluster: Any, tiny_llama: Path, tmp_path: Path) -> None:
    spec = shard_cases.patching(tiny_llama)
    local = nnrun.run(spec, output=tmp_path / "local.h5").path
    killed: list[int] = []

    def kill_one_worker(state: Any) -> None:
        # The first two shards were just handed out, one to each worker, which spends
        # seconds on imports and the model before it can finish: kill the first to start.
        if state.shards_running and not killed:
            deadline = time.monotonic() + 60
            while not (workers := _shard_workers()):
                assert time.monotonic() < deadline, "no worker process started"
                time.sleep(0.05)
            os.kill(workers[0], signal.SIGKILL)
            killed.append(workers[0])

    report = ray_run(spec, tmp_path / "ray.h5", shard_size=2, progress=kill_one_worker)
    assert killed and report.retries == 1 and report.failed == 0
    assert_same_output(local, tmp_path / "ray.h5")


def test_resume_after_an_interrupted_driver_skips_finished_shards(
    cluster: Any, tiny_llama: Path, tmp_path: Path
) -> None:
    spec = shard_cases.patching(tiny_llama)
    out = tmp_path / "ray.h5"
    directory = shard_dir(out)

    def interrupt(state: Any) -> None:
        if state.shards_done >= 2:
            raise KeyboardInterrupt  # as Ctrl-C in the driver

    with pytest.raises(KeyboardInterrupt):
        ray_run(spec, out, shard_size=1, progress=interrupt)
    assert not out.exists()
    finished = sorted(p.name for p in directory.glob("shard-?????.h5"))
    assert len(finished) >= 2
    stamps = {name: (directory / name).stat().st_mtime_ns for name in finished}
    rewritten: list[str] = []

    def watch(state: Any) -> None:
        if state.stage == "merging":  # every shard is done: none of the kept ones changed
            rewritten.extend(
                n for n, t in stamps.items() if (directory / n).stat().st_mtime_ns != t
            )

    report = ray_run(spec, out, shard_size=1, resume=True, progress=watch)
    # A worker may finish one more shard after the driver stopped: it is skipped too.
    assert report.skipped >= len(finished) and rewritten == []
    assert report.shards == 6 and report.load_s  # the rest ran on fresh workers
    assert_same_output(nnrun.run(spec, output=tmp_path / "local.h5").path, out)

    with pytest.raises(nnrun.NnrunError, match="nothing to resume"):
        ray_run(spec, out, resume=True)


def test_resume_refuses_another_spec(cluster: Any, tiny_llama: Path, tmp_path: Path) -> None:
    spec = shard_cases.patching(tiny_llama)
    out = tmp_path / "ray.h5"

    def interrupt(state: Any) -> None:
        if state.shards_done >= 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        ray_run(spec, out, shard_size=3, progress=interrupt)
    changed = {**spec, "seed": 3}
    with pytest.raises(nnrun.NnrunError, match=r"the spec changed .*changed: seed"):
        ray_run(changed, out, resume=True)
    # Without --resume the old shards are dropped and the run starts over.
    report = ray_run(changed, out, shard_size=3)
    assert report.skipped == 0 and nnrun.load(out).attrs["seed"] == 3


def test_killed_driver_resumes_through_the_cli(
    cluster: Any, tiny_llama: Path, tmp_path: Path
) -> None:
    """`nnrun run --executor ray --address` on the running cluster, killed with SIGKILL
    once two shards are written; `--resume` finishes it, and only the missing shards run."""
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(yaml.safe_dump(shard_cases.patching(tiny_llama)))
    out = tmp_path / "cli.h5"
    directory = shard_dir(out)
    address = cluster.get_runtime_context().gcs_address
    command = [str(NNRUN), "run", str(spec_file), "-o", str(out), "-q", "--executor", "ray"]
    command += ["--address", address, "--workers", "2", "--shard-size", "1"]
    driver = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while len(list(directory.glob("shard-?????.h5"))) < 2 and driver.poll() is None:
        assert time.monotonic() < deadline, "no shard finished in two minutes"
        time.sleep(0.1)
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    assert not out.exists()
    kept = {p.name: p.stat().st_mtime_ns for p in directory.glob("shard-?????.h5")}
    assert 2 <= len(kept) < 6
    # Without -q the log says how many shards it kept.
    resume = [c for c in command if c != "-q"] + ["--resume"]
    again = subprocess.run(resume, capture_output=True, text=True, timeout=300, check=False)
    assert again.returncode == 0, again.stderr
    assert f"resuming: {len(kept)} of 6 shards are already done" in again.stderr
    assert_same_output(nnrun.run(spec_file, output=tmp_path / "local.h5").path, out)


def test_a_shard_that_fails_every_try_becomes_failed_points(
    cluster: Any, tiny_llama: Path, tmp_path: Path
) -> None:
    spec = shard_cases.patching(tiny_llama)
    spec["sweep"] = {"model_dir": [str(tiny_llama), str(tmp_path / "missing")], "layer": [0]}
    spec["model"]["path"] = "${model_dir}"
    spec["sweep"]["pos"] = [1]
    report = ray_run(spec, tmp_path / "ray.h5", shard_size=1, retries=1)
    assert (report.failed, report.retries) == (1, 1)
    results = nnrun.load(tmp_path / "ray.h5")
    ((label, message),) = results.failed_points().items()
    assert label.startswith(f"model_dir={tmp_path / 'missing'}")
    assert message.startswith("shard 1 (point 1) failed 2 times: model directory")
    assert results.status == "complete"
    assert shard_dir(tmp_path / "ray.h5").is_dir()  # kept: --resume tries the failed shard again


def test_a_failing_window_fails_the_run_and_keeps_the_rest(
    cluster: Any, tiny_llama: Path, tmp_path: Path
) -> None:
    spec = shard_cases.prompt_file(tiny_llama, tmp_path)
    lines = (tmp_path / "prompts.jsonl").read_text().splitlines()
    # A prompt longer than the tiny model's 128 positions, in the last window only: a
    # valid record (the driver checks every line first), found when its batch runs.
    lines[9] = json.dumps({"text": " ".join(["capital"] * 300)})
    (tmp_path / "prompts.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(nnrun.NnrunError, match=r"shard 2 \(prompts 8..10\) failed: .*128"):
        ray_run(spec, tmp_path / "ray.h5", shard_size=3, retries=0)
    assert not (tmp_path / "ray.h5").exists()
    assert len(list(shard_dir(tmp_path / "ray.h5").glob("shard-?????.h5"))) == 2
