"""A preemption or time-limit notice: Slurm signals the batch script (``--signal=B:USR1@N``),
which forwards SIGUSR1 to every step; the PPO loop checkpoints at the end of the current step,
asks for a requeue and exits cleanly, and the requeued job resumes from that checkpoint."""

from __future__ import annotations

import signal
import sys


class PreemptionNotice:
    """Whether Slurm has asked the job to stop: ``requested`` turns true on ``signum`` (SIGUSR1), and
    the loop then checkpoints after its current step and asks for a requeue."""

    def __init__(self, signum: int = signal.SIGUSR1):
        self.requested = False
        signal.signal(signum, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        if not self.requested:
            print("rlhf: preemption notice received; checkpointing after this step", file=sys.stderr, flush=True)
        self.requested = True
