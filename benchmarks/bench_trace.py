"""Benchmark: one forward pass saving every layer, plain PyTorch vs nnrun vs nnsight.

One process, the builtin SmolLM2-135M-Instruct (fp32, 30 layers), a batch of 8
prompts of different lengths (left-padded, explicit position ids everywhere). Every
contender saves each layer's output at each prompt's last token, and, with --patch,
also patches the first prompt's layer-8 output at its last token into the second:

  plain         model(**batch), no hooks (saves nothing: the floor)
  hooks         plain forward hooks on the 30 layers that copy h[:, -1] to the host
  nnrun-engine  nnrun.engine.Engine on a model loaded and a plan compiled once
  nnrun         nnrun.run(dict spec): compile, run and HDF5 write, every time (the
                model stays loaded between calls, as in a notebook)
  nnsight       nnsight 0.8.1 trace with one invoke per prompt, .save() per layer

The saved values of hooks, nnrun and nnsight are checked to agree first. A second
table compares the compile-time probe pass with the experiment's own pass on the demo
spec: probed afresh, and read from the probe cache.

    .venv/bin/python benchmarks/bench_trace.py               # 5 runs
    .venv/bin/python benchmarks/bench_trace.py --runs 3 --patch

Not part of the test suite. Needs nnsight==0.8.1 (the `test` extra).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

import torch
from _common import (
    PROMPTS,
    REPO,
    Row,
    device,
    engine_factory,
    medians,
    nnsight_model,
    plain_model,
    report,
    sync,
    time_row,
    versions,
)

PATCH_LAYER = 8


def spec(patch: bool) -> dict[str, Any]:
    out: dict[str, Any] = {
        "nnrun": 1,
        "name": "bench-trace",
        "model": {"builtin": "smollm2-135m-instruct", "device": device()},
        "prompts": dict(PROMPTS),
        "batch_size": len(PROMPTS),
        "save": {"resid": {"at": "model.layers.*.output", "tokens": -1}},
    }
    if patch:
        out["edits"] = [
            {
                "at": f"model.layers.{PATCH_LAYER}.output",
                "prompts": ["germany"],
                "tokens": -1,
                "set": {"from": "france"},
            }
        ]
    return out


def table(runs: int, quick: bool, patch: bool = False) -> list[Row]:
    import nnrun
    from nnrun.models import builtin_checkpoint

    path = str(builtin_checkpoint())
    texts = tuple(PROMPTS.values())
    model, _, batch = plain_model(path, texts)
    model.to(device())
    batch = {k: v.to(device()) for k, v in batch.items()}
    batch["position_ids"] = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    layers = model.model.layers
    france, germany = 0, 1

    def plain() -> None:
        with torch.inference_mode():
            model(**batch)
        sync()

    def hooks() -> torch.Tensor:
        saved: list[torch.Tensor] = []

        def save(_m: Any, _a: Any, out: torch.Tensor) -> None:
            saved.append(out[:, -1])

        def patch_hook(_m: Any, _a: Any, out: torch.Tensor) -> torch.Tensor:
            out = out.clone()
            out[germany, -1] = out[france, -1]
            return out

        handles = []
        if patch:
            handles.append(layers[PATCH_LAYER].register_forward_hook(patch_hook))
        handles += [layer.register_forward_hook(save) for layer in layers]
        try:
            with torch.inference_mode():
                model(**batch)
        finally:
            for handle in handles:
                handle.remove()
        return torch.stack(saved, dim=1).cpu()  # (prompt, layer, d)

    tmp = Path(tempfile.mkdtemp(prefix="nnrun-bench-"))

    def via_api() -> torch.Tensor:
        results = nnrun.run(spec(patch), output=tmp / "bench.h5", overwrite=True)
        return results["resid"][:, :, 0]

    new_engine = engine_factory(spec(patch))

    def via_engine() -> torch.Tensor:
        (result,) = list(new_engine().run())
        return result.saves["resid"].data[:, :, 0]

    oracle = nnsight_model(path)
    oracle.to(device())

    def via_nnsight() -> torch.Tensor:
        saved: dict[int, list[Any]] = {}
        with oracle.trace() as tracer:
            # Values crossing invokes go through an outer dict and a barrier.
            shared: dict[str, Any] = {"barrier": tracer.barrier(2) if patch else None}
            for i, text in enumerate(texts):
                with tracer.invoke(text):
                    saved[i] = []
                    for n, layer in enumerate(oracle.model.layers):
                        if patch and n == PATCH_LAYER and i == france:
                            shared["source"] = layer.output[:, -1].clone()
                            shared["barrier"]()
                        elif patch and n == PATCH_LAYER and i == germany:
                            shared["barrier"]()
                            layer.output[:, -1] = shared["source"]
                        saved[i].append(layer.output[:, -1].save())
        return torch.stack([torch.cat(list(saved[i])) for i in range(len(texts))]).cpu()

    reference = hooks()
    for name, fn in (("nnrun-engine", via_engine), ("nnrun", via_api), ("nnsight", via_nnsight)):
        got = fn()
        scale = reference.abs().max()
        err = float((got.detach().cpu() - reference).abs().max() / scale)
        assert err < 1e-4, f"{name} saved other values than plain hooks (relative {err:.1e})"

    found = medians(
        {
            "plain": plain,
            "hooks": hooks,
            "nnrun-engine": via_engine,
            "nnrun": via_api,
            "nnsight": via_nnsight,
        },
        runs,
    )
    work = f"SmolLM2, 8 prompts x 30 layers saved at the last token{', + a patch' if patch else ''}"
    rows = [
        time_row(found, "smollm2", work, "nnrun-engine", "hooks", 1.02),
        time_row(found, "smollm2", work, "nnrun-engine", "nnsight", 1.00),
        time_row(found, "smollm2", work, "nnrun", "hooks", note="whole run: compile, file"),
        time_row(found, "smollm2", work, "hooks", "plain", note="the peer against a bare pass"),
    ]
    return rows + probe_table(runs)


def probe_table(runs: int) -> list[Row]:
    """The compile-time probe pass against the demo experiment's own pass."""
    from nnrun._run import cached_model
    from nnrun.compile import _probe as probe_module
    from nnrun.compile import compile_plan, probe_sites
    from nnrun.engine import Engine
    from nnrun.spec import check_spec

    demo = check_spec(REPO / "examples" / "demo.yaml", [f"model.device={device()}"])
    model = cached_model(demo.data["model"])
    plan = compile_plan(demo, model.model, model.tokenizer)  # fills the probe cache

    def experiment() -> None:
        list(Engine(plan, model.model, model.tokenizer).run())
        sync()

    def probe() -> None:
        probe_sites(model.model, tokenizer=model.tokenizer)
        sync()

    def cached_compile() -> None:
        probe_module._PROBED.pop(model.model, None)  # as in a new process: from the disk
        compile_plan(demo, model.model, model.tokenizer)

    found = medians({"pass": experiment, "probe": probe, "compile": cached_compile}, runs)
    work = "SmolLM2, demo spec: the probe pass against the experiment's own pass"
    return [
        time_row(found, "smollm2", work, "probe", "pass", note="first run with these model files"),
        time_row(
            found, "smollm2", work, "compile", "pass", 0.10, "later runs: probe read from the cache"
        ),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5, help="timed runs per contender")
    parser.add_argument("--patch", action="store_true", help="also patch france -> germany")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", help="also write the rows to this file (for run.py)")
    args = parser.parse_args()
    print(versions())
    rows = table(args.runs, args.quick, args.patch)
    report(rows, args.json)


if __name__ == "__main__":
    main()
