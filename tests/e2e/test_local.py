"""``rlhf-launch SPEC --local``: one process when the plan allows it, one per rank otherwise or with
--processes; ranks that outlive their launcher stop; a resumed run's first line says from where."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rlhf_launch.frontend.backends.local import gpu_shortage, local_gpus, one_process_blocker, one_process_threads, rank_environments
from rlhf_launch.frontend.cli import main
from rlhf_launch.frontend.spec import load_spec
from rlhf_launch.runtime.run_lock import holder
from rlhf_launch.runtime.worker import LAUNCHER_FD_ENV, LAUNCHER_PID_ENV
from tests.conftest import ROOT

TINY = ROOT / "specs" / "tiny_cpu.yaml"
NO_GPU = lambda: False  # noqa: E731


def blocker(*sets: str, cuda=NO_GPU) -> str | None:
    loaded = load_spec(TINY, sets)
    return one_process_blocker(loaded.spec, loaded.plan, cuda)


def test_one_process_only_when_every_role_fits_on_one_rank_without_deepspeed_or_vllm():
    assert blocker() is None
    assert blocker("model_configs.actor.generator_config={shared_with_trainer: false, generator_type: hf}") is None
    assert blocker("slurm.gpus_per_node=4", "model_configs.critic.trainer_config.parallel.data.size=2") == "critic runs on several ranks"
    assert blocker(
        "model_configs.critic.trainer_config.parallel.data.mode=deepspeed",
        "model_configs.critic.trainer_config.deepspeed_config={zero_optimization: {stage: 2}}",
    ) == "critic uses DeepSpeed"
    assert blocker("model_configs.actor.generator_config={shared_with_trainer: false, generator_type: vllm}") == "the generator is vLLM"
    # On a machine with GPUs each rank keeps a GPU of its own, as before
    assert blocker("run.device=auto", cuda=lambda: True) == "each rank gets a GPU of its own"
    assert blocker("run.device=auto") is None


def test_on_one_machines_gpus_ranks_are_numbered_over_the_whole_machine():
    plan = load_spec(TINY).plan  # 4 ranks in 2 components
    per_component = [env["SLURM_LOCALID"] for env in rank_environments(plan, 1, 1)]
    assert per_component == ["0", "1", "0", "1"]  # as on Slurm nodes: two ranks per GPU here
    assert [env["SLURM_LOCALID"] for env in rank_environments(plan, 1, 1, one_machine=True)] == ["0", "1", "2", "3"]


def test_more_ranks_than_local_gpus_is_refused():
    spec, plan = load_spec(TINY, ["run.device=auto"]).spec, load_spec(TINY).plan
    assert local_gpus(spec, device_count=lambda: 2) == 2
    assert local_gpus(load_spec(TINY).spec, device_count=lambda: 2) == 0  # run.device: cpu
    assert "4 ranks, one GPU each, but this machine has 2 GPU(s)" in gpu_shortage(plan, 2)
    assert gpu_shortage(plan, 4) is None and gpu_shortage(plan, 0) is None


def test_one_process_threads_follow_omp_num_threads_or_one_ranks_share():
    spec = load_spec(TINY).spec  # slurm.cpus_per_gpu: 1
    assert one_process_threads(spec, env={}) == 1
    assert one_process_threads(spec, env={"OMP_NUM_THREADS": "3"}) == 3
    spec.slurm.cpus_per_gpu = 10_000
    assert one_process_threads(spec, env={}) == os.cpu_count()


def test_processes_needs_local(capsys):
    assert main([str(TINY), "--processes", "--dry-run"]) == 2
    assert "--processes goes with --local" in capsys.readouterr().err


def test_a_rank_stops_when_the_pipe_to_its_launcher_closes():
    """The worker's guard on its own (no torch): EOF on the launcher pipe ends the process."""
    code = ("import sys, time\nfrom rlhf_launch.runtime.worker import LauncherGuard\n"
            "LauncherGuard.from_env()\nprint('up', flush=True)\ntime.sleep(120)\n")
    read_end, write_end = os.pipe()
    env = {**os.environ, LAUNCHER_FD_ENV: str(read_end), LAUNCHER_PID_ENV: "12345", "RLHF_RANK_OFFSET": "2", "SLURM_PROCID": "1"}
    child = subprocess.Popen(
        [sys.executable, "-c", code],
        env=env,
        pass_fds=(read_end,),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    os.close(read_end)
    try:
        assert child.stdout.readline().strip() == "up"
        os.close(write_end)
        assert child.wait(timeout=10) == 3
        assert child.stderr.read().strip() == "rlhf: global rank 3 stopping: the launcher (pid 12345) is gone"
    finally:
        if child.poll() is None:
            child.kill()


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
        except (OSError, IndexError, ValueError):
            continue
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")  # a zombie has exited; only its parent's reaping is left


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds the ranks through /proc")
def test_ranks_exit_when_the_launcher_is_killed(tiny_models, tmp_path):
    args = [
        sys.executable, "-m", "rlhf_launch", str(TINY), "--local", "--processes",
        "--output-dir", str(tmp_path),
        "--set", "train_config.max_train_step=1000",
    ]
    launcher = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    run_dir = tmp_path / "tiny_cpu"
    ranks: list[int] = []
    try:
        deadline = time.monotonic() + 240
        while not (run_dir / "status.json").exists():  # rank 0 writes it once every rank met and loaded its models
            assert launcher.poll() is None, launcher.stderr.read()[-3000:]
            assert time.monotonic() < deadline, "the ranks never started training"
            time.sleep(0.3)
        ranks = _children(launcher.pid)
        assert len(ranks) == 4, ranks
        assert holder(run_dir).pid in ranks  # global rank 0 took the launcher's lock of the folder over
        launcher.send_signal(signal.SIGKILL)
        launcher.wait()
        killed_at = time.monotonic()
        while any(_alive(pid) for pid in ranks) and time.monotonic() - killed_at < 10:
            time.sleep(0.1)
        assert not [pid for pid in ranks if _alive(pid)], "ranks outlived their launcher by 10 s"
        err = launcher.stderr.read()  # rank 0 writes to the launcher's terminal, the others to their logs
        logs = err + "".join(p.read_text() for p in (run_dir / "logs").glob("local-rank*.log"))
        assert logs.count(f"stopping: the launcher (pid {launcher.pid}) is gone") == 4, logs[-3000:]
        assert "critic rank 0 (global rank 1) stopping: the launcher" in logs
        assert holder(run_dir) is None  # gone with the ranks
    finally:
        for pid in ranks:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        if launcher.poll() is None:
            launcher.kill()


def test_a_resumed_run_says_first_which_checkpoint_and_step_it_continues_from(tiny_models, tmp_path):
    base = [
        sys.executable, "-m", "rlhf_launch", str(TINY), "--local",
        "--output-dir", str(tmp_path),
        "--set", "train_config.save_interval=1",
    ]
    first = subprocess.run([*base, "--set", "train_config.max_train_step=2"], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert first.returncode == 0, first.stderr[-3000:]
    run_dir = tmp_path / "tiny_cpu"
    assert first.stderr.splitlines()[0] == f"rlhf-launch: training tiny_cpu here in one process (1 CPU thread); run folder {run_dir}"
    resumed = subprocess.run(
        [*base, "--set", "train_config.max_train_step=3", "--resume"],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    checkpoint = run_dir / "checkpoints" / "step-00000002"
    assert resumed.stderr.splitlines()[0] == (
        f"rlhf-launch: resuming tiny_cpu from {checkpoint} (step 2 of 3) here in one process (1 CPU thread); run folder {run_dir}"
    )


@pytest.mark.slow
def test_distributed_norm_rewards_and_rollouts_file_match_one_process(tiny_models, tmp_path):
    """Ranks in their own processes (the generator sharded over two actor ranks) normalise the
    rewards as one process does, and global rank 0 alone writes each sample once."""
    import json

    from rlhf_launch.core import yaml_io
    from rlhf_launch.runtime.metrics import read_metrics
    from rlhf_launch.runtime.rollout_log import rollouts_path
    from rlhf_launch.runtime.training_run import run_local
    from tests.factory import layout, make_spec, spec_dict

    # Sampling is seeded per generate call: 16 prompts per call on each of the two actor ranks
    # cover the same prompts as one process's two calls.
    overrides = {**layout(actor=2), "rollout_config.actor_micro_bs": 16, "repeater_config.norm_rewards": True,
                 "rollout_config.write_to_file": True, "train_config.max_train_step": 2, "train_config.save_interval": 0}
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(yaml_io.dump(spec_dict(overrides, run_dir=tmp_path / "ranks")))
    proc = subprocess.run([sys.executable, "-m", "rlhf_launch", str(spec_file), "--local", "--processes"],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_local(make_spec(overrides), tmp_path / "single", quiet=True)
    for a, b in zip(read_metrics(tmp_path / "ranks"), read_metrics(tmp_path / "single"), strict=True):
        for key in ("reward_mean", "kl", "policy_loss", "value_loss", "advantage_mean", "return_mean"):
            assert a[key] == pytest.approx(b[key], abs=1e-5), (a["step"], key)
    ranks, single = ([json.loads(line) for line in rollouts_path(tmp_path / run).read_text().splitlines()] for run in ("ranks", "single"))
    assert len(ranks) == len(single) == 2 * 32
    for a, b in zip(ranks, single, strict=True):
        assert (a["step"], a["row"], a["prompt"], a["response"]) == (b["step"], b["row"], b["prompt"], b["response"])
        assert (a["score"], a["reward"]) == (pytest.approx(b["score"], abs=1e-5), pytest.approx(b["reward"], abs=1e-5))


def test_each_rank_gets_the_envs_of_the_roles_on_its_component():
    from tests.factory import load

    plan = load({"model_configs.actor.trainer_config.envs": {"ACTOR_FLAG": "a b", "OMP_NUM_THREADS": "3"},
                 "model_configs.reward.trainer_config.envs": {"REWARD_FLAG": "r"}}).plan
    envs = rank_environments(plan, 1, 1)
    roles = [plan.role_of_rank(rank)[0] for rank in range(plan.world_size)]
    assert roles == ["actor", "critic", "reference", "reward"]
    # actor and critic share the trainer component's environment, as on its srun line; the role's value wins over ours
    assert [e.get("ACTOR_FLAG") for e in envs] == ["a b", "a b", None, None]
    assert [e["OMP_NUM_THREADS"] for e in envs] == ["3", "3", "1", "1"]
    assert [e.get("REWARD_FLAG") for e in envs] == [None, None, "r", "r"]


def test_one_process_takes_every_roles_envs_unless_two_disagree(tmp_path):
    from rlhf_launch.frontend.backends.local import _environment, one_process_envs
    from tests.factory import load

    agree = load({"model_configs.actor.trainer_config.envs": {"A": "1"}, "model_configs.reference.trainer_config.envs": {"B": "2"}})
    assert one_process_blocker(agree.spec, agree.plan, NO_GPU) is None
    assert one_process_envs(agree.spec) == {"A": "1", "B": "2"}
    clash = load({"model_configs.actor.trainer_config.envs": {"A": "1"}, "model_configs.reward.trainer_config.envs": {"A": "2"}})
    assert one_process_blocker(clash.spec, clash.plan, NO_GPU) == (
        "the trainer and inference roles set A to different values ('1', '2') in trainer_config.envs"
    )
    os.environ["RLHF_TEST_KEPT"] = "before"
    with _environment({"RLHF_TEST_KEPT": "during", "RLHF_TEST_NEW": "x"}):
        assert os.environ["RLHF_TEST_KEPT"] == "during" and os.environ["RLHF_TEST_NEW"] == "x"
    assert os.environ.pop("RLHF_TEST_KEPT") == "before" and "RLHF_TEST_NEW" not in os.environ
