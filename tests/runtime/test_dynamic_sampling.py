"""DAPO's dynamic sampling: the group selection, a tiny-model step, the spec checks, and exact resumes."""

from __future__ import annotations

import random

import pytest
import torch

from tests.factory import make_spec


def _plain_selection(informative: list[list[bool]], wanted: int) -> tuple[list[tuple[int, int]], int]:
    """select_groups written as one pass with counters: informative groups first, then dropped ones, in order."""
    kept, dropped = [], []
    for r in range(len(informative)):
        for g in range(len(informative[r])):
            if informative[r][g] and len(kept) < wanted:
                kept.append((r, g))
            elif not informative[r][g]:
                dropped.append((r, g))
    topped_up = dropped[: wanted - len(kept)]
    return kept + topped_up, len(topped_up)


def test_select_groups_matches_a_plain_loop():
    from rlhf_launch.runtime.dynamic_sampling import select_groups

    rng = random.Random(0)
    for _ in range(300):
        rounds, groups, wanted = rng.randint(1, 4), rng.randint(1, 6), rng.randint(1, 6)
        flags = [[rng.random() < 0.5 for _ in range(groups)] for _ in range(rounds)]
        assert select_groups(flags, wanted) == _plain_selection(flags, wanted)
    # Enough informative groups: no dropped group is used; too few: the earliest dropped ones fill the batch.
    assert select_groups([[False, True], [True, True]], 3) == ([(0, 1), (1, 0), (1, 1)], 0)
    assert select_groups([[False, True], [False, False]], 3) == ([(0, 1), (0, 0), (1, 0)], 2)


def test_extra_rounds_are_a_pure_function_of_seed_step_and_round(tiny_models):
    from rlhf_launch.runtime.data import PromptMix

    spec = make_spec()
    a, b = PromptMix(spec.dataset_config), PromptMix(spec.dataset_config)
    order = [(2, 1), (0, 3), (2, 2), (5, 1), (0, 1)]
    first = {(step, r): a.extra_indices(step, r, 4) for step, r in order}
    for step, r in reversed(order):  # another order of calls (a resumed run) draws the same
        assert b.extra_indices(step, r, 4) == first[(step, r)]
    assert a.extra_indices(0, 1, 4) != a.extra_indices(0, 2, 4)
    assert a.indices(3) == PromptMix(spec.dataset_config).indices(3)  # the steps' own stream is unchanged
    with pytest.raises(ValueError):
        a.extra_indices(0, 4, 4)


def test_dynamic_sampling_spec_checks():
    from rlhf_launch.core.problems import SpecError
    from tests.factory import load

    with pytest.raises(SpecError) as info:
        load({"rollout_config.dynamic_sampling": True})
    (problem,) = [p for p in info.value.problems if p.path == "rollout_config.dynamic_sampling"]
    assert "advantage_estimator gae" in problem.message and "grpo" in problem.message
    n_paths = [p.path for p in info.value.problems if p.path == "rollout_config.n_samples_per_prompt"]
    assert n_paths == ["rollout_config.n_samples_per_prompt"]
    load({"rollout_config.dynamic_sampling": True, "repeater_config.advantage_estimator": "grpo",
          "rollout_config.n_samples_per_prompt": 2})


def _overrides(source, **extra):
    from tests.factory import reward_function

    return {**reward_function("tests.reward_probe:even_questions_constant"), "dataset_config.ppo_datas": [f"{source}::1.0"],
            "dataset_config.num_samples_each_epoch": 8, "rollout_config.n_samples_per_prompt": 4,
            "rollout_config.max_new_tokens": 8, "rollout_config.dynamic_sampling": True,
            "rollout_config.dynamic_sampling_max_draws": 3, "repeater_config.advantage_estimator": "grpo",
            "train_config.ppo_epochs": 1, **extra}


def test_dynamic_rollout_keeps_only_informative_groups(tiny_models, tmp_path):
    """A quarter of the questions (multiples of 4) get one constant reward: they are dropped, further rounds draw
    new prompts, and the batch holds informative groups only; with one round, it is topped up with dropped ones."""
    from rlhf_launch.runtime import ppo
    from rlhf_launch.runtime.loop import PPOLoop
    from tests import reward_probe

    source = reward_probe.question_records(tmp_path / "questions.jsonl")
    loop = PPOLoop(make_spec(_overrides(source)), tmp_path / "run")
    reward_probe.CALLS.clear()
    batch, scores, metrics = loop.rollout_source.next(1)
    every_score = [s for call in reward_probe.CALLS for s in call["scores"]]  # each round's responses, kept or not
    assert len(every_score) == 32 * metrics["sampling_rounds"]
    assert metrics["reward_generated_mean"] == pytest.approx(sum(every_score) / len(every_score), abs=1e-6)
    assert metrics["reward_generated_mean"] != pytest.approx(float(scores.mean()), abs=1e-3)  # the dropped groups count
    assert batch["response_ids"].shape[0] == 32 and scores.shape == (32,)
    assert metrics["filtered_frac"] > 0 and metrics["sampling_rounds"] >= 2 and metrics["dynamic_topped_up"] == 0
    assert bool(ppo.informative_groups(scores, 4).all())
    indices = batch["prompt_index"][:, 1].view(8, 4)
    assert bool((indices == indices[:, :1]).all())  # each group's rows share their prompt
    assert all(int(i) % 4 for i in indices[:, 0])  # no constant question was kept
    again, again_scores, _ = PPOLoop(make_spec(_overrides(source)), tmp_path / "run2").rollout_source.next(1)
    assert torch.equal(again["response_ids"], batch["response_ids"]) and torch.equal(again_scores, scores)

    one = PPOLoop(make_spec(_overrides(source, **{"rollout_config.dynamic_sampling_max_draws": 1})), tmp_path / "run3")
    batch, scores, metrics = one.rollout_source.next(1)
    assert metrics["sampling_rounds"] == 1 and metrics["dynamic_topped_up"] == 8 * metrics["filtered_frac"] > 0
    assert int((~ppo.informative_groups(scores, 4)).sum()) == metrics["dynamic_topped_up"]
    assert metrics["reward_generated_mean"] == pytest.approx(float(scores.mean()), abs=1e-6)  # one round, all of it kept


@pytest.mark.slow
def test_dynamic_sampling_resumed_and_distributed_runs_equal_one_uninterrupted_process(tiny_models, tmp_path):
    """Extra rounds draw from (seed, step, round) alone: a run resumed after step 2 equals the uninterrupted one,
    and two actor ranks (each generating its 16 rows of a round in one call) match one process to 1e-5."""
    from tests import reward_probe
    from tests.factory import check_resume_and_ranks

    source = reward_probe.question_records(tmp_path / "questions.jsonl")
    single = _overrides(source, **{"train_config.save_interval": 1, "rollout_config.actor_micro_bs": 16})
    straight = check_resume_and_ranks(tmp_path, single, ("reward_mean", "filtered_frac", "sampling_rounds", "policy_loss", "kl"))
    assert all(row["filtered_frac"] > 0 for row in straight)
