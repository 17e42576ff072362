"""Copies from the device to the host that do not stop the device.

On CUDA, each batch's values go to page-locked (pinned) host memory with
`non_blocking=True`, and an event marks when they have all arrived: the engine goes
on to the next batch at once, and whoever reads the values (the writer thread) waits
for the event first (`BatchResult.wait`). Pinned blocks come from torch's caching
host allocator, which reuses them once their tensors are gone, so the memory this
takes stays bounded by the batches in flight. Elsewhere a copy is a plain `.to("cpu")`
(nothing to copy for values already on the CPU).
"""

from __future__ import annotations

from typing import Any

import torch


def to_host(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` on the host; from CUDA, a pinned copy that may still be on its way."""
    if tensor.device.type != "cuda":
        return tensor.to("cpu")
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    host.copy_(tensor, non_blocking=True)
    return host


def copies_done(device: torch.device) -> Any:
    """Something whose `synchronize()` returns once the copies to the host queued so far
    on `device` have arrived (a CUDA event); None off CUDA, where copies are done."""
    if device.type != "cuda":
        return None
    event = torch.cuda.Event()
    event.record()
    return event
