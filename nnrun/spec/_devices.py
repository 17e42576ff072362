"""Device names in `model.device_map` and `model.max_memory` (no torch needed)."""

from __future__ import annotations

import re
from typing import Any

_NAMED = ("cpu", "disk", "mps", "cuda")
_CUDA = re.compile(r"cuda:(\d+)")


def is_device_name(value: Any, *, map_value: bool) -> bool:
    """Whether `value` names a device as accelerate takes it.

    A device_map value may be cpu, disk, mps, cuda, cuda:N or a GPU number (int or
    digits); a max_memory key the same but plain `cuda` (its memory is per GPU).
    """
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return value >= 0
    if not isinstance(value, str):
        return False
    if value.isdigit() or _CUDA.fullmatch(value):
        return True
    return value in _NAMED and (map_value or value != "cuda")


def accelerate_device(value: Any) -> Any:
    """A spec's device name as accelerate wants it: GPU numbers as ints, the rest as is."""
    if isinstance(value, str):
        if value.isdigit():
            return int(value)
        found = _CUDA.fullmatch(value)
        if found:
            return int(found.group(1))
    return value
