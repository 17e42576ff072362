"""Benchmark: a 30-layer activation-patching sweep, nnrun against nnsight and plain hooks.

One process, the builtin SmolLM2-135M-Instruct (fp32, 30 layers) on the CPU. The
experiment: patch the clean prompt's residual at the country token (" France",
token 3) into the corrupt prompt ("... Germany is") at one layer, and read
P(" Paris") at the corrupt prompt's last token; once per layer, 30 numbers.

  nnrun          nnrun.run(spec with sweep: {layer: {range: [0, 30]}}) and a prob
                 metric: compile the 30 points, pack them (1 shared clean row + 30
                 patched rows), run, write the HDF5 file. The model stays loaded
                 between calls, as in a notebook.
  nnrun-engine   the packed plan compiled once; Engine.run only (hooks + forward)
  nnrun-loop     30 nnrun.run calls in a Python loop, one layer each (model cached)
  nnsight-loop   nnsight 0.8.1 the natural way: a Python loop of 30 traces, each with
                 a clean and a corrupt invoke sharing the value through a barrier
  nnsight-one    nnsight 0.8.1 as an expert writes it: one trace, 31 invokes (clean +
                 one per layer), each patched invoke meeting the clean one at its
                 layer through a barrier of two
  hooks          a hand-written batched forward: 31 rows (clean + 30 corrupt copies),
                 one forward hook per layer copying row 0's value into row 1 + layer

All five results are checked to agree (1e-4) before timing. With --processes, the
whole-process time of `nnrun run SPEC` for the sweep is compared with 30 separate
`nnrun run` calls, one layer each (or --quick: 5 calls, scaled to 30).

    .venv/bin/python benchmarks/bench_sweep.py --runs 5
    .venv/bin/python benchmarks/bench_sweep.py --runs 3 --processes

Not part of the test suite. Needs nnsight==0.8.1 (the `test` extra).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from _common import (
    Row,
    device,
    medians,
    nnsight_model,
    report,
    time_row,
    versions,
)

CLEAN, CORRUPT = "The capital of France is", "The capital of Germany is"
POS, LAYERS = 3, 30  # " France" / " Germany": SmolLM2 adds no BOS


def spec(layers: Any = None) -> dict[str, Any]:
    return {
        "nnrun": 1,
        "name": "bench-sweep",
        "model": {"builtin": "smollm2-135m-instruct", "device": device()},
        "batch_size": 32,
        "prompts": {"clean": CLEAN, "corrupt": CORRUPT},
        "sweep": {"layer": layers or {"range": [0, LAYERS]}},
        "edits": [
            {
                "at": "model.layers.${layer}.output",
                "prompts": ["corrupt"],
                "tokens": POS,
                "set": {"from": "clean"},
            }
        ],
        "metrics": {"p_paris": {"prob": " Paris", "prompts": ["corrupt"]}},
    }


def table(runs: int, quick: bool, layers: int | None = None) -> list[Row]:
    """The sweep against its peers; with `quick`, over the first 10 layers only."""
    count = layers or (10 if quick else LAYERS)
    contenders, reference = _contenders(count)
    for name, fn in contenders.items():
        got = fn()
        err = float((got - reference).abs().max())
        assert err < 1e-4, f"{name} disagrees with plain hooks by {err:.1e}"
    found = medians(contenders, runs)
    work = f"SmolLM2 patching sweep over {count} layers, P(' Paris') per layer"
    return [
        time_row(found, "smollm2", work, "nnrun", "nnsight-one", 1.00, "one run, packed rows"),
        time_row(found, "smollm2", work, "nnrun", "nnsight-loop", 1.00, "a loop of traces"),
        time_row(found, "smollm2", work, "nnrun-engine", "hooks", note="one batched pass each"),
        time_row(found, "smollm2", work, "nnrun-loop", "nnsight-loop", 1.00, "one run per layer"),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5, help="timed runs per contender")
    parser.add_argument(
        "--processes", action="store_true", help="also time whole `nnrun run` processes"
    )
    parser.add_argument("--quick", action="store_true", help="10 layers; 5 separate processes")
    parser.add_argument("--json", help="also write the rows to this file (for run.py)")
    args = parser.parse_args()
    print(versions())
    rows = table(args.runs, args.quick)
    report(rows, args.json)
    if args.processes:
        processes(Path(tempfile.mkdtemp(prefix="nnrun-bench-sweep-")), quick=args.quick)


def _contenders(layers: int) -> tuple[dict[str, Any], torch.Tensor]:
    """Every contender over the first `layers` layers, and the hooks' answer."""
    import nnrun
    from nnrun._run import cached_model
    from nnrun.compile import compile_plan
    from nnrun.engine import Engine
    from nnrun.models import builtin_checkpoint
    from nnrun.spec import check_spec

    path = str(builtin_checkpoint())
    tmp = Path(tempfile.mkdtemp(prefix="nnrun-bench-sweep-"))
    loaded = check_spec(spec({"range": [0, layers]}))

    def via_nnrun() -> torch.Tensor:
        results = nnrun.run(loaded, output=tmp / "sweep.h5", overwrite=True)
        return torch.from_numpy(results.metric("p_paris")[:, 0])

    singles = [check_spec(spec([layer])) for layer in range(layers)]

    def via_nnrun_loop() -> torch.Tensor:
        # A notebook loop: one nnrun.run per layer (the model stays loaded between calls).
        found = [
            nnrun.run(one, output=tmp / "one.h5", overwrite=True).metric("p_paris")[0, 0]
            for one in singles
        ]
        return torch.tensor(found)

    model = cached_model(loaded.points()[0].data["model"])
    plan = compile_plan(loaded, model.model, model.tokenizer)

    def via_engine() -> torch.Tensor:
        values = {}
        for result in Engine(plan, model.model, model.tokenizer).run():
            batch = result.metrics["p_paris"]
            values.update(zip(batch.rows, batch.data.tolist()))
        keys = [dict(info.rows)["corrupt"] for info in plan.points]
        return torch.tensor([values[k] for k in keys])

    hf, tok = model.model, model.tokenizer
    paris = tok.encode(" Paris", add_special_tokens=False)[0]
    ids = tok([CLEAN] + [CORRUPT] * layers, return_tensors="pt").to(hf.device)

    def via_hooks() -> torch.Tensor:
        def patch(layer: int):
            def hook(_m: Any, _a: Any, out: torch.Tensor) -> torch.Tensor:
                out = out.clone()
                out[1 + layer, POS] = out[0, POS]
                return out

            return hook

        handles = [hf.model.layers[i].register_forward_hook(patch(i)) for i in range(layers)]
        try:
            with torch.inference_mode():
                logits = hf(**ids).logits[1:, -1]  # (layer, vocab)
        finally:
            for handle in handles:
                handle.remove()
        return torch.softmax(logits.float(), dim=-1)[:, paris].cpu()

    ns = nnsight_model(path)

    def via_nnsight_loop() -> torch.Tensor:
        found = []
        for layer in range(layers):
            with torch.no_grad(), ns.trace() as tracer:
                shared: dict[str, Any] = {"barrier": tracer.barrier(2)}
                with tracer.invoke(CLEAN):
                    shared["h"] = ns.model.layers[layer].output[:, POS].clone()
                    shared["barrier"]()
                with tracer.invoke(CORRUPT):
                    shared["barrier"]()
                    ns.model.layers[layer].output[:, POS] = shared["h"]
                    p = torch.softmax(ns.lm_head.output[0, -1].float(), dim=-1)[paris].save()
            found.append(float(p))
        return torch.tensor(found)

    def via_nnsight_one() -> torch.Tensor:
        saved = []
        with torch.no_grad(), ns.trace() as tracer:
            shared: dict[str, Any] = {"meet": [tracer.barrier(2) for _ in range(layers)]}
            with tracer.invoke(CLEAN):
                for layer in range(layers):
                    shared[layer] = ns.model.layers[layer].output[:, POS].clone()
                    shared["meet"][layer]()
            for layer in range(layers):
                with tracer.invoke(CORRUPT):
                    shared["meet"][layer]()
                    ns.model.layers[layer].output[:, POS] = shared[layer]
                    logits = ns.lm_head.output[0, -1].float()
                    saved.append(torch.softmax(logits, dim=-1)[paris].save())
        return torch.tensor([float(p) for p in saved])

    contenders = {
        "hooks": via_hooks,
        "nnrun-engine": via_engine,
        "nnrun": via_nnrun,
        "nnrun-loop": via_nnrun_loop,
        "nnsight-one": via_nnsight_one,
        "nnsight-loop": via_nnsight_loop,
    }
    return contenders, via_hooks()


def processes(tmp: Path, *, quick: bool) -> None:
    """Whole `nnrun run` processes: one sweep, against one process per layer."""
    nnrun_exe = str(Path(sys.executable).with_name("nnrun"))
    sweep_file = tmp / "sweep.yaml"
    sweep_file.write_text(yaml.safe_dump(spec()))
    start = time.perf_counter()
    subprocess.run(
        [nnrun_exe, "run", "-q", str(sweep_file), "-o", str(tmp / "p.h5")],
        check=True,
        capture_output=True,
    )
    sweep_s = time.perf_counter() - start
    count = 5 if quick else LAYERS
    start = time.perf_counter()
    for layer in range(count):
        one = tmp / f"one-{layer}.yaml"
        one.write_text(yaml.safe_dump(spec([layer])))
        subprocess.run(
            [nnrun_exe, "run", "-q", str(one), "-o", str(tmp / f"one-{layer}.h5")],
            check=True,
            capture_output=True,
        )
    separate_s = (time.perf_counter() - start) * LAYERS / count
    scaled = f" (5 processes, scaled to {LAYERS})" if quick else ""
    print()
    print(
        f"whole processes: `nnrun run` of the sweep {sweep_s:.1f} s; "
        f"{LAYERS} separate `nnrun run` calls {separate_s:.1f} s{scaled}; "
        f"{separate_s / sweep_s:.1f}x"
    )


if __name__ == "__main__":
    main()
