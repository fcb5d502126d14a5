"""The actor: the policy being trained, and its generator when the two share ranks."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from rlhf import ppo
from rlhf.config import JobSpec
from rlhf.engine import TorchTrainer
from rlhf.models import load_causal_lm, response_logits
from rlhf.roles.common import in_micro_batches, train_minibatches
from rlhf.rollout import Batch, SamplingSettings, hf_generate, sequences
from rlhf.timing import Timer


def policy_logprobs(model, batch: Batch, temperature: float) -> Tensor:
    input_ids, attention_mask = sequences(batch)
    logits = response_logits(model, input_ids, attention_mask, batch["response_ids"].shape[1], temperature)
    return ppo.logprobs_from_logits(logits, batch["response_ids"])


class ActorRole:
    def __init__(self, spec: JobSpec, device: torch.device, sampling: SamplingSettings, timer: Timer):
        cfg = spec.model_configs.actor
        self.spec, self.sampling, self.timer = spec, sampling, timer
        self.model = load_causal_lm(cfg.model_path, cfg.torch_dtype, device)
        self.trainer = TorchTrainer(self.model, cfg.trainer_config.train_kwargs)
        self.loss_type = cfg.trainer_config.train_kwargs.loss_type

    def generate(self, prompts: Batch) -> Batch:
        return hf_generate(self.model, prompts["prompt_ids"], prompts["prompt_mask"], self.sampling, self.spec.rollout_config.actor_micro_bs)

    def logprobs(self, rollout: Batch) -> Tensor:
        fn = lambda b: policy_logprobs(self.model, b, self.sampling.temperature)  # noqa: E731
        return in_micro_batches(fn, rollout, self.spec.repeater_config.actor_micro_bs)

    def _loss(self, micro: Batch, num_seqs: int, num_tokens: int):
        input_ids, attention_mask = sequences(micro)
        logits = response_logits(self.model, input_ids, attention_mask, micro["response_ids"].shape[1], self.sampling.temperature)
        logprobs = ppo.logprobs_from_logits(logits, micro["response_ids"])
        mask = micro["response_mask"]
        loss, stats = ppo.policy_loss(
            logprobs, micro["old_logprobs"], micro["advantages"], mask, self.spec.train_config.policy_clip,
            self.loss_type, num_seqs=num_seqs, num_tokens=num_tokens,
        )
        with torch.no_grad():
            stats["entropy"] = ppo.masked_mean(ppo.entropy_from_logits(logits), mask)
        return loss, stats

    def train(self, experience: Batch, seed: int) -> dict[str, float]:
        tc = self.spec.train_config
        stats = train_minibatches(self.trainer, experience, self._loss, tc.ppo_minibatch, tc.actor_micro_bs, tc.ppo_epochs, seed, self.timer)
        return {"policy_loss": stats.pop("loss"), **{f"actor_{k}": v for k, v in stats.items() if k != "entropy"}, "entropy": stats["entropy"], "actor_lr": self.trainer.lr}

    def state_dict(self) -> dict:
        return self.trainer.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.trainer.load_state_dict(state)

    def save_pretrained(self, directory: Path, tokenizer) -> None:
        self.model.save_pretrained(directory)
        tokenizer.save_pretrained(directory)
