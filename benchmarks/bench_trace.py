"""Benchmark: one forward pass saving every layer, plain PyTorch vs nnrun vs nnsight.

One process, the builtin SmolLM2-135M-Instruct (fp32, 30 layers) on the CPU, a batch
of 8 prompts of different lengths (left-padded, explicit position ids everywhere).
Every contender saves each layer's output at each prompt's last token, and, with
--patch, also patches the first prompt's layer-8 output at its last token into the
second prompt:

  plain         model(**batch), no hooks (saves nothing: the floor)
  hooks         plain forward hooks on the 30 layers that copy h[:, -1] to the host
  nnrun-engine  nnrun.engine.Engine on a model loaded and a plan compiled once
  nnrun         nnrun.run(dict spec): load, compile, run and HDF5 write, every time
  nnsight       nnsight 0.8.1 trace with one invoke per prompt, .save() per layer

The saved values of hooks, nnrun and nnsight are checked to agree first.

    .venv/bin/python benchmarks/bench_trace.py               # 5 runs
    .venv/bin/python benchmarks/bench_trace.py --runs 3 --patch

Not part of the test suite. Needs nnsight==0.8.1 (the `test` extra).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path
from typing import Any

import torch
from _common import PROMPTS, engine_factory, plain_model, timed, versions

PATCH_LAYER = 8


def spec(patch: bool) -> dict[str, Any]:
    out: dict[str, Any] = {
        "nnrun": 1,
        "name": "bench-trace",
        "model": {"builtin": "smollm2-135m-instruct", "device": "cpu"},
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5, help="timed runs per contender")
    parser.add_argument("--patch", action="store_true", help="also patch france -> germany")
    args = parser.parse_args()

    import nnsight

    import nnrun
    from nnrun.models import builtin_checkpoint

    path = str(builtin_checkpoint())
    texts = list(PROMPTS.values())
    print(
        f"SmolLM2-135M-Instruct fp32 CPU, one forward of {len(texts)} prompts, every layer "
        f"saved at the last token{', plus a patch' if args.patch else ''}; {args.runs} runs"
    )
    print(versions())

    model, tokenizer, batch = plain_model(path, texts)
    batch["position_ids"] = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    layers = model.model.layers
    france, germany = 0, 1

    def plain() -> None:
        with torch.inference_mode():
            model(**batch)

    def hooks() -> torch.Tensor:
        saved: list[torch.Tensor] = []

        def save(_m: Any, _a: Any, out: torch.Tensor) -> None:
            saved.append(out[:, -1])

        def patch(_m: Any, _a: Any, out: torch.Tensor) -> torch.Tensor:
            out = out.clone()
            out[germany, -1] = out[france, -1]
            return out

        handles = []
        if args.patch:
            handles.append(layers[PATCH_LAYER].register_forward_hook(patch))
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
        return nnrun.run(spec(args.patch), output=tmp / "bench.h5")["resid"][:, :, 0]

    new_engine = engine_factory(spec(args.patch))

    def via_engine() -> torch.Tensor:
        (result,) = list(new_engine().run())
        return result.saves["resid"].data[:, :, 0]

    oracle = nnsight.TransformersModel(path, task="text-generation", tokenizer=path, dispatch=True)

    def via_nnsight() -> torch.Tensor:
        saved: dict[int, list[Any]] = {}
        with oracle.trace() as tracer:
            # Values crossing invokes go through an outer dict and a barrier.
            shared: dict[str, Any] = {"barrier": tracer.barrier(2) if args.patch else None}
            for i, text in enumerate(texts):
                with tracer.invoke(text):
                    saved[i] = []
                    for n, layer in enumerate(oracle.model.layers):
                        if args.patch and n == PATCH_LAYER and i == france:
                            shared["source"] = layer.output[:, -1].clone()
                            shared["barrier"]()
                        elif args.patch and n == PATCH_LAYER and i == germany:
                            shared["barrier"]()
                            layer.output[:, -1] = shared["source"]
                        saved[i].append(layer.output[:, -1].save())
        return torch.stack([torch.cat(list(saved[i])) for i in range(len(texts))])

    contenders = {
        "plain": plain,
        "hooks": hooks,
        "nnrun-engine": via_engine,
        "nnrun": via_api,
        "nnsight": via_nnsight,
    }
    reference = hooks()
    for name in ("nnrun-engine", "nnrun", "nnsight"):
        got = contenders[name]()
        scale = reference.abs().max()
        err = float((got.detach() - reference).abs().max() / scale)
        assert err < 1e-4, f"{name} saved other values than plain hooks (relative {err:.1e})"

    medians = {}
    for name, times in timed(contenders, args.runs).items():
        medians[name] = statistics.median(times)
        spread = ", ".join(f"{t:.3f}" for t in times)
        print(f"{name:>13}: median {medians[name]:.3f} s   ({spread})")
    print()
    for name in ("hooks", "nnrun-engine", "nnrun", "nnsight"):
        print(f"{name + '/plain':>19}: {medians[name] / medians['plain']:.2f}x")
    for name in ("nnrun-engine", "nnsight"):
        print(f"{name + '/hooks':>19}: {medians[name] / medians['hooks']:.2f}x")


if __name__ == "__main__":
    main()
