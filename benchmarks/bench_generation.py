"""Benchmark: greedy generation with a per-step save, plain transformers vs nnrun vs nnsight.

One process, the builtin SmolLM2-135M-Instruct (fp32) on the CPU. Each contender
generates the same new tokens greedily for the same left-padded batch:

  plain         model.generate, no hooks
  nnrun         nnrun.run(dict spec) saving model.layers[-1].output at tokens -1 at
                every step, written to an HDF5 file in a temp dir (includes the
                model load, compile and file write of every run)
  nnrun-engine  the same spec through nnrun.engine.Engine on a model loaded and a
                plan compiled once: hooks + generation + host copies only
  nnsight       nnsight 0.8.1 (model loaded once) saving the same value per step with
                `for step in tracer.iter[0:N]`

Every contender runs once as a warm-up, then --runs rounds that take turns between the
contenders; the median of each is reported.
The generated ids of all contenders are checked to be identical first.

    .venv/bin/python benchmarks/bench_generation.py               # 5 runs
    .venv/bin/python benchmarks/bench_generation.py --runs 3 --new-tokens 8

Not part of the test suite. Needs nnsight==0.8.1 (the `test` extra).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

import torch
from _common import PROMPTS as ALL_PROMPTS
from _common import (
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

# Four prompts of different lengths (the numbers in README.md were measured on these).
PROMPTS = {k: ALL_PROMPTS[k] for k in ("france", "eiffel", "hi", "story")}
SITE = "model.layers[-1].output"


def spec(new_tokens: int) -> dict[str, Any]:
    return {
        "nnrun": 1,
        "name": "bench-generation",
        "model": {"builtin": "smollm2-135m-instruct", "device": device()},
        "prompts": dict(PROMPTS),
        "batch_size": len(PROMPTS),
        "generate": {"max_new_tokens": new_tokens, "do_sample": False},
        "save": {"last": {"at": SITE, "tokens": -1, "steps": "all"}},
    }


def table(runs: int, quick: bool, new_tokens: int | None = None) -> list[Row]:
    import h5py

    import nnrun
    from nnrun.models import builtin_checkpoint

    n = new_tokens or (8 if quick else 16)
    path = str(builtin_checkpoint())
    texts = tuple(PROMPTS.values())
    model, tokenizer, batch = plain_model(path, texts)
    model.to(device())
    batch = {k: v.to(device()) for k, v in batch.items()}

    def plain() -> list[list[int]]:
        with torch.inference_mode():
            out = model.generate(
                **batch, max_new_tokens=n, do_sample=False, pad_token_id=tokenizer.pad_token_id
            )
        return out[:, batch["input_ids"].shape[1] :].tolist()

    tmp = Path(tempfile.mkdtemp(prefix="nnrun-bench-"))

    def via_api() -> list[list[int]]:
        results = nnrun.run(spec(n), output=tmp / "bench.h5", overwrite=True)
        with h5py.File(results.path, "r") as f:
            return f["generation/ids"][()].tolist()

    new_engine = engine_factory(spec(n))

    def via_engine() -> list[list[int]]:
        (result,) = list(new_engine().run())
        assert tuple(result.saves["last"].data.shape[:2]) == (len(texts), n)
        return result.generated

    oracle = nnsight_model(path)

    def via_nnsight() -> list[list[int]]:
        with oracle.generate(list(texts), max_new_tokens=n, do_sample=False) as tracer:
            hidden = list().save()
            for _ in tracer.iter[0:n]:
                hidden.append(oracle.model.layers[-1].output[:, -1].save())
            ids = tracer.result.save()
        assert len(hidden) == n
        sync()
        return ids[:, -n:].tolist()

    contenders = {
        "plain": plain,
        "nnrun": via_api,
        "nnrun-engine": via_engine,
        "nnsight": via_nnsight,
    }
    # The same greedy tokens everywhere (nnrun cuts each row after its EOS).
    reference = plain()
    for name, fn in contenders.items():
        got = fn()
        cut = [row[: len(g)] for row, g in zip(reference, got)]
        assert got == cut, f"{name} generated other tokens than plain generate"
    found = medians(contenders, max(2, runs - 2) if quick else runs)
    work = f"SmolLM2, generate {n} tokens for 4 prompts, last layer saved at every step"
    return [
        time_row(found, "smollm2", work, "nnrun-engine", "plain"),
        time_row(found, "smollm2", work, "nnrun-engine", "nnsight", 1.00),
        time_row(found, "smollm2", work, "nnrun", "plain", note="whole run: compile, file"),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5, help="timed runs per contender")
    parser.add_argument("--new-tokens", type=int, default=16, help="max_new_tokens")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", help="also write the rows to this file (for run.py)")
    args = parser.parse_args()
    print(versions())
    rows = table(args.runs, args.quick, args.new_tokens)
    report(rows, args.json)


if __name__ == "__main__":
    main()
