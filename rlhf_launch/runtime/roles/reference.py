"""The reference: the frozen initial policy whose log-probs anchor the KL penalty."""

from __future__ import annotations

import torch
from torch import Tensor

from rlhf_launch.core.config import JobSpec
from rlhf_launch.runtime.models import PolicyModule, load_frozen
from rlhf_launch.runtime.roles.common import policy_logprobs
from rlhf_launch.runtime.rollout import Batch


class ReferenceRole:
    """The reference: scores the rollout's responses under the frozen initial policy, for the KL penalty.
    With data.mode deepspeed its weights are sharded over its ranks by ZeRO-3 (``rlhf_launch.runtime.models.load_frozen``)."""

    def __init__(self, spec: JobSpec, device: torch.device, temperature: float):
        self.spec, self.temperature = spec, temperature
        model, self.inference = load_frozen(spec, "reference", device)
        self.policy = PolicyModule(model)

    def logprobs(self, rollout: Batch) -> Tensor:
        """Log-probs [B, R] of the rollout's response tokens under the frozen policy at the sampling temperature
        (under ZeRO-3 every rank of the role runs as many forwards as the busiest one)."""
        fn = lambda b: policy_logprobs(self.policy, b, self.temperature)  # noqa: E731
        return self.inference.in_micro_batches(fn, rollout, self.spec.inference_micro_batch("reference"))
