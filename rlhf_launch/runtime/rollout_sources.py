"""Where a PPO step's rollout comes from: one interface, ``RolloutSource``, and the ways a loop gets one.

``PlainRollouts``     sampled at the start of the step, with the weights of the step before
``SampledAhead``      sampled during the step before (rollout_config.max_staleness 1; rlhf_launch/runtime/rollout_ahead.py)
``DynamicSampling``   rounds of generate and score until enough groups are informative
                      (rollout_config.dynamic_sampling; rlhf_launch/runtime/dynamic_sampling.py)

The loop picks one when it is built. All three sample through ``RolloutSampler``: the generator ranks'
prompts, rendered and sharded, answered by the generator, and gathered whole on every process.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor

from rlhf_launch.core.config import JobSpec
from rlhf_launch.runtime.data import PromptMix, render_prompts
from rlhf_launch.runtime.exchange import shard_bounds
from rlhf_launch.runtime.protocols import Cluster, Generator
from rlhf_launch.runtime.rollout import Batch
from rlhf_launch.runtime.rollout_ahead import RolloutAhead
from rlhf_launch.runtime.seed_streams import Stream, step_seed
from rlhf_launch.runtime.timing import Timer, busy

ROLLOUT_KEYS = ["prompt_ids", "prompt_mask", "response_ids", "response_mask", "finished", "gen_logprobs", "prompt_index"]


class RolloutSource(Protocol):
    """A step's rollout, whole on every process (every process calls ``next`` at the same point: it gathers)."""

    returns_scores: bool  # whether ``next`` scores its rollouts too (then the loop does not run the reward's pass)

    def next(self, step: int) -> tuple[Batch, Tensor | None, dict[str, float]]:
        """Step ``step``'s rollout; its reward scores where ``returns_scores``, else None; and its sampling metrics:
        gen_tokens (every response token generated for it) and any of the source's own."""


def generated_tokens(rollout: Batch) -> int:
    """The response tokens of a rollout (its response mask's ones)."""
    return int(rollout["response_mask"].sum())


class RolloutSampler:
    """The generator side of a step: its prompts (``prompts``, None off the generator ranks), rendered with
    ``tokenizer`` and sharded over the generator's replicas, answered by ``generator``, and gathered back whole;
    the sampling is timed in the busy(generator) section of the timer it is given."""

    def __init__(self, spec: JobSpec, cluster: Cluster, prompts: PromptMix | None, tokenizer, generator: Generator | None,
                 device: torch.device, pad_id: int, timer: Timer):
        self.spec, self.cluster, self.prompts, self.tokenizer = spec, cluster, prompts, tokenizer
        self.generator, self.device, self.pad_id, self.timer = generator, device, pad_id, timer

    def rollout(self, step: int, round_: int = 0) -> Batch:
        """Step ``step``'s prompts and sampled responses, whole, on every process; with dynamic sampling,
        those of its round ``round_``."""
        return self.gather(self.sample(step, self.timer, round_))

    def gather(self, local: Batch | None) -> Batch:
        """The generator replica leaders' shards (``sample``), whole, on every process."""
        return self.cluster.gather("generator", local, ROLLOUT_KEYS, pad={"response_ids": self.pad_id})

    def sample(self, step: int, timer: Timer, round_: int = 0) -> Batch | None:
        """This generator replica's shard of step ``step``'s (round ``round_``'s) rollout on its leader, None on
        every other process; the sampling is timed in ``timer``'s busy(generator) section."""
        spec, c = self.spec, self.cluster
        local = None
        if c.runs("generator"):  # every rank of an engine takes part; its replica leader reports
            # n_samples_per_prompt: each drawn prompt as n contiguous rows, one group; every row is seeded by its own
            # global row (below), so the n responses differ and do not depend on how the rows are sharded.
            n = spec.rollout_config.n_samples_per_prompt
            drawn = (self.prompts.indices(step - 1) if round_ == 0
                     else self.prompts.extra_indices(step - 1, round_, spec.rollout_config.dynamic_sampling_max_draws))
            picks = [pick for pick in drawn for _ in range(n)]
            messages = [self.prompts.policy_prompt(source, index) for source, index in picks]
            # The tokenizer carries the policy's chat_template override (load_tokenizer).
            encoded = render_prompts(self.tokenizer, messages, spec.dataset_config.max_seq_len)
            index, parts = c.shard_of("generator")
            start, stop = shard_bounds(len(messages), parts, index)
            prompts = {
                "prompt_ids": encoded["input_ids"][start:stop].to(self.device),
                "prompt_mask": encoded["attention_mask"][start:stop].to(self.device),
            }
            # A further round's rows are seeded past the first round's, so that its responses are new draws.
            first = round_ * len(messages) + start
            with timer(busy("generator")):
                local = self.generator.generate(prompts, first, lambda row: step_seed(spec.run.seed, step, Stream.SAMPLING, row))
            # (source, record) of each row: a role that needs the prompt's messages rebuilds them from its own copy of the data.
            local["prompt_index"] = torch.tensor(picks[start:stop], dtype=torch.long, device=self.device).view(-1, 2)
            local = local if c.is_replica_leader("generator") else None
        return local


class PlainRollouts:
    """Each step's rollout sampled at its start, in the step's generate section."""

    returns_scores = False

    def __init__(self, sampler: RolloutSampler, timer: Timer):
        self.sampler, self.timer = sampler, timer

    def next(self, step: int) -> tuple[Batch, None, dict[str, float]]:
        """Step ``step``'s rollout, sampled now."""
        with self.timer("generate"):
            rollout = self.sampler.rollout(step)
        return rollout, None, {"gen_tokens": generated_tokens(rollout)}


class SampledAhead:
    """Each step's rollout sampled during the step before (``RolloutAhead``); the step's generate section is
    only the wait for it."""

    returns_scores = False

    def __init__(self, ahead: RolloutAhead, timer: Timer):
        self.ahead, self.timer = ahead, timer

    def next(self, step: int) -> tuple[Batch, None, dict[str, float]]:
        """Step ``step``'s rollout, sampled ahead; the sampling of step + 1's starts."""
        with self.timer("generate"):
            rollout = self.ahead.take(step, self.timer)
        return rollout, None, {"gen_tokens": generated_tokens(rollout)}
