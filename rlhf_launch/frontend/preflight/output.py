"""The run folder: it can be created here, holds no previous run unless resuming (the launcher's own rule,
``rlhf_launch.frontend.run_dir.previous_run``), and on Slurm it is not under a node-local /tmp."""

from __future__ import annotations

import os

from rlhf_launch.core.problems import error, warning
from rlhf_launch.frontend.preflight.findings import Preflight

NODE_LOCAL = ("/tmp", "/var/tmp", "/dev/shm")


def check_output(pf: Preflight) -> None:
    """The run folder can be created here, holds no previous run unless resuming, and a Slurm job's is not
    on a node-local path."""
    from rlhf_launch.frontend.run_dir import previous_run

    key = "run.output_dir"
    pf.at(key, pf.run_dir)
    taken = previous_run(pf.run_dir, pf.resume)  # the rule the launcher applies before it writes the folder
    if taken:
        pf.problems.append(error(key, taken))
    existing = pf.run_dir
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        pf.problems.append(error(key, f"{existing} is a file; expected a folder to hold the run folder {pf.run_dir}"))
    elif not os.access(existing, os.W_OK | os.X_OK):
        pf.problems.append(error(key, f"{existing} is not writable by this user; expected a folder where {pf.run_dir} can be written"))
    resolved = str(pf.run_dir.resolve())
    if not pf.local and any(resolved == d or resolved.startswith(d + "/") for d in NODE_LOCAL):
        pf.problems.append(warning(
            key, f"the run folder {resolved} is under a node-local folder: each Slurm node would see its own; "
            "expected a shared file system (e.g. --output-dir $HOME/runs)",
        ))
