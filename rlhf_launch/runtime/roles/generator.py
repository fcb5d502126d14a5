"""A separate Hugging Face generator group: its own copy of the policy, refreshed from the actor
after every update by an in-memory broadcast (rlhf_launch/runtime/weight_sync.py)."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

from rlhf_launch.core.config import JobSpec
from rlhf_launch.runtime.models import load_causal_lm
from rlhf_launch.runtime.rollout import Batch, SamplingSettings, hf_generate
from rlhf_launch.runtime.weight_sync import receive_weights


class HFGeneratorRole:
    """The generator as a separate Hugging Face copy of the policy: samples the responses, and takes
    the actor's new weights after every update."""

    def __init__(self, spec: JobSpec, device: torch.device, sampling: SamplingSettings):
        cfg = spec.model_configs.actor
        self.spec, self.sampling, self.device = spec, sampling, device
        self.model = load_causal_lm(cfg.model_path, cfg.torch_dtype, device, attn_implementation=cfg.attn_implementation,
                                    trust_remote_code=cfg.trust_remote_code, role="actor")
        self.model.requires_grad_(False)

    def generate(self, prompts: Batch, first_row: int, seed_of) -> Batch:
        """One sampled response per prompt, ``rollout_config.actor_micro_bs`` prompts per generate call,
        each call seeded from the global row of its first prompt."""
        return hf_generate(self.model, prompts["prompt_ids"], prompts["prompt_mask"], self.sampling,
                           self.spec.inference_micro_batch("generator"), first_row, seed_of)

    @torch.no_grad()
    def load(self, named: Iterable[tuple[str, Tensor]]) -> None:
        """New weights from the actor in this same process."""
        params = dict(self.model.named_parameters())
        for name, tensor in named:
            params[name].copy_(tensor)

    def receive(self, src: int, group) -> None:
        """New weights broadcast by global rank ``src`` over ``group``, straight into the model's parameters."""
        receive_weights(list(self.model.named_parameters()), src, group, self.device)
