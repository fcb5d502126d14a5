"""DAPO's dynamic sampling (Yu et al. 2025, arXiv:2503.14476; rollout_config.dynamic_sampling): rounds of generate
and reward until the step's batch holds enough groups whose responses' scores differ.

A group whose responses all score the same has advantage 0 everywhere under a group estimator: it teaches
nothing. Round 0 draws the step's usual prompts, round r >= 1 ``PromptMix.extra_indices(step, r)``, seeded as
global rows r x rollout size + row: all a pure function of (seed, step), so a resumed run draws what the
uninterrupted one drew.
"""

from __future__ import annotations

import itertools

import torch
from torch import Tensor

from rlhf_launch.core import metric_catalogue as mc
from rlhf_launch.core.config import JobSpec
from rlhf_launch.runtime import ppo
from rlhf_launch.runtime.padding import pad_and_concat
from rlhf_launch.runtime.rollout import Batch
from rlhf_launch.runtime.rollout_sources import RolloutSampler, generated_tokens
from rlhf_launch.runtime.scoring_exchange import Scorer
from rlhf_launch.runtime.timing import Timer


def select_groups(informative: list[list[bool]], wanted: int) -> tuple[list[tuple[int, int]], int]:
    """The (round, group) pairs of a dynamic-sampling batch of ``wanted`` groups, and how many of them were
    dropped ones, from each round's ``informative`` flags per group.

    The informative groups in the order they were generated (round, then group), the first ``wanted`` of them;
    when there are fewer, the batch is topped up with dropped groups in the same order (deterministic, and the
    earliest: a resumed run picks the same)."""
    order = [(r, g) for r, flags in enumerate(informative) for g in range(len(flags))]
    kept = [(r, g) for r, g in order if informative[r][g]][:wanted]
    topped_up = [(r, g) for r, g in order if not informative[r][g]][: wanted - len(kept)]
    return kept + topped_up, len(topped_up)


def concat_rows(batches: list[Batch], rows: list[tuple[int, int]], pad_id: int) -> Batch:
    """The rows ``(batch index, row)`` of rollouts of different widths as one rollout: prompts left-padded and
    responses right-padded (pad_id, mask 0) to the widest; positions follow the masks, so no row's numbers change."""
    # (value, on the left) per key; the other keys have one width in every round
    padding = {"prompt_ids": (pad_id, True), "prompt_mask": (0, True), "response_ids": (pad_id, False),
               "response_mask": (0, False), "gen_logprobs": (0.0, False)}
    starts = list(itertools.accumulate((len(b["prompt_ids"]) for b in batches), initial=0))
    out = {}
    for key in batches[0]:
        value, left = padding.get(key, (0, False))
        whole = pad_and_concat([b[key] for b in batches], value, left=left)
        out[key] = whole[torch.tensor([starts[i] + row for i, row in rows], dtype=torch.long, device=whole.device)]
    return out


class DynamicSampling:
    """The rollout source of dynamic sampling (rlhf_launch/runtime/rollout_sources.py): each step's rollout is
    chosen from rounds that ``sampler`` generates and ``scorer`` scores with the reward, each round timed in the
    step's generate and score sections."""

    returns_scores = True

    def __init__(self, spec: JobSpec, sampler: RolloutSampler, scorer: Scorer, timer: Timer):
        self.spec, self.sampler, self.scorer, self.timer = spec, sampler, scorer, timer

    def next(self, step: int) -> tuple[Batch, Tensor, dict[str, float]]:
        """Rounds of generate + reward until the batch holds num_samples_each_epoch informative groups
        (``ppo.informative_groups`` of the clipped scores, the scores the advantages see) or dynamic_sampling_max_draws
        rounds are done; ``select_groups`` picks the batch.

        Every process has each round's whole rollout and scores (gathered), so all make the same choices and
        run the same rounds. Returns the batch, its scores and the metrics filtered_frac (share of the groups
        generated that were dropped), sampling_rounds and dynamic_topped_up (dropped groups put back to fill
        the batch), reward_generated_mean (raw scores of every round's responses, kept or not) with gen_tokens
        (every round's response tokens)."""
        spec, timer = self.spec, self.timer
        ro = spec.rollout_config
        n, wanted = ro.n_samples_per_prompt, spec.dataset_config.num_samples_each_epoch
        rounds: list[tuple[Batch, Tensor]] = []
        flags: list[list[bool]] = []
        for round_ in range(ro.dynamic_sampling_max_draws):
            with timer("generate"):
                rollout = self.sampler.rollout(step, round_)
            with timer("score"):
                scores = self.scorer.score(["reward"], rollout)["scores"]
            rounds.append((rollout, scores))
            flags.append(ppo.informative_groups(scores.clamp(ro.clip_reward_min, ro.clip_reward_max), n).tolist())
            if sum(map(sum, flags)) >= wanted:
                break
        chosen, topped_up = select_groups(flags, wanted)
        rows = [(r, g * n + i) for r, g in chosen for i in range(n)]
        batch = concat_rows([rollout for rollout, _ in rounds], rows, self.sampler.pad_id)
        scores = torch.stack([rounds[r][1][row] for r, row in rows])
        generated = sum(len(f) for f in flags)
        return batch, scores, {
            mc.FILTERED_FRAC: 1.0 - sum(map(sum, flags)) / generated,
            mc.REWARD_GENERATED_MEAN: float(torch.cat([round_scores for _, round_scores in rounds]).mean()),
            mc.SAMPLING_ROUNDS: float(len(rounds)),
            mc.DYNAMIC_TOPPED_UP: float(topped_up),
            "gen_tokens": sum(generated_tokens(rollout) for rollout, _ in rounds),
        }
