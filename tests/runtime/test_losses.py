"""The actor's and the critic's micro-batch losses, from settings read once from the spec."""

from __future__ import annotations

import pytest
import torch

from rlhf_launch.runtime import ppo
from rlhf_launch.runtime.experience import ExperienceSettings
from rlhf_launch.runtime.losses import ActorLossSettings, CriticLossSettings, actor_loss, critic_loss
from tests.factory import make_spec

B, R, V = 4, 5, 11


def _micro(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([5, 3, 0, 4])
    return {
        "response_ids": torch.randint(0, V, (B, R), generator=g),
        "response_mask": (torch.arange(R)[None, :] < lengths[:, None]).long(),
        "old_logprobs": torch.randn(B, R, generator=g) * 0.1 - 2.0,
        "advantages": torch.randn(B, R, generator=g),
        "ref_logprobs": torch.randn(B, R, generator=g) * 0.1 - 2.0,
        "old_values": torch.randn(B, R, generator=g),
        "returns": torch.randn(B, R, generator=g),
    }


SETS = {"train_config.policy_clip": 0.1, "train_config.policy_clip_high": 0.3, "train_config.value_clip": 0.15,
        "rollout_config.max_new_tokens": 7, "repeater_config.kl_coeff": 0.25, "repeater_config.kl_estimator": "k2",
        "repeater_config.kl_in": "loss", "model_configs.actor.trainer_config.train_kwargs.loss_type": "per_seq_sum",
        "model_configs.critic.trainer_config.train_kwargs.loss_type": "per_token"}


def test_settings_are_the_spec_keys_each_loss_reads():
    spec = make_spec(SETS)
    assert ActorLossSettings.from_spec(spec) == ActorLossSettings(clip=0.1, clip_high=0.3, loss_type="per_seq_sum", max_len=7,
                                                                  kl_coeff=0.25, kl_estimator="k2")
    assert CriticLossSettings.from_spec(spec) == CriticLossSettings(clip=0.15, loss_type="per_token", max_len=7)
    with pytest.raises(AttributeError):
        ActorLossSettings().clip = 0.3  # frozen: read once, never changed


def test_the_kl_term_is_decided_by_the_repeater_and_added_only_with_ref_logprobs():
    assert ExperienceSettings(kl_in="loss").kl_in_loss and not ExperienceSettings(kl_in="reward").kl_in_loss
    settings = ActorLossSettings.from_spec(make_spec(SETS))
    logits = torch.randn(B, R, V, generator=torch.Generator().manual_seed(1), dtype=torch.float64).requires_grad_()
    micro = _micro()
    with_kl, stats = actor_loss(settings, logits, micro, num_seqs=6, num_tokens=20)
    plain, plain_stats = actor_loss(settings, logits, {k: v for k, v in micro.items() if k != "ref_logprobs"}, 6, 20)
    mask = micro["response_mask"]
    logprobs = ppo.logprobs_from_logits(logits, micro["response_ids"])
    expected, _ = ppo.policy_loss(logprobs, micro["old_logprobs"], micro["advantages"], mask, 0.1, "per_seq_sum",
                                  num_seqs=6, num_tokens=20, clip_eps_high=0.3, max_len=7)
    kl = ppo.aggregate_loss(ppo.kl_estimate(logprobs, micro["ref_logprobs"], mask, "k2"), mask, "per_seq_sum", 6, 20, 7)
    assert torch.equal(plain, expected) and torch.equal(with_kl, expected + 0.25 * kl)
    assert torch.equal(stats["kl_loss"], kl.detach()) and "kl_loss" not in plain_stats
    assert set(plain_stats) == {"clipfrac", "approx_kl", "entropy"}
    assert torch.equal(stats["entropy"], ppo.masked_mean(ppo.entropy_from_logits(logits), mask))


def test_critic_loss_is_the_clipped_value_loss_of_its_settings():
    settings = CriticLossSettings(clip=0.15, loss_type="per_seq_sum", max_len=7)
    micro = _micro(2)
    values = torch.randn(B, R, generator=torch.Generator().manual_seed(3))
    loss, stats = critic_loss(settings, values, micro, num_seqs=6, num_tokens=20)
    expected, expected_stats = ppo.value_loss(values, micro["old_values"], micro["returns"], micro["response_mask"], 0.15,
                                              "per_seq_sum", num_seqs=6, num_tokens=20, max_len=7)
    assert torch.equal(loss, expected) and stats.keys() == expected_stats.keys() == {"clipfrac"}
