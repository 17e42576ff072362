"""Timing shared by the benchmark scripts."""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable
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


def versions() -> str:
    """One line naming the software and machine a benchmark ran on."""
    import nnsight
    import torch
    import transformers

    import nnrun

    return (
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), transformers "
        f"{transformers.__version__}, nnsight {nnsight.__version__}, nnrun {nnrun.__version__}, "
        f"{os.cpu_count()} CPUs, {platform.processor() or platform.machine()}"
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


def plain_model(path: str, texts: list[str]) -> tuple[Any, Any, dict[str, Any]]:
    """The model, tokenizer and a left-padded batch, loaded with transformers alone."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.padding_side = "left"
    return model, tokenizer, tokenizer(texts, return_tensors="pt", padding=True)


def engine_factory(spec: dict[str, Any]) -> Callable[[], Any]:
    """Load and compile once; each call returns a fresh Engine over that plan."""
    from nnrun.compile import compile_plan
    from nnrun.engine import Engine
    from nnrun.models import load_model
    from nnrun.spec import check_spec

    loaded = check_spec(spec)
    model = load_model(loaded.data["model"])
    plan = compile_plan(loaded, model.model, model.tokenizer)
    return lambda: Engine(plan, model.model, model.tokenizer)
