"""Seeding torch's global generators without the state `torch.manual_seed` grows.

`torch.manual_seed` also seeds every CUDA device. On a CUDA build whose GPU is not
initialised yet, that call is queued for later with a formatted stack trace: each run
pays for the trace, and the queue grows for the life of the process. Only the
generators that can be used are seeded here: the CPU's always, CUDA's only once CUDA
is running (a model on the GPU has initialised it by the time a run starts).
"""

from __future__ import annotations

import torch


def seed_generators(seed: int) -> None:
    """Seed the CPU generator, and every CUDA device's when CUDA is initialised."""
    torch.default_generator.manual_seed(seed)
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.manual_seed_all(seed)  # runs at once: nothing is queued
    if torch.backends.mps.is_available():
        torch.mps.manual_seed(seed)
