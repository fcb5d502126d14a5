"""The critic: a value model trained towards the GAE returns."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from rlhf_launch.core import metric_catalogue as mc
from rlhf_launch.core.config import JobSpec
from rlhf_launch.runtime.losses import CriticLossSettings, critic_loss
from rlhf_launch.runtime.models import ValueModule, load_value_model
from rlhf_launch.runtime.protocols import Cluster
from rlhf_launch.runtime.roles.common import (
    export_pretrained,
    in_micro_batches,
    lockstep_calls,
    make_trainer,
    train_minibatches,
    zero3_config,
)
from rlhf_launch.runtime.rollout import Batch, sequences
from rlhf_launch.runtime.timing import Timer


class CriticRole:
    """The critic: gives the value V_t of each response token and trains the value model towards the
    GAE returns with the clipped value loss."""

    def __init__(self, spec: JobSpec, device: torch.device, pad_id: int, timer: Timer, cluster: Cluster):
        cfg = spec.model_configs.critic
        self.spec, self.timer, self.cluster = spec, timer, cluster
        # Under ZeRO-3 the model is partitioned while it loads: no rank ever holds all of it.
        self.model = load_value_model(cfg.model_path, cfg.torch_dtype, device, pad_id, "critic", cfg.head_name,
                                      zero3_config(spec, "critic", cluster), cfg.attn_implementation, cfg.trust_remote_code)
        self.trainer = make_trainer(spec, "critic", ValueModule(self.model), cluster, device)
        self.loss_settings = CriticLossSettings.from_spec(spec)

    def _values(self, batch: Batch) -> Tensor:
        input_ids, attention_mask = sequences(batch)
        return self.trainer.module(input_ids, attention_mask, batch["response_ids"].shape[1])

    def values(self, rollout: Batch) -> Tensor:
        """Values [B, R] of the rollout's response tokens (the old values of the value clip), without grad, in micro batches."""
        micro = self.spec.inference_micro_batch("critic")
        return in_micro_batches(self._values, rollout, micro, lockstep_calls(self.spec, "critic", self.cluster, self.trainer, micro))

    def _loss(self, micro: Batch, num_seqs: int, num_tokens: int):
        return critic_loss(self.loss_settings, self._values(micro), micro, num_seqs, num_tokens)

    def train(self, experience: Batch, seed: int) -> dict[str, float]:
        """PPO epochs of value updates on this rank's share of ``experience`` (``seed`` orders the
        minibatches); returns the critic's metrics of rlhf_launch/core/metric_catalogue.py (value_loss, critic_lr,
        critic_clipfrac, critic_grad_norm), averaged over steps and ranks."""
        tc = self.spec.train_config
        stats = train_minibatches(
            self.trainer, experience, self._loss, tc.value_minibatch, self.spec.train_micro_batch("critic"), tc.ppo_epochs,
            seed, self.timer, shard=self.cluster.shard_of("critic"), group=self.cluster.group("critic"),
        )
        return {mc.VALUE_LOSS: stats.pop("loss"), **{f"critic_{k}": v for k, v in stats.items()}, mc.CRITIC_LR: self.trainer.lr}

    def save_pretrained(self, directory: Path, tokenizer, is_writer: bool) -> None:
        """The value model as a Hugging Face folder (a collective under ZeRO-3)."""
        export_pretrained(self.trainer, self.model, directory, tokenizer, is_writer)
