"""On the project's local Slurm cluster (slurm/local_cluster.sh): a submission whose preemption notice
(slurm.signal_seconds) is shorter than a step and a checkpoint write is warned about, and the job still goes in
with the notice asked for. tests/core/test_budget.py checks the same warning without Slurm."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from rlhf_launch.frontend.spec import load_spec
from tests.conftest import ROOT
from tests.e2e.test_slurm_jobs import TINY, slurm_env  # noqa: F401 - the fixture that brings the cluster up

pytestmark = [pytest.mark.slow, pytest.mark.slurm]
# A file system this slow makes the tiny models' checkpoint take minutes: far longer than a 10 s notice.
SLOW_DISK = ["slurm.checkpoint_write_gb_per_s=1e-6", "slurm.signal_seconds=10"]


def test_a_notice_shorter_than_a_checkpoint_write_is_warned_about_at_submit(tiny_models, slurm_env, tmp_path):  # noqa: F811
    needed = load_spec(TINY, SLOW_DISK[:1]).plan.signal_seconds
    assert needed > 10
    args = [sys.executable, "-m", "rlhf_launch", str(TINY), "--partition", "debug", "--output-dir", str(tmp_path),
            "--set", "run.name=short_notice"]
    for value in SLOW_DISK:
        args += ["--set", value]
    proc = subprocess.run(args, capture_output=True, text=True, env=slurm_env, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    job = re.search(r"submitted job (\d+)", proc.stdout).group(1)
    try:
        warned = [line for line in proc.stderr.splitlines() if "slurm.signal_seconds" in line]
        assert len(warned) == 1 and "found 10" in warned[0] and f"use at least {needed}" in warned[0], proc.stderr
        # the job asks for the notice the spec gives, warned or not
        assert "#SBATCH --signal=B:USR1@10\n" in (tmp_path / "short_notice" / "job.sbatch").read_text()
    finally:
        subprocess.run(["scancel", job], capture_output=True, env=slurm_env)
