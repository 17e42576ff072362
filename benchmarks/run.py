"""Every benchmark, one table of ratios: nnrun against its peers, with issue 9's targets.

Each benchmark script runs in a process of its own (`bench_NAME.py --json FILE`), so
one table's imports, caches and memory never touch another's; the rows each writes
are gathered into one markdown table. Every script checks that the contenders'
outputs are equal before it times them. A script that fails gives a failed row
with its error; the others still run.

    .venv/bin/python benchmarks/run.py                 # everything (about 8 min on 2 cores)
    .venv/bin/python benchmarks/run.py --quick         # about a minute: fewer runs, smaller
                                                       # sizes, the SmolLM2-heavy tables skipped
    .venv/bin/python benchmarks/run.py --only tiny     # one table (repeatable)
    .venv/bin/python benchmarks/run.py --json rows.json

NNRUN_BENCH_DEVICE=cuda|cpu picks the device the benchmarks run on (default: cuda
when there is one); benchmarks/gpu.sh runs the quick table on a GPU.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from _common import Row, format_table, read_rows

HERE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Table:
    """One benchmark script and the arguments of a full and a quick run."""

    name: str
    script: str
    full: tuple[str, ...]
    quick: tuple[str, ...] | None  # None: skipped under --quick
    needs: tuple[str, ...] = ()  # modules the script imports (a missing one: a failed row)
    why_skipped: str = ""  # said in the table when --quick skips it


TABLES = (
    Table("startup", "bench_startup.py", ("--runs", "5"), ("--runs", "5")),
    Table("tiny", "bench_tiny.py", ("--runs", "7"), ("--quick", "--runs", "3"), ("nnsight",)),
    Table("trace", "bench_trace.py", ("--runs", "5"), ("--quick", "--runs", "3"), ("nnsight",)),
    Table(
        "generation",
        "bench_generation.py",
        ("--runs", "5"),
        None,
        ("nnsight",),
        "SmolLM2 generation with nnsight: about a minute here",
    ),
    Table(
        "sweep",
        "bench_sweep.py",
        ("--runs", "5"),
        None,
        ("nnsight",),
        "SmolLM2 sweeps with nnsight loops: a few minutes here",
    ),
    Table(
        "dataset",
        "bench_dataset.py",
        ("--runs", "3", "--prompts", "2000"),
        ("--quick", "--runs", "2", "--prompts", "300"),
    ),
    Table(
        "backward",
        "bench_backward.py",
        ("--table", "--prompts", "16", "160"),
        None,
        (),
        "SmolLM2 backward passes in two processes: minutes here",
    ),
    Table(
        "ray",
        "bench_ray.py",
        ("--table", "--runs", "3"),
        None,
        ("ray",),
        "starts Ray clusters: a minute per run here",
    ),
)


def run_table(table: Table, quick: bool, out_dir: Path, timeout: float) -> tuple[list[Row], float]:
    """The rows of one benchmark script, run in a process of its own; failed rows on error."""
    start = time.perf_counter()
    missing = [m for m in table.needs if importlib.util.find_spec(m) is None]
    if missing:
        return [failed(table, f"needs {', '.join(missing)} (pip install -e '.[test]')")], 0.0
    out = out_dir / f"{table.name}.json"
    args = table.quick if quick else table.full
    argv = [sys.executable, str(HERE / table.script), *(args or ()), "--json", str(out)]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return [failed(table, f"took over {timeout:.0f} s")], time.perf_counter() - start
    took = time.perf_counter() - start
    if done.returncode or not out.is_file():
        return [failed(table, last_error(done.stderr or done.stdout, done.returncode))], took
    return read_rows(str(out)), took


def last_error(output: str, status: int) -> str:
    """The exception a script died of (its last lines from the exception's name on)."""
    lines = output.strip().splitlines()
    for i in range(len(lines) - 1, -1, -1):
        if re.match(r"[A-Za-z_][\w.]*(Error|Exception|Interrupt|Exit)\b", lines[i]):
            return " ".join(lines[i:])[:400]
    return (lines[-1] if lines else f"exit status {status}")[:400]


def failed(table: Table, why: str) -> Row:
    nan = float("nan")
    return Row(table.name, table.script, "", "", nan, nan, error=why)


def skipped(table: Table) -> Row:
    nan = float("nan")
    return Row(
        table.name,
        table.script,
        "",
        "",
        nan,
        nan,
        note=f"skipped by --quick: {table.why_skipped}",
    )


def machine() -> str:
    """Where and when: the date, load, CPUs and the versions (from a child process, so
    this process stays free of torch)."""
    probe = (
        "import sys; sys.path.insert(0, sys.argv[1]); "
        "from _common import versions, device; print(versions() + '; benchmarks on ' + device())"
    )
    done = subprocess.run([sys.executable, "-c", probe, str(HERE)], capture_output=True, text=True)
    found = done.stdout.strip() or f"(versions unknown: {done.stderr.strip()[-200:]})"
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    now = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    return f"{now}; load average {load} at the start; {found}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a run under two minutes")
    parser.add_argument(
        "--only",
        action="append",
        choices=[t.name for t in TABLES],
        help="run only this table (repeatable); one --quick skips runs in full",
    )
    parser.add_argument("--json", help="also write every row to this file")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads of every benchmark (OMP_NUM_THREADS; default 1, 0: torch's "
        "own choice). On a 2-core machine shared with other work, two threads waiting on "
        "each other made the SmolLM2 tables 5x slower and their ratios noise",
    )
    parser.add_argument(
        "--timeout", type=float, default=1800, help="seconds one table may take (default 1800)"
    )
    args = parser.parse_args()
    chosen = [t for t in TABLES if not args.only or t.name in args.only]
    if args.threads:  # inherited by every benchmark process (and the versions probe)
        os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(args.threads)
    print(machine(), flush=True)
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="nnrun-bench-run-") as tmp:
        for table in chosen:
            if args.quick and table.quick is None and not args.only:
                rows.append(skipped(table))
                continue
            print(f"{table.name} ...", end=" ", flush=True, file=sys.stderr)
            got, took = run_table(
                table, args.quick and table.quick is not None, Path(tmp), args.timeout
            )
            print(f"{took:.0f} s", file=sys.stderr, flush=True)
            rows += got
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(r) for r in rows], indent=1))
    print(format_table(rows))
    judged = [r for r in rows if r.met() is not None]
    met = sum(bool(r.met()) for r in judged)
    print(f"\n{met} of {len(judged)} targets met." if judged else "\n(no targets in these rows)")


if __name__ == "__main__":
    main()
