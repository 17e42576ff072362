"""Stage 4: execute a Plan with forward hooks, one micro-batch at a time."""

from nnrun.engine._batch import Batch, count_prompts, iter_prompts, make_batch
from nnrun.engine._engine import BatchResult, Engine, MetricBatch, SaveBatch, preflight

__all__ = [
    "Batch",
    "BatchResult",
    "Engine",
    "MetricBatch",
    "SaveBatch",
    "count_prompts",
    "iter_prompts",
    "make_batch",
    "preflight",
]
