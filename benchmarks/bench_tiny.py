"""Benchmark: the fixed cost of a pass, on a tiny GPT-2 (2 layers, width 64); CPU, or cuda where
there is one (NNRUN_BENCH_DEVICE).

Two workloads, in one process:

  one pass    1 prompt of 8 tokens, both blocks' outputs saved at every token:
                plain         tokenize + forward, nothing saved (the floor)
                hooks         tokenize + forward with two hand-written forward hooks,
                              the outputs stacked and copied to the host
                nnrun-engine  nnrun.engine.Engine(plan, ...).run() on a plan compiled once
                nnrun         nnrun.run(spec): compile, run, HDF5 file, every call
                nnsight       nnsight 0.8.1: one trace, one invoke, .save() per block
  400 prompts a prompt file of 400 lines at batch_size 1, both blocks saved at the
              last token:
                nnrun         nnrun.run(spec) (the model stays loaded between calls)
                hand-written  read the file, tokenize each prompt, forward with hooks,
                              write each row with h5py into one dataset

Saved values are checked equal before timing.

    .venv/bin/python benchmarks/bench_tiny.py [--runs 7] [--quick]

Not part of the test suite. Needs nnsight==0.8.1 (the `test` extra).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

import torch
from _common import (
    Row,
    device,
    engine_factory,
    medians,
    report,
    sync,
    time_row,
    tiny_model,
)

TEXT = "The capital of France is Paris, and"  # 8 tokens with the tiny tokenizer
LAYERS = 2
UNJUDGED = "--quick: not judged, the target is for 400 prompts"


def table(runs: int, quick: bool) -> list[Row]:
    import h5py
    import numpy as np

    import nnrun

    path = tiny_model()
    tmp = Path(tempfile.mkdtemp(prefix="nnrun-bench-tiny-"))
    spec = {
        "nnrun": 1,
        "name": "bench-tiny",
        "model": {"path": str(path), "device": device()},
        "prompts": {"a": TEXT},
        "save": {"h": {"at": "transformer.h.*.output", "tokens": "all"}},
    }
    new_engine = engine_factory(spec)
    engine = new_engine()
    model, tok = engine.model, engine.tokenizer
    assert len(tok(TEXT)["input_ids"]) == 8

    def plain() -> None:
        with torch.inference_mode():
            model(**tok(TEXT, return_tensors="pt").to(model.device))
        sync()

    def hooks() -> torch.Tensor:
        saved: list[torch.Tensor] = []
        handles = [
            block.register_forward_hook(lambda _m, _a, out: saved.append(out))
            for block in model.transformer.h
        ]
        try:
            with torch.inference_mode():
                model(**tok(TEXT, return_tensors="pt").to(model.device))
        finally:
            for handle in handles:
                handle.remove()
        return torch.stack(saved, dim=1).cpu()  # (prompt, layer, token, d)

    def via_engine() -> torch.Tensor:
        (result,) = list(new_engine().run())
        return result.saves["h"].data

    def via_run() -> torch.Tensor:
        return nnrun.run(spec, output=tmp / "one.h5", overwrite=True)["h"].tensor()

    ns = _nnsight(path)
    ns.to(device())

    def via_nnsight() -> torch.Tensor:
        saved: list[Any] = []
        with torch.inference_mode(), ns.trace(TEXT):
            for block in ns.transformer.h:
                saved.append(block.output.save())
        return torch.stack(list(saved), dim=1).cpu()

    reference = hooks()
    for name, fn in (("engine", via_engine), ("run", via_run), ("nnsight", via_nnsight)):
        got = fn()
        assert torch.allclose(got, reference, atol=1e-6), f"{name} saved other values"
    one = medians(
        {
            "plain": plain,
            "hooks": hooks,
            "nnrun-engine": via_engine,
            "nnrun": via_run,
            "nnsight": via_nnsight,
        },
        runs,
        repeat=10 if quick else 40,
    )
    work = "tiny GPT-2, 1 prompt x 8 tokens, 2 blocks saved at every token"
    rows = [
        time_row(one, "tiny", work, "nnrun-engine", "hooks", 1.10),
        time_row(one, "tiny", work, "nnrun-engine", "nnsight", 1.00),
        time_row(one, "tiny", work, "nnrun", "hooks", note="whole run: compile, file"),
        time_row(one, "tiny", work, "hooks", "plain", note="the peer against a bare pass"),
    ]

    # 400 prompts from a file, one per batch.
    count = 100 if quick else 400
    texts = [f"{TEXT} {i} is the number" for i in range(count)]
    source = tmp / "prompts.jsonl"
    source.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    data_spec = {
        **spec,
        "batch_size": 1,
        "prompts": {"file": str(source)},
        "save": {"h": {"at": "transformer.h.*.output", "tokens": -1}},
    }

    def via_run_file() -> np.ndarray:
        return nnrun.run(data_spec, output=tmp / "data.h5", overwrite=True).array("h")

    def by_hand() -> np.ndarray:
        saved: list[torch.Tensor] = []
        handles = [
            block.register_forward_hook(lambda _m, _a, out: saved.append(out[:, -1]))
            for block in model.transformer.h
        ]
        try:
            with h5py.File(tmp / "hand.h5", "w") as f:
                ds = f.create_dataset("h", shape=(count, LAYERS, 1, 64), dtype=np.float32)
                with open(source) as lines, torch.inference_mode():
                    for i, line in enumerate(lines):
                        text = json.loads(line)["text"]
                        saved.clear()
                        model(**tok(text, return_tensors="pt").to(model.device))
                        ds[i] = torch.stack(saved, dim=1).cpu().numpy()[0, :, None]
                return ds[()]
        finally:
            for handle in handles:
                handle.remove()

    np.testing.assert_allclose(via_run_file(), by_hand(), atol=1e-6)
    many = medians({"nnrun": via_run_file, "hand-written": by_hand}, max(3, runs // 2))
    work = f"tiny GPT-2, {count} prompts from a file, batch_size 1, 2 blocks at the last token"
    if quick:  # the run's fixed cost weighs more over fewer prompts: shown, not judged
        rows.append(time_row(many, "tiny", work, "nnrun", "hand-written", note=UNJUDGED))
    else:
        rows.append(time_row(many, "tiny", work, "nnrun", "hand-written", 1.10))
    return rows


def _nnsight(path: Path) -> Any:
    from _common import nnsight_model

    return nnsight_model(str(path))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=7, help="timed rounds per contender")
    parser.add_argument("--quick", action="store_true", help="fewer repeats, 100 prompts")
    parser.add_argument("--json", help="also write the rows to this file (for run.py)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = table(args.runs, args.quick)
    report(rows, args.json)


if __name__ == "__main__":
    main()
