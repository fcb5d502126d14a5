"""The Slurm backend (``rlhf-launch SPEC``, the default): one heterogeneous job that runs the rendered
sbatch script (``slurm_script``), submitted with sbatch (``slurm_jobs``, which also follows the job:
``rlhf-launch status`` and ``cancel``)."""

from __future__ import annotations

import sys
from pathlib import Path

from rlhf_launch.frontend.backends.start import EXIT_BAD_SPEC, in_prepared_run_dir, start_line


def launch(loaded, run_dir: Path, resume: str | None, processes: bool = False) -> int:
    """Submit one heterogeneous job that runs the rendered script; returns the exit status.
    ``processes`` belongs to the local backend (the flag rules allow it only there)."""
    # The lock is held while spec.yaml is written and the job submitted, not after: the job starts
    # later, and its global rank 0 locks the folder then.
    return in_prepared_run_dir(run_dir, loaded.spec, resume, lambda lock: _submit(loaded, run_dir, resume))


def _submit(loaded, run_dir: Path, resume: str | None) -> int:
    from rlhf_launch.frontend.backends.slurm_jobs import SlurmError, submit
    from rlhf_launch.frontend.backends.slurm_script import JobFiles, render_sbatch

    if resume is not None:
        from rlhf_launch.runtime.checkpoint import CheckpointError, resolve_resume

        try:
            # The job resolves --resume again when it starts: a checkpoint written meanwhile wins.
            print(f"rlhf-launch: {start_line(loaded, run_dir, resume, resolve_resume(run_dir, resume))} on Slurm")
        except CheckpointError as exc:
            print(f"rlhf-launch: {exc}", file=sys.stderr)
            return EXIT_BAD_SPEC
    script = render_sbatch(loaded.spec, loaded.plan, JobFiles(str(run_dir), sys.executable, resume or ""))
    try:
        job_id = submit(script, run_dir)
    except SlurmError as exc:
        print(f"rlhf-launch: {exc}", file=sys.stderr)
        return 1
    plan = loaded.plan
    print(f"submitted job {job_id}: {plan.total_gpus} GPUs on {plan.total_nodes} nodes, {len(plan.components)} components")
    print(f"run folder: {run_dir}")
    print(f"follow:     rlhf-launch status {run_dir}    |    tail -f {run_dir}/logs/slurm-{job_id}.out")
    print(f"cancel:     rlhf-launch cancel {run_dir}")
    return 0
