"""Specs that the shard tests (in-process and on a Ray cluster) run both locally and in shards.

Each case covers what a merge must get right: sweep axes, shared rows, layered and
ragged saves whose token width differs between shards, metrics, generation, prompt
files (windows of different widths, extra JSONL fields that appear late), and a
sweep over a prompt file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from helpers import write_jsonl

PROMPTS = {
    "clean": "The capital of France is",
    "corrupt": "The capital of Germany is",
    "short": "Hi",
    "long": "The Eiffel Tower is in the city of",
}


def patching(tiny: Path) -> dict[str, Any]:
    """A layer x position patching sweep with saves at every layer and six metrics."""
    return {
        "nnrun": 1,
        "model": {"path": str(tiny), "device": "cpu"},
        "batch_size": 3,
        "prompts": dict(PROMPTS),
        "sweep": {"layer": [0, 1, 2], "pos": [1, -1]},
        "edits": [
            {
                "at": "model.layers.${layer}.output",
                "prompts": ["corrupt"],
                "tokens": "${pos}",
                "set": {"from": "clean"},
            },
            {"at": "model.layers.0.mlp.output", "prompts": ["long"], "noise": {"std": 0.1}},
        ],
        "save": {
            "resid": {"at": "model.layers.*.output"},
            "last": {"at": "model.layers.${layer}.output", "tokens": [-1], "apply": ["norm"]},
            "top": {"at": "output", "tokens": [-1], "apply": ["softmax", {"topk": 3}]},
        },
        "metrics": {
            "ld": {"logit_diff": [" Paris", " Berlin"], "prompts": ["corrupt"]},
            "p": {"prob": " Paris"},
            "kl": {"kl": "clean", "prompts": ["corrupt", "short"]},
        },
    }


def steering(tiny: Path) -> dict[str, Any]:
    """A one-variable sweep with generation and a per-step save."""
    return {
        "nnrun": 1,
        "model": {"path": str(tiny), "device": "cpu"},
        "batch_size": 2,
        "prompts": {"a": PROMPTS["clean"], "b": PROMPTS["short"], "c": PROMPTS["long"]},
        "sweep": {"alpha": [0.0, 2.0, 4.0, 8.0]},
        "generate": {"max_new_tokens": 3},
        "edits": [
            {
                "at": "model.layers.1.output",
                "tokens": "all",
                "steps": "all",
                "add": [0.5] * 32,
                "alpha": "${alpha}",
            }
        ],
        "save": {"h": {"at": "model.layers.2.output", "tokens": [-1], "steps": "all"}},
    }


def prompt_records(count: int = 11) -> list[dict[str, Any]]:
    """JSONL records of growing length; `late` appears only from record 7 on."""
    words = "the capital of France is Paris and the city of Rome is far".split()
    records: list[dict[str, Any]] = []
    for i in range(count):
        record: dict[str, Any] = {"text": " ".join(words[: 2 + (i * 5) % 11]), "n": i}
        if i >= 7:
            record["late"] = f"x{i}"
        records.append(record)
    return records


def prompt_file(tiny: Path, directory: Path, *, generate: bool = False) -> dict[str, Any]:
    """A spec over a JSONL prompt file (streamed), no sweep."""
    path = write_jsonl(directory / "prompts.jsonl", prompt_records())
    spec: dict[str, Any] = {
        "nnrun": 1,
        "model": {"path": str(tiny), "device": "cpu"},
        "batch_size": 2,
        "prompts": {"file": str(path)},
        "save": {
            "resid": {"at": "model.layers.*.output"},
            "logits": {"at": "output", "tokens": [-1]},
        },
        "metrics": {"p": {"prob": " Paris"}},
    }
    if generate:
        spec["generate"] = {"max_new_tokens": 2}
        spec["save"] = {"h": {"at": "model.layers.1.output", "tokens": [-1], "steps": "all"}}
    return spec


def sweep_over_file(tiny: Path, directory: Path) -> dict[str, Any]:
    """A sweep whose points each stream the same prompt file."""
    path = write_jsonl(directory / "few.jsonl", prompt_records(5))
    return {
        "nnrun": 1,
        "model": {"path": str(tiny), "device": "cpu"},
        "batch_size": 2,
        "prompts": {"file": str(path)},
        "sweep": {"layer": [0, 2]},
        "edits": [{"at": "model.layers.${layer}.output", "tokens": [-1], "zero": True}],
        "save": {"logits": {"at": "output", "tokens": [-1], "apply": ["argmax"]}},
        "metrics": {"p": {"prob": " Paris"}},
    }
