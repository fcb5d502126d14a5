"""Section times include work still pending at the section's end (a GPU's queued kernels); only the outermost
section blocks the host for it, and the sections inside it (forward and backward per micro step) are read from
marks on the device's queue, so that timing them does not stop the device from overlapping its work."""

from __future__ import annotations

import time

import pytest
import torch

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


class DeviceQueue(QueuedWork):
    """A device queue with a clock: work launched runs after the work before it; a mark is reached when the work
    queued before it is done (what a CUDA event records), and nothing here blocks the host but ``synchronize``."""

    def __init__(self) -> None:
        super().__init__()
        self.free_at = time.perf_counter()  # when the queued work will be done

    def launch(self, seconds: float) -> None:
        self.free_at = max(self.free_at, time.perf_counter()) + seconds

    def synchronize(self) -> None:
        self.calls += 1
        time.sleep(max(0.0, self.free_at - time.perf_counter()))

    def mark(self) -> float:
        return max(self.free_at, time.perf_counter())

    def seconds(self, start: float, end: float) -> float:
        return end - start


def test_sections_inside_the_step_are_timed_without_blocking_the_host():
    queue = DeviceQueue()
    timer = Timer(queue.synchronize, queue)
    with timer("step"):
        with timer("train"):
            for _ in range(3):  # micro steps: each launch returns at once
                with timer("forward"):
                    queue.launch(0.1)
                with timer("backward"):
                    queue.launch(0.2)
            with timer("optimizer"):
                queue.launch(0.05)
        host_done = time.perf_counter()
    assert queue.calls == 2  # the step's two ends only, never per micro step
    totals = timer.pop()
    assert host_done - (queue.free_at - 0.95) < 0.1  # the host ran ahead of the queue: nothing inside blocked
    assert totals["forward"] == pytest.approx(0.3, abs=0.05)
    assert totals["backward"] == pytest.approx(0.6, abs=0.05)
    assert totals["optimizer"] == pytest.approx(0.05, abs=0.05)
    assert totals["train"] == pytest.approx(0.95, abs=0.05)
    assert totals["step"] >= 0.95


def test_every_outermost_section_still_holds_its_own_queued_work():
    queue = DeviceQueue()
    timer = Timer(queue.synchronize, queue)
    with timer("generate"):
        queue.launch(0.2)
    with timer("weight_sync"):
        with timer("inner"):
            pass
    totals = timer.pop()
    assert totals["generate"] >= 0.2 and totals["weight_sync"] < 0.1 and totals["inner"] < 0.1
    assert queue.calls == 4


def test_a_timer_for_the_cpu_needs_no_device():
    timer = Timer.for_device(torch.device("cpu"))
    with timer("step"), timer("forward"):
        time.sleep(0.01)
    totals = timer.pop()
    assert totals["forward"] == pytest.approx(0.01, abs=0.05) and totals["step"] >= totals["forward"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_on_a_gpu_the_step_waits_for_its_own_stream_only():
    """Another thread's kernels (the rollout sampled ahead) on a stream of their own do not count in this
    thread's step, and the sections inside the step are timed by events."""
    device = torch.device("cuda", torch.cuda.current_device())
    a = torch.randn(4096, 4096, device=device)
    side = torch.cuda.Stream(device)
    torch.cuda.synchronize()
    timer = Timer.for_device(device)
    with torch.cuda.stream(side):
        for _ in range(200):  # a long queue on the other stream
            a @ a
    with timer("step"):
        with timer("forward"):
            b = a[:64] @ a
        with timer("backward"):
            b @ a.T
    totals = timer.pop()
    started = time.perf_counter()
    side.synchronize()
    side_left = time.perf_counter() - started
    assert side_left > 0  # the other stream was still busy after the step was timed
    assert totals["step"] < 0.5 * (totals["step"] + side_left)
    assert 0 < totals["forward"] <= totals["step"] and 0 < totals["backward"] <= totals["step"]
