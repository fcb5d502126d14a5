"""A real Slurm cluster on localhost (slurm/local_cluster.sh): the things the launcher relies on.

Heterogeneous jobs land one component per node with CUDA_VISIBLE_DEVICES set, the batch shell can be
signalled, and a requeued hetjob runs again. The cluster is left running after the session: `up` is
idempotent, so the next session starts in ~0.1 s; `bash slurm/local_cluster.sh down` stops it.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "slurm" / "local_cluster.sh"
NODES = {"n1", "n2", "n3", "n4"}
FAILED_STATES = {"FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE", "PREEMPTED"}

pytestmark = pytest.mark.slurm


def _no_apt_reason() -> str | None:
    """Why the cluster cannot be installed here, or None if it is installed or installable."""
    if all(shutil.which(c) for c in ("slurmctld", "slurmd", "sbatch", "munged")):
        return None
    if os.geteuid() != 0:
        return "Slurm is not installed and installing it needs root"
    if not shutil.which("apt-get"):
        return "Slurm is not installed and there is no apt-get"
    return None


@pytest.fixture(scope="session")
def slurm_env() -> dict[str, str]:
    """Environment for Slurm clients talking to the local cluster (started here if it is not up)."""
    in_ci = bool(os.environ.get("CI"))
    reason = _no_apt_reason()
    if reason and not in_ci:
        pytest.skip(reason)
    if os.geteuid() != 0 and not in_ci:
        pytest.skip("the local Slurm cluster runs its daemons as root")
    proc = subprocess.run(["bash", str(SCRIPT), "up"], capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        message = f"local Slurm cluster did not come up (rc {proc.returncode}):\n{proc.stdout}\n{proc.stderr[-6000:]}"
        # Without CI, a machine that cannot reach its package mirror may skip; everything else is a failure.
        if not in_ci and "apt-get install failed" in proc.stderr:
            pytest.skip("no apt access to install Slurm: " + proc.stderr.strip().splitlines()[-1])
        pytest.fail(message)
    match = re.search(r"^export SLURM_CONF=(\S+)$", proc.stdout, re.M)
    assert match, proc.stdout
    # Variables of an enclosing Slurm job (if pytest runs inside one) would leak into sbatch/srun.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_"))}
    env["SLURM_CONF"] = match.group(1)
    return env


def _run(env: dict[str, str], *args: str) -> str:
    proc = subprocess.run(list(args), env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, f"{args}: rc {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def _submit(env: dict[str, str], script: Path) -> str:
    return _run(env, "sbatch", "--parsable", str(script)).strip().split(";")[0]


def _job_states(env: dict[str, str], job: str) -> list[str]:
    """States of all components of a (het)job: `scontrol show job -o` prints one line per component."""
    out = _run(env, "scontrol", "show", "job", "-o", job)
    return re.findall(r"\bJobState=(\S+)", out)


def _wait_for(env: dict[str, str], job: str, state: str, timeout: float, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    states: list[str] = []
    while time.monotonic() < deadline:
        states = _job_states(env, job)
        if states and all(s == state for s in states):
            return
        if FAILED_STATES & set(states):
            break
        time.sleep(0.3)
    detail = log.read_text() if log and log.exists() else "(no output)"
    pytest.fail(f"job {job}: states {states}, wanted {state} within {timeout}s\n{detail}\n{_ctld_log_lines(env, job)}")


def _ctld_log_lines(env: dict[str, str], job: str) -> str:
    """slurmctld's lines about a job: a failed launch says why only there (e.g. "Killing non-startable")."""
    config = subprocess.run(["scontrol", "show", "config"], env=env, capture_output=True, text=True, timeout=60).stdout
    match = re.search(r"^SlurmctldLogFile\s*=\s*(\S+)", config, re.M)
    try:
        lines = Path(match.group(1)).read_text(errors="replace").splitlines() if match else []
    except OSError as e:
        return f"(slurmctld log unreadable: {e})"
    ids = re.compile(rf"JobId={job}\b")
    return "slurmctld.log:\n" + "\n".join([line for line in lines if ids.search(line)][-30:])


def _wait_for_text(path: Path, text: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and text in path.read_text():
            return
        time.sleep(0.2)
    pytest.fail(f"{text!r} not in {path} within {timeout}s:\n{path.read_text() if path.exists() else '(missing)'}")


def _hetjob_header(out: Path, groups: int, extra: str = "") -> str:
    one = "#SBATCH --nodes=1 --ntasks-per-node=2 --gpus-per-node=2"
    components = "\n#SBATCH hetjob\n".join([one] * groups)
    return f"#!/bin/bash\n#SBATCH --job-name=rlhf-local-test\n#SBATCH --output={out}\n{extra}{components}\n"


def test_four_idle_nodes_with_two_gpus_each(slurm_env):
    deadline = time.monotonic() + 20  # jobs of an earlier test may still be completing
    while True:
        rows = [line.split() for line in _run(slurm_env, "sinfo", "-h", "-N", "-o", "%N %t %G").splitlines()]
        nodes = {r[0]: (r[1], r[2]) for r in rows}
        if set(nodes) == NODES and all(state == "idle" for state, _ in nodes.values()) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert set(nodes) == NODES, rows
    assert all(state == "idle" for state, _ in nodes.values()), rows
    assert all(gres.startswith("gpu:2") for _, gres in nodes.values()), rows


def test_three_component_hetjob_runs_one_component_per_node(slurm_env, tmp_path):
    out = tmp_path / "het.out"
    script = tmp_path / "het.sbatch"
    script.write_text(
        _hetjob_header(out, 3)
        + "echo HET_SIZE=$SLURM_HET_SIZE\n"
        + "for g in 0 1 2; do v=SLURM_JOB_NODELIST_HET_GROUP_$g; echo GROUP $g ${!v}; done\n"
        # No variable tells a task its het group: pass it on the command line.
        + "for g in 0 1 2; do\n"
        + '  srun --het-group=$g bash -c "echo STEP $g \\$SLURMD_NODENAME \\$SLURM_PROCID \\$CUDA_VISIBLE_DEVICES" &\n'
        + "done\nwait\necho DONE\n"
    )
    job = _submit(slurm_env, script)
    _wait_for(slurm_env, job, "COMPLETED", timeout=60, log=out)
    _wait_for_text(out, "DONE", timeout=5)
    text = out.read_text()
    assert "HET_SIZE=3" in text, text
    groups = dict(re.findall(r"^GROUP (\d) (\S+)$", text, re.M))
    assert set(groups) == {"0", "1", "2"}, text
    assert len(set(groups.values())) == 3 and set(groups.values()) <= NODES, text
    steps = re.findall(r"^STEP (\d) (\S+) (\d) (\S*)$", text, re.M)
    assert len(steps) == 6, text
    for group, node, _rank, devices in steps:
        assert node == groups[group], text
        assert devices == "0,1", text  # 2 GPUs per node, both given to the component


# Two minutes in steps of one second: a trap runs after the current step, not after a long foreground sleep.
WAIT_TWO_MINUTES = "for i in $(seq 120); do sleep 1 & wait $!; done"


@contextlib.contextmanager
def _running(env: dict[str, str], script: Path, out: Path, ready: str):
    """A submitted job, once it runs and its output shows ``ready``; cancelled on the way out."""
    job = _submit(env, script)
    try:
        _wait_for(env, job, "RUNNING", timeout=60, log=out)
        _wait_for_text(out, ready, timeout=15)
        yield job
    finally:
        subprocess.run(["scancel", job], env=env, capture_output=True)


def test_usr1_to_the_batch_shell_reaches_its_trap(slurm_env, tmp_path):
    out = tmp_path / "sig.out"
    script = tmp_path / "sig.sbatch"
    script.write_text(
        _hetjob_header(out, 2)
        + "trap 'echo GOT_USR1; exit 0' USR1\n"
        + "echo READY\n"  # the trap is set before READY is printed
        + f"{WAIT_TWO_MINUTES}\necho NO_SIGNAL\n"
    )
    with _running(slurm_env, script, out, "READY") as job:
        _run(slurm_env, "scancel", "--signal=USR1", "--batch", job)
        _wait_for(slurm_env, job, "COMPLETED", timeout=30, log=out)
        assert "GOT_USR1" in out.read_text()


def test_requeued_hetjob_runs_again(slurm_env, tmp_path):
    out = tmp_path / "requeue.out"
    script = tmp_path / "requeue.sbatch"
    script.write_text(
        _hetjob_header(out, 2, extra="#SBATCH --requeue\n#SBATCH --open-mode=append\n")
        + "echo RUN ${SLURM_RESTART_COUNT:-0}\n"
        + f'if [ "${{SLURM_RESTART_COUNT:-0}}" = 0 ]; then {WAIT_TWO_MINUTES}; fi\n'
        + "echo END ${SLURM_RESTART_COUNT:-0}\n"
    )
    with _running(slurm_env, script, out, "RUN 0") as job:
        _run(slurm_env, "scontrol", "requeue", job)
        # A requeued job is held cred_expire+1 s (11 s here), and a hetjob then may wait ~15 s more for
        # backfill. Resetting StartTime once every component is PENDING restarts it in ~1 s; sent
        # earlier, the leader (requeued last) keeps its hold. Not "now": the hold also keeps the relaunch's
        # credential newer, in whole seconds, than the revocation the requeue sent to the nodes, and slurmd
        # refuses one from the same second ("Job credential revoked": FAILED) if the requeue, this update and
        # a backfill pass share a second. now+1, read after the requeue returned, is always a second later.
        _wait_for(slurm_env, job, "PENDING", timeout=20, log=out)
        _run(slurm_env, "scontrol", "update", f"jobid={job}", "StartTime=now+1")
        _wait_for(slurm_env, job, "COMPLETED", timeout=60, log=out)
        _wait_for_text(out, "END 1", timeout=5)
        assert "END 0" not in out.read_text()


def test_an_uneven_component_is_accepted_and_its_ranks_land_as_planned(slurm_env, tmp_path):
    """A trainer of 5 ranks on 2-GPU nodes (2 + 2 + 1) as the launcher renders it: sbatch --test-only
    accepts it, and the tasks of its srun step land on the nodes the plan says, in blocks."""
    from rlhf_launch.frontend.backends.slurm_script import JobFiles, render_sbatch
    from tests.factory import layout, load

    loaded = load({**layout(actor=3, critic=2), "train_config.actor_micro_bs": 1, "train_config.critic_micro_bs": 1})
    assert loaded.plan.components[0].ranks_per_node == [2, 2, 1]
    script = tmp_path / "uneven.sbatch"
    script.write_text(render_sbatch(loaded.spec, loaded.plan, JobFiles(str(tmp_path), "/bin/true")))
    proc = subprocess.run(["sbatch", "--test-only", "--partition=debug", str(script)], env=slurm_env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "to start at" in proc.stderr, proc.stderr
    # The same component header, with a probe for the worker: each task reports its node and rank.
    out = tmp_path / "probe.out"
    header = render_sbatch(loaded.spec, loaded.plan, JobFiles(str(tmp_path), "/bin/true")).split("set -uo pipefail")[0]
    header = re.sub(r"#SBATCH --output=\S+", f"#SBATCH --output={out}", header)
    probe = tmp_path / "probe.sbatch"
    probe.write_text(header + "srun --het-group=0 --distribution=block bash -c 'echo TASK $SLURM_PROCID $SLURMD_NODENAME'\necho DONE\n")
    job = _submit(slurm_env, probe)
    _wait_for(slurm_env, job, "COMPLETED", timeout=60, log=out)
    _wait_for_text(out, "DONE", timeout=5)
    tasks = dict(re.findall(r"^TASK (\d) (\S+)$", out.read_text(), re.M))
    nodes = [tasks[str(rank)] for rank in range(5)]
    assert nodes[0] == nodes[1] != nodes[2] == nodes[3] != nodes[4] != nodes[0], out.read_text()
