"""Section times include work still pending at the section's end (a GPU's queued kernels)."""

from __future__ import annotations

import time

import pytest

from rlhf_launch.runtime.timing import Timer


class QueuedWork:
    """A stand-in for a device queue: work 'launched' in a section finishes only at synchronize()."""

    def __init__(self) -> None:
        self.pending = 0.0
        self.calls = 0

    def launch(self, seconds: float) -> None:
        self.pending += seconds

    def synchronize(self) -> None:
        self.calls += 1
        time.sleep(self.pending)
        self.pending = 0.0


def test_queued_work_is_charged_to_the_section_that_launched_it():
    queue = QueuedWork()
    timer = Timer(queue.synchronize)
    with timer("generate"):
        queue.launch(0.2)  # returns at once, like a kernel launch
    with timer("train"):
        pass
    totals = timer.pop()
    assert totals["generate"] >= 0.2
    assert totals["train"] < 0.1
    assert queue.calls == 4


def test_without_synchronize_sections_time_the_host_only():
    timer = Timer()
    with timer("a"):
        time.sleep(0.01)
    assert timer.pop()["a"] == pytest.approx(0.01, abs=0.05)
    assert timer.pop() == {}
