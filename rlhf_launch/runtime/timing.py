"""Wall-clock time per section of a PPO step (generate, forward, backward, optimizer, ...), and the names of
the sections that hold each role's own compute (``busy``) and its scoring pass (``scoring``)."""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager


class Timer:
    """Seconds per named section: ``with timer("generate"):`` adds the block's wall-clock time to that section.

    ``synchronize`` (``torch.cuda.synchronize`` on a GPU) runs at both ends of every section: GPU
    work is queued, so without it a section would measure how long its kernels took to launch
    and the next section would pay for them."""

    def __init__(self, synchronize: Callable[[], None] | None = None) -> None:
        self.totals: dict[str, float] = defaultdict(float)
        self.synchronize = synchronize or (lambda: None)

    @contextmanager
    def __call__(self, section: str) -> Iterator[None]:
        self.synchronize()
        start = time.perf_counter()
        try:
            yield
        finally:
            self.synchronize()
            self.totals[section] += time.perf_counter() - start

    def add(self, sections: dict[str, float]) -> None:
        """Add seconds measured elsewhere (another thread's Timer) to these sections."""
        for name, seconds in sections.items():
            self.totals[name] += seconds

    def pop(self) -> dict[str, float]:
        """The totals since the last pop."""
        totals, self.totals = dict(self.totals), defaultdict(float)
        return totals


def busy(role: str) -> str:
    """The Timer section of ``role``'s own compute on this rank (generate, its scoring pass, its update)."""
    return f"busy/{role}"


def scoring(role: str) -> str:
    """The Timer section of ``role``'s scoring pass alone (also counted in ``busy(role)``)."""
    return f"score/{role}"
