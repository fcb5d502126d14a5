"""Generating responses and laying a rollout out as tensors.

A rollout batch is a dict of tensors (no Python objects), so that it can move between role
processes unchanged:
  prompt_ids [B, P]      left-padded prompts      prompt_mask [B, P]
  response_ids [B, R]    right-padded responses   response_mask [B, R]  1 up to and including the
                                                                        first stop token
  finished [B]           whether the response ended with a stop token
  gen_logprobs [B, R]    the generator's log-prob of each response token it sampled (its behaviour policy:
                         rlhf_launch.runtime.ppo.truncated_is_weights), 0 off the mask: log softmax(logits / temperature),
                         the definition of the actor's old log-probs, so that the two differ only by
                         weights (an asynchronous rollout) and numerics (another engine), not by top-k,
                         top-p or min_new_tokens, which neither side's log-probs see
  prompt_index [B, 2]    (source, record) of the prompt in dataset_config.ppo_datas (added by the
                         PPO loop): a role that needs the prompt's messages (a reward model with a
                         tokenizer or system prompt of its own) rebuilds them from its copy of the data
A response that reaches max_new_tokens without a stop token keeps all its tokens in the mask:
it is scored like any other and its last token is treated as terminal (no bootstrapped value).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList, MinNewTokensLengthLogitsProcessor, PreTrainedModel

from rlhf_launch.core.config import JobSpec
from rlhf_launch.runtime.padding import pad_and_concat

Batch = dict[str, Tensor]


@dataclass(frozen=True)
class SamplingSettings:
    """How responses are sampled, resolved from the spec: generate_kwargs, max_new_tokens, the stop
    tokens (end-of-sequence, then answer_end_id) and the padding token."""

    do_sample: bool
    temperature: float
    top_k: int
    top_p: float
    min_new_tokens: int
    max_new_tokens: int
    stop_ids: tuple[int, ...]
    pad_id: int

    @staticmethod
    def from_spec(spec: JobSpec, eos_id: int, pad_id: int) -> SamplingSettings:
        """Settings from the spec; the tokenizer's ``eos_id`` and ``pad_id`` fill what generate_kwargs leaves unset."""
        gk = spec.rollout_config.generate_kwargs
        eos = gk.eos_token_id if gk.eos_token_id is not None else eos_id
        stops = [eos] + [spec.repeater_config.answer_end_id] * (spec.repeater_config.answer_end_id not in (None, eos))
        return SamplingSettings(
            do_sample=gk.do_sample,
            temperature=gk.temperature,
            top_k=gk.top_k,
            top_p=gk.top_p,
            min_new_tokens=gk.min_new_tokens,
            max_new_tokens=spec.rollout_config.max_new_tokens,
            stop_ids=tuple(stops),
            pad_id=gk.pad_token_id if gk.pad_token_id is not None else pad_id,
        )

    def generation_config(self) -> GenerationConfig:
        """A Hugging Face GenerationConfig of these settings (greedy: temperature 1, no top-k or top-p)."""
        # Every sampling knob set explicitly: generate() fills unset ones from the checkpoint's own
        # generation_config.json and then from library defaults (top_k 50), which would change the policy.
        if self.do_sample:
            sampling = dict(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p)
        else:
            sampling = dict(temperature=1.0, top_k=0, top_p=1.0)
        return GenerationConfig(
            do_sample=self.do_sample,
            num_beams=1,
            max_new_tokens=self.max_new_tokens,
            min_new_tokens=self.min_new_tokens,
            eos_token_id=list(self.stop_ids),
            pad_token_id=self.pad_id,
            repetition_penalty=1.0,
            no_repeat_ngram_size=0,
            **sampling,
        )


def response_mask(response_ids: Tensor, stop_ids: tuple[int, ...]) -> Tensor:
    """1 on each response token up to and including its first stop token."""
    is_stop = torch.zeros_like(response_ids, dtype=torch.bool)
    for stop in stop_ids:
        is_stop |= response_ids == stop
    stops_before = is_stop.long().cumsum(-1) - is_stop.long()  # stop tokens strictly before t
    return (stops_before == 0).long()


class BehaviourLogprobs(LogitsProcessor):
    """Records, during one Hugging Face ``generate`` call, log softmax(logits / temperature) of every token
    it samples: the behaviour log-probs of the rollout.

    A processor given to ``generate`` runs after generate's own processors and before its temperature, top-k
    and top-p warpers; ``hf_generate`` leaves min_new_tokens out of the generation config and adds its processor
    after this one, so this one sees the model's own logits. The token a step samples is known only at the next
    call (the last one at ``finish``), so one step's log-probs [b, V] are kept until then, never the history."""

    def __init__(self, temperature: float):
        self.temperature = temperature
        self.last: Tensor | None = None
        self.picked: list[Tensor] = []

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        if self.last is not None:
            self.picked.append(self.last.gather(1, input_ids[:, -1:]))
        self.last = torch.log_softmax(scores.float() / self.temperature, dim=-1)
        return scores

    def finish(self, responses: Tensor) -> Tensor:
        """[b, r] log-probs of the ``responses`` (the generated tokens, [b, r]) of this call."""
        if self.last is not None and len(self.picked) < responses.shape[1]:
            self.picked.append(self.last.gather(1, responses[:, len(self.picked) : len(self.picked) + 1]))
        self.last = None
        out = torch.cat(self.picked, dim=1) if self.picked else responses.new_zeros(responses.shape, dtype=torch.float32)
        return out[:, : responses.shape[1]]


@torch.no_grad()
def hf_generate(
    model: PreTrainedModel,
    prompt_ids: Tensor,
    prompt_mask: Tensor,
    settings: SamplingSettings,
    micro_bs: int,
    first_row: int = 0,
    seed_of: Callable[[int], int] | None = None,
    lockstep: bool = False,
) -> Batch:
    """Sample one response per prompt with Hugging Face generate, ``micro_bs`` prompts at a time.

    With ``seed_of``, the sampler is seeded from the global row of each chunk's first prompt
    (``first_row`` is this shard's), so responses do not depend on how the batch is sharded.
    ``lockstep``: every rank of the default group runs forward passes until all are done
    (``synced_gpus``). A ZeRO-3 model needs it: its parameter hooks communicate on every
    forward, so a rank whose responses all stopped early must not leave while others go on.
    The rollout carries the behaviour log-probs of the sampled tokens (``BehaviourLogprobs``).
    """
    config = settings.generation_config()
    # min_new_tokens is applied by a processor after BehaviourLogprobs, which must see the logits unbanned. None, not 0:
    # generate turns any set min_new_tokens into min_length = prompt + min_new_tokens and adds a MinLengthLogitsProcessor
    # (a no-op here that clones the logits every step); TRL's PPO leaves it unset too.
    config.min_new_tokens = None
    chunks, logprob_chunks = [], []
    for start in range(0, prompt_ids.shape[0], micro_bs):
        if seed_of is not None:
            torch.manual_seed(seed_of(first_row + start))
        ids, mask = prompt_ids[start : start + micro_bs], prompt_mask[start : start + micro_bs]
        behaviour = BehaviourLogprobs(settings.temperature)
        processors = LogitsProcessorList([behaviour])
        if settings.min_new_tokens:
            processors.append(MinNewTokensLengthLogitsProcessor(ids.shape[1], settings.min_new_tokens, list(settings.stop_ids), ids.device))
        out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config, synced_gpus=lockstep,
                             logits_processor=processors)
        chunks.append(out[:, ids.shape[1] :])
        logprob_chunks.append(behaviour.finish(chunks[-1]))
    return rollout_batch(prompt_ids, prompt_mask, chunks, settings, logprob_chunks)


def rollout_batch(
    prompt_ids: Tensor, prompt_mask: Tensor, chunks: list[Tensor], settings: SamplingSettings, logprob_chunks: list[Tensor] | None = None,
) -> Batch:
    """A rollout from generated tokens (``chunks``: [b, r] blocks of rows in prompt order, any
    widths): padded right, masked after each first stop token, with ``finished`` set; with
    ``logprob_chunks`` (the same shapes, float) also ``gen_logprobs``, 0 off the mask."""
    responses = pad_and_concat(chunks, settings.pad_id).to(prompt_ids.device)
    mask = response_mask(responses, settings.stop_ids)
    responses = responses.masked_fill(mask == 0, settings.pad_id)
    finished = torch.isin(responses, torch.tensor(settings.stop_ids, device=responses.device)).any(1)
    batch = {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "response_ids": responses, "response_mask": mask, "finished": finished}
    if logprob_chunks is not None:
        logprobs = pad_and_concat([c.float() for c in logprob_chunks], width=responses.shape[1]).to(prompt_ids.device)
        batch["gen_logprobs"] = logprobs.masked_fill(mask == 0, 0.0)
    return batch


def sequences(batch: Batch) -> tuple[Tensor, Tensor]:
    """Prompt and response side by side: (input_ids [B, P+R], attention_mask [B, P+R])."""
    input_ids = torch.cat([batch["prompt_ids"], batch["response_ids"]], dim=1)
    attention_mask = torch.cat([batch["prompt_mask"], batch["response_mask"]], dim=1)
    return input_ids, attention_mask


def select(batch: Batch, index: Tensor | slice) -> Batch:
    """The rows ``index`` (a slice or index tensor) of every tensor in ``batch``."""
    return {k: v[index] for k, v in batch.items()}
