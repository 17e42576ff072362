"""Timing and reporting shared by the benchmark scripts (see run.py for the table)."""

from __future__ import annotations

import functools
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

# Prompts of different lengths, so batches are padded as in real use.
PROMPTS = {
    "france": "The capital of France is",
    "germany": "The capital of Germany is",
    "eiffel": "The Eiffel Tower is in the city of",
    "hi": "Hi",
    "story": "Once upon a time, in a small village by the sea, there lived",
    "math": "Two plus two equals",
    "code": "def fibonacci(n):",
    "list": "Apples, bananas, cherries and",
}

REPO = Path(__file__).resolve().parents[1]


@dataclass
class Row:
    """One line of the benchmark table: nnrun's figure against its peer's on a workload."""

    table: str  # tiny | smollm2 | dataset | startup
    workload: str  # what runs, in a few words
    contender: str  # the nnrun side
    peer: str  # what it is compared with
    value: float  # the contender's median (seconds, or bytes / MB/s, see unit)
    peer_value: float
    unit: str = "s"  # s (time, lower is better) | MB/s (higher is better) | bytes | MiB
    cpu: float | None = None  # CPU seconds of the contender and peer (time rows)
    peer_cpu: float | None = None
    target: float | None = None  # the ratio to reach (at most; at least for MB/s)
    note: str = ""
    limit: float | None = None  # an absolute bound on the wall value instead (unit s)
    error: str = ""  # the benchmark failed to run: why (value and peer_value are NaN)

    @property
    def ratio(self) -> float:
        return self.value / self.peer_value if self.peer_value else float("nan")

    @property
    def cpu_ratio(self) -> float | None:
        if self.cpu is None or not self.peer_cpu:
            return None
        return self.cpu / self.peer_cpu

    def judged(self) -> float:
        """The ratio a target is judged on: CPU seconds where measured (the machine is
        shared: they move far less than wall-clock time), else the value's."""
        return self.cpu_ratio if self.cpu_ratio is not None else self.ratio

    def met(self) -> bool | None:
        if self.error:
            return False
        if self.limit is not None:
            return self.value < self.limit
        if self.target is None:
            return None
        if self.unit == "MB/s":
            return self.judged() >= self.target
        return self.judged() <= self.target


def report(rows: list[Row], path: str | None) -> None:
    """A benchmark's rows: written to `path` for run.py (when given), printed as a table."""
    if path:
        Path(path).write_text(json.dumps([asdict(r) for r in rows]))
    print(format_table(rows))


def read_rows(path: str) -> list[Row]:
    return [Row(**r) for r in json.loads(Path(path).read_text())]


def format_table(rows: list[Row]) -> str:
    """The markdown table run.py prints and benchmarks/README.md keeps."""
    out = [
        "| table | workload | nnrun | peer | nnrun | peer | ratio (wall) | ratio (CPU) | target | met |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        if r.error or math.isnan(r.value):  # failed, or skipped (said in the note)
            said = f"**failed**: {_cell(r.error)}" if r.error else _cell(r.note)
            out.append(
                f"| {r.table} | {r.workload} | {r.contender} | {r.peer} | | | | | | {said} |"
            )
            continue
        value, peer = _show(r.value, r.unit), _show(r.peer_value, r.unit)
        cpu = "" if r.cpu_ratio is None else f"{r.cpu_ratio:.2f}x"
        if r.limit is not None:
            target = f"< {_show(r.limit, r.unit)}"
        elif r.target is not None:
            target = f"{'>=' if r.unit == 'MB/s' else '<='} {r.target:.2f}x"
        else:
            target = ""
        met = {None: "", True: "yes", False: "**no**"}[r.met()]
        workload = f"{r.workload} ({r.note})" if r.note else r.workload
        out.append(
            f"| {r.table} | {_cell(workload)} | {r.contender} | {r.peer} | {value} | {peer} | "
            f"{r.ratio:.2f}x | {cpu} | {target} | {met} |"
        )
    return "\n".join(out)


def _cell(text: str) -> str:
    """Text fit for one markdown table cell (one line, no column breaks)."""
    return " ".join(text.split()).replace("|", "/")


def _show(value: float, unit: str) -> str:
    if unit == "s":
        return f"{value * 1e3:.1f} ms" if value < 1 else f"{value:.2f} s"
    if unit == "bytes":
        return f"{value / 2**20:.1f} MiB"
    return f"{value:.1f} {unit}"


def versions() -> str:
    """One line naming the software and machine a benchmark ran on."""
    import torch
    import transformers

    import nnrun

    try:
        import nnsight

        peer = f", nnsight {nnsight.__version__}"
    except ImportError:
        peer = ""
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"
    return (
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), transformers "
        f"{transformers.__version__}{peer}, nnrun {nnrun.__version__}, python "
        f"{platform.python_version()}, {os.cpu_count()} CPUs, "
        f"{platform.processor() or platform.machine()}, {device}"
    )


def timed(
    contenders: dict[str, Callable[[], Any]],
    runs: int,
    cpu: dict[str, list[float]] | None = None,
) -> dict[str, list[float]]:
    """Seconds per call of each contender, `runs` rounds after one warm-up call each.

    Rounds interleave the contenders, so a slow spell of the machine hits them alike.
    With `cpu`, the process's CPU seconds per call are filled in too: on a machine
    shared with other work they move far less than wall-clock time.
    """
    for fn in contenders.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(runs):
        for name, fn in contenders.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            fn()
            times[name].append(time.perf_counter() - start)
            if cpu is not None:
                cpu.setdefault(name, []).append(time.process_time() - start_cpu)
    return times


def medians(
    contenders: dict[str, Callable[[], Any]], runs: int, repeat: int = 1
) -> dict[str, tuple[float, float]]:
    """(median wall, median CPU) seconds per call; each timed sample averages `repeat`
    calls (for calls of a millisecond, where one call is below the clock's noise)."""
    if repeat > 1:
        contenders = {k: _repeated(fn, repeat) for k, fn in contenders.items()}
    cpu: dict[str, list[float]] = {}
    wall = timed(contenders, runs, cpu)
    return {
        k: (statistics.median(wall[k]) / repeat, statistics.median(cpu[k]) / repeat)
        for k in contenders
    }


def _repeated(fn: Callable[[], Any], n: int) -> Callable[[], Any]:
    def run() -> Any:
        for _ in range(n):
            fn()

    return run


def time_row(
    found: dict[str, tuple[float, float]],
    table: str,
    workload: str,
    contender: str,
    peer: str,
    target: float | None = None,
    note: str = "",
) -> Row:
    """A Row of two timed contenders of `medians`."""
    (wall, cpu), (peer_wall, peer_cpu) = found[contender], found[peer]
    return Row(table, workload, contender, peer, wall, peer_wall, "s", cpu, peer_cpu, target, note)


@functools.cache
def plain_model(path: str, texts: tuple[str, ...]) -> tuple[Any, Any, dict[str, Any]]:
    """The model, tokenizer and a left-padded batch, loaded with transformers alone."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.padding_side = "left"
    return model, tokenizer, tokenizer(list(texts), return_tensors="pt", padding=True)


@functools.cache
def nnsight_model(path: str) -> Any:
    """nnsight 0.8.1's wrapper of a local checkpoint, loaded once per process."""
    import nnsight

    return nnsight.TransformersModel(path, task="text-generation", tokenizer=path, dispatch=True)


def engine_factory(spec: dict[str, Any]) -> Callable[[], Any]:
    """Load and compile once; each call returns a fresh Engine over that plan."""
    from nnrun._run import cached_model
    from nnrun.compile import compile_plan
    from nnrun.engine import Engine
    from nnrun.spec import check_spec

    loaded = check_spec(spec)
    model = cached_model(loaded.data["model"])
    plan = compile_plan(loaded, model.model, model.tokenizer)
    return lambda: Engine(plan, model.model, model.tokenizer)


def device() -> str:
    """Where the benchmarks run: cuda when a GPU is there and NNRUN_BENCH_DEVICE allows."""
    import torch

    wanted = os.environ.get("NNRUN_BENCH_DEVICE", "auto")
    if wanted == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return wanted


def sync() -> None:
    """Wait for the GPU (timings of CUDA work end when the work does)."""
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def tiny_model(layers: int = 2, width: int = 64) -> Path:
    """The tiny seeded GPT-2 of the tests (2 layers, width 64 here), built once per machine."""
    sys.path.insert(0, str(REPO / "tests"))
    from tiny_models import build_tiny_model

    from nnrun.models import cache_dir

    target = cache_dir() / "bench" / f"tiny-gpt2-{layers}x{width}"
    if not (target / "config.json").is_file():
        build_tiny_model("gpt2", target, layers=layers, width=width)
    return target
