"""The Ray executor: shards on a Ray cluster, one model load per worker, one merged file.

The driver (this process) splits the run into shards, starts `workers` actors (each
a ShardWorker holding the model), hands each idle worker the next shard and merges
the shard files into the output when all are done. A shard whose worker fails or
dies is tried again (on a fresh worker if the old one died) up to `retries` more
times; after that its sweep points are recorded as failed, like a point that fails
locally. Shard files stay in `<output stem>.shards/` until the merge succeeds, so
`--resume` after an interrupted driver runs only the shards that have no complete
file.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from nnrun._run import ProgressFn, RunProgress, _spec_difference, sweep_layout
from nnrun.errors import NnrunError
from nnrun.executor._shards import (
    Shard,
    ShardReport,
    ShardWorker,
    clear_shards,
    finished,
    plan_shards,
    read_manifest,
    report_from,
    shard_dir,
    spec_sha256,
    write_manifest,
)
from nnrun.spec import LoadedSpec

INSTALL_HINT = "--executor ray needs Ray: pip install 'nnrun[ray]'"
# Environment that workers need to find the same models as the driver.
_FORWARDED_ENV = (
    "NNRUN_CACHE",
    "HF_HOME",
    "HF_HUB_CACHE",
    "HF_HUB_OFFLINE",
    "TRANSFORMERS_OFFLINE",
)


@dataclass
class RayOptions:
    """How to run on Ray (`nnrun run --executor ray ...`)."""

    address: str | None = None  # a running cluster ("auto", "ray://host:10001"); None: local
    workers: int | None = None  # default: one per gpus_per_worker GPUs, else one per node
    gpus_per_worker: float = 0
    cpus_per_worker: float | None = None  # default: 1 with GPUs, else the CPUs shared out
    shard_size: int | None = None  # points (sweeps) or prompts (prompt files) per shard
    retries: int = 2  # further tries of a failed shard


@dataclass
class RayReport:
    """What a distributed run did and where its time went (seconds)."""

    shards: int = 0
    skipped: int = 0  # complete shard files kept from an earlier run (--resume)
    failed: int = 0
    retries: int = 0
    workers: int = 0
    cluster_s: float = 0.0  # connecting to (or starting) the cluster
    workers_s: float = 0.0  # starting the worker processes
    shards_s: float = 0.0  # from the first shard handed out to the last one back
    merge_s: float = 0.0
    total_s: float = 0.0
    load_s: list[float] = field(default_factory=list)  # each model load on a worker
    shard_s: list[float] = field(default_factory=list)  # each shard, on its worker


def import_ray() -> Any:
    """The ray module, or a clear message when it is not installed."""
    try:
        import ray
    except ImportError:
        raise NnrunError(INSTALL_HINT) from None
    return ray


def run_ray(
    loaded: LoadedSpec,
    output: Path,
    options: RayOptions,
    *,
    progress: ProgressFn | None = None,
    log: Callable[[str], None] | None = None,
    resume: bool = False,
) -> RayReport:
    """Run `loaded` on a Ray cluster into `output` (see the module docstring)."""
    ray = import_ray()
    started = time.perf_counter()
    started_utc = _utc_now()
    report = RayReport()
    say = log or (lambda _m: None)
    output = Path(output).absolute()
    directory = shard_dir(output)

    owned = not ray.is_initialized()
    clock = time.perf_counter()
    if owned:
        _connect(ray, options.address)
    report.cluster_s = time.perf_counter() - clock
    try:
        workers, cpus = _worker_counts(ray, options)
        report.workers = workers
        shards = _shards(loaded, directory, options, workers, resume)
        todo = [s for s in shards if not finished(s.file(directory), loaded)]
        report.shards, report.skipped = len(shards), len(shards) - len(todo)
        if report.skipped:
            say(f"resuming: {report.skipped} of {len(shards)} shards are already done")
        state = RunProgress(
            stage="running",
            points_total=len(loaded.points()),
            shards_total=len(shards),
            shards_done=report.skipped,
        )
        _count_skipped(state, shards, todo, directory)
        report_progress = progress or (lambda _s: None)
        report_progress(state)
        failures: dict[int, str] = {}
        if todo:
            clock = time.perf_counter()
            pool = _Pool(ray, options, min(workers, len(todo)), cpus)
            report.workers_s = time.perf_counter() - clock
            clock = time.perf_counter()
            try:
                failures = pool.run(loaded, todo, directory, state, report, report_progress, say)
            finally:
                pool.close()
            report.shards_s = time.perf_counter() - clock
        report.failed = len(failures)
        if failures and loaded.sweep is None:
            index, message = next(iter(failures.items()))
            raise NnrunError(
                f"{shards[index].label} {_failed(options)}: {message} (the finished shards "
                f"are kept in {directory}; --resume runs the rest)"
            )
        if len(failures) == len(shards):
            message = next(iter(failures.values()))
            raise NnrunError(f"every shard {_failed(options)}; the first: {message}")
        state.stage = "merging"
        report_progress(state)
        clock = time.perf_counter()
        _merge(loaded, output, directory, shards, failures, options, report, started_utc)
        report.merge_s = time.perf_counter() - clock
        if failures:
            say(
                f"{len(failures)} shards failed; their files are missing from {directory}, "
                "and --resume runs them again"
            )
        else:
            clear_shards(directory)
        state.stage = "done"
        report_progress(state)
    finally:
        if owned:
            ray.shutdown()
    report.total_s = time.perf_counter() - started
    return report


def _connect(ray: Any, address: str | None) -> None:
    import logging

    env = {k: os.environ[k] for k in _FORWARDED_ENV if k in os.environ}
    kwargs: dict[str, Any] = {
        "include_dashboard": False,
        "logging_level": logging.WARNING,
        "log_to_driver": False,  # worker chatter would tear the progress bar
        "runtime_env": {"env_vars": env} if env else None,
    }
    # A local cluster says on every start that it enabled token authentication (the
    # safe default); that line would only tear the progress bar.
    auth = logging.getLogger("ray._private.authentication.authentication_token_setup")
    quiet = _DropMessage("Token authentication is enabled")
    auth.addFilter(quiet)
    try:
        # "local" starts a cluster for this run even when another runs on this machine
        # (or a stale one is recorded in /tmp/ray): --address auto joins that one.
        ray.init(address=address or "local", **kwargs)
    except (ConnectionError, RuntimeError, ValueError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        if address is None:
            raise NnrunError(f"could not start a local Ray cluster: {reason}") from None
        raise NnrunError(
            f"could not connect to the Ray cluster at {address}: {reason} (is `ray start` "
            "running there? A cluster with token authentication also needs RAY_AUTH_MODE=token "
            "and its token here: see docs/scaling.md)"
        ) from None
    finally:
        auth.removeFilter(quiet)


class _DropMessage:
    """A logging filter that drops records starting with one text."""

    def __init__(self, start: str) -> None:
        self.start = start

    def filter(self, record: Any) -> bool:
        return not str(record.getMessage()).startswith(self.start)


def _worker_counts(ray: Any, options: RayOptions) -> tuple[int, float]:
    """How many workers, and CPUs per worker; refuses what the cluster cannot hold."""
    resources = ray.cluster_resources()
    cpus = float(resources.get("CPU", 0))
    gpus = float(resources.get("GPU", 0))
    nodes = max(1, sum(1 for n in ray.nodes() if n.get("Alive")))
    per_gpu = options.gpus_per_worker
    if options.workers is not None and options.workers < 1:
        raise NnrunError(f"--workers must be at least 1, not {options.workers}")
    if per_gpu > 0 and per_gpu > gpus:
        raise NnrunError(
            f"--gpus-per-worker {per_gpu:g}: the Ray cluster has {gpus:g} GPUs"
            + ("" if gpus else " (is CUDA visible to `ray start`?)")
        )
    workers = options.workers
    if workers is None:
        workers = int(gpus // per_gpu) if per_gpu > 0 else nodes
    if per_gpu > 0 and workers * per_gpu > gpus:
        raise NnrunError(
            f"{workers} workers with {per_gpu:g} GPUs each need {workers * per_gpu:g} GPUs; "
            f"the Ray cluster has {gpus:g}"
        )
    per_cpu = options.cpus_per_worker
    if per_cpu is None:
        per_cpu = 1.0 if per_gpu > 0 else max(1.0, float(int(cpus // workers)))
    if workers * per_cpu > cpus:
        raise NnrunError(
            f"{workers} workers with {per_cpu:g} CPUs each need {workers * per_cpu:g} CPUs; "
            f"the Ray cluster has {cpus:g} (use fewer --workers)"
        )
    return workers, per_cpu


def _shards(
    loaded: LoadedSpec, directory: Path, options: RayOptions, workers: int, resume: bool
) -> list[Shard]:
    """This run's shards: the manifest's when resuming, else planned afresh."""
    if resume:
        manifest = read_manifest(directory)
        if manifest is None:
            raise NnrunError(f"nothing to resume: {directory} holds no shards of an earlier run")
        if manifest["spec_sha256"] != spec_sha256(loaded):
            raise NnrunError(
                f"cannot resume {directory}: the spec changed since its shards were written "
                f"({_spec_difference(manifest['spec'], loaded.text)}); run without --resume"
            )
        return [Shard.from_json(s) for s in manifest["shards"]]
    clear_shards(directory)
    shards = plan_shards(loaded, workers=workers, size=options.shard_size)
    write_manifest(directory, loaded, shards)
    return shards


def _count_skipped(
    state: RunProgress, shards: list[Shard], todo: list[Shard], directory: Path
) -> None:
    """Points of the shards kept from an earlier run, done or failed, as their files say."""
    import h5py

    waiting = {s.index for s in todo}
    for shard in shards:
        if shard.index in waiting or shard.points is None:
            continue
        with h5py.File(shard.file(directory), "r") as f:
            status = f["sweep/status"][()] if "sweep" in f else []
            for point in shard.points:
                if point < len(status) and status[point] == 2:
                    state.points_failed += 1
                else:
                    state.points_done += 1


class _Pool:
    """The worker actors, each running one shard at a time."""

    def __init__(self, ray: Any, options: RayOptions, size: int, cpus: float) -> None:
        self.ray = ray
        self.options = options
        self.cpus = cpus
        self.actor_class = ray.remote(ShardWorker).options(
            num_cpus=cpus, num_gpus=options.gpus_per_worker or None, max_restarts=0
        )
        self.actors = [self._start() for _ in range(size)]
        try:  # wait until every worker has started, so a broken worker shows here
            ray.get([actor.ready.remote() for actor in self.actors])
        except ray.exceptions.RayError as e:
            self.close()
            reason = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
            raise NnrunError(f"a Ray worker could not start: {reason}") from None

    def _start(self) -> Any:
        return self.actor_class.remote(os.getcwd(), int(self.cpus))

    def close(self) -> None:
        for actor in self.actors:
            self.ray.kill(actor)
        self.actors = []

    def run(
        self,
        loaded: LoadedSpec,
        todo: list[Shard],
        directory: Path,
        state: RunProgress,
        report: RayReport,
        progress: ProgressFn,
        say: Callable[[str], None],
    ) -> dict[int, str]:
        """Run every shard of `todo`; returns the shards that failed every try."""
        ray = self.ray
        # The spec travels once to the object store, not once per shard.
        spec_ref = ray.put(replace(loaded, _points=None))
        queue = list(todo)
        tries: dict[int, int] = {}
        failures: dict[int, str] = {}
        running: dict[Any, tuple[int, Shard]] = {}  # object ref -> (actor slot, shard)
        idle = list(range(len(self.actors)))
        while queue or running:
            if queue and idle:
                while queue and idle:
                    slot, shard = idle.pop(0), queue.pop(0)
                    tries[shard.index] = tries.get(shard.index, 0) + 1
                    path = str(shard.file(directory))
                    running[self.actors[slot].run.remote(spec_ref, shard, path)] = (slot, shard)
                state.shards_running = len(running)
                progress(state)
            (ref,), _ = ray.wait(list(running), num_returns=1)
            slot, shard = running.pop(ref)
            state.shards_running = len(running)
            try:
                result = report_from(ray.get(ref))
            except ray.exceptions.RayError as e:  # the worker died (killed, out of memory)
                message = f"the worker died ({type(e).__name__})"
                result = ShardReport(shard.index, ok=False, error=message)
                self.actors[slot] = self._start()
            if result.ok and not shard.file(directory).is_file():
                result = replace(
                    result,
                    ok=False,
                    error=f"{result.worker} wrote {shard.file(directory)}, but this machine "
                    "cannot see it: the output must be on a filesystem every node shares",
                )
            idle.append(slot)
            if result.ok:
                self._done(result, state, report)
            elif tries[shard.index] <= self.options.retries:
                say(f"{shard.label} failed ({result.error}); trying again")
                state.retries += 1
                report.retries += 1
                queue.append(shard)
            else:
                failures[shard.index] = result.error
                state.shards_failed += 1
                count = len(shard.points or ())
                state.points_failed += count
                for point in shard.points or ():
                    state.failures[point] = result.error
            progress(state)
        return failures

    def _done(self, result: ShardReport, state: RunProgress, report: RayReport) -> None:
        state.shards_done += 1
        state.points_done += result.points_done
        state.points_failed += result.points_failed
        state.failures.update(result.failures)
        state.rows_done += result.rows
        report.shard_s.append(result.run_s)
        if result.load_s > 0.05:  # a cached model costs nothing to "load"
            report.load_s.append(result.load_s)


def _merge(
    loaded: LoadedSpec,
    output: Path,
    directory: Path,
    shards: list[Shard],
    failures: dict[int, str],
    options: RayOptions,
    report: RayReport,
    started_utc: str,
) -> None:
    import json
    import sys

    from nnrun.store._merge import FailedPoints, ShardPart, merge_shards

    parts = [ShardPart(s.file(directory), s.points) for s in shards if s.index not in failures]
    failed = [
        FailedPoints(s.points or (), f"{s.label} {_failed(options)}: {failures[s.index]}")
        for s in shards
        if s.index in failures
    ]
    attrs = {
        "command": " ".join(sys.argv),
        "started_utc": started_utc,
        "executor": json.dumps(
            {"executor": "ray", "workers": report.workers, "shards": len(shards)}
        ),
    }
    merge_shards(parts, output, sweep=sweep_layout(loaded), attrs=attrs, failed=failed)


def _failed(options: RayOptions) -> str:
    tries = options.retries + 1
    return "failed" if tries == 1 else f"failed {tries} times"


def _utc_now() -> str:
    from nnrun.store._writer import _utc_now as now

    return now()
