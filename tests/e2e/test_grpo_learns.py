"""GRPO learns on the tiny model: with a deterministic, checkable reward and no critic, the reward goes up.

The settings are those of specs/grpo_cpu.yaml, built from tests/factory.py overrides (so editing the shipped spec
cannot change what is tested): 8 prompts x 4 samples per step, the grpo estimator, a k3 KL term in the actor's loss,
clip-higher, and rlhf_launch.runtime.rewards:vowel_ratio as the reward (2 x vowels / letters - 1 of the response text).
"""

from __future__ import annotations

import statistics

import pytest

from rlhf_launch.runtime.training_run import run_local
from tests.factory import make_spec, reward_function

STEPS = 30
WINDOW = 6  # steps averaged at each end: one step's mean over 32 samples is noisy, six of them much less
MARGIN = 0.15  # on a reward in [-1, 1]; the untrained policy starts near -0.25 and the runs end above 0.1

GRPO_TINY = {
    **reward_function("rlhf_launch.runtime.rewards:vowel_ratio"),
    "rollout_config.clip_reward_min": -1.0,
    "rollout_config.clip_reward_max": 1.0,
    "rollout_config.n_samples_per_prompt": 4,
    "dataset_config.num_samples_each_epoch": 8,
    "repeater_config.advantage_estimator": "grpo",
    "repeater_config.kl_in": "loss",
    "repeater_config.kl_estimator": "k3",
    "repeater_config.kl_coeff": 0.01,
    "repeater_config.norm_adv": False,
    "train_config.ppo_minibatch": 16,
    "train_config.value_minibatch": 16,
    "train_config.actor_micro_bs": 16,
    "train_config.critic_micro_bs": 16,
    "train_config.ppo_epochs": 1,
    "train_config.policy_clip": 0.2,
    "train_config.policy_clip_high": 0.28,
    "train_config.save_interval": 10,
    "train_config.max_train_step": STEPS,
}


@pytest.mark.slow
def test_grpo_raises_a_verifiable_reward_without_a_critic(tiny_models, tmp_path):
    """Over 30 seeded steps the mean reward of the last six clearly exceeds that of the first six, while the
    critic is never trained and the KL term sits in the actor's loss (finite, and the policy has moved)."""
    history = run_local(make_spec(GRPO_TINY), tmp_path / "run", quiet=True)
    assert len(history) == STEPS
    rewards = [row["reward_mean"] for row in history]
    first, last = statistics.fmean(rewards[:WINDOW]), statistics.fmean(rewards[-WINDOW:])
    print(f"grpo tiny: reward first {WINDOW} steps {first:.3f}, last {WINDOW} {last:.3f}")  # shown with pytest -s
    assert last > first + MARGIN, f"first {first:.3f}, last {last:.3f}: {[round(r, 3) for r in rewards]}"

    assert all("value_loss" not in row for row in history)  # no critic update
    kl_losses = [row["actor_kl_loss"] for row in history]
    assert all(k is not None and k >= 0.0 for k in kl_losses)  # k3 >= 0, and no NaN was logged as None
    assert statistics.fmean(kl_losses[-WINDOW:]) > statistics.fmean(kl_losses[:WINDOW])  # away from the reference
    assert (tmp_path / "run" / "final" / "actor" / "config.json").is_file()
