"""A training run from its start to its end, around the PPO loop (rlhf_launch/runtime/loop.py): the run folder's
lock, the provenance record, the resume point, the steps with their checkpoints, a stop for requeue when the
job is about to be preempted, status.json, and the exported models.

``run`` runs on every rank of a job (rlhf_launch/runtime/worker.py) and, for a small job, in the launcher's own
process (``rlhf-launch --local``); ``run_local`` puts every role in this one process.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from rlhf_launch.core import yaml_io
from rlhf_launch.core.config import JobSpec
from rlhf_launch.runtime import provenance
from rlhf_launch.runtime.checkpoint import checkpoint_step, request_requeue, resolve_resume, supersede_later
from rlhf_launch.runtime.cluster import SingleProcess
from rlhf_launch.runtime.loop import PPOLoop
from rlhf_launch.runtime.preemption import PreemptionNotice
from rlhf_launch.runtime.protocols import Cluster
from rlhf_launch.runtime.run_lock import RunLock
from rlhf_launch.runtime.run_reporter import RunReporter


def run(
    spec: JobSpec, run_dir: Path, resume: str | None = None, quiet: bool = False,
    cluster: Cluster | None = None, device: torch.device | None = None, notice: PreemptionNotice | None = None,
) -> list[dict]:
    """Train to train_config.max_train_step; returns (on global rank 0) the metrics of the steps run here.

    With a PreemptionNotice that fires, the run stops after the current step with a checkpoint
    and a requeue request (rlhf_launch/runtime/preemption.py).

    Global rank 0 holds the run folder's lock for the whole run (rlhf_launch/runtime/run_lock.py: a second run in
    the folder raises RunLocked) and appends this start to RUN_DIR/provenance.json before the first step."""
    cluster = cluster or SingleProcess()
    leader = cluster.is_leader
    lock = _lock(run_dir) if leader else None
    try:
        checkpoint = _resume_point(run_dir, resume, cluster)
        if leader:
            start_step = checkpoint_step(checkpoint) if checkpoint is not None else 0
            record = provenance.collect(
                run_dir / "spec.yaml",
                yaml_io.dump(spec.to_dict()),
                start_step,
                str(checkpoint) if checkpoint else None,
            )
            provenance.append_record(run_dir, record)
        loop = PPOLoop(spec, run_dir, cluster, device)
        if checkpoint is not None:
            loop.load(checkpoint)
            if leader:
                for path in supersede_later(run_dir, loop.step):
                    print(f"rlhf: resuming from step {loop.step}; set aside the later checkpoint {path.name}", file=sys.stderr)
        total = spec.train_config.max_train_step
        report = RunReporter(run_dir if leader else None, total, loop.step, quiet,
                             tokenizer=loop.tokenizer if spec.rollout_config.write_to_file else None)
        loop.rollout_log = report.rollouts
        clock = SaveClock(spec.train_config.save_interval_minutes, cluster)
        try:
            report.status("running", loop.step)
            while loop.step < total:
                report.step_done(loop.step + 1, loop.ppo_step())
                saved = clock.due() or _due_for_checkpoint(spec, loop.step)  # the clock first: its collective runs every step
                if saved:
                    loop.save()
                    clock.saved()
                if notice is not None and loop.step < total and cluster.any(notice.requested):
                    _stop_for_requeue(loop, saved, report)
                    return report.history
                report.status("running", loop.step)
            loop.export()
        except BaseException as exc:
            report.status("failed", loop.step, error=f"{type(exc).__name__}: {exc}")
            raise
        finally:
            report.close()
        report.status("completed", loop.step)
        return report.history
    finally:
        if lock is not None:
            lock.release()


def run_local(spec: JobSpec, run_dir: Path, resume: str | None = None, quiet: bool = False) -> list[dict]:
    """Every role in this one process."""
    return run(spec, run_dir, resume, quiet)


def _lock(run_dir: Path) -> RunLock:
    """The run folder's lock, taken by global rank 0 (the folder is made if need be); what it took over or could
    not do is said on stderr."""
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = RunLock.acquire(run_dir)
    if lock.taken_over is not None:
        print(
            f"rlhf: took over the lock of {run_dir} from the run of {lock.taken_over.describe()}, which is gone",
            file=sys.stderr,
            flush=True,
        )
    if lock.unsupported:
        print(f"rlhf: cannot lock {run_dir} ({lock.unsupported}); nothing keeps a second run out of it", file=sys.stderr, flush=True)
    return lock


class SaveClock:
    """train_config.save_interval_minutes: whether that many minutes have passed since this start or the last
    checkpoint. Ranks' clocks and step ends differ, so global rank 0's clock decides and every rank learns its
    answer through one collective per step: all ranks checkpoint at the same step, and since a checkpoint changes
    no numbers, a run that checkpoints by time still equals one that does not (and a resumed run the straight one)."""

    def __init__(self, minutes: float | None, cluster: Cluster, now: Callable[[], float] = time.monotonic):
        self.seconds = minutes * 60 if minutes else None
        self.cluster, self.now = cluster, now
        self.since = now()

    def due(self) -> bool:
        """Rank 0's answer on every rank; False without a time interval (no collective then)."""
        if self.seconds is None:
            return False
        return self.cluster.any(self.cluster.is_leader and self.now() - self.since >= self.seconds)

    def saved(self) -> None:
        """A checkpoint was written: the interval starts again."""
        self.since = self.now()


def _due_for_checkpoint(spec: JobSpec, step: int) -> bool:
    interval = spec.train_config.save_interval
    return bool(interval and step % interval == 0) or step == spec.train_config.max_train_step


def _resume_point(run_dir: Path, resume: str | None, cluster: Cluster) -> Path | None:
    """The checkpoint to continue from, chosen by global rank 0 and told to every rank."""
    checkpoint = cluster.share(resolve_resume(run_dir, resume) if cluster.is_leader else None, "actor")
    if checkpoint is not None and cluster.is_leader:
        print(f"rlhf: resuming from {checkpoint} (step {checkpoint_step(checkpoint)})", file=sys.stderr, flush=True)
    return Path(checkpoint) if checkpoint is not None else None


def _stop_for_requeue(loop: PPOLoop, saved: bool, report: RunReporter) -> None:
    """A preemption notice reached some rank: every rank checkpoints this step, and rank 0
    asks the job to requeue itself (the sbatch script acts on that)."""
    if not saved:
        loop.save()
    if loop.cluster.is_leader:
        request_requeue(loop.run_dir)
    report.status("preempted", loop.step)
