"""Benchmark: attribution patching against exact patching, and a backward pass's memory.

The builtin SmolLM2-135M-Instruct (fp32, 30 layers) on the CPU.

  --atp       runs specs/attribution-patching.yaml (one forward + one backward pass)
              and specs/activation-patching.yaml (150 patched points) and prints the
              Pearson correlation of the attribution grid with the exact effect of each
              patch (patched logit_diff - unpatched), per band of ten layers and over
              all cells, and over the positions where the two prompts' residuals
              differ (the country token and the last one). Both runs take about a
              minute on 2 cores.
  --memory    runs a backward spec (logit_diff loss, every layer's gradient at the last
              token saved) over N prompts streamed from a JSONL file, N = 10, 100 and
              1000 by default, each in a fresh process; prints wall time, the peak RSS
              of the process and its RSS after every 80th batch row (flat: one batch's
              graph at a time), and `nnrun plan`'s estimate of one batch's activations
              against the bytes autograd really keeps for such a batch.

    .venv/bin/python benchmarks/bench_backward.py --atp
    .venv/bin/python benchmarks/bench_backward.py --memory --prompts 10 100 1000
    .venv/bin/python benchmarks/bench_backward.py --table --prompts 16 160   # for run.py

Not part of the test suite (tests/test_specs.py and tests/test_gradients.py check the
same things with thresholds).
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from _common import Row, report

ROOT = Path(__file__).resolve().parents[1]
COUNTRIES = ["France", "Germany", "Italy", "Spain", "Japan", "England", "Poland", "Greece"]
TEMPLATES = [
    "The capital of {} is",
    "Everyone knows that the capital city of {} is",
    "Q: What is the capital of {}? A: The capital is",
    "In {}, the seat of government is the city of",
]

# One process per prompt count: its peak RSS is its own (ru_maxrss never goes down).
_CHILD = """
import json, resource, sys, time
import nnrun
spec, out = json.loads(sys.argv[1]), sys.argv[2]
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 // 2**20
seen = []
def progress(state):
    if state.stage == "running" and state.rows_done % 80 < 8:
        seen.append((state.rows_done, rss()))
start = time.perf_counter()
nnrun.run(spec, output=out, cache=False, progress=progress)
wall = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
print(json.dumps({"wall": wall, "peak": peak, "rss": seen}))
"""


def backward_spec(prompts: Path, limit: int) -> dict[str, Any]:
    return {
        "nnrun": 1,
        "name": "bench-backward",
        "model": {"builtin": "smollm2-135m-instruct", "device": "cpu"},
        "batch_size": 8,
        "prompts": {"file": str(prompts), "limit": limit},
        "metrics": {"ld": {"logit_diff": [" Paris", " Berlin"]}},
        "backward": {"metric": "ld"},
        "save": {"grad": {"at": "@layers.*.grad", "tokens": -1}},
    }


def prompt_file(tmp: Path, count: int) -> Path:
    """`count` capital-city prompts from four templates (seeded), one JSON line each."""
    rng = random.Random(0)
    prompts = tmp / "prompts.jsonl"
    with prompts.open("w") as f:
        for _ in range(count):
            text = rng.choice(TEMPLATES).format(rng.choice(COUNTRIES))
            f.write(json.dumps({"text": text}) + "\n")
    return prompts


def peak(prompts: Path, n: int, tmp: Path) -> dict[str, Any]:
    """A backward run over the first `n` prompts in a fresh process: its wall time, peak
    RSS (MiB) and RSS every 80th row."""
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            _CHILD,
            json.dumps(backward_spec(prompts, n)),
            str(tmp / f"out{n}.h5"),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def memory(counts: list[int], tmp: Path) -> None:
    prompts = prompt_file(tmp, max(counts))
    for n in counts:
        got = peak(prompts, n, tmp)
        rss = ", ".join(f"{rows}: {mib}" for rows, mib in got["rss"])
        print(
            f"{n:5d} prompts: {got['wall']:7.1f} s, peak RSS {got['peak']} MiB; RSS by rows {rss}"
        )
    planned, kept, shape = estimate(prompts)
    print(
        f"plan estimate for a batch of {shape}: {planned / 2**20:.1f} MiB; "
        f"autograd keeps {kept / 2**20:.1f} MiB"
    )


def estimate(prompts: Path) -> tuple[int, int, str]:
    """`nnrun plan`'s activation estimate (bytes) for one batch of 8, what autograd
    keeps for that batch (bytes), and the batch's shape in words."""
    import torch

    import nnrun
    from nnrun._run import cached_model
    from nnrun.engine import Engine
    from nnrun.spec import check_spec

    texts = [line for line in prompts.read_text().splitlines()[:8]]
    spec = backward_spec(prompts, 8)
    spec["prompts"] = {f"p{i}": json.loads(t)["text"] for i, t in enumerate(texts)}
    report = nnrun.plan(spec)
    loaded = cached_model(check_spec(spec).data["model"])
    params = {p.data_ptr() for p in loaded.model.parameters()}
    kept: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.untyped_storage().data_ptr() not in params:
            kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        list(Engine(report.plan, loaded.model, loaded.tokenizer).run())
    shape = f"{report.backward_rows} x {report.longest} tokens"
    return report.backward_bytes, sum(kept.values()), shape


def table(counts: list[int], tmp: Path) -> list[Row]:
    """Rows for run.py: peak RSS of the largest count against the smallest, and the
    plan's estimate of one batch's activations against what autograd keeps."""
    small, big = min(counts), max(counts)
    prompts = prompt_file(tmp, big)
    peaks = {n: peak(prompts, n, tmp) for n in (small, big)}
    planned, kept, shape = estimate(prompts)
    work = "SmolLM2, backward: {metric: logit_diff}, every layer's grad at the last token"
    return [
        Row(
            "backward",
            f"{work}, {big} prompts vs {small}, batch_size 8",
            f"peak RSS, {big} prompts",
            f"peak RSS, {small} prompts",
            peaks[big]["peak"],
            peaks[small]["peak"],
            "MiB",
            note="each run in a process of its own; one batch's graph at a time",
        ),
        Row(
            "backward",
            f"{work}, one batch of {shape}",
            "nnrun plan estimate",
            "autograd keeps",
            planned / 2**20,
            kept / 2**20,
            "MiB",
            note="activations kept for the backward pass",
        ),
    ]


def attribution(tmp: Path) -> None:
    import numpy as np

    import nnrun

    atp = nnrun.run(ROOT / "specs" / "attribution-patching.yaml", output=tmp / "atp.h5")
    exact = nnrun.run(ROOT / "specs" / "activation-patching.yaml", output=tmp / "exact.h5")
    grid = atp["attribution"][0].double().numpy()  # (layer, pos)
    effect = exact.metric("logit_diff")[:, :, 0] - atp.metric("logit_diff")[0]

    def r(a: Any, b: Any) -> float:
        return float(np.corrcoef(np.ravel(a), np.ravel(b))[0, 1])

    layers = grid.shape[0]
    bands = [(lo, min(lo + 10, layers)) for lo in range(0, layers, 10)]
    for name, cols in (("all positions", slice(None)), ("positions 3-4", slice(3, None))):
        cells = ", ".join(
            f"layers {lo}-{hi - 1}: {r(grid[lo:hi, cols], effect[lo:hi, cols]):.4f}"
            for lo, hi in bands
        )
        print(f"{name}: {cells}; all layers: {r(grid[:, cols], effect[:, cols]):.4f}")
    np.set_printoptions(precision=2, suppress=True, linewidth=120)
    print("attribution (left) and exact effect (right), layer by position:")
    print(np.c_[grid, effect])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--atp", action="store_true", help="attribution vs exact patching")
    parser.add_argument("--memory", action="store_true", help="memory over many prompts")
    parser.add_argument("--prompts", type=int, nargs="+", default=[10, 100, 1000])
    parser.add_argument(
        "--table", action="store_true", help="rows for run.py: memory of the least and most prompts"
    )
    parser.add_argument("--json", help="with --table, also write the rows to this file")
    args = parser.parse_args()
    if not (args.atp or args.memory or args.table):
        parser.error("give --atp, --memory, --table or several")
    with tempfile.TemporaryDirectory() as tmp:
        if args.table:
            rows = table(args.prompts, Path(tmp))
            report(rows, args.json)
        if args.atp:
            attribution(Path(tmp))
        if args.memory:
            memory(args.prompts, Path(tmp))


if __name__ == "__main__":
    main()
