"""The repeater: a scored rollout becomes PPO experience (KL-shaped rewards, GAE, whitening).

Pure tensors in and out; the running reward statistics are passed in and returned, so that the
caller owns and checkpoints them.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from rlhf import ppo
from rlhf.core.config import JobSpec
from rlhf.rollout import Batch


@dataclass
class RewardMoments:
    """Running count / mean / sum of squared deviations of the clipped scores (reward_scale)."""

    count: float = 0.0
    mean: float = 0.0
    m2: float = 0.0

    def update(self, scores: Tensor) -> None:
        self.count, self.mean, self.m2 = ppo.update_running_moments(self.count, self.mean, self.m2, scores)

    @property
    def std(self) -> float:
        return ppo.running_std(self.count, self.m2)


def make_experience(
    spec: JobSpec, rollout: Batch, old_logprobs: Tensor, ref_logprobs: Tensor, values: Tensor, scores: Tensor, moments: RewardMoments
) -> tuple[Batch, dict[str, float]]:
    rc, ro = spec.repeater_config, spec.rollout_config
    mask = rollout["response_mask"].to(values.dtype)
    clipped = scores.clamp(ro.clip_reward_min, ro.clip_reward_max)
    shaped = clipped
    if rc.reward_scale:
        moments.update(clipped)
        shaped = clipped / moments.std
    rewards = ppo.add_score_at_last_token(ppo.kl_penalty(old_logprobs, ref_logprobs, mask, rc.kl_coeff), shaped, mask)
    advantages, returns = ppo.compute_gae(rewards, values, mask, rc.gamma, rc.gae_lambda)
    if rc.norm_adv:
        advantages = ppo.masked_whiten(advantages, mask)
    experience = {
        **rollout,
        "old_logprobs": old_logprobs,
        "old_values": values,
        "advantages": advantages,
        "returns": returns,
    }
    seq_kl = ppo.masked_sum(old_logprobs - ref_logprobs, mask, dim=1)
    lengths = mask.sum(1)
    metrics = {
        "reward_mean": float(scores.mean()),
        "reward_std": float(scores.std()) if scores.numel() > 1 else 0.0,
        "reward_clipped_mean": float(clipped.mean()),
        "kl": float(seq_kl.mean()),
        "response_len_mean": float(lengths.mean()),
        "truncated_frac": 1.0 - float(rollout["finished"].float().mean()),
        "value_mean": float(ppo.masked_mean(values, mask)),
        "return_mean": float(ppo.masked_mean(returns, mask)),
        "advantage_mean": float(ppo.masked_mean(advantages, mask)),
    }
    return experience, metrics
