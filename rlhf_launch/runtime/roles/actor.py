"""The actor: the policy being trained, and its generator when the two share ranks."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import Tensor

from rlhf_launch.core import metric_catalogue as mc
from rlhf_launch.core.config import JobSpec
from rlhf_launch.core.plan import optimizer_steps, part_micro_steps, shard_bounds
from rlhf_launch.runtime import ppo
from rlhf_launch.runtime.losses import ActorLossSettings, actor_loss
from rlhf_launch.runtime.models import PolicyModule, compute_in, load_causal_lm
from rlhf_launch.runtime.protocols import Cluster
from rlhf_launch.runtime.roles.common import (
    export_pretrained,
    in_micro_batches,
    lockstep_calls,
    make_trainer,
    policy_logprobs,
    train_minibatches,
    zero3_config,
)
from rlhf_launch.runtime.rollout import Batch, SamplingSettings, hf_generate, select, sequences
from rlhf_launch.runtime.timing import Timer


class ActorRole:
    """The actor: trains the policy with PPO's clipped objective, gives the rollout's log-probs, and
    generates when it shares its ranks with the generator."""

    def __init__(self, spec: JobSpec, device: torch.device, sampling: SamplingSettings, timer: Timer, cluster: Cluster):
        cfg = spec.model_configs.actor
        self.spec, self.sampling, self.timer, self.cluster = spec, sampling, timer, cluster
        # Under ZeRO-3 the model is partitioned while it loads: no rank ever holds all of it.
        self.model = load_causal_lm(cfg.model_path, cfg.torch_dtype, device, zero3_config(spec, "actor", cluster),
                                    cfg.attn_implementation, cfg.trust_remote_code, "actor")
        self.policy = PolicyModule(self.model)
        self.trainer = make_trainer(spec, "actor", self.policy, cluster, device)
        self.loss_settings = ActorLossSettings.from_spec(spec)

    def generate(self, prompts: Batch, first_row: int, seed_of) -> Batch:
        """Sample responses for this rank's prompts (all parameters gathered under ZeRO-3). In lockstep
        (ZeRO-3), a rank with a smaller share of the prompts adds calls on its first prompt, whose
        responses are dropped, until it has made as many generate calls as the largest share needs."""
        micro = self.spec.inference_micro_batch("generator")
        lockstep = self.trainer.generates_in_lockstep
        ids, mask = prompts["prompt_ids"], prompts["prompt_mask"]
        with torch.no_grad(), self.trainer.gathered(), compute_in(self.policy.compute_dtype, self.model.device):
            out = hf_generate(self.model, ids, mask, self.sampling, micro, first_row, seed_of, lockstep)
            extra = (lockstep_calls(self.spec, "generator", self.cluster, self.trainer, micro) or 0) - math.ceil(ids.shape[0] / micro)
            for _ in range(extra):
                hf_generate(self.model, ids[:1], mask[:1], self.sampling, micro, first_row, seed_of, lockstep)
            return out

    def logprobs(self, rollout: Batch) -> Tensor:
        """Log-probs [B, R] of the rollout's response tokens under the current policy at the sampling
        temperature (the old log-probs of the PPO ratio), without grad, in micro batches."""
        fn = lambda b: policy_logprobs(self.trainer.module, b, self.sampling.temperature)  # noqa: E731
        micro = self.spec.inference_micro_batch("actor")
        return in_micro_batches(fn, rollout, micro, lockstep_calls(self.spec, "actor", self.cluster, self.trainer, micro))

    def _loss(self, micro: Batch, num_seqs: int, num_tokens: int):
        input_ids, attention_mask = sequences(micro)
        logits = self.trainer.module(input_ids, attention_mask, micro["response_ids"].shape[1], self.sampling.temperature)
        return actor_loss(self.loss_settings, logits, micro, num_seqs, num_tokens)

    def ptx_loss(self, micro: Batch, num_tokens: int) -> Tensor:
        """The language-model loss (ppo.lm_loss, before the weight) of a micro batch of pretraining text
        (``input_ids``, ``attention_mask`` [b, T], right-padded) as its part of ``num_tokens`` predicted tokens,
        through the trained module (so that DDP sees the forward), at temperature 1: the pretraining
        distribution is the model's own, not the sampling one."""
        width = max(int(micro["attention_mask"].sum(1).max()), 1)  # the micro batch's own padding only
        input_ids, attention_mask = micro["input_ids"][:, :width], micro["attention_mask"][:, :width]
        logits = self.trainer.module(input_ids, attention_mask, width - 1, 1.0)
        return ppo.lm_loss(logits, input_ids, attention_mask, num_tokens)

    def _ptx_update(self, batch: Batch, updates: int, update: int) -> dict[str, float]:
        """Accumulate weight x the LM loss of optimizer step ``update``'s share of the step's pretraining ``batch``.

        The N sequences are cut into ``updates`` contiguous parts (shard_bounds: sizes differ by at most one), each
        part into the actor ranks' shares, and each share into micro batches. Every rank runs, for every part, the
        micro steps of the largest part's largest share (``part_micro_steps``; rlhf_launch.core.plan.ptx_micro_steps for the
        spec's own batch and updates), the missing ones on the batch's first
        row with the loss x 0: DDP's all-reduces and ZeRO-3's gathers pair up, and DeepSpeed sees the same number of
        micro steps before every update. Returns this rank's part of the unweighted LM loss."""
        start, stop = shard_bounds(batch["input_ids"].shape[0], updates, update)
        part = select(batch, slice(start, stop))
        num_tokens = max(ppo.predicted_tokens(part["attention_mask"]), 1)
        index, parts = self.cluster.shard_of("actor")
        lo, hi = shard_bounds(stop - start, parts, index)
        micro_bs = self.spec.train_micro_batch("actor")
        weight = self.spec.train_config.pretrain_loss_weight
        total = 0.0
        for micro_start in range(0, part_micro_steps(batch["input_ids"].shape[0], updates, parts, micro_bs) * micro_bs, micro_bs):
            padding = micro_start >= hi - lo
            rows = slice(lo + micro_start, min(lo + micro_start + micro_bs, hi))
            micro = select(batch, slice(0, 1)) if padding else select(part, rows)
            with self.timer("forward"):
                lm = self.ptx_loss(micro, num_tokens)
            with self.timer("backward"):
                self.trainer.backward(weight * lm * (0.0 if padding else 1.0))
            if not padding:
                total += float(lm.detach())
        return {"ptx_loss": total}

    def train(self, experience: Batch, seed: int, ptx: Batch | None = None) -> dict[str, float]:
        """PPO epochs of policy updates on this rank's share of ``experience`` (``seed`` orders the
        minibatches); returns the actor's metrics of rlhf_launch/core/metric_catalogue.py (policy_loss, entropy,
        actor_lr and actor_<statistic> of ``actor_loss`` and the trainer: clipfrac, approx_kl, grad_norm and, with
        kl_in loss, kl_loss), averaged over steps and ranks.

        ``ptx``: the step's whole pretraining batch (PPO-ptx, train_config.pretrain_loss_weight > 0), spread evenly
        over the optimizer steps; each adds pretrain_loss_weight x the LM loss of its part (``_ptx_update``), and
        actor_ptx_loss reports the unweighted LM loss averaged over the optimizer steps."""
        tc = self.spec.train_config
        before_update = None
        if ptx is not None:
            ptx = {key: value.to(self.model.device) for key, value in ptx.items()}
            updates = optimizer_steps(self.spec, "actor")
            before_update = lambda update: self._ptx_update(ptx, updates, update)  # noqa: E731
        stats = train_minibatches(
            self.trainer, experience, self._loss, tc.ppo_minibatch, self.spec.train_micro_batch("actor"), tc.ppo_epochs, seed, self.timer,
            shard=self.cluster.shard_of("actor"), group=self.cluster.group("actor"), before_update=before_update,
        )
        entropy = stats.pop("entropy")
        return {
            mc.POLICY_LOSS: stats.pop("loss"),
            **{f"actor_{k}": v for k, v in stats.items()},  # actor_clipfrac, actor_approx_kl, actor_kl_loss, actor_grad_norm, ...
            mc.ENTROPY: entropy,
            mc.ACTOR_LR: self.trainer.lr,
        }

    def save_pretrained(self, directory: Path, tokenizer, is_writer: bool) -> None:
        """The policy as a Hugging Face folder (a collective under ZeRO-3)."""
        export_pretrained(self.trainer, self.model, directory, tokenizer, is_writer)
