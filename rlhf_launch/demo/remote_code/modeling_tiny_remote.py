"""The ``tiny_remote`` models: a causal LM, and a reward model that is its own class, as InternLM2's is (a decoder
and a one-output ``v_head``, not a sequence classifier). Built on transformers' Llama modules."""

from __future__ import annotations

import torch
from torch import nn
from transformers import LlamaForCausalLM, LlamaModel, LlamaPreTrainedModel
from transformers.modeling_outputs import SequenceClassifierOutputWithPast

# Relative, as a model's own code must be: transformers copies the files a model file imports this way beside it.
from .configuration_tiny_remote import TinyRemoteConfig


class TinyRemotePreTrainedModel(LlamaPreTrainedModel):
    """The common base of the ``tiny_remote`` models."""

    config_class = TinyRemoteConfig


class TinyRemoteModel(TinyRemotePreTrainedModel, LlamaModel):
    """The decoder alone."""


class TinyRemoteForCausalLM(TinyRemotePreTrainedModel, LlamaForCausalLM):
    """The decoder with its language-model head."""


class TinyRemoteForRewardModel(TinyRemotePreTrainedModel):
    """The decoder with a one-output value head, ``v_head``, read at the last attended token of each sequence."""

    def __init__(self, config: TinyRemoteConfig):
        super().__init__(config)
        self.model = LlamaModel(config)
        self.v_head = nn.Linear(config.hidden_size, 1, bias=False)
        self.post_init()

    def forward(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None, **kwargs
                ) -> SequenceClassifierOutputWithPast:
        """Scores [B, 1] of whole sequences: the head on the hidden state of each row's last attended token."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs).last_hidden_state
        last = attention_mask.shape[1] - 1 - attention_mask.flip(-1).long().argmax(-1)
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        return SequenceClassifierOutputWithPast(logits=self.v_head(hidden[rows, last]))
