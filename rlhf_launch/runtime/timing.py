"""Wall-clock time per section of a PPO step (generate, forward, backward, optimizer, ...), and the names of
the sections that hold each role's own compute (``busy``) and its scoring pass (``scoring``)."""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import torch


class Clock(Protocol):
    """Marks on a device's queue of work: ``mark()`` records the moment the device reaches this point of the
    queue (without waiting for it), ``seconds(a, b)`` is the device time from mark ``a`` to mark ``b``, known
    once both are reached."""

    def mark(self) -> Any:
        """A mark at the current end of the device's queue."""

    def seconds(self, start: Any, end: Any) -> float:
        """Seconds between two marks (waits until ``end`` is reached)."""


class CudaClock:
    """CUDA events on the calling thread's current stream of ``device``: a section measured by two of them
    costs no host synchronisation, and counts only the work queued on that stream (and what that stream
    waits for: the collectives it joined, ZeRO-3's prefetches), not another thread's kernels."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def mark(self) -> Any:
        """A timing event recorded on the current stream."""
        import torch

        event = torch.cuda.Event(enable_timing=True)
        event.record(torch.cuda.current_stream(self.device))
        return event

    def seconds(self, start: Any, end: Any) -> float:
        """Seconds from ``start`` to ``end`` (waits for ``end``)."""
        end.synchronize()
        return start.elapsed_time(end) / 1000.0

    def synchronize(self) -> None:
        """Wait for the work queued on the calling thread's current stream (not the whole device)."""
        import torch

        torch.cuda.current_stream(self.device).synchronize()


class Timer:
    """Seconds per named section: ``with timer("generate"):`` adds the block's time to that section.

    GPU work is queued: without care a section would measure how long its kernels took to launch, and the next
    section would pay for them. An outermost section (the step; a section entered outside any other)
    calls ``synchronize`` at both ends, so that it holds all the work it queued. A section inside another
    (forward and backward per micro step, the roles' busy sections) does not block: with a ``clock`` it is
    measured between two marks on the device's queue, read once its outermost section has ended; without one,
    by the host clock (the CPU, where nothing is queued). A device-wide synchronize at both ends of every
    forward and backward would stop ZeRO-3 from overlapping its prefetches with compute; the marks keep each
    section's figure (the device time from its start to its end, queued work included) without that.

    A Timer belongs to one thread (its nesting depth is its own)."""

    def __init__(self, synchronize: Callable[[], None] | None = None, clock: Clock | None = None) -> None:
        self.totals: dict[str, float] = defaultdict(float)
        self.synchronize = synchronize or (lambda: None)
        self.clock = clock
        self.depth = 0
        self.pending: list[tuple[str, Any, Any]] = []  # nested sections' marks, read when the outermost section ends

    @classmethod
    def for_device(cls, device: torch.device) -> Timer:
        """The Timer of the calling thread on ``device``: CUDA events and the thread's current stream on a GPU
        (a device-wide synchronize would also wait for another thread's kernels, such as the rollout sampled
        ahead, and for every stream's collectives), the host clock on the CPU."""
        if device.type != "cuda":
            return cls()
        clock = CudaClock(device)
        return cls(clock.synchronize, clock)

    @contextmanager
    def __call__(self, section: str) -> Iterator[None]:
        if self.depth == 0:
            with self._outermost(section):
                yield
            return
        self.depth += 1
        try:
            if self.clock is None:
                start = time.perf_counter()
                try:
                    yield
                finally:
                    self.totals[section] += time.perf_counter() - start
            else:
                start = self.clock.mark()
                try:
                    yield
                finally:
                    self.pending.append((section, start, self.clock.mark()))
        finally:
            self.depth -= 1

    @contextmanager
    def _outermost(self, section: str) -> Iterator[None]:
        self.synchronize()
        start = time.perf_counter()
        self.depth = 1
        try:
            yield
        finally:
            self.depth = 0
            self.synchronize()
            self.totals[section] += time.perf_counter() - start
            self._read_marks()

    def _read_marks(self) -> None:
        for section, start, end in self.pending:
            self.totals[section] += self.clock.seconds(start, end)
        self.pending.clear()

    def add(self, sections: dict[str, float]) -> None:
        """Add seconds measured elsewhere (another thread's Timer) to these sections."""
        for name, seconds in sections.items():
            self.totals[name] += seconds

    def pop(self) -> dict[str, float]:
        """The totals since the last pop."""
        if self.pending:
            self._read_marks()
        totals, self.totals = dict(self.totals), defaultdict(float)
        return totals


def busy(role: str) -> str:
    """The Timer section of ``role``'s own compute on this rank (generate, its scoring pass, its update)."""
    return f"busy/{role}"


def scoring(role: str) -> str:
    """The Timer section of ``role``'s scoring pass alone (also counted in ``busy(role)``)."""
    return f"score/{role}"
