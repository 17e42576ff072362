"""Timing shared by the benchmark scripts."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any


def timed(contenders: dict[str, Callable[[], Any]], runs: int) -> dict[str, list[float]]:
    """Seconds per call of each contender, `runs` rounds after one warm-up call each.

    Rounds interleave the contenders, so a slow spell of the machine hits them alike.
    """
    for fn in contenders.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(runs):
        for name, fn in contenders.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times
