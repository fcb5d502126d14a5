"""What every launch backend does as it starts a run: lock the run folder (or say which run holds it),
write spec.yaml under that lock, and say in its first line what is about to happen."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

from rlhf_launch.frontend.run_dir import in_use_message, lock_run_dir, prepare_run_dir

# A spec, flag, input or run folder the run must not start with: the user can fix it and launch again.
EXIT_BAD_SPEC = 2


def lock_or_say_why(run_dir: Path):
    """The run folder's lock (``lock_run_dir``), or None after saying on stderr which run holds it."""
    from rlhf_launch.runtime.run_lock import RunLocked

    try:
        return lock_run_dir(run_dir)
    except RunLocked as exc:
        print(f"rlhf-launch: {in_use_message(exc)}", file=sys.stderr)
        return None


def in_prepared_run_dir(run_dir: Path, spec, resume: str | None, then: Callable[..., int]) -> int:
    """Lock the run folder, write spec.yaml into it, then return ``then(lock)`` with the lock still held;
    EXIT_BAD_SPEC after one line on stderr when another run holds the folder or a new run must not start there."""
    lock = lock_or_say_why(run_dir)
    if lock is None:
        return EXIT_BAD_SPEC
    with lock:
        problem = prepare_run_dir(run_dir, spec, resume)
        if problem:
            print(f"rlhf-launch: {problem}", file=sys.stderr)
            return EXIT_BAD_SPEC
        return then(lock)


def start_line(loaded, run_dir: Path, resume: str | None, checkpoint: Path | None) -> str:
    """What the launcher is about to do, for its first line: a fresh start, or the checkpoint and
    step a resumed run continues from."""
    name, total = loaded.spec.run.name, loaded.spec.train_config.max_train_step
    if checkpoint is not None:
        from rlhf_launch.runtime.checkpoint import checkpoint_step

        return f"resuming {name} from {checkpoint} (step {checkpoint_step(checkpoint)} of {total})"
    if resume is not None:
        return f"training {name} from the start (no complete checkpoint in {run_dir} yet)"
    return f"training {name}"
