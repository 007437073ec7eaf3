"""Median latency of calls, timed in turns: the one timer of verification and benchmarks.

Each callable is called ``warm_up`` times, then the callables take turns, one
call each per round, so a change in machine load during the measurement hits
all of them alike instead of whichever happened to run then. ``synchronize``
runs before and after every timed call (``torch.cuda.synchronize`` for GPU
work, whose calls return before the device has finished).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping
from typing import Any


def median_ms(
    calls: Mapping[str, Callable[[], Any]],
    repeats: int,
    *,
    warm_up: int = 3,
    synchronize: Callable[[], None] | None = None,
) -> dict[str, float]:
    """The median wall time of one call, in milliseconds, per callable."""
    sync = synchronize or (lambda: None)
    for call in calls.values():
        for _ in range(warm_up):
            call()
    timings: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            sync()
            start = time.perf_counter()
            call()
            sync()
            timings[name].append((time.perf_counter() - start) * 1000)
    return {name: round(statistics.median(values), 4) for name, values in timings.items()}
