"""What ``rlhf-launch convert`` does with each XTuner-RLHF key, as data.

Key paths are dotted; ``<role>`` stands for every model under ``model_configs``. The facts behind
each entry (XTuner's defaults, the keys it swallows) come from XTuner-RLHF's own code: gen-1 is the
format of its documentation (``actor``, ``dataset_config``), "later" the format of its last RLHF
code (``policy``, ``prompt_dataset_config``). The README's conversion table lists these tables.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

GEN1, LATER = "gen-1", "later"

# XTuner's later spellings, renamed before anything else: after this a later config reads as gen-1.
RENAMED_LATER: dict[str, str] = {
    "rollout_config.policy_micro_bs": "rollout_config.actor_micro_bs",
    "repeater_config.policy_micro_bs": "repeater_config.actor_micro_bs",
    "train_config.policy_micro_bs": "train_config.actor_micro_bs",
    "train_config.critic_warmup_step": "train_config.pretrain_step",
    "train_config.policy_minibatch": "train_config.ppo_minibatch",
    "train_config.critic_minibatch": "train_config.value_minibatch",
    "prompt_dataset_config.samples_each_epoch": "dataset_config.num_samples_each_epoch",
    "prompt_dataset_config.max_len": "dataset_config.max_seq_len",
    "prompt_dataset_config.random_seed": "dataset_config.random_seed",
    "prompt_dataset_config.sample_strategy": "dataset_config.sample_strategy",
    "prompt_dataset_config.message_datasets": "dataset_config.ppo_datas",
}

# Spellings of both formats that the spec has under another name.
RENAMED: dict[str, str] = {
    "model_configs.<role>.model_config.attn_implementation": "model_configs.<role>.attn_implementation",
    "model_configs.<role>.trainer_config.train_kwargs.clip_grad_norm": "model_configs.<role>.trainer_config.train_kwargs.max_grad_norm",
    # the later format's place, also in XTuner's commits between the two formats
    "repeater_config.clip_reward_min": "rollout_config.clip_reward_min",
    "repeater_config.clip_reward_max": "rollout_config.clip_reward_max",
    # the dataset_config of XTuner's commits between the two formats
    "dataset_config.prompt_samples_each_epoch": "dataset_config.num_samples_each_epoch",
    "dataset_config.max_prompt_len": "dataset_config.max_seq_len",
    "dataset_config.prompt_datasets": "dataset_config.ppo_datas",
    "dataset_config.ratio_within_datasets": "dataset_config.ratio_within_datas",
}

_IGNORED = "XTuner accepts it and never uses it"

# Keys dropped with one note each: XTuner ignores them, or they change nothing in a converted run.
DROPPED: dict[str, str] = {
    "train_config.step_interval": _IGNORED,
    "train_config.pt_minibatch": _IGNORED,
    "train_config.async_learn": "it only lets XTuner train the critic while the policy trains; the losses are the same",
    "model_configs.<role>.model_class": "XTuner replaces it by its own model class",
    "model_configs.actor.generator_config.generate_kwargs": (
        "XTuner never reads it: sampling comes only from rollout_config.generate_kwargs"
    ),
    "rollout_config.async_reward": "the reference, critic and reward passes always run at the same time, each on its own ranks "
    "(the scores are the same); rollout_config.max_staleness: 1 overlaps generation with training",
    "model_configs.<role>.model_config.use_cache": "the KV cache is always used for generation and never in training",
    "model_configs.<role>.trainer_config.exclude_keys": "rlhf-launch saves and syncs every parameter; it has no such setting",
    "dataset_config.sample_strategy": "each step draws every prompt's source at random by the normalised weights (no per-source quota)",
    "prompt_dataset_config.message_type": "the prompt section is the spec's dataset_config",
}

@dataclass(frozen=True)
class Unsupported:
    """A key for a feature rlhf-launch does not have yet; ``no_op(value, spec)`` says when it may be dropped."""

    feature: str
    no_op: Callable[[Any, dict], bool]


def _off(value: Any, spec: dict) -> bool:
    return value in (None, False, 0, 0.0, [], {})


def _one_sample(value: Any, spec: dict) -> bool:
    return value in (None, 0, 1)


def _not_resuming(value: Any, spec: dict) -> bool:
    return value is None or value <= 0


_RESUME = "restarting at a step number (rlhf-launch resumes a run from its own checkpoints: --resume)"
_GROUP = "group-relative advantages (several samples per prompt)"

# PPO-ptx's keys (pretrain_dataset_config, pretrain_loss_weight, pt_datas, ...) are converted by ``ptx``.
UNSUPPORTED: dict[str, Unsupported] = {
    "repeater_config.grpo_k": Unsupported(_GROUP, _one_sample),
    "repeater_config.loo_k": Unsupported(_GROUP, _one_sample),
    "repeater_config.use_loo": Unsupported("leave-one-out (RLOO) advantages", _off),
    "repeater_config.sum_kl": Unsupported("a KL penalty summed over the response", _off),
    "repeater_config.kl_reward_penalty": Unsupported("a KL penalty on the sequence reward", _off),
    "repeater_config.non_eos_penalty": Unsupported("a penalty for responses without end-of-sequence", _off),
    "rollout_config.repeat_prompt": Unsupported("several responses per prompt", _one_sample),
    "train_config.ppo_loss_weight": Unsupported("a PPO loss weight other than 1", lambda v, s: v == 1),
    "dataset_config.ratio_within_datas": Unsupported(
        "ppo_datas probabilities as the fraction of each dataset kept", lambda v, s: v is True
    ),
    "train_config.resume_step": Unsupported(_RESUME, _not_resuming),
    "rollout_config.resume_step": Unsupported(_RESUME, _not_resuming),
    "model_configs.<role>.trainer_config.train_kwargs.optimizer": Unsupported("another optimizer than AdamW", lambda v, s: False),
    "model_configs.<role>.trainer_config.train_kwargs.lr_scheduler": Unsupported("a learning-rate scheduler", lambda v, s: False),
    "model_configs.<role>.trainer_config.train_kwargs.lr_scheduler_kwargs": Unsupported("a learning-rate scheduler", lambda v, s: False),
}

# Loss objects (``policy_criterion=PPOPolicyLoss(cliprange=0.2)``): which keyword becomes which spec key.
CRITERIA: dict[str, dict[str, str]] = {
    "policy_criterion": {"cliprange": "train_config.policy_clip"},
    "critic_criterion": {"cliprange_value": "train_config.value_clip"},
    "value_criterion": {"cliprange_value": "train_config.value_clip"},
}
# ``loss_type`` of gen-1's loss objects: XTuner's per_seq is the spec's only loss for the value model.
CRITERION_NO_OP: dict[str, tuple[Any, ...]] = {"loss_type": ("per_seq",)}

WHOLE_BATCH = "the rollout batch"  # a default that is dataset_config.num_samples_each_epoch

# XTuner's defaults where they differ from the spec's: written into the converted spec when the key is absent.
XTUNER_DEFAULTS: dict[str, dict[str, Any]] = {
    "rollout_config.write_to_file": {GEN1: True, LATER: True},
    "rollout_config.clip_reward_min": {GEN1: -5, LATER: -5},
    "rollout_config.clip_reward_max": {GEN1: 5, LATER: 5},
    "repeater_config.norm_rewards": {GEN1: True, LATER: True},
    "repeater_config.norm_adv": {GEN1: False, LATER: False},
    "repeater_config.kl_coeff": {GEN1: 0.02, LATER: 0.01},
    "repeater_config.gae_lambda": {GEN1: 0.95, LATER: 0.99},
    "train_config.actor_micro_bs": {GEN1: 2, LATER: 2},
    "train_config.critic_micro_bs": {GEN1: 2, LATER: 2},
    "train_config.ppo_minibatch": {GEN1: 512, LATER: WHOLE_BATCH},
    "train_config.value_minibatch": {GEN1: 512, LATER: WHOLE_BATCH},
    "train_config.value_clip": {GEN1: 0.5, LATER: 0.5},
    "dataset_config.max_seq_len": {GEN1: 4096, LATER: 4096},
    "dataset_config.random_seed": {GEN1: 110, LATER: 110},
    "model_configs.<role>.trainer_config.train_kwargs.lr": {GEN1: 1e-5, LATER: 1e-5},
}

# Later-format keys XTuner knows (so they are not reported as unknown sections).
XTUNER_SECTIONS = ("prompt_dataset_config", "pretrain_dataset_config")
