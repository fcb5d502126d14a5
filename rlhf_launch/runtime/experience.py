"""The repeater: a scored rollout becomes PPO experience (KL term, advantages by the spec's estimator).

Pure tensors in and out; the running reward statistics are passed in and returned, so that the
caller owns and checkpoints them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from rlhf_launch.core import metric_catalogue as mc
from rlhf_launch.core.algorithms import estimator as estimator_info
from rlhf_launch.core.config import JobSpec
from rlhf_launch.runtime import ppo
from rlhf_launch.runtime.rollout import Batch


@dataclass(frozen=True)
class ExperienceSettings:
    """The spec keys the repeater reads (rollout_config clip range and n, repeater_config), and nothing else,
    so that the experience can be built and tested without a whole JobSpec."""

    clip_reward_min: float = -1.5
    clip_reward_max: float = 1.5
    norm_rewards: bool = False
    reward_scale: bool = False
    kl_coeff: float = 0.02
    kl_estimator: str = "k1"
    kl_in: str = "reward"
    advantage_estimator: str = "gae"
    gamma: float = 1.0
    gae_lambda: float = 0.95
    norm_adv: bool = True
    group_size: int = 1  # rollout_config.n_samples_per_prompt: the contiguous rows of one prompt
    tis_cap: float | None = None  # train_config.tis_cap: truncated importance weights against the generator's log-probs

    @classmethod
    def from_spec(cls, spec: JobSpec) -> ExperienceSettings:
        """The settings of ``spec``."""
        rc, ro = spec.repeater_config, spec.rollout_config
        return cls(
            clip_reward_min=ro.clip_reward_min, clip_reward_max=ro.clip_reward_max, norm_rewards=rc.norm_rewards,
            reward_scale=rc.reward_scale, kl_coeff=rc.kl_coeff, kl_estimator=rc.kl_estimator, kl_in=rc.kl_in,
            advantage_estimator=rc.advantage_estimator, gamma=rc.gamma, gae_lambda=rc.gae_lambda, norm_adv=rc.norm_adv,
            group_size=ro.n_samples_per_prompt, tis_cap=spec.train_config.tis_cap,
        )

    @property
    def kl_in_loss(self) -> bool:
        """Whether the KL term acts in the actor's loss (kl_in loss, as GRPO) rather than as a penalty in the rewards
        (kl_in reward, as PPO-RLHF). Decided here only: with it, the rewards carry no KL and the experience carries
        ref_logprobs, from which the actor's loss adds kl_coeff x KL (rlhf_launch/runtime/losses.py ``actor_loss``)."""
        return self.kl_in == "loss"

    @property
    def needs_critic(self) -> bool:
        """Whether the estimator uses the critic's values (and trains it on the returns): gae only."""
        return estimator_info(self.advantage_estimator).needs_critic


@dataclass
class RewardMoments:
    """Running count / mean / sum of squared deviations of the clipped scores (reward_scale, norm_rewards).

    One set of statistics serves both options; the loop saves it in every checkpoint (loop.pt) and
    restores it on resume, so a resumed run scales its scores exactly as the uninterrupted one."""

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

    def normalize(self, scores: Tensor) -> Tensor:
        """(scores - mean) / (population std + 1e-8) by these moments (ppo.normalize_by_moments)."""
        return ppo.normalize_by_moments(scores, self.count, self.mean, self.m2)


def shape_scores(settings: ExperienceSettings, scores: Tensor, moments: RewardMoments) -> tuple[Tensor, Tensor]:
    """The clipped scores [B] and the sequence rewards [B] made of them, before the KL penalty.

    clipped = clamp(score, clip_reward_min, clip_reward_max). With norm_rewards or reward_scale the
    moments first take in this batch's clipped scores, then (the order of XTuner's repeater, whose
    statistics include the batch they normalise):
      norm_rewards:  (clipped - mean) / (std + 1e-8)   (XTuner, xtuner/rlhf/repeaters/base.py)
      reward_scale:  clipped / std                     (std = 1 before two scores are seen)
    with mean and std (population) over every clipped score so far. norm_rewards already divides by
    the std, so with both options on the scores are normalised once, as by norm_rewards alone.
    """
    clipped = scores.clamp(settings.clip_reward_min, settings.clip_reward_max)
    if not (settings.norm_rewards or settings.reward_scale):
        return clipped, clipped
    moments.update(clipped)
    if settings.norm_rewards:
        return clipped, moments.normalize(clipped)
    return clipped, clipped / moments.std


def make_experience(
    settings: ExperienceSettings, rollout: Batch, old_logprobs: Tensor, ref_logprobs: Tensor | None, values: Tensor | None, scores: Tensor,
    moments: RewardMoments,
) -> tuple[Batch, dict[str, float]]:
    """PPO experience and step metrics from a scored rollout.

    In: the rollout (prompt_ids, prompt_mask [B, P]; response_ids, response_mask [B, R]; finished [B]);
    its response tokens' log-probs under the actor (``old_logprobs``) and the reference
    (``ref_logprobs``; None when the job has no reference, kl_coeff 0: then there is no KL term at all) and the
    critic's ``values`` (None when the estimator needs no critic), all [B, R];
    and the reward ``scores`` [B]. Scores are clipped and, with norm_rewards or reward_scale, normalised
    by the running statistics of ``moments``, which they update (shape_scores).

    The KL term is KL_t = ppo.kl_estimate(old_logprobs, ref_logprobs, kl_estimator). With kl_in reward the
    token rewards are -kl_coeff * KL_t; with kl_in loss they are 0 and the experience carries ref_logprobs,
    from which the actor adds kl_coeff * KL to its loss (rlhf_launch/runtime/losses.py). ``ppo.advantages_and_returns``
    turns the scores and token rewards into advantages (gae whitened over the batch with norm_adv) by the
    advantage_estimator, groups being the ``group_size`` contiguous rows of one prompt.

    Out: the experience, the rollout's keys plus old_logprobs and advantages [B, R] (0 off the mask), with
    gae also old_values (= values) and returns [B, R], with kl_in loss ref_logprobs [B, R], and scores (raw)
    and score_rewards (clipped and normalised), each [B]; with ``tis_cap`` and the generator's behaviour log-probs
    (rollout["gen_logprobs"]) also is_weights [B, R] (ppo.truncated_is_weights, used by the policy loss). And the
    step's metrics of the rollout: the entries of rlhf_launch/core/metric_catalogue.py logged by this module, each
    under its catalogue constant (reward_mean, kl, gen_logprob_gap, ...; the README lists their meanings). Without
    ``ref_logprobs`` the KL metrics (kl, kl_<estimator>) are left out: nothing measured them, and a 0 would read as
    "the policy has not moved".
    """
    if settings.needs_critic and values is None:
        raise ValueError(f"advantage_estimator {settings.advantage_estimator} needs the critic's values")
    mask = rollout["response_mask"].to(old_logprobs.dtype)
    clipped, shaped = shape_scores(settings, scores, moments)
    has_ref = ref_logprobs is not None
    kl = ppo.kl_estimate(old_logprobs, ref_logprobs, mask, settings.kl_estimator) if has_ref else torch.zeros_like(old_logprobs)
    # With kl_in loss the KL acts through the actor's gradient instead: none of it in the rewards.
    kl_rewards = -settings.kl_coeff * kl if not settings.kl_in_loss and has_ref else torch.zeros_like(kl)
    advantages, returns = ppo.advantages_and_returns(
        settings.advantage_estimator, shaped.to(old_logprobs.dtype), kl_rewards, mask,
        values=values if settings.needs_critic else None, group_size=settings.group_size,
        gamma=settings.gamma, lam=settings.gae_lambda, whiten=settings.norm_adv,
    )
    experience = {**rollout, "old_logprobs": old_logprobs, "advantages": advantages, "scores": scores, "score_rewards": shaped}
    if returns is not None:
        experience.update(old_values=values, returns=returns)
    if settings.kl_in_loss and has_ref:  # the actor adds the KL term exactly when the experience carries these
        experience["ref_logprobs"] = ref_logprobs
    lengths = mask.sum(1)
    metrics = {
        mc.REWARD_MEAN: float(scores.mean()),
        mc.REWARD_STD: float(scores.std()) if scores.numel() > 1 else 0.0,
        mc.REWARD_CLIPPED_MEAN: float(clipped.mean()),
        mc.RESPONSE_LEN_MEAN: float(lengths.mean()),
        mc.TRUNCATED_FRAC: 1.0 - float(rollout["finished"].float().mean()),
        mc.ADVANTAGE_MEAN: float(ppo.masked_mean(advantages, mask)),
    }
    if has_ref:
        metrics[mc.KL] = float(ppo.masked_sum(old_logprobs - ref_logprobs, mask, dim=1).mean())
    if has_ref and settings.kl_estimator in mc.KL_BY_ESTIMATOR.values:  # k1 is the kl metric itself
        metrics[mc.KL_BY_ESTIMATOR.key(settings.kl_estimator)] = float(ppo.masked_sum(kl, mask, dim=1).mean())
    if "gen_logprobs" in rollout:
        gen = rollout["gen_logprobs"].to(old_logprobs.dtype)
        metrics[mc.GEN_LOGPROB_GAP] = float(ppo.masked_mean((old_logprobs - gen).abs(), mask))
        if settings.tis_cap is not None:
            weights = ppo.truncated_is_weights(old_logprobs, gen, mask, settings.tis_cap)
            experience["is_weights"] = weights
            metrics[mc.TIS_WEIGHT_MEAN] = float(ppo.masked_mean(weights, mask))
            metrics[mc.TIS_WEIGHT_MAX] = float(weights.max()) if mask.any() else 0.0
    if returns is not None:
        metrics[mc.VALUE_MEAN] = float(ppo.masked_mean(values, mask))
        metrics[mc.RETURN_MEAN] = float(ppo.masked_mean(returns, mask))
    return experience, metrics
