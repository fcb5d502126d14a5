"""The actor: the policy being trained, and its generator when the two share ranks."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from rlhf import ppo
from rlhf.core.config import JobSpec
from rlhf.models import PolicyModule, compute_in, load_causal_lm
from rlhf.protocols import Cluster
from rlhf.roles.common import export_pretrained, in_micro_batches, make_trainer, policy_logprobs, train_minibatches, zero3_config
from rlhf.rollout import Batch, SamplingSettings, hf_generate, sequences
from rlhf.timing import Timer


class ActorRole:
    """The actor: trains the policy with PPO's clipped objective, gives the rollout's log-probs, and
    generates when it shares its ranks with the generator."""

    def __init__(self, spec: JobSpec, device: torch.device, sampling: SamplingSettings, timer: Timer, cluster: Cluster):
        cfg = spec.model_configs.actor
        self.spec, self.sampling, self.timer, self.cluster = spec, sampling, timer, cluster
        # Under ZeRO-3 the model is partitioned while it loads: no rank ever holds all of it.
        self.model = load_causal_lm(cfg.model_path, cfg.torch_dtype, device, zero3_config(spec, "actor", cluster),
                                    cfg.attn_implementation)
        self.policy = PolicyModule(self.model)
        self.trainer = make_trainer(spec, "actor", self.policy, cluster, device)
        self.loss_type = cfg.trainer_config.train_kwargs.loss_type

    def generate(self, prompts: Batch, first_row: int, seed_of) -> Batch:
        """Sample responses for this rank's prompts (all parameters gathered under ZeRO-3)."""
        with torch.no_grad(), self.trainer.gathered(), compute_in(self.policy.compute_dtype, self.model.device):
            return hf_generate(self.model, prompts["prompt_ids"], prompts["prompt_mask"], self.sampling,
                               self.spec.inference_micro_batch("generator"), first_row, seed_of, self.trainer.generates_in_lockstep)

    def logprobs(self, rollout: Batch) -> Tensor:
        """Log-probs [B, R] of the rollout's response tokens under the current policy at the sampling
        temperature (the old log-probs of the PPO ratio), without grad, in micro batches."""
        fn = lambda b: policy_logprobs(self.trainer.module, b, self.sampling.temperature)  # noqa: E731
        return in_micro_batches(fn, rollout, self.spec.inference_micro_batch("actor"))

    def _loss(self, micro: Batch, num_seqs: int, num_tokens: int):
        input_ids, attention_mask = sequences(micro)
        logits = self.trainer.module(input_ids, attention_mask, micro["response_ids"].shape[1], self.sampling.temperature)
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
        """PPO epochs of policy updates on this rank's share of ``experience`` (``seed`` orders the
        minibatches); returns policy_loss, entropy, actor_lr and actor_clipfrac, actor_approx_kl,
        actor_grad_norm, averaged over steps and ranks."""
        tc = self.spec.train_config
        stats = train_minibatches(
            self.trainer, experience, self._loss, tc.ppo_minibatch, self.spec.train_micro_batch("actor"), tc.ppo_epochs, seed, self.timer,
            shard=self.cluster.shard_of("actor"), group=self.cluster.group("actor"),
        )
        entropy = stats.pop("entropy")
        return {
            "policy_loss": stats.pop("loss"),
            **{f"actor_{k}": v for k, v in stats.items()},
            "entropy": entropy,
            "actor_lr": self.trainer.lr,
        }

    def save_pretrained(self, directory: Path, tokenizer, is_writer: bool) -> None:
        """The policy as a Hugging Face folder (a collective under ZeRO-3)."""
        export_pretrained(self.trainer, self.model, directory, tokenizer, is_writer)
