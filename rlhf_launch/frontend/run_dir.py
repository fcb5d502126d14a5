"""The run folder: where a spec's run lives, whether a new run may start there, and its lock.

One rule each, shared by the launcher, the launch backends and the pre-flight (``--check``)."""

from __future__ import annotations

import os
from pathlib import Path


def run_dir_of(spec) -> str:
    """The spec's run folder, absolute: run.output_dir/run.name."""
    return os.path.abspath(os.path.join(spec.run.output_dir, spec.run.name))


def previous_run(run_dir: Path, resume: str | None) -> str | None:
    """Why a new run must not start in ``run_dir``: it holds a previous run (checkpoints or metrics) and this
    is no --resume; else None. ``prepare_run_dir`` and the pre-flight (``--check``) apply this one rule."""
    if resume is None and ((run_dir / "checkpoints").exists() or (run_dir / "metrics.jsonl").exists()):
        return (
            f"{run_dir} already holds a run; continue it with --resume, or start another with "
            "--set run.name=NEW or --output-dir DIR"
        )
    return None


def prepare_run_dir(run_dir: Path, spec, resume: str | None) -> str | None:
    """Create the run folder and write the resolved spec; None, or why the run must not start."""
    problem = previous_run(run_dir, resume)
    if problem:
        return problem
    from rlhf_launch.core import yaml_io

    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "spec.yaml").write_text(yaml_io.dump(spec.to_dict()))
    return None


def run_dir_in_use(run_dir: Path) -> str | None:
    """Why the run folder cannot take another run now (a live run holds its lock), or None.

    Only checks, before the slower pre-flight: ``lock_run_dir`` takes the lock before anything is
    written (rlhf_launch/runtime/run_lock.py)."""
    from rlhf_launch.runtime.run_lock import RunLocked, holder

    found = holder(run_dir)
    return None if found is None else in_use_message(RunLocked(run_dir, found))


def in_use_message(exc) -> str:
    """The launcher's line for a run folder another run holds (a RunLocked)."""
    return f"{exc}; wait for it to end or stop it, or start another run with --set run.name=NEW or --output-dir DIR"


def lock_run_dir(run_dir: Path):
    """Create the run folder and lock it for this launcher (a RunLock; RunLocked when another run
    holds it), before spec.yaml is written: a second launcher must not overwrite the spec that
    this one's ranks are about to read."""
    from rlhf_launch.runtime.run_lock import RunLock

    run_dir.mkdir(parents=True, exist_ok=True)
    return RunLock.acquire(run_dir, take_handover=False)
