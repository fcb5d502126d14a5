"""Sampling the next step's rollout while this step trains (rollout_config.max_staleness 1).

Step k's rollout is taken at the start of step k; right after, the generator ranks start sampling
step k+1's with the weights they hold, those after step k-1, and the trainers score and train on
step k's meanwhile. The generator finishes (``join``) before it takes the weights of step k, so
every rollout is sampled with exactly the weights the schedule names, however long each side takes:
a run's numbers do not depend on timing, and one process (which samples ahead at once, in line)
computes what many processes compute in parallel.

The background sampling runs in a thread of the generator rank. The thread owns the generator
model, and the main thread does only collectives and CPU bookkeeping meanwhile, so the two never
touch the same model or the global random state (Hugging Face sampling seeds it per call).

A checkpoint after step k holds step k+1's rollout (``AHEAD_FILE``), already sampled with the
weights after step k-1, which the checkpoint no longer has: a resumed run continues exactly.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import torch

from rlhf_launch.runtime.rollout import Batch
from rlhf_launch.runtime.timing import Timer

Sample = Callable[[int, Timer], "Batch | None"]  # (step, timer) -> this rank's shard, None off the generator leaders
Gather = Callable[["Batch | None"], Batch]  # every shard -> the whole rollout on every rank (a collective)


class _Background:
    """One call on a daemon thread, with its result or exception at ``result()``.

    A daemon thread rather than an executor: a rank that fails while its generator samples must
    still exit (an executor's worker is joined when the interpreter exits)."""

    def __init__(self, fn: Callable[[], object]):
        self.value: object = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(fn,), name="rlhf-sample-ahead", daemon=True)
        self.thread.start()

    def _run(self, fn: Callable[[], object]) -> None:
        try:
            self.value = fn()
        except BaseException as exc:  # re-raised in the main thread by result()
            self.error = exc

    def result(self) -> object:
        """Wait for the call; its return value, or its exception raised here."""
        self.thread.join()
        if self.error is not None:
            raise self.error
        return self.value


class RolloutAhead:
    """The rollout of the next step, sampled ahead.

    ``sample`` and ``gather`` are the loop's (``RolloutSampler`` in rlhf_launch/runtime/rollout_sources.py, whose
    ``SampledAhead`` takes each step's rollout from here): every rank calls ``take``, ``join``, ``for_checkpoint``
    at the same points, because ``gather`` is a collective; only the ranks given ``background`` sample in a
    thread (the generator ranks of a job in several processes)."""

    def __init__(self, sample: Sample, gather: Gather, background: bool, device: torch.device):
        self.sample, self.gather, self.background, self.device = sample, gather, background, device
        self.due: int | None = None  # the step whose rollout is being (or was) sampled ahead
        self.running: _Background | None = None
        self.local: Batch | None = None  # this rank's finished shard of step ``due``'s rollout
        self.whole: Batch | None = None  # step ``due``'s whole rollout, once gathered (for a checkpoint, or from one)

    def take(self, step: int, timer: Timer) -> Batch:
        """Step ``step``'s whole rollout on every rank: the one sampled ahead, or (at the start of a run) one
        sampled now. Then step + 1's sampling starts: in the background on a generator rank of several processes,
        at once in one process. Also after a run's last step: its final checkpoint then holds the next rollout,
        and a run continued from it to more steps equals one that ran them all."""
        if self.whole is not None and self.due == step:
            rollout = self.whole
        elif self.due == step:
            self.join(timer)
            rollout = self.gather(self.local)
        else:
            rollout = self.gather(self.sample(step, timer))
        self.due, self.local, self.whole = step + 1, None, None
        if self.background:
            self.running = _Background(lambda: self._sample_in_thread(step + 1))
        else:
            self.local = self.sample(step + 1, timer)
        return rollout

    def _sample_in_thread(self, step: int) -> tuple[Batch | None, dict[str, float]]:
        if self.device.type == "cuda":
            # The current device is per thread; and a whole-device synchronize would also wait for the main
            # thread's collectives, so this thread's sections synchronize its own stream only.
            torch.cuda.set_device(self.device)
            timer = Timer(torch.cuda.current_stream(self.device).synchronize)
        else:
            timer = Timer()
        local = self.sample(step, timer)
        return local, timer.pop()

    def join(self, timer: Timer) -> None:
        """Wait until the background sampling (if any) is done; its busy seconds go to ``timer``. The generator
        ranks call it before they take new weights: the rollout ahead is sampled with the old ones."""
        if self.running is not None:
            running, self.running = self.running, None
            self.local, sections = running.result()
            timer.add(sections)

    def for_checkpoint(self, step: int, timer: Timer) -> Batch | None:
        """After step ``step``: the next step's whole rollout on every rank (gathered now; ``take`` reuses it),
        or None when none is being sampled ahead. A collective."""
        if self.due != step + 1:
            return None
        if self.whole is None:
            self.join(timer)
            self.whole, self.local = self.gather(self.local), None
        return self.whole

    def restore(self, step: int, rollout: Batch) -> None:
        """Step ``step``'s rollout as a checkpoint saved it (``for_checkpoint``)."""
        self.due, self.whole = step, {key: value.to(self.device) for key, value in rollout.items()}
