"""Loading the four models and the few forward passes PPO needs.

Token alignment, used everywhere: a sequence is a left-padded prompt of P columns followed by
a right-padded response of R columns. Response token t sits at column P + t; its log-prob
and the critic's value V_t both come from the hidden state at column P + t - 1, the prefix
before the action. So every per-token output here is [B, R], column t for response token t.
"""

from __future__ import annotations

import torch
from torch import Tensor
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, PreTrainedModel

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto"}


def quiet_transformers() -> None:
    """Progress bars for loading a few shards only clutter the training log."""
    from transformers.utils import logging

    logging.disable_progress_bar()


def _prepare(model: PreTrainedModel, device: torch.device) -> PreTrainedModel:
    # eval() for good: PPO ratios must compare the same function, so dropout stays off in training too.
    return model.to(device).eval()


def load_causal_lm(path: str, dtype: str, device: torch.device) -> PreTrainedModel:
    model = AutoModelForCausalLM.from_pretrained(path, dtype=_DTYPES[dtype], local_files_only=_is_offline())
    return _prepare(model, device)


def load_value_model(path: str, dtype: str, device: torch.device, pad_token_id: int) -> PreTrainedModel:
    """A sequence-classification model with one output, used per token (critic) or at the end (reward)."""
    model = AutoModelForSequenceClassification.from_pretrained(
        path, num_labels=1, dtype=_DTYPES[dtype], local_files_only=_is_offline()
    )
    model.config.pad_token_id = pad_token_id
    if not isinstance(getattr(model, "score", None), torch.nn.Module):
        raise ValueError(f"{path}: {type(model).__name__} has no 'score' head; expected a decoder sequence-classification model")
    return _prepare(model, device)


def _is_offline() -> bool:
    import os

    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")


def position_ids(attention_mask: Tensor) -> Tensor:
    """Positions that skip left padding, as generate() assigns them."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


class PolicyModule(torch.nn.Module):
    """A causal LM whose forward gives the logits of each response token, [B, R, V], divided by the
    sampling temperature (log-probs must be those of the distribution the tokens came from).
    A module of its own so that DDP and DeepSpeed see the forward that training runs."""

    def __init__(self, model: PreTrainedModel):
        super().__init__()
        self.model = model

    def forward(self, input_ids: Tensor, attention_mask: Tensor, response_len: int, temperature: float = 1.0) -> Tensor:
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids(attention_mask),
            logits_to_keep=response_len + 1,
            use_cache=False,
        )
        logits = out.logits[:, :-1].float()
        return logits / temperature if temperature != 1.0 else logits


class ValueModule(torch.nn.Module):
    """A sequence-classification model used per token: V_t for each response token, [B, R],
    the value head on the prefix before the token."""

    def __init__(self, model: PreTrainedModel):
        super().__init__()
        self.model = model

    def forward(self, input_ids: Tensor, attention_mask: Tensor, response_len: int) -> Tensor:
        hidden = self.model.base_model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids(attention_mask), use_cache=False
        ).last_hidden_state
        return self.model.score(hidden[:, -response_len - 1 : -1]).squeeze(-1).float()


def sequence_scores(model: PreTrainedModel, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """The reward model's score of each whole sequence, [B], read at its last attended token."""
    hidden = model.base_model(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids(attention_mask), use_cache=False
    ).last_hidden_state
    last = attention_mask.shape[1] - 1 - attention_mask.flip(-1).long().argmax(-1)
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    return model.score(hidden[rows, last]).squeeze(-1).float()
