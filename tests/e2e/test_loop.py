"""The PPO loop end to end on the tiny spec: learning, checkpoints, exact resume."""

from __future__ import annotations

import json

import pytest
import torch

from rlhf_launch.frontend.cli import main
from rlhf_launch.frontend.spec import load_spec
from rlhf_launch.runtime.checkpoint import latest_checkpoint
from rlhf_launch.runtime.metrics import read_metrics
from rlhf_launch.runtime.training_run import run_local
from tests.conftest import ROOT
from tests.factory import without_timing

TINY = ROOT / "specs" / "tiny_cpu.yaml"
REQUIRED = {
    "step",
    "reward_mean",
    "kl",
    "policy_loss",
    "value_loss",
    "entropy",
    "response_len_mean",
    "step_time_s",
    "gen_tokens_per_s",
    "generate_time_s",
    "score_time_s",
    "train_time_s",
    "busy_actor_s",
    "util_actor",
    "util_reward",
}


def tiny(*overrides):
    return load_spec(TINY, list(overrides)).spec


@pytest.mark.slow
def test_reward_goes_up_on_the_tiny_spec(tiny_models, tmp_path):
    history = run_local(tiny(), tmp_path / "run", quiet=True)
    rewards = [m["reward_mean"] for m in history]
    first, last = sum(rewards[:8]) / 8, sum(rewards[-8:]) / 8
    assert last > first + 0.2, rewards
    assert REQUIRED <= set(history[0])
    assert (tmp_path / "run" / "final" / "actor" / "config.json").exists()


def test_resumed_run_equals_an_uninterrupted_run(tiny_models, tmp_path):
    sets = (
        "train_config.save_interval=2",
        "dataset_config.num_samples_each_epoch=16",
        "train_config.ppo_minibatch=8",
        "train_config.value_minibatch=8",
        "repeater_config.reward_scale=true",
    )
    straight = tmp_path / "straight"
    run_local(tiny(*sets, "train_config.max_train_step=4"), straight, quiet=True)
    resumed = tmp_path / "resumed"
    run_local(tiny(*sets, "train_config.max_train_step=2"), resumed, quiet=True)
    run_local(tiny(*sets, "train_config.max_train_step=4"), resumed, resume="auto", quiet=True)
    a, b = read_metrics(straight), read_metrics(resumed)
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    assert without_timing(a) == without_timing(b)
    for name in ("actor.pt", "critic.pt"):
        sa = torch.load(latest_checkpoint(straight) / name, weights_only=False)
        sb = torch.load(latest_checkpoint(resumed) / name, weights_only=False)
        for key, tensor in sa["model"].items():
            assert torch.equal(tensor, sb["model"][key]), key
    assert json.loads((resumed / "status.json").read_text())["state"] == "completed"


def test_python_reward_function(tiny_models, tmp_path):
    spec = tiny(
        "model_configs.reward.model_path=null",
        "model_configs.reward.reward_function=rlhf_launch.runtime.rewards:vowel_ratio",
        "train_config.max_train_step=1",
    )
    (row,) = run_local(spec, tmp_path / "run", quiet=True)
    assert -1.0 <= row["reward_mean"] <= 1.0


def test_cli_local_run_and_refusal_to_overwrite(tiny_models, tmp_path, capsys):
    args = [str(TINY), "--local", "--output-dir", str(tmp_path), "--set", "train_config.max_train_step=1"]
    assert main(args) == 0
    run_dir = tmp_path / "tiny_cpu"
    assert (run_dir / "spec.yaml").exists() and len(read_metrics(run_dir)) == 1
    assert main(args) == 2
    assert "already holds a run; continue it with --resume" in capsys.readouterr().err
    assert main([*args[:-1], "train_config.max_train_step=2", "--resume"]) == 0
    assert [r["step"] for r in read_metrics(run_dir)] == [1, 2]
    assert main([*args, "--resume", str(tmp_path / "nowhere")]) == 2


def test_norm_rewards_and_rollouts_file_resume_exactly(tiny_models, tmp_path):
    """A run interrupted after step 3 and resumed from its step-2 checkpoint redoes step 3: its
    metrics, its rollouts.jsonl (no duplicated step-3 lines) and its reward statistics equal the
    uninterrupted run's, and the statistics are those of every clipped score it logged."""
    import math

    from rlhf_launch.runtime.rollout_log import rollouts_path
    from tests.factory import make_spec

    sets = {"train_config.save_interval": 2, "dataset_config.num_samples_each_epoch": 16, "train_config.ppo_minibatch": 8,
            "train_config.value_minibatch": 8, "repeater_config.norm_rewards": True, "rollout_config.write_to_file": True}
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run_local(make_spec(sets, **{"train_config.max_train_step": 4}), straight, quiet=True)
    run_local(make_spec(sets, **{"train_config.max_train_step": 3}), resumed, quiet=True)
    step_two = resumed / "checkpoints" / "step-00000002"
    run_local(make_spec(sets, **{"train_config.max_train_step": 4}), resumed, resume=str(step_two), quiet=True)
    assert without_timing(read_metrics(straight)) == without_timing(read_metrics(resumed))
    text = rollouts_path(resumed).read_text()
    assert text == rollouts_path(straight).read_text()
    samples = [json.loads(line) for line in text.splitlines()]
    assert [s["step"] for s in samples] == [step for step in (1, 2, 3, 4) for _ in range(16)]
    assert all(s["response_len"] >= 1 and isinstance(s["prompt"], str) and s["prompt"] for s in samples)
    moments = [torch.load(latest_checkpoint(run) / "loop.pt", weights_only=False)["reward_moments"] for run in (straight, resumed)]
    assert moments[0] == moments[1]
    clipped = [min(max(s["score"], -1.5), 1.5) for s in samples]
    mean = sum(clipped) / len(clipped)
    assert moments[0]["count"] == len(clipped)
    assert moments[0]["mean"] == pytest.approx(mean, rel=1e-6)
    assert moments[0]["m2"] == pytest.approx(sum((x - mean) ** 2 for x in clipped), rel=1e-6)
    last = [s for s in samples if s["step"] == 4]
    std = math.sqrt(moments[0]["m2"] / moments[0]["count"])
    assert [s["reward"] for s in last] == pytest.approx([(x - mean) / (std + 1e-8) for x in clipped[-16:]], rel=1e-5, abs=1e-6)
