"""The reward: a reward model's score of each whole sequence, or a Python function of the texts.

A reward model reads the policy's own token ids (prompt and response side by side), unless it must
read something else: a tokenizer of its own (``model_configs.reward.tokenizer_config`` that loads a
different tokenizer) or a ``[REWARD_META]`` system prompt. Those rows are re-rendered: the prompt's
messages rebuilt from the data (the rollout's ``prompt_index``), the response decoded with the
policy's tokenizer, and the conversation encoded with the reward model's tokenizer and chat template.
A reward function is loaded, given its record fields and checked by rlhf_launch/runtime/reward_function.py.
"""

from __future__ import annotations

import torch
from torch import Tensor

from rlhf_launch.core.config import JobSpec
from rlhf_launch.core.data_sources import parse_source
from rlhf_launch.core.model_tokenizers import policy_tokenizer_config, same_settings, tokenizer_config_of, tokenizer_key
from rlhf_launch.runtime.data import PromptMix, encode_conversation, equivalent_tokenizers, load_tokenizer
from rlhf_launch.runtime.models import load_frozen, sequence_scores
from rlhf_launch.runtime.reward_function import accepted_fields, call_function, field_lists, load_function
from rlhf_launch.runtime.rollout import Batch, sequences
from rlhf_launch.runtime.rollout_log import decode_rows


class RewardRole:
    """The reward: scores each whole sequence with a reward model, or with a Python function of the
    decoded prompts and responses."""

    def __init__(self, spec: JobSpec, device: torch.device, tokenizer):
        cfg = spec.model_configs.reward
        self.spec, self.tokenizer = spec, tokenizer
        if cfg.reward_function:
            self.function, self.model = load_function(cfg.reward_function), None
            self.accepts = accepted_fields(self.function)
            # The record fields come from this role's own copy of the data, loaded only for a function that takes them.
            self.records = PromptMix(spec.dataset_config) if self.accepts != frozenset() else None
        else:
            self.function = None
            self.inputs = RewardInputs(spec, tokenizer)
            tokenizer = self.inputs.tokenizer  # the reward model pads with its own tokenizer's id
            self.model, self.inference = load_frozen(spec, "reward", device, tokenizer.pad_token_id)

    def scores(self, rollout: Batch) -> Tensor:
        """Raw scores [B] (clipping and scaling belong to the PPO step)."""
        if self.function is not None:
            return self._function_scores(rollout)
        encode = sequences if self.inputs.direct else self.inputs.encode
        fn = lambda b: sequence_scores(self.model, *encode(b))  # noqa: E731
        return self.inference.in_micro_batches(fn, rollout, self.spec.inference_micro_batch("reward"))

    def _function_scores(self, rollout: Batch) -> Tensor:
        prompts = decode_rows(self.tokenizer, rollout["prompt_ids"], rollout["prompt_mask"])
        responses = decode_rows(self.tokenizer, rollout["response_ids"], rollout["response_mask"])
        scores = call_function(self.function, self.spec.model_configs.reward.reward_function, prompts, responses, self._fields(rollout))
        return torch.tensor([float(s) for s in scores])

    def _fields(self, rollout: Batch) -> dict[str, list]:
        """The record fields the function accepts, each a list aligned with the rows (None where a row's record lacks it)."""
        if self.records is None:
            return {}
        if "prompt_index" not in rollout:
            raise ValueError("the rollout has no prompt_index: the reward function's record fields need each row's source record")
        rows = [self.records.record_fields(source, index) for source, index in rollout["prompt_index"].tolist()]
        return field_lists(self.accepts, rows)


class RewardInputs:
    """What the reward model reads for each rollout row: the policy's token ids as they are (``direct``),
    or the conversation re-rendered for it (``encode``).

    Re-rendered rows are the prompt as ``PromptMix.reward_prompt`` gives it (its source's
    ``[REWARD_META]`` system prompt, else the policy's), then the decoded response as the assistant
    turn, through the reward tokenizer's chat template; a row longer than ``max_seq_len +
    max_new_tokens`` keeps its last tokens, where the score is read. Rows of sources without
    ``[REWARD_META]`` keep the policy's ids while the two tokenizers are the same.
    """

    def __init__(self, spec: JobSpec, policy_tokenizer):
        settings = tokenizer_config_of(spec, "reward")
        self.policy_tokenizer = policy_tokenizer
        self.tokenizer = policy_tokenizer
        if not same_settings(settings, policy_tokenizer_config(spec)):
            own = load_tokenizer(settings, spec.model_configs.reward.model_path, tokenizer_key(spec, "reward"))
            self.tokenizer = policy_tokenizer if equivalent_tokenizers(own, policy_tokenizer) else own
        self.re_encodes = self.tokenizer is not policy_tokenizer
        reward_meta = any(parse_source(entry).reward_meta for entry in spec.dataset_config.ppo_datas)
        # Only then is the data loaded on this rank: the direct path needs no messages.
        self.prompts = PromptMix(spec.dataset_config) if self.re_encodes or reward_meta else None
        self.max_len = spec.dataset_config.max_seq_len + spec.rollout_config.max_new_tokens

    @property
    def direct(self) -> bool:
        """True when every row is scored on the policy's token ids, as they are."""
        return self.prompts is None

    def encode(self, rollout: Batch) -> tuple[Tensor, Tensor]:
        """(input_ids, attention_mask) [B, T] of the rows as the reward model reads them, left-padded
        with the reward tokenizer's padding token, on the rollout's device."""
        if "prompt_index" not in rollout:
            raise ValueError("the rollout has no prompt_index: re-rendering the reward model's input needs each row's source record")
        responses = decode_rows(self.policy_tokenizer, rollout["response_ids"], rollout["response_mask"])
        picks = rollout["prompt_index"].tolist()
        rows = [self._row(rollout, i, source, index, responses[i]) for i, (source, index) in enumerate(picks)]
        return _left_padded(rows, self.tokenizer.pad_token_id, rollout["prompt_ids"].device)

    def _row(self, rollout: Batch, i: int, source: int, index: int, response: str) -> list[int]:
        if not self.re_encodes and self.prompts.reward_meta[source] is None:
            ids = torch.cat([rollout["prompt_ids"][i][rollout["prompt_mask"][i].bool()],
                             rollout["response_ids"][i][rollout["response_mask"][i].bool()]])
            return ids.tolist()
        messages = [*self.prompts.reward_prompt(source, index), {"role": "assistant", "content": response}]
        return encode_conversation(self.tokenizer, messages)[-self.max_len:]


def _left_padded(rows: list[list[int]], pad_id: int, device: torch.device) -> tuple[Tensor, Tensor]:
    width = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, width - len(row):] = torch.tensor(row, dtype=torch.long)
        attention_mask[i, width - len(row):] = 1
    return input_ids.to(device), attention_mask.to(device)
