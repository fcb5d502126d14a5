"""Roles in their own processes (rlhf-launch --local): same losses as one process, DDP and
ZeRO-3, a separate generator group; failures take every rank down, naming the culprit."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from launcher.local import start_ranks
from launcher.spec import load_spec
from rlhf.loop import run_local
from rlhf.metrics import read_metrics
from tests.conftest import ROOT

TINY = ROOT / "specs" / "tiny_cpu.yaml"
# Clip fractions are left out: they count ties (new value == old value exactly, as in the first
# minibatch) that rounding differences of 1e-7 between layouts break either way.
COMPARED = ["reward_mean", "kl", "policy_loss", "value_loss", "entropy", "actor_approx_kl", "actor_grad_norm", "critic_grad_norm"]
BASE = ["train_config.max_train_step=3", "train_config.save_interval=0"]
LAYOUTS = {
    "ddp": [
        "slurm.gpus_per_node=4",
        # Sampling is seeded per generate call: with the generator sharded over the two actor
        # ranks, calls must cover the same prompts as in one process (16 = 32 prompts / 2 ranks).
        "rollout_config.actor_micro_bs=16",
        "model_configs.actor.trainer_config.parallel.data.size=2",
        "model_configs.critic.trainer_config.parallel.data.size=2",
        "model_configs.reward.trainer_config.parallel.data.size=2",
    ],
    "zero3-separate-generator": [
        "model_configs.actor.trainer_config.parallel.data={size: 2, mode: deepspeed}",
        "model_configs.critic.trainer_config.parallel.data={size: 2, mode: deepspeed}",
        "model_configs.actor.trainer_config.deepspeed_config={zero_optimization: {stage: 3}}",
        "model_configs.critic.trainer_config.deepspeed_config={zero_optimization: {stage: 3}}",
        "model_configs.actor.generator_config={shared_with_trainer: false, generator_type: hf}",
    ],
}


def launch(tmp_path, sets, name="run"):
    args = [sys.executable, "-m", "launcher.cli", str(TINY), "--local", "--output-dir", str(tmp_path), "--set", f"run.name={name}"]
    for s in sets:
        args += ["--set", s]
    return subprocess.run(args, capture_output=True, text=True, timeout=600, cwd=ROOT)


@pytest.mark.slow
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_distributed_run_matches_one_process(tiny_models, tmp_path, layout):
    sets = BASE + LAYOUTS[layout]
    proc = launch(tmp_path, sets)
    assert proc.returncode == 0, proc.stderr[-3000:]
    distributed = read_metrics(tmp_path / "run")
    single = run_local(load_spec(TINY, sets).spec, tmp_path / "single", quiet=True)
    assert [r["step"] for r in distributed] == [1, 2, 3]
    for a, b in zip(distributed, single, strict=True):
        for key in COMPARED:
            assert a[key] == pytest.approx(b[key], abs=1e-5), (a["step"], key)
    assert (tmp_path / "run" / "final" / "actor" / "model.safetensors").exists()
    assert (tmp_path / "run" / "checkpoints" / "step-00000003" / "COMPLETE").exists()


@pytest.mark.slow
def test_a_killed_rank_takes_every_rank_down_naming_it(tiny_models, tmp_path):
    loaded = load_spec(TINY, ["train_config.max_train_step=500", f"run.output_dir={tmp_path}"])
    run_dir = tmp_path / "tiny_cpu"
    run_dir.mkdir()
    from launcher import yaml_io

    (run_dir / "spec.yaml").write_text(yaml_io.dump(loaded.spec.to_dict()))
    procs = start_ranks(loaded.plan, run_dir / "spec.yaml", run_dir, None, rank0_to_terminal=False)
    try:
        deadline = time.monotonic() + 240
        while not (run_dir / "metrics.jsonl").exists() or not (run_dir / "metrics.jsonl").read_text():
            assert time.monotonic() < deadline, "training never started"
            assert all(p.process.poll() is None for p in procs)
            time.sleep(0.5)
        victim = next(p for p in procs if p.role == "reference")
        os.killpg(victim.process.pid, signal.SIGKILL)
        killed_at = time.monotonic()
        for p in procs:
            if p is not victim:
                p.process.wait(timeout=max(1, 60 - (time.monotonic() - killed_at)))
        assert time.monotonic() - killed_at < 60
        others = [p for p in procs if p is not victim]
        assert all(p.process.returncode != 0 for p in others), [p.process.returncode for p in others]
        logs = "".join(p.log.read_text() for p in others)
        assert "reference rank 0 (global rank 2) stopped responding" in logs, logs[-3000:]
    finally:
        for p in procs:
            if p.process.poll() is None:
                os.killpg(p.process.pid, signal.SIGKILL)


def test_launcher_stops_every_rank_when_one_fails(tiny_models, tmp_path):
    proc = launch(tmp_path, ["train_config.max_train_step=2", "model_configs.reward.model_path=/nonexistent/reward"])
    assert proc.returncode != 0
    assert "reward rank 0 (global rank 3) exited with status" in proc.stderr
    assert "stopping the other ranks" in proc.stderr


def test_rendezvous_timeout_names_the_missing_ranks(tiny_models, tmp_path):
    loaded = load_spec(TINY, ["run.rendezvous_timeout_s=2"])
    from launcher import yaml_io
    from launcher.local import free_port, rank_environments

    (tmp_path / "spec.yaml").write_text(yaml_io.dump(loaded.spec.to_dict()))
    env = {**os.environ, **rank_environments(loaded.plan, free_port(), 1)[0]}
    proc = subprocess.run([sys.executable, "-m", "rlhf.worker", "--spec", str(tmp_path / "spec.yaml")], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 3
    assert "never arrived: critic rank 0 (global rank 1), reference rank 0 (global rank 2), reward rank 0 (global rank 3)" in proc.stderr
