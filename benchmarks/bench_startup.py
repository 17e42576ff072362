"""Benchmark: whole-process startup of the CLI, against the imports it cannot avoid.

Each command runs as a new process (median of --runs, 5 by default), timed from the
parent: wall time and the child's CPU seconds.

  floor        python -c "import yaml, jsonschema, typer, rich" (what any CLI of this
               shape pays before doing anything)
  --help       nnrun --help
  validate     nnrun validate examples/demo.yaml specs/activation-patching.yaml (a
               150-point sweep); issue 9's target: under 0.3 s whole-process

Before timing, each command is run once and must exit 0 (validate must say `ok` for
both specs).

    .venv/bin/python benchmarks/bench_startup.py [--runs 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from _common import REPO, Row, report

SPECS = ("examples/demo.yaml", "specs/activation-patching.yaml")
FLOOR = "import yaml, jsonschema, typer, rich"


def commands() -> dict[str, list[str]]:
    nnrun = str(Path(sys.executable).with_name("nnrun"))
    return {
        "floor": [sys.executable, "-c", FLOOR],
        "nnrun --help": [nnrun, "--help"],
        "nnrun validate": [nnrun, "validate", *SPECS],
    }


def whole_process(argv: list[str]) -> tuple[float, float, str]:
    """(wall seconds, child CPU seconds, stdout) of one run of `argv`, which must exit 0."""
    before = os.times()
    start = time.perf_counter()
    done = subprocess.run(argv, cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - start
    after = os.times()
    if done.returncode:
        raise RuntimeError(f"{' '.join(argv)} exited {done.returncode}: {done.stderr[-500:]}")
    cpu = (after.children_user - before.children_user) + (
        after.children_system - before.children_system
    )
    return wall, cpu, done.stdout


def table(runs: int, quick: bool) -> list[Row]:
    cmds = commands()
    _, _, said = whole_process(cmds["nnrun validate"])
    accepted = [line.split()[-1] for line in said.splitlines() if line.startswith("ok ")]
    assert accepted == list(SPECS), f"validate did not accept both specs: {said!r}"
    for argv in cmds.values():  # warm the page cache
        whole_process(argv)
    samples: dict[str, list[tuple[float, float]]] = {name: [] for name in cmds}
    for _ in range(runs):
        for name, argv in cmds.items():  # interleaved: a slow spell hits all alike
            samples[name].append(whole_process(argv)[:2])
    found = {
        name: (statistics.median(w for w, _ in s), statistics.median(c for _, c in s))
        for name, s in samples.items()
    }
    work = f"whole process, median of {runs}"
    (floor, floor_cpu) = found["floor"]
    rows = []
    for name, limit, note in (
        ("nnrun --help", None, ""),
        ("nnrun validate", 0.30, "demo.yaml + activation-patching.yaml (150 points)"),
    ):
        wall, cpu = found[name]
        rows.append(
            Row(
                "startup",
                work,
                name,
                "python + yaml, jsonschema, typer, rich",
                wall,
                floor,
                "s",
                cpu,
                floor_cpu,
                limit=limit,
                note=note,
            )
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5, help="timed runs of each command")
    parser.add_argument("--quick", action="store_true", help="accepted for run.py; same runs")
    parser.add_argument("--json", help="also write the rows to this file (for run.py)")
    args = parser.parse_args()
    rows = table(args.runs, args.quick)
    report(rows, args.json)


if __name__ == "__main__":
    main()
