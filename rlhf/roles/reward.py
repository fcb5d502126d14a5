"""The reward: a reward model's score of each whole sequence, or a Python function of the texts."""

from __future__ import annotations

import importlib

import torch
from torch import Tensor

from rlhf.core.config import JobSpec
from rlhf.core.problems import InputError
from rlhf.models import load_value_model, sequence_scores
from rlhf.roles.common import in_micro_batches
from rlhf.rollout import Batch, sequences


class RewardFunctionError(InputError, ValueError):
    """A ``reward_function`` that cannot be imported."""


def load_function(path: str):
    """The reward function named 'module:function'; RewardFunctionError naming the spec key when it cannot be imported."""
    module_name, _, name = path.partition(":")
    try:
        return getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError) as exc:
        raise RewardFunctionError(f"model_configs.reward.reward_function: cannot load {path!r}: {exc}") from None


class RewardRole:
    """The reward: scores each whole sequence with a reward model, or with a Python function of the
    decoded prompts and responses."""

    def __init__(self, spec: JobSpec, device: torch.device, tokenizer):
        cfg = spec.model_configs.reward
        self.spec, self.tokenizer = spec, tokenizer
        if cfg.reward_function:
            self.function, self.model = load_function(cfg.reward_function), None
        else:
            self.function = None
            model = load_value_model(cfg.model_path, cfg.torch_dtype, device, tokenizer.pad_token_id, "reward", cfg.head_name,
                                     attn_implementation=cfg.attn_implementation)
            self.model = model.requires_grad_(False)

    def scores(self, rollout: Batch) -> Tensor:
        """Raw scores [B] (clipping and scaling belong to the PPO step)."""
        if self.function is not None:
            return self._function_scores(rollout)
        fn = lambda b: sequence_scores(self.model, *sequences(b))  # noqa: E731
        return in_micro_batches(fn, rollout, self.spec.inference_micro_batch("reward"))

    def _function_scores(self, rollout: Batch) -> Tensor:
        def decode(ids: Tensor, mask: Tensor) -> list[str]:
            return [self.tokenizer.decode(row[m.bool()], skip_special_tokens=True) for row, m in zip(ids, mask, strict=False)]

        prompts = decode(rollout["prompt_ids"], rollout["prompt_mask"])
        responses = decode(rollout["response_ids"], rollout["response_mask"])
        scores = self.function(prompts, responses)
        if len(scores) != len(responses):
            raise ValueError(f"reward function returned {len(scores)} scores for {len(responses)} responses")
        return torch.tensor([float(s) for s in scores])
