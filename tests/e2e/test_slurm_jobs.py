"""End to end on the project's local Slurm cluster (slurm/local_cluster.sh): real
heterogeneous jobs running the distributed PPO loop."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

import pytest

from rlhf_launch.frontend.spec import load_spec
from rlhf_launch.runtime.metrics import read_metrics
from rlhf_launch.runtime.training_run import run_local
from tests.conftest import ROOT

pytestmark = [pytest.mark.slow, pytest.mark.slurm]
TINY = ROOT / "specs" / "tiny_cpu.yaml"
# a separate generator makes three components: trainer, inference, generator
THREE_GROUPS = ["model_configs.actor.generator_config={shared_with_trainer: false, generator_type: hf}", "train_config.save_interval=2"]
COMPARED = ["reward_mean", "kl", "policy_loss", "value_loss", "entropy"]


@pytest.fixture(scope="session")
def slurm_env():
    up = subprocess.run(["bash", str(ROOT / "slurm" / "local_cluster.sh"), "up"], capture_output=True, text=True, timeout=600)
    if up.returncode != 0:
        message = f"the local Slurm cluster did not come up:\n{up.stdout[-2000:]}\n{up.stderr[-2000:]}"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    line = subprocess.run(["bash", str(ROOT / "slurm" / "local_cluster.sh"), "env"], capture_output=True, text=True, check=True).stdout
    conf = re.search(r"SLURM_CONF=(\S+)", line).group(1)
    return {**os.environ, "SLURM_CONF": conf}


def submit(env, out_dir, sets, name, resume=False, spec=TINY, check=True):
    args = [
        sys.executable, "-m", "rlhf_launch", str(spec), "--partition", "debug", *([] if check else ["--no-check"]),
        "--output-dir", str(out_dir),
        "--set", f"run.name={name}",
    ]
    for s in sets:
        args += ["--set", s]
    if resume:
        args.append("--resume")
    proc = subprocess.run(args, capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return re.search(r"submitted job (\d+)", proc.stdout).group(1)


def job_states(env, job_id) -> list[dict]:
    out = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, env=env).stdout
    return [dict(re.findall(r"(\w+)=(\S*)", line)) for line in out.splitlines()]


def wait_for_end(env, job_id, timeout=420, nudge=True) -> list[dict]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        states = job_states(env, job_id)
        if states and all(s["JobState"] in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY") for s in states):
            return states
        if nudge and states and states[0]["JobState"] == "PENDING":
            # A requeued hetjob is held cred_expire+1 s, then waits for the backfill scheduler: ask for a start
            # in ~1 s. Not "now": slurmd refuses a relaunch whose credential is from the second of the requeue's
            # revocation ("Job credential revoked", the job ends FAILED). The leader is PENDING only once the
            # requeue is done, so now+1 is always a later second.
            subprocess.run(["scontrol", "update", f"jobid={job_id}", "StartTime=now+1"], capture_output=True, env=env)
        time.sleep(2)
    pytest.fail(f"job {job_id} did not end within {timeout} s: {job_states(env, job_id)}")


def without_timing(rows):
    return [{k: r[k] for k in COMPARED} | {"step": r["step"]} for r in rows]


def status_of(run_dir, env) -> str:
    """What ``rlhf-launch status RUN_DIR`` prints."""
    return subprocess.run([sys.executable, "-m", "rlhf_launch", "status", str(run_dir)], capture_output=True, text=True, env=env).stdout


def test_three_component_hetjob_trains(tiny_models, slurm_env, tmp_path):
    job = submit(slurm_env, tmp_path, [*THREE_GROUPS, "train_config.max_train_step=3"], "het")
    states = wait_for_end(slurm_env, job)
    assert [s["JobState"] for s in states] == ["COMPLETED"] * 3, states
    assert len({s["NodeList"] for s in states}) == 3, "components on different logical nodes"
    rows = read_metrics(tmp_path / "het")
    assert [r["step"] for r in rows] == [1, 2, 3]
    single = run_local(load_spec(TINY, [*THREE_GROUPS, "train_config.max_train_step=3"]).spec, tmp_path / "single", quiet=True)
    for a, b in zip(rows, single, strict=True):
        for key in COMPARED:
            assert a[key] == pytest.approx(b[key], abs=1e-5)
    status = status_of(tmp_path / "het", slurm_env)
    assert "trainer" in status and "COMPLETED" in status and "training: completed at step 3/3" in status


def test_vllm_generator_group_on_its_own_node(tiny_models, slurm_env, tmp_path, killed_engine_leftovers):
    """specs/tiny_cpu_vllm.yaml as submitted: one vLLM engine over the generator component's two
    ranks, next to what a killed engine of that shape leaves in shared memory. Greedy decoding, so
    that its training equals a run with HF generate."""
    greedy = ["train_config.max_train_step=3", "rollout_config.generate_kwargs.do_sample=false"]
    job = submit(slurm_env, tmp_path, greedy, "vllm", spec=ROOT / "specs" / "tiny_cpu_vllm.yaml")
    states = wait_for_end(slurm_env, job)
    assert [s["JobState"] for s in states] == ["COMPLETED"] * 3, states
    assert states[2]["NumTasks"] == "2"
    hf = "model_configs.actor.generator_config={shared_with_trainer: false, generator_type: hf}"
    single = run_local(load_spec(TINY, [*greedy, hf]).spec, tmp_path / "single", quiet=True)
    for a, b in zip(read_metrics(tmp_path / "vllm"), single, strict=True):
        for key in [*COMPARED, "response_len_mean"]:
            assert a[key] == pytest.approx(b[key], abs=1e-5), (a["step"], key)


def test_signalled_job_checkpoints_requeues_and_finishes_like_an_uninterrupted_one(tiny_models, slurm_env, tmp_path):
    """Asynchronous (max_staleness 1, with truncated importance weights): the checkpoint the notice writes carries the
    rollout the generator component sampled ahead, so the requeued job continues exactly."""
    sets = [*THREE_GROUPS, "train_config.max_train_step=10", "train_config.save_interval=0", "rollout_config.max_staleness=1",
            "train_config.tis_cap=2.0"]
    job = submit(slurm_env, tmp_path, sets, "preempted")
    run_dir = tmp_path / "preempted"
    deadline = time.monotonic() + 300
    while not ((run_dir / "metrics.jsonl").exists() and len(read_metrics(run_dir)) >= 2):
        assert time.monotonic() < deadline, job_states(slurm_env, job)
        time.sleep(1)
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], check=True, env=slurm_env)
    states = wait_for_end(slurm_env, job, timeout=600)
    assert all(s["JobState"] == "COMPLETED" for s in states), states
    assert int(states[0].get("Restarts", "0")) >= 1, "the job requeued itself"
    rows = read_metrics(run_dir)
    assert [r["step"] for r in rows] == list(range(1, 11))
    single = run_local(load_spec(TINY, sets).spec, tmp_path / "single", quiet=True)
    for a, b in zip(rows, single, strict=True):
        for key in [*COMPARED, "gen_logprob_gap", "tis_weight_mean"]:
            assert a[key] == pytest.approx(b[key], abs=1e-5), (a["step"], key)


def test_a_crashing_role_fails_the_job_and_status_names_it(tiny_models, slurm_env, tmp_path):
    job = submit(
        slurm_env,
        tmp_path,
        [*THREE_GROUPS, "train_config.max_train_step=3", "model_configs.reward.model_path=/nonexistent/reward"],
        "crash",
        check=False,  # the pre-flight would refuse the missing model before submitting: the crash must happen in the job
    )
    states = wait_for_end(slurm_env, job, timeout=300)
    assert states[0]["JobState"] in ("FAILED", "CANCELLED"), states
    status = status_of(tmp_path / "crash", slurm_env)
    assert "reward rank 0" in status and "failed" in status, status


def test_resume_of_a_completed_run_continues_to_more_steps(tiny_models, slurm_env, tmp_path):
    job = submit(slurm_env, tmp_path, [*THREE_GROUPS, "train_config.max_train_step=2"], "more")
    wait_for_end(slurm_env, job)
    job2 = submit(slurm_env, tmp_path, [*THREE_GROUPS, "train_config.max_train_step=4"], "more", resume=True)
    states = wait_for_end(slurm_env, job2)
    assert all(s["JobState"] == "COMPLETED" for s in states), states
    assert [r["step"] for r in read_metrics(tmp_path / "more")] == [1, 2, 3, 4]
    assert json.loads((tmp_path / "more" / "status.json").read_text())["state"] == "completed"


def test_cancel_stops_a_running_job(tiny_models, slurm_env, tmp_path):
    job = submit(slurm_env, tmp_path, ["train_config.max_train_step=500"], "cancelled")
    run_dir = tmp_path / "cancelled"
    deadline = time.monotonic() + 300
    while not (run_dir / "metrics.jsonl").exists() or not read_metrics(run_dir):
        assert time.monotonic() < deadline, job_states(slurm_env, job)
        time.sleep(1)
    out = subprocess.run([sys.executable, "-m", "rlhf_launch", "cancel", str(run_dir)], capture_output=True, text=True, env=slurm_env)
    assert out.returncode == 0 and f"cancelled job {job}" in out.stdout, out.stderr
    states = wait_for_end(slurm_env, job, timeout=120, nudge=False)
    assert all(s["JobState"] == "CANCELLED" for s in states), states


def test_an_uneven_trainer_component_trains_like_one_process(tiny_models, slurm_env, tmp_path):
    """A trainer component of 5 ranks (actor 3, critic 2) on nodes of 2 GPUs: 2 + 2 + 1 over three
    nodes, the inference component on the fourth. The actor's shares are uneven too (32 prompts over
    3 ranks: 11, 11, 10; minibatches of 16: 6, 5, 5); one-prompt generate calls make sampling
    independent of the sharding."""
    sets = [
        "train_config.max_train_step=2",
        "train_config.actor_micro_bs=1",
        "rollout_config.actor_micro_bs=1",
        "model_configs.actor.trainer_config.parallel.data.size=3",
        "model_configs.critic.trainer_config.parallel.data.size=2",
    ]
    job = submit(slurm_env, tmp_path, sets, "uneven")
    states = wait_for_end(slurm_env, job)
    assert [s["JobState"] for s in states] == ["COMPLETED"] * 2, states
    assert states[0]["NumNodes"] == "3", states
    # The allocation counts --ntasks-per-node on every node; the step ran the plan's 5 tasks, one log each.
    assert len(list((tmp_path / "uneven" / "logs").glob(f"{job}-trainer-*.log"))) == 5
    rows = read_metrics(tmp_path / "uneven")
    single = run_local(load_spec(TINY, sets).spec, tmp_path / "single", quiet=True)
    assert [r["step"] for r in rows] == [1, 2]
    for a, b in zip(rows, single, strict=True):
        for key in COMPARED:
            assert a[key] == pytest.approx(b[key], abs=1e-5), (a["step"], key)
