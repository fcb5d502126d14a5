"""Sampling ahead (rollout_config.max_staleness 1): which weights each rollout comes from, in one process
and in a thread, across a checkpoint; and whole runs that stay exact."""

from __future__ import annotations

import threading

import pytest
import torch

from rlhf_launch.runtime.rollout_ahead import RolloutAhead
from rlhf_launch.runtime.timing import Timer
from tests.factory import check_resume_and_ranks, make_spec, without_timing

SEPARATE_HF = {"model_configs.actor.generator_config": {"shared_with_trainer": False, "generator_type": "hf"}}


class FakeRun:
    """A loop's schedule with rollouts that say which weights sampled them: ``version`` is the number of updates the
    generator's weights have seen, and the sampler records the thread it ran in."""

    def __init__(self):
        self.version = 0
        self.threads: set[str] = set()

    def sample(self, step: int, timer: Timer):
        with timer("busy/generator"):
            self.threads.add(threading.current_thread().name)
            return {"step": torch.tensor([step]), "weights": torch.tensor([self.version])}

    def gather(self, local):
        return dict(local)

    def run(self, ahead: RolloutAhead, steps: range, save_after: int | None = None):
        """Take each step's rollout, 'train', join, 'sync weights'; returns (step, weights) of every rollout taken."""
        seen, saved = [], None
        timer = Timer()
        for step in steps:
            rollout = ahead.take(step, timer)
            seen.append((int(rollout["step"]), int(rollout["weights"])))
            ahead.join(timer)
            self.version = step  # the generator now holds the weights after this step's update
            if step == save_after:
                saved = ahead.for_checkpoint(step, timer)
        assert timer.pop().get("busy/generator", 0.0) > 0
        return seen, saved


@pytest.mark.parametrize("background", [False, True], ids=["in-line", "thread"])
def test_each_rollout_comes_from_the_weights_two_updates_back(background):
    """Rollout k is sampled with the weights after step k-2 (the first two with the initial ones), in a thread or not."""
    fake = FakeRun()
    seen, _ = fake.run(RolloutAhead(fake.sample, fake.gather, background, torch.device("cpu")), range(1, 6))
    assert seen == [(1, 0), (2, 0), (3, 1), (4, 2), (5, 3)]
    assert ("rlhf-sample-ahead" in fake.threads) == background


@pytest.mark.parametrize("background", [False, True], ids=["in-line", "thread"])
def test_a_checkpoint_carries_the_rollout_ahead_and_a_restored_run_takes_it(background):
    fake = FakeRun()
    straight, _ = fake.run(RolloutAhead(fake.sample, fake.gather, background, torch.device("cpu")), range(1, 6))
    fake = FakeRun()
    first, saved = fake.run(RolloutAhead(fake.sample, fake.gather, background, torch.device("cpu")), range(1, 4), save_after=3)
    assert {k: int(v) for k, v in saved.items()} == {"step": 4, "weights": 2}
    resumed = FakeRun()
    resumed.version = 3  # the checkpoint's weights: after step 3
    ahead = RolloutAhead(resumed.sample, resumed.gather, background, torch.device("cpu"))
    ahead.restore(4, saved)
    rest, _ = resumed.run(ahead, range(4, 6))
    assert first + rest == straight


def test_an_error_while_sampling_ahead_reaches_the_main_thread():
    def broken(step, timer):
        if step > 1:
            raise RuntimeError("engine died")
        return {"step": torch.tensor([step])}

    ahead = RolloutAhead(broken, dict, background=True, device=torch.device("cpu"))
    ahead.take(1, Timer())
    with pytest.raises(RuntimeError, match="engine died"):
        ahead.join(Timer())


def test_a_finished_run_continued_to_more_steps_equals_one_that_ran_them_all():
    """The last step samples ahead too: the final checkpoint carries the rollout a longer run would take next."""
    fake = FakeRun()
    straight, _ = fake.run(RolloutAhead(fake.sample, fake.gather, False, torch.device("cpu")), range(1, 6))
    fake = FakeRun()
    first, saved = fake.run(RolloutAhead(fake.sample, fake.gather, False, torch.device("cpu")), range(1, 3), save_after=2)
    resumed = FakeRun()
    resumed.version = 2
    ahead = RolloutAhead(resumed.sample, resumed.gather, False, torch.device("cpu"))
    ahead.restore(3, saved)
    rest, _ = resumed.run(ahead, range(3, 6))
    assert first + rest == straight


def test_sampling_ahead_needs_a_separate_generator_and_no_dynamic_sampling():
    from rlhf_launch.core.problems import SpecError
    from tests.factory import load

    with pytest.raises(SpecError) as info:
        load({"rollout_config.max_staleness": 1})
    (problem,) = [p for p in info.value.problems if p.path == "rollout_config.max_staleness"]
    assert "shared with the actor" in problem.message and "shared_with_trainer: false" in problem.message
    grpo = {"repeater_config.advantage_estimator": "grpo", "rollout_config.n_samples_per_prompt": 2}
    with pytest.raises(SpecError) as info:
        load({**SEPARATE_HF, **grpo, "rollout_config.max_staleness": 1, "rollout_config.dynamic_sampling": True})
    (problem,) = [p for p in info.value.problems if p.path.startswith("rollout_config")]
    assert problem.path == "rollout_config.max_staleness" and "dynamic_sampling" in problem.message
    load({**SEPARATE_HF, **grpo, "rollout_config.max_staleness": 1})
    with pytest.raises(SpecError):
        load({**SEPARATE_HF, "rollout_config.max_staleness": 2})


def test_asynchronous_run_lags_one_update_and_its_first_step_is_the_synchronous_one(tiny_models, tmp_path):
    """Against the synchronous run of the same spec: step 1 is the same (both sample with the initial weights); from
    step 2 on the rollout comes from weights one update older than the actor's, which the log-prob gap shows."""
    from rlhf_launch.runtime.training_run import run_local

    base = {**SEPARATE_HF, "train_config.max_train_step": 3}
    sync = run_local(make_spec(base), tmp_path / "sync", quiet=True)
    lagged = run_local(make_spec({**base, "rollout_config.max_staleness": 1}), tmp_path / "async", quiet=True)
    assert without_timing(lagged[:1]) == without_timing(sync[:1])
    # Same weights, two code paths (KV cache vs one forward): the synchronous gap is rounding only.
    assert max(row["gen_logprob_gap"] for row in sync) < 1e-4
    assert lagged[1]["gen_logprob_gap"] > 100 * max(sync[1]["gen_logprob_gap"], 1e-6)
    assert lagged[1]["reward_mean"] != sync[1]["reward_mean"]


@pytest.mark.slow
def test_asynchronous_run_resumes_exactly_and_matches_across_processes(tiny_models, tmp_path):
    """Truncated importance weights on; a run stopped after step 2 and resumed equals the straight run (the
    checkpoint carries step 3's rollout, sampled with weights it no longer has), and with the actor on two ranks
    and the generator in a process of its own, sampling in a thread, the metrics match one process to 1e-5."""
    single = {**SEPARATE_HF, "rollout_config.max_staleness": 1, "train_config.tis_cap": 1.5, "train_config.save_interval": 1}
    straight = check_resume_and_ranks(tmp_path, single, ("reward_mean", "policy_loss", "gen_logprob_gap", "tis_weight_mean", "kl"))
    kept = sorted((tmp_path / "straight" / "checkpoints").glob("step-*"))
    assert kept and all((checkpoint / "rollout_ahead.pt").exists() for checkpoint in kept)
    assert straight[2]["tis_weight_mean"] != 1.0


def test_a_group_estimator_samples_ahead_too(tiny_models, tmp_path):
    """GRPO (no critic, n = 4 rows per prompt) with the rollout sampled ahead: from step 2 the rollout lags the actor
    by one update, and the truncated importance weights stay within their cap."""
    from rlhf_launch.runtime.training_run import run_local
    from tests.factory import reward_function

    grpo = {**SEPARATE_HF, **reward_function(), "repeater_config.advantage_estimator": "grpo", "repeater_config.kl_coeff": 0.0,
            "repeater_config.norm_adv": False, "rollout_config.n_samples_per_prompt": 4, "dataset_config.num_samples_each_epoch": 8,
            "rollout_config.max_staleness": 1, "train_config.tis_cap": 2.0, "train_config.max_train_step": 2}
    rows = run_local(make_spec(grpo), tmp_path / "grpo", quiet=True)
    assert [row["step"] for row in rows] == [1, 2]
    assert rows[0]["gen_logprob_gap"] < 1e-4 < rows[1]["gen_logprob_gap"]
    assert 0 < rows[1]["tis_weight_mean"] and rows[1]["tis_weight_max"] <= 2.0
    assert "value_loss" not in rows[1]  # no critic: the plan has none
