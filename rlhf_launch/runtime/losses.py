"""The actor's and the critic's losses on one micro batch, from the few spec keys each reads.

The settings are read once from the spec (``ActorLossSettings.from_spec``, ``CriticLossSettings.from_spec``), as the
repeater's are (rlhf_launch/runtime/experience.py ``ExperienceSettings``), so that a loss neither re-reads the JobSpec on
every micro batch nor needs one to be tested. Where the KL term acts is decided once, by the repeater
(``ExperienceSettings.kl_in_loss``): with kl_in loss the experience carries ``ref_logprobs``, and the actor's loss adds
kl_coeff x KL exactly when its micro batch has them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from rlhf_launch.core.config import JobSpec
from rlhf_launch.runtime import ppo
from rlhf_launch.runtime.rollout import Batch

LossAndStats = tuple[Tensor, dict[str, Tensor]]


@dataclass(frozen=True)
class ActorLossSettings:
    """The spec keys the actor's loss reads: train_config's ratio clips, the actor's loss_type,
    rollout_config.max_new_tokens (per_seq_sum's constant denominator) and the KL term's coefficient and estimator."""

    clip: float = 0.2  # train_config.policy_clip
    clip_high: float | None = None  # train_config.policy_clip_high; None: clip
    loss_type: str = "per_seq"  # model_configs.actor.trainer_config.train_kwargs.loss_type
    max_len: int = 1024  # rollout_config.max_new_tokens
    kl_coeff: float = 0.02  # repeater_config.kl_coeff
    kl_estimator: str = "k1"  # repeater_config.kl_estimator

    @classmethod
    def from_spec(cls, spec: JobSpec) -> ActorLossSettings:
        """The settings of ``spec``."""
        tc, rc, kwargs = spec.train_config, spec.repeater_config, spec.model_configs.actor.trainer_config.train_kwargs
        return cls(clip=tc.policy_clip, clip_high=tc.policy_clip_high, loss_type=kwargs.loss_type,
                   max_len=spec.rollout_config.max_new_tokens, kl_coeff=rc.kl_coeff, kl_estimator=rc.kl_estimator)


@dataclass(frozen=True)
class CriticLossSettings:
    """The spec keys the critic's loss reads: train_config.value_clip, the critic's loss_type and
    rollout_config.max_new_tokens (per_seq_sum's constant denominator)."""

    clip: float = 0.2  # train_config.value_clip
    loss_type: str = "per_seq"  # model_configs.critic.trainer_config.train_kwargs.loss_type
    max_len: int = 1024  # rollout_config.max_new_tokens

    @classmethod
    def from_spec(cls, spec: JobSpec) -> CriticLossSettings:
        """The settings of ``spec``."""
        kwargs = spec.model_configs.critic.trainer_config.train_kwargs
        return cls(clip=spec.train_config.value_clip, loss_type=kwargs.loss_type, max_len=spec.rollout_config.max_new_tokens)


def actor_loss(settings: ActorLossSettings, logits: Tensor, micro: Batch, num_seqs: int, num_tokens: int) -> LossAndStats:
    """The actor's loss on a micro batch, as its part of a minibatch of ``num_seqs`` sequences and ``num_tokens``
    response tokens, from the policy's ``logits`` [B, R, V] over the micro batch's response tokens.

        L = ppo.policy_loss (PPO's clipped surrogate, Schulman et al. 2017, arXiv:1707.06347; clip-higher with
            clip_high, DAPO, arXiv:2503.14476; weighted by the experience's is_weights, if any)
          + kl_coeff x aggregate_loss(KL_t)   when the micro batch carries ref_logprobs (kl_in loss, as GRPO: Shao et
                                              al. 2024, arXiv:2402.03300), KL_t = ppo.kl_estimate by kl_estimator

    The KL term's gradient flows through the new log-probs (the reference's are constants) and it is normalised like
    the policy term (by the whole minibatch), so that micro batches and ranks still add up to the minibatch loss.
    Stats: policy_loss's clipfrac and approx_kl, kl_loss (the KL term before kl_coeff) with the KL term, and entropy
    (the masked mean of the policy's per-token entropy)."""
    logprobs = ppo.logprobs_from_logits(logits, micro["response_ids"])
    mask = micro["response_mask"]
    s = settings
    loss, stats = ppo.policy_loss(
        logprobs, micro["old_logprobs"], micro["advantages"], mask, s.clip,
        s.loss_type, num_seqs=num_seqs, num_tokens=num_tokens, clip_eps_high=s.clip_high, max_len=s.max_len,
        is_weights=micro.get("is_weights"),
    )
    if "ref_logprobs" in micro:  # only with kl_in loss and a reference (kl_coeff > 0): ExperienceSettings.kl_in_loss
        kl = ppo.aggregate_loss(ppo.kl_estimate(logprobs, micro["ref_logprobs"], mask, s.kl_estimator), mask, s.loss_type,
                                num_seqs, num_tokens, s.max_len)
        loss = loss + s.kl_coeff * kl
        stats["kl_loss"] = kl.detach()
    with torch.no_grad():
        stats["entropy"] = ppo.masked_mean(ppo.entropy_from_logits(logits), mask)
    return loss, stats


def critic_loss(settings: CriticLossSettings, values: Tensor, micro: Batch, num_seqs: int, num_tokens: int) -> LossAndStats:
    """The critic's loss on a micro batch, as its part of a minibatch of ``num_seqs`` sequences and ``num_tokens``
    response tokens, from the value model's ``values`` [B, R]: ppo.value_loss against the experience's returns,
    clipped around its old_values (the value clipping of OpenAI Baselines' PPO2, Engstrom et al. 2020,
    arXiv:2005.12729). Stats: clipfrac."""
    s = settings
    return ppo.value_loss(values, micro["old_values"], micro["returns"], micro["response_mask"], s.clip,
                          s.loss_type, num_seqs=num_seqs, num_tokens=num_tokens, max_len=s.max_len)
