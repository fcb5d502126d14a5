"""The critic: a value model trained towards the GAE returns."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from rlhf import ppo
from rlhf.core.config import JobSpec
from rlhf.models import ValueModule, load_value_model
from rlhf.protocols import Cluster
from rlhf.roles.common import export_pretrained, in_micro_batches, make_trainer, train_minibatches
from rlhf.rollout import Batch, sequences
from rlhf.timing import Timer


class CriticRole:
    def __init__(self, spec: JobSpec, device: torch.device, pad_id: int, timer: Timer, cluster: Cluster):
        cfg = spec.model_configs.critic
        self.spec, self.timer, self.cluster = spec, timer, cluster
        self.model = load_value_model(cfg.model_path, cfg.torch_dtype, device, pad_id)
        self.trainer = make_trainer(spec, "critic", ValueModule(self.model), cluster, device)
        self.loss_type = cfg.trainer_config.train_kwargs.loss_type

    def _values(self, batch: Batch) -> Tensor:
        input_ids, attention_mask = sequences(batch)
        return self.trainer.module(input_ids, attention_mask, batch["response_ids"].shape[1])

    def values(self, rollout: Batch) -> Tensor:
        return in_micro_batches(self._values, rollout, self.spec.inference_micro_batch("critic"))

    def _loss(self, micro: Batch, num_seqs: int, num_tokens: int):
        return ppo.value_loss(
            self._values(micro), micro["old_values"], micro["returns"], micro["response_mask"], self.spec.train_config.value_clip,
            self.loss_type, num_seqs=num_seqs, num_tokens=num_tokens,
        )

    def train(self, experience: Batch, seed: int) -> dict[str, float]:
        tc = self.spec.train_config
        stats = train_minibatches(
            self.trainer, experience, self._loss, tc.value_minibatch, self.spec.train_micro_batch("critic"), tc.ppo_epochs, seed, self.timer,
            shard=self.cluster.shard_of("critic"), group=self.cluster.group("critic"),
        )
        return {"value_loss": stats.pop("loss"), **{f"critic_{k}": v for k, v in stats.items()}, "critic_lr": self.trainer.lr}

    def save_pretrained(self, directory: Path, tokenizer, is_writer: bool) -> None:
        export_pretrained(self.trainer, self.model, directory, tokenizer, is_writer)
