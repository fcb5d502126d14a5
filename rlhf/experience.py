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
        """Merge a batch of clipped scores [B] into the moments."""
        self.count, self.mean, self.m2 = ppo.update_running_moments(self.count, self.mean, self.m2, scores)

    @property
    def std(self) -> float:
        """Population standard deviation of the scores so far; 1.0 before there are two."""
        return ppo.running_std(self.count, self.m2)


def make_experience(
    spec: JobSpec, rollout: Batch, old_logprobs: Tensor, ref_logprobs: Tensor, values: Tensor, scores: Tensor, moments: RewardMoments
) -> tuple[Batch, dict[str, float]]:
    """PPO experience and step metrics from a scored rollout.

    In: the rollout (prompt_ids, prompt_mask [B, P]; response_ids, response_mask [B, R]; finished [B]);
    its response tokens' log-probs under the actor (``old_logprobs``) and the reference
    (``ref_logprobs``) and the critic's ``values``, all [B, R]; and the reward ``scores`` [B]. Scores
    are clipped to [clip_reward_min, clip_reward_max] and, with reward_scale, divided by the running
    std of ``moments``, which they update. Token rewards are -kl_coeff * (old_logprobs - ref_logprobs)
    plus the score on each response's last token; GAE turns them into advantages and returns.

    Out: the experience, the rollout's keys plus old_logprobs, old_values (= values), advantages
    (whitened over the batch with norm_adv) and returns, each [B, R], the last two 0 off the mask;
    and the metrics reward_mean and reward_std (raw scores), reward_clipped_mean, kl (mean over
    sequences of the summed old_logprobs - ref_logprobs), response_len_mean (tokens), truncated_frac
    (responses without a stop token) and the masked means value_mean, return_mean, advantage_mean.
    """
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
