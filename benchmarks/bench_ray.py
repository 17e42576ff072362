"""Benchmark: what the Ray executor costs over a local run, and where the time goes.

The sweep of bench_sweep.py (SmolLM2-135M-Instruct fp32 on the CPU, the clean
residual at the country token patched into the corrupt prompt at each of 30 layers,
P(" Paris") per layer) run three ways, each writing its HDF5 file:

  local        nnrun.run(spec, cache=False): model load, compile, run, write
  ray          nnrun.run(spec, executor="ray", workers=2): a local Ray cluster started
               and stopped by the run, two workers (each loads the model), 8 shards
               of 4 points, merge
  ray (warm)   the same on a cluster already running (ray.init before the timer):
               what a run on a standing cluster costs

For each ray run the driver's report splits the time: cluster start, workers
started (process + imports), shards handed out until the last came back (model
loads and compute on the workers), merge; and each worker's model loads and shard
times. The files are checked to hold the same P(" Paris") (1e-5) before any timing.

    .venv/bin/python benchmarks/bench_ray.py --runs 3
    .venv/bin/python benchmarks/bench_ray.py --table --runs 3    # rows for run.py

Not part of the test suite. Needs the ray extra (pip install 'nnrun[ray]').
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from _common import Row, report
from bench_sweep import spec as sweep_spec

import nnrun
from nnrun.executor import RayOptions, run_ray
from nnrun.spec import check_spec


def measure(runs: int, workers: int) -> tuple[dict[str, list[float]], dict[str, list[Any]]]:
    """Seconds of each way of running per round, and the ray runs' reports; the files
    are checked to agree before any timing."""
    import os

    import ray
    import torch

    loaded = check_spec(sweep_spec())
    tmp = Path(tempfile.mkdtemp(prefix="nnrun-bench-ray-"))
    options = RayOptions(workers=workers)
    print(
        f"bench_sweep's 30-point patching sweep on SmolLM2-135M-Instruct fp32 CPU; "
        f"{workers} Ray workers; {runs} runs; torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), ray {ray.__version__}, {os.cpu_count()} CPUs"
    )

    def local() -> Any:
        return nnrun.run(loaded, output=tmp / "local.h5", cache=False, overwrite=True)

    def cold() -> Any:
        return run_ray(loaded, tmp / "ray.h5", options)

    def warm() -> Any:
        return run_ray(loaded, tmp / "warm.h5", options)

    # Check before timing: the same numbers from every way of running.
    local()
    cold()
    want = nnrun.load(tmp / "local.h5").metric("p_paris")
    np.testing.assert_allclose(nnrun.load(tmp / "ray.h5").metric("p_paris"), want, rtol=1e-5)
    print(f"P(' Paris') agrees (1e-5): layer 0 {want[0, 0]:.3f}, layer 29 {want[-1, 0]:.3f}")

    times: dict[str, list[float]] = {"local": [], "ray": [], "ray (warm)": []}
    reports: dict[str, list[Any]] = {"ray": [], "ray (warm)": []}
    for _ in range(runs):
        start = time.perf_counter()
        local()
        times["local"].append(time.perf_counter() - start)
        start = time.perf_counter()
        reports["ray"].append(cold())
        times["ray"].append(time.perf_counter() - start)
        ray.init(
            address="local",
            num_cpus=os.cpu_count(),
            include_dashboard=False,
            logging_level=logging.WARNING,
        )
        try:
            start = time.perf_counter()
            reports["ray (warm)"].append(warm())
            times["ray (warm)"].append(time.perf_counter() - start)
        finally:
            ray.shutdown()
    return times, reports


def table(runs: int, workers: int) -> list[Row]:
    """Rows for run.py: each ray run's median against the local run's."""
    times, _ = measure(runs, workers)
    local = statistics.median(times["local"])
    work = f"SmolLM2 30-point patching sweep, {workers} Ray workers on this machine"
    return [
        Row(
            "ray", work, "ray", "local", statistics.median(times["ray"]), local, note="own cluster"
        ),
        Row(
            "ray",
            work,
            "ray (warm)",
            "local",
            statistics.median(times["ray (warm)"]),
            local,
            note="a cluster started before the timer",
        ),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3, help="timed runs of each")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--table", action="store_true", help="only the rows for run.py")
    parser.add_argument("--json", help="with --table, also write the rows to this file")
    args = parser.parse_args()
    if args.table:
        rows = table(args.runs, args.workers)
        report(rows, args.json)
        return
    times, reports = measure(args.runs, args.workers)

    base = statistics.median(times["local"])
    print()
    print("| run | median (s) | runs (s) | over local (s) |")
    print("| --- | --- | --- | --- |")
    for name, values in times.items():
        median = statistics.median(values)
        spread = ", ".join(f"{v:.2f}" for v in values)
        print(f"| {name} | {median:.2f} | {spread} | {median - base:+.2f} |")

    print()
    print("Where a ray run's time goes (medians over the runs, seconds):")
    print()
    print("| run | cluster start | workers start | shards (loads + compute) | merge | total |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, found in reports.items():

        def med(key: str, found: list[Any] = found) -> float:
            return statistics.median(getattr(r, key) for r in found)

        print(
            f"| {name} | {med('cluster_s'):.2f} | {med('workers_s'):.2f} | "
            f"{med('shards_s'):.2f} | {med('merge_s'):.2f} | {med('total_s'):.2f} |"
        )
    loads = [s for r in reports["ray"] for s in r.load_s]
    shards = [s for r in reports["ray"] for s in r.shard_s]
    print()
    print(
        f"on the workers: {len(loads) // args.runs} model loads per run, median "
        f"{statistics.median(loads):.2f} s each; {len(shards) // args.runs} shards per run, "
        f"median {statistics.median(shards):.2f} s each (a first shard includes its load)"
    )


if __name__ == "__main__":
    main()
