"""What the micro-benchmarks (picks.py, routes.py) share: calls per second of one step."""

from __future__ import annotations

import time
from typing import Callable


def rate(step: Callable[[int], object], seconds: float) -> float:
    """Calls per second of ``step(i)``, run in growing batches for about ``seconds``."""
    done, batch = 0, 1
    start = time.perf_counter()
    deadline = start + seconds
    while True:
        for i in range(done, done + batch):
            step(i)
        done += batch
        now = time.perf_counter()
        if now >= deadline:
            return done / (now - start)
        # grow, but not past the time left (a scan of 10,000 routes takes a millisecond)
        left = int((deadline - now) / ((now - start) / done)) + 1
        batch = min(batch * 2, left, 100_000)
