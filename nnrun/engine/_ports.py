"""Reading and replacing the tensor a location names inside a module's output.

Module outputs are tensors, tuples (attention: `(attn_out, weights)`), or a
transformers `ModelOutput` at the root. A location's tuple indices walk into
them; replacing a value rebuilds only the containers on that path, so the
other elements of a tuple reach the rest of the model untouched.
"""

from __future__ import annotations

from typing import Any

import torch

from nnrun.errors import RunError

# Keys a model's own output may carry its main tensor under, in preference order.
MAIN_OUTPUT_KEYS = ("logits", "last_hidden_state")


def main_key(output: Any) -> str | int:
    """The key of a model output's main tensor: logits, else last_hidden_state."""
    if hasattr(output, "keys"):
        for key in MAIN_OUTPUT_KEYS:
            if output.get(key) is not None:
                return key
    return 0


def get_value(container: Any, indices: tuple[int, ...], *, root: bool, label: str) -> torch.Tensor:
    """The tensor at `indices` inside `container` (the root output: its main tensor)."""
    value = container
    path = list(indices)
    if root and not path and not isinstance(value, torch.Tensor):
        path = [main_key(value)]
    for i in path:
        try:
            value = value[i]
        except (IndexError, KeyError, TypeError):
            raise RunError(
                f"{label}: the value there has no element [{i}] ({_describe(value)})"
            ) from None
    if not isinstance(value, torch.Tensor):
        raise RunError(
            f"{label}: the value there is {_describe(value)}, not a tensor; "
            f"add a tuple index such as {label}[0]"
        )
    return value


def set_value(container: Any, indices: tuple[int, ...], value: torch.Tensor, *, root: bool) -> Any:
    """A copy of `container` with the tensor at `indices` replaced by `value`."""
    path = list(indices)
    if root and not path and not isinstance(container, torch.Tensor):
        path = [main_key(container)]
    return _replace(container, path, value)


def _replace(container: Any, path: list[Any], value: torch.Tensor) -> Any:
    if not path:
        return value
    head, rest = path[0], path[1:]
    if isinstance(container, tuple) and not hasattr(container, "keys"):
        items = list(container)
        items[head] = _replace(items[head], rest, value)
        return type(container)(items) if type(container) is not tuple else tuple(items)
    if isinstance(container, list):
        items = list(container)
        items[head] = _replace(items[head], rest, value)
        return items
    if hasattr(container, "keys"):  # ModelOutput / dict: keep the same class
        key = list(container.keys())[head] if isinstance(head, int) else head
        container[key] = _replace(container[key], rest, value)
        return container
    raise RunError(f"cannot replace element [{head}] of {_describe(container)}")


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    if isinstance(value, tuple | list):
        inner = ", ".join(
            _describe(v) if isinstance(v, torch.Tensor) else type(v).__name__ for v in value
        )
        return f"a {type(value).__name__} of {len(value)} ({inner})"
    return f"a {type(value).__name__}"
