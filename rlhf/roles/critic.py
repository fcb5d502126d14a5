"""The critic: a value model trained towards the GAE returns."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from rlhf import ppo
from rlhf.config import JobSpec
from rlhf.engine import TorchTrainer
from rlhf.models import load_value_model, token_values
from rlhf.roles.common import in_micro_batches, train_minibatches
from rlhf.rollout import Batch, sequences
from rlhf.timing import Timer


def values_of(model, batch: Batch) -> Tensor:
    input_ids, attention_mask = sequences(batch)
    return token_values(model, input_ids, attention_mask, batch["response_ids"].shape[1])


class CriticRole:
    def __init__(self, spec: JobSpec, device: torch.device, pad_id: int, timer: Timer):
        cfg = spec.model_configs.critic
        self.spec, self.timer = spec, timer
        self.model = load_value_model(cfg.model_path, cfg.torch_dtype, device, pad_id)
        self.trainer = TorchTrainer(self.model, cfg.trainer_config.train_kwargs)
        self.loss_type = cfg.trainer_config.train_kwargs.loss_type

    def values(self, rollout: Batch) -> Tensor:
        return in_micro_batches(lambda b: values_of(self.model, b), rollout, self.spec.repeater_config.critic_micro_bs)

    def _loss(self, micro: Batch, num_seqs: int, num_tokens: int):
        values = values_of(self.model, micro)
        return ppo.value_loss(
            values, micro["old_values"], micro["returns"], micro["response_mask"], self.spec.train_config.value_clip,
            self.loss_type, num_seqs=num_seqs, num_tokens=num_tokens,
        )

    def train(self, experience: Batch, seed: int) -> dict[str, float]:
        tc = self.spec.train_config
        stats = train_minibatches(self.trainer, experience, self._loss, tc.value_minibatch, tc.critic_micro_bs, tc.ppo_epochs, seed, self.timer)
        return {"value_loss": stats.pop("loss"), **{f"critic_{k}": v for k, v in stats.items()}, "critic_lr": self.trainer.lr}

    def state_dict(self) -> dict:
        return self.trainer.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.trainer.load_state_dict(state)

    def save_pretrained(self, directory: Path, tokenizer) -> None:
        self.model.save_pretrained(directory)
        tokenizer.save_pretrained(directory)
