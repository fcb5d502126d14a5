"""Wall-clock time per section of a PPO step (generate, forward, backward, optimizer, ...)."""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager


class Timer:
    def __init__(self) -> None:
        self.totals: dict[str, float] = defaultdict(float)

    @contextmanager
    def __call__(self, section: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.totals[section] += time.perf_counter() - start

    def pop(self) -> dict[str, float]:
        """The totals since the last pop."""
        totals, self.totals = dict(self.totals), defaultdict(float)
        return totals
