"""Small helpers shared by the engine, store and CLI tests."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
NNRUN = REPO / ".venv" / "bin" / "nnrun"


@contextmanager
def one_torch_thread() -> Iterator[None]:
    """Run torch on one thread: tiny models are many times faster so on a busy machine."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def write_yaml(path: Path, data: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def write_jsonl(path: Path, records: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def hooks_by_module(model: Any) -> dict[str, tuple[int, int]]:
    """name -> (forward hooks, forward pre-hooks) for every module that has any."""
    return {
        name: (len(m._forward_hooks), len(m._forward_pre_hooks))
        for name, m in model.named_modules()
        if m._forward_hooks or m._forward_pre_hooks
    }


def assert_no_hooks(model: Any) -> None:
    left = hooks_by_module(model)
    assert left == {}, f"hooks left on modules: {left}"


def h5_str(value: Any) -> Any:
    """h5py strings come back as bytes in datasets: make them str."""
    if isinstance(value, bytes):
        return value.decode()
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, list):
        return [h5_str(v) for v in value]
    return value
