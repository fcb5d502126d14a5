"""The rendered sbatch scripts: golden files, quoting, and the step monitor run for real with
stand-in srun/scontrol commands."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from rlhf_launch.core.problems import SpecError
from rlhf_launch.frontend.backends.slurm_script import JobFiles, RenderError, render_sbatch
from rlhf_launch.frontend.spec import load_spec
from tests.conftest import ROOT
from tests.factory import layout, load_sized, reward_function

GOLDEN = ROOT / "tests" / "golden"
SEED_SPECS = ["internlm2_1_8b", "internlm2_7b", "llama2_7b", "llama2_7b_vllm"]
FILES = JobFiles(run_dir="/scratch/runs/job", python="/opt/env/bin/python")


def rendered(name: str, files: JobFiles = FILES, overrides=()) -> str:
    loaded = load_spec(ROOT / "specs" / f"{name}.yaml", overrides)
    return render_sbatch(loaded.spec, loaded.plan, files)


@pytest.mark.parametrize("name", SEED_SPECS)
def test_golden_scripts(name):
    """Set RLHF_UPDATE_GOLDEN=1 to rewrite the golden files after a deliberate change."""
    text = rendered(name)
    golden = GOLDEN / f"{name}.sbatch"
    if os.environ.get("RLHF_UPDATE_GOLDEN"):
        golden.write_text(text)
    assert text == golden.read_text()


def test_vllm_script_has_three_components_with_rank_offsets():
    text = rendered("llama2_7b_vllm")
    assert text.count("#SBATCH hetjob") == 2
    assert "RLHF_HET_GROUP=2,RLHF_RANK_OFFSET=20" in text
    assert "srun --het-group=2" in text
    assert "#SBATCH --nodes=2\n#SBATCH --ntasks-per-node=8" in text


def test_flags_reach_every_component():
    text = rendered("llama2_7b_vllm", overrides=["slurm.partition=gpu", "slurm.time=01:00:00", "slurm.extra_sbatch=[--exclusive]"])
    assert text.count("#SBATCH --partition=gpu") == 3
    assert text.count("#SBATCH --time=01:00:00") == 3
    assert text.count("#SBATCH --exclusive") == 3


@pytest.mark.parametrize("run_dir", ["/tmp/a b", "/tmp/$(id)", "/tmp/x\n#SBATCH --x", "/tmp/100%", "/tmp/`id`"])
def test_unsafe_run_dirs_are_refused(run_dir):
    with pytest.raises(RenderError):
        rendered("internlm2_1_8b", JobFiles(run_dir=run_dir, python="/usr/bin/python3"))


def test_setup_lines_are_kept_one_per_line():
    text = rendered("internlm2_1_8b", overrides=["slurm.setup=['module load cuda/12', 'source /opt/env.sh']"])
    assert "\nmodule load cuda/12\nsource /opt/env.sh\n" in text


# --------------------------------------------------------------------------- running the script
STUB_SRUN = r"""#!/bin/bash
# Stand-in srun: records its arguments, then behaves as STUB_<group> says.
group=""
for arg in "$@"; do case "$arg" in --het-group=*) group=${arg#--het-group=};; esac; done
printf '%s\n' "$@" > "$STUB_DIR/srun-$group.args"
env | grep '^RLHF_\|^MASTER_\|_OFFLINE=' | sort > "$STUB_DIR/srun-$group.env"
sleeper=""
on_usr1() {
  echo usr1 >> "$STUB_DIR/srun-$group.signals"
  mkdir -p "$RUN_DIR_FOR_STUB/checkpoints"
  touch "$RUN_DIR_FOR_STUB/checkpoints/requeue"
  kill $sleeper 2>/dev/null
  exit 0
}
trap on_usr1 USR1
trap 'echo term >> "$STUB_DIR/srun-$group.signals"; kill $sleeper 2>/dev/null; exit 143' TERM
behaviour=STUB_$group
case "${!behaviour:-ok}" in
  ok) exit 0;;
  fail*) sleep 0.5; exit "${!behaviour#fail}";;
  hang) sleep 120 & sleeper=$!; wait $sleeper;;
esac
"""
STUB_SCONTROL = """#!/bin/bash
printf '%s\\n' "$*" >> "$STUB_DIR/scontrol.calls"
[ "$1 $2" = "show hostnames" ] && echo node-a
exit 0
"""


@pytest.fixture
def stub_env(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in (("srun", STUB_SRUN), ("scontrol", STUB_SCONTROL)):
        (bin_dir / name).write_text(body)
        (bin_dir / name).chmod(0o755)
    run_dir = tmp_path / "run"
    env = {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "STUB_DIR": str(tmp_path),
        "RUN_DIR_FOR_STUB": str(run_dir),
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NODELIST_HET_GROUP_0": "node-a",
    }
    return tmp_path, run_dir, env


def start(script: str, tmp_path: Path, env: dict) -> subprocess.Popen:
    path = tmp_path / "job.sbatch"
    path.write_text(script)
    return subprocess.Popen(["bash", str(path)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_script_runs_each_component_with_its_group_and_offset(stub_env):
    tmp_path, run_dir, env = stub_env
    proc = start(rendered("llama2_7b_vllm", JobFiles(str(run_dir), "/opt/env/bin/python")), tmp_path, env)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    for group, offset in ((0, 0), (1, 16), (2, 20)):
        args = (tmp_path / f"srun-{group}.args").read_text().splitlines()
        assert f"--export=ALL,RLHF_HET_GROUP={group},RLHF_RANK_OFFSET={offset},OMP_NUM_THREADS=8" in args
        assert "--cpus-per-task=8" in args  # srun does not inherit it from the allocation
        assert args[-4:] == ["-m", "rlhf_launch.runtime.worker", "--spec", f"{run_dir}/spec.yaml"]
        environ = (tmp_path / f"srun-{group}.env").read_text()
        assert "MASTER_ADDR=node-a" in environ and "RLHF_WORLD_SIZE=22" in environ
        assert f"MASTER_PORT={first_free_candidate(4242, 0)}" in environ


def test_hostile_values_are_passed_verbatim_never_executed(stub_env):
    tmp_path, run_dir, env = stub_env
    marker = tmp_path / "pwned"
    python = f"/opt/py $(touch {marker}) `touch {marker}`; touch {marker}\n touch {marker}"
    script = render_sbatch(*_spec_and_plan("internlm2_1_8b"), JobFiles(str(run_dir), python, resume=f"$(touch {marker})"))
    proc = start(script, tmp_path, env)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    assert not marker.exists()
    args = (tmp_path / "srun-0.args").read_text()
    assert python in args  # one argument, exactly as given
    assert f"--resume\n$(touch {marker})\n" in args


def _spec_and_plan(name: str):
    loaded = load_spec(ROOT / "specs" / f"{name}.yaml")
    return loaded.spec, loaded.plan


def test_a_failing_step_stops_the_others_and_sets_the_exit_status(stub_env):
    tmp_path, run_dir, env = stub_env
    env = {**env, "STUB_0": "hang", "STUB_1": "hang", "STUB_2": "fail3"}
    started = time.monotonic()
    proc = start(rendered("llama2_7b_vllm", JobFiles(str(run_dir), "/opt/env/bin/python")), tmp_path, env)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 3, out
    assert time.monotonic() - started < 30
    assert "generator failed, stopping the other steps" in out
    for group in (0, 1):
        assert "term" in (tmp_path / f"srun-{group}.signals").read_text()


def test_preemption_signal_is_forwarded_and_the_job_requeues(stub_env):
    tmp_path, run_dir, env = stub_env
    env = {**env, "STUB_0": "hang", "STUB_1": "hang"}
    proc = start(rendered("internlm2_1_8b", JobFiles(str(run_dir), "/opt/env/bin/python")), tmp_path, env)
    deadline = time.monotonic() + 30
    while not (tmp_path / "srun-1.args").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(0.5)
    proc.send_signal(signal.SIGUSR1)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    assert "usr1" in (tmp_path / "srun-0.signals").read_text()
    assert "requeue 4242" in (tmp_path / "scontrol.calls").read_text()
    assert not (run_dir / "checkpoints" / "requeue").exists()


def test_requeued_job_resumes_automatically(stub_env):
    tmp_path, run_dir, env = stub_env
    proc = start(rendered("internlm2_1_8b", JobFiles(str(run_dir), "/opt/env/bin/python")), tmp_path, {**env, "SLURM_RESTART_COUNT": "1"})
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    assert "--resume\nauto\n" in (tmp_path / "srun-0.args").read_text()
    # and meets at a new port: the first attempt's store may still be closing
    assert first_port_candidate(4242, 1) != first_port_candidate(4242, 0)
    assert f"MASTER_PORT={first_free_candidate(4242, 1)}" in (tmp_path / "srun-0.env").read_text()


def first_port_candidate(job: int, restart: int, attempt: int = 0) -> int:
    """The script's port candidate, computed as the script does (POSIX cksum)."""
    digest = subprocess.run(["cksum"], input=f"{job}/{restart}/{attempt}", capture_output=True, text=True, check=True)
    return 20000 + int(digest.stdout.split()[0]) % 12768


def first_free_candidate(job: int, restart: int) -> int:
    """The port the script picks: its first candidate that nothing on this machine listens on (another process may
    hold the first one; the script then takes the next, which test_a_port_something_listens_on_is_skipped checks)."""
    for attempt in range(64):
        port = first_port_candidate(job, restart, attempt)
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) != 0:
                return port
    raise AssertionError("no free candidate port")


def test_a_port_something_listens_on_is_skipped(stub_env):
    tmp_path, run_dir, env = stub_env
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", first_port_candidate(4242, 0)))
        busy.listen()
        proc = start(rendered("internlm2_1_8b", JobFiles(str(run_dir), "/opt/env/bin/python")), tmp_path, env)
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    port = int(re.search(r"MASTER_PORT=(\d+)", (tmp_path / "srun-0.env").read_text()).group(1))
    assert port == first_port_candidate(4242, 0, attempt=1) and 20000 <= port < 32768


def test_compute_nodes_are_offline_by_default_and_ranks_are_placed_in_blocks(stub_env):
    tmp_path, run_dir, env = stub_env
    env = {k: v for k, v in env.items() if not k.endswith("_OFFLINE")}
    proc = start(rendered("internlm2_1_8b", JobFiles(str(run_dir), "/opt/env/bin/python")), tmp_path, {**env, "HF_DATASETS_OFFLINE": "0"})
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    environ = (tmp_path / "srun-0.env").read_text().splitlines()
    assert "HF_HUB_OFFLINE=1" in environ and "TRANSFORMERS_OFFLINE=1" in environ
    assert "HF_DATASETS_OFFLINE=0" in environ  # set before submitting: kept
    assert "--distribution=block" in (tmp_path / "srun-0.args").read_text().splitlines()
    # Host memory per node from the plan (rlhf_launch/core/budget.py), not all of each node's
    assert re.findall(r"#SBATCH --mem=(\S+)", rendered("internlm2_1_8b")) == ["71G", "29G"]


def test_script_is_valid_bash():
    for name in SEED_SPECS:
        subprocess.run(["bash", "-n"], input=rendered(name), text=True, check=True)


# --------------------------------------------------------------------------- trainer_config.envs and uneven components
# A trainer of 20 GPUs on 8-GPU nodes (8 + 8 + 4), and envs on three roles: actor and critic share
# the trainer component, the reference gives the inference component its own.
ENVS_UNEVEN = {
    **layout(actor=12, critic=8),
    "model_configs.actor.trainer_config.envs": {"NCCL_DEBUG": "INFO", "XTUNER_FLAGS": "a,b c'd $(id)"},
    "model_configs.critic.trainer_config.envs": {"NCCL_DEBUG": "INFO", "CUDA_DEVICE_MAX_CONNECTIONS": "1"},
    "model_configs.reference.trainer_config.envs": {"HF_HOME": "/scratch/hf cache"},
}


def factory_rendered(overrides, files: JobFiles = FILES) -> str:
    loaded = load_sized(overrides)
    return render_sbatch(loaded.spec, loaded.plan, files)


def test_golden_script_with_envs_and_an_uneven_component():
    """Set RLHF_UPDATE_GOLDEN=1 to rewrite the golden file after a deliberate change."""
    text = factory_rendered(ENVS_UNEVEN)
    golden = GOLDEN / "envs_uneven.sbatch"
    if os.environ.get("RLHF_UPDATE_GOLDEN"):
        golden.write_text(text)
    assert text == golden.read_text()
    subprocess.run(["bash", "-n"], input=text, text=True, check=True)


def test_an_uneven_component_asks_for_its_tasks_with_at_most_a_node_each():
    text = factory_rendered(ENVS_UNEVEN)
    trainer = text.split("#SBATCH hetjob")[0]
    assert "#SBATCH --nodes=3\n#SBATCH --ntasks=20\n#SBATCH --ntasks-per-node=8\n#SBATCH --gpus-per-node=8\n" in trainer
    assert "# 8 + 8 + 4 ranks on 3 nodes" in trainer
    inference = text.split("#SBATCH hetjob")[1]
    assert "--ntasks=" not in inference.split("set -uo")[0]  # an even component keeps the per-node form


def test_each_component_runs_its_roles_envs_quoted(stub_env):
    tmp_path, run_dir, env = stub_env
    proc = start(factory_rendered(ENVS_UNEVEN, JobFiles(str(run_dir), "/opt/env/bin/python")), tmp_path, env)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    trainer = (tmp_path / "srun-0.args").read_text().splitlines()
    command = trainer[trainer.index("env"):]
    assert command[:5] == ["env", "NCCL_DEBUG=INFO", "XTUNER_FLAGS=a,b c'd $(id)", "CUDA_DEVICE_MAX_CONNECTIONS=1", "/opt/env/bin/python"]
    inference = (tmp_path / "srun-1.args").read_text().splitlines()
    assert inference[inference.index("env") + 1] == "HF_HOME=/scratch/hf cache"
    assert not any(arg.startswith(("NCCL_DEBUG", "XTUNER_FLAGS")) for arg in inference)


def test_roles_on_the_same_ranks_may_not_set_one_variable_to_two_values():
    with pytest.raises(SpecError) as info:
        load_sized({"model_configs.actor.trainer_config.envs": {"NCCL_DEBUG": "INFO"},
                    "model_configs.critic.trainer_config.envs": {"NCCL_DEBUG": "WARN"}})
    message = str(info.value)
    assert "model_configs.critic.trainer_config.envs.NCCL_DEBUG: found 'WARN', but actor sets 'INFO'" in message
    assert "trainer component" in message
    # A reward function runs on the reference ranks: its model section's envs meet the reference's.
    with pytest.raises(SpecError, match="reward.trainer_config.envs.X: found '2', but reference sets '1'"):
        load_sized({**reward_function(), "model_configs.reference.trainer_config.envs": {"X": "1"},
                    "model_configs.reward.trainer_config.envs": {"X": "2"}})
    # Different components are different ranks: each keeps its value.
    loaded = load_sized({"model_configs.actor.trainer_config.envs": {"X": "1"}, "model_configs.reference.trainer_config.envs": {"X": "2"}})
    assert [c.envs for c in loaded.plan.components] == [{"X": "1"}, {"X": "2"}]


@pytest.mark.parametrize("name", ["RLHF_RANK_OFFSET", "SLURM_PROCID", "MASTER_PORT"])
def test_envs_may_not_move_a_rank(name):
    with pytest.raises(SpecError, match=f"actor.trainer_config.envs.{name}: set, but the launcher sets it"):
        load_sized({"model_configs.actor.trainer_config.envs": {name: "0"}})


@pytest.mark.parametrize("name", ["1ABC", "A-B", "A B", "A;id"])
def test_envs_names_are_shell_names(name):
    with pytest.raises(SpecError, match="envs"):
        load_sized({"model_configs.actor.trainer_config.envs": {name: "0"}})
