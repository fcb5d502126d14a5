"""The reference: the frozen initial policy whose log-probs anchor the KL penalty."""

from __future__ import annotations

import torch
from torch import Tensor

from rlhf.core.config import JobSpec
from rlhf.models import PolicyModule, load_causal_lm
from rlhf.roles.common import in_micro_batches, policy_logprobs
from rlhf.rollout import Batch


class ReferenceRole:
    """The reference: scores the rollout's responses under the frozen initial policy, for the KL penalty."""

    def __init__(self, spec: JobSpec, device: torch.device, temperature: float):
        cfg = spec.model_configs.reference
        self.spec, self.temperature = spec, temperature
        self.policy = PolicyModule(load_causal_lm(cfg.model_path, cfg.torch_dtype, device,
                                                  attn_implementation=cfg.attn_implementation).requires_grad_(False))

    def logprobs(self, rollout: Batch) -> Tensor:
        """Log-probs [B, R] of the rollout's response tokens under the frozen policy at the sampling temperature."""
        fn = lambda b: policy_logprobs(self.policy, b, self.temperature)  # noqa: E731
        return in_micro_batches(fn, rollout, self.spec.inference_micro_batch("reference"))
