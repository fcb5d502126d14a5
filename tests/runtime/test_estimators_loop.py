"""The advantage estimators, KL placement, group sampling and verifiable rewards inside the PPO loop."""

from __future__ import annotations

import pytest
import torch

from rlhf_launch.runtime import ppo
from rlhf_launch.runtime.cluster import SingleProcess
from rlhf_launch.runtime.experience import ExperienceSettings
from rlhf_launch.runtime.roles.actor import ActorRole
from rlhf_launch.runtime.roles.common import policy_logprobs
from rlhf_launch.runtime.rollout import SamplingSettings
from rlhf_launch.runtime.timing import Timer
from tests.factory import make_spec


def _micro_batch(B=4, P=3, R=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([5, 3, 1, 4])[:B]
    return {
        "prompt_ids": torch.randint(3, 500, (B, P), generator=g),
        "prompt_mask": torch.ones(B, P, dtype=torch.long),
        "response_ids": torch.randint(3, 500, (B, R), generator=g),
        "response_mask": (torch.arange(R)[None, :] < lengths[:, None]).long(),
        "advantages": torch.randn(B, R, generator=g),
        "ref_logprobs": torch.randn(B, R, generator=g) * 0.1 - 6.0,
    }


def test_kl_in_loss_adds_kl_coeff_times_the_kl_term_and_its_gradient(tiny_models):
    """With kl_in loss (the experience then carries ref_logprobs) the actor's loss (and gradient) exceeds the plain
    policy loss (an experience without them) by exactly kl_coeff times aggregate_loss(k3(new, ref)), the gradient
    flowing through the new log-probs only."""
    spec = make_spec({"repeater_config.kl_estimator": "k3", "repeater_config.kl_coeff": 0.5, "train_config.policy_clip_high": 0.28,
                      "repeater_config.kl_in": "loss"})
    assert ExperienceSettings.from_spec(spec).kl_in_loss
    device = torch.device("cpu")
    actor = ActorRole(spec, device, SamplingSettings.from_spec(spec, 2, 0), Timer(), SingleProcess())
    micro = _micro_batch()
    mask = micro["response_mask"]
    with torch.no_grad():
        micro["old_logprobs"] = policy_logprobs(actor.trainer.module, micro, 1.0) + 0.05  # ratios away from 1

    def loss_and_grads(batch):
        actor.model.zero_grad()
        loss, stats = actor._loss(batch, num_seqs=6, num_tokens=20)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in actor.model.named_parameters() if p.grad is not None}, stats

    plain, plain_grads, plain_stats = loss_and_grads({k: v for k, v in micro.items() if k != "ref_logprobs"})
    with_kl, kl_grads, kl_stats = loss_and_grads(micro)
    assert "kl_loss" not in plain_stats

    # The KL term alone, from the log-probs computed afresh.
    actor.model.zero_grad()
    new = policy_logprobs(actor.trainer.module, micro, 1.0)
    term = ppo.aggregate_loss(ppo.kl_estimate(new, micro["ref_logprobs"], mask, "k3"), mask, "per_token", 6, 20)
    (0.5 * term).backward()
    term_grads = {n: p.grad.clone() for n, p in actor.model.named_parameters() if p.grad is not None}

    assert float(term.detach()) > 1e-3  # the check below means something
    torch.testing.assert_close(with_kl - plain, 0.5 * term.detach(), rtol=1e-5, atol=1e-6)
    assert float(kl_stats["kl_loss"]) == float(term.detach())
    for name, grad in term_grads.items():
        torch.testing.assert_close(kl_grads[name] - plain_grads[name], grad, rtol=1e-4, atol=1e-6)


# --------------------------------------------------------------------------- verifiable rewards
def _reward_role(tmp_path, function):
    from rlhf_launch.core.model_tokenizers import policy_tokenizer_config, tokenizer_key
    from rlhf_launch.runtime.data import load_tokenizer
    from rlhf_launch.runtime.roles.reward import RewardRole
    from tests import reward_probe
    from tests.factory import reward_function

    source = reward_probe.question_records(tmp_path / "questions.jsonl")
    spec = make_spec({**reward_function(f"tests.reward_probe:{function}"), "dataset_config.ppo_datas": [f"{source}::1.0"]})
    tokenizer = load_tokenizer(policy_tokenizer_config(spec), spec.model_configs.actor.model_path, tokenizer_key(spec, "actor"))
    return RewardRole(spec, torch.device("cpu"), tokenizer), tokenizer


def _rollout_of(tokenizer, picks):
    from rlhf_launch.runtime.data import render_prompts

    messages = [[{"role": "user", "content": f"Question {index}: what is {index} plus {index}?"}] for _, index in picks]
    encoded = render_prompts(tokenizer, messages, 48)
    B = len(picks)
    return {"prompt_ids": encoded["input_ids"], "prompt_mask": encoded["attention_mask"],
            "response_ids": torch.randint(3, 500, (B, 4), generator=torch.Generator().manual_seed(1)),
            "response_mask": torch.ones(B, 4, dtype=torch.long), "prompt_index": torch.tensor(picks).view(-1, 2)}


def test_reward_function_gets_each_rows_record_fields(tiny_models, tmp_path):
    from tests import reward_probe

    picks = [(0, 5), (0, 2), (0, 5), (0, 9), (0, 31)]
    role, tokenizer = _reward_role(tmp_path, "checked_answer")
    scores = role.scores(_rollout_of(tokenizer, picks))
    assert scores.shape == (5,)
    call = reward_probe.CALLS[-1]
    assert call["answer"] == ["10", "4", "10", "18", "62"] and set(call) == {"prompts", "answer"}  # only what it names

    role, _ = _reward_role(tmp_path, "every_field")
    role.scores(_rollout_of(tokenizer, picks))
    assert reward_probe.CALLS[-1]["level"] == [2, 2, 2, 0, 1]

    role, _ = _reward_role(tmp_path, "texts_only")
    assert role.records is None  # fn(prompts, responses) needs no data
    role.scores(_rollout_of(tokenizer, picks))
    assert set(reward_probe.CALLS[-1]) == {"prompts"}


def test_accepted_fields_reads_the_signature():
    from rlhf_launch.runtime.reward_function import accepted_fields
    from rlhf_launch.runtime.rewards import math_answer, vowel_ratio

    def named(prompts, responses, answer, level=0):
        """A test function."""

    assert accepted_fields(vowel_ratio) == frozenset()
    assert accepted_fields(named) == {"answer", "level"}
    assert accepted_fields(math_answer) is None  # **fields: every field


# --------------------------------------------------------------------------- spec checks
def test_group_estimator_with_one_sample_per_prompt_is_an_error():
    import pytest

    from rlhf_launch.core.problems import SpecError
    from tests.factory import load

    with pytest.raises(SpecError) as info:
        load({"repeater_config.advantage_estimator": "rloo"})
    (problem,) = [p for p in info.value.problems if p.path == "rollout_config.n_samples_per_prompt"]
    assert "found 1, expected at least 2" in problem.message and "repeater_config.advantage_estimator rloo" in problem.message
    load({"repeater_config.advantage_estimator": "reinforce_pp"})  # needs no groups


def test_unused_critic_is_a_warning_and_batch_checks_count_sequences():
    import pytest

    from rlhf_launch.core.problems import SpecError
    from tests.factory import load

    loaded = load({"repeater_config.advantage_estimator": "grpo", "rollout_config.n_samples_per_prompt": 4})
    assert [p.path for p in loaded.warnings if "uses no critic" in p.message] == ["model_configs.critic"]
    assert loaded.spec.rollout_size() == 128
    assert not [p for p in load().warnings if "uses no critic" in p.message]
    # 32 prompts x 3 = 96 sequences: a minibatch of 64 divides the prompts, not the sequences.
    with pytest.raises(SpecError) as info:
        load({"rollout_config.n_samples_per_prompt": 3, "train_config.ppo_minibatch": 64, "train_config.value_minibatch": 32})
    (problem,) = [p for p in info.value.problems if p.path == "train_config.ppo_minibatch"]
    assert "the rollout batch (96 = dataset_config.num_samples_each_epoch x rollout_config.n_samples_per_prompt 3)" in problem.message


# --------------------------------------------------------------------------- GRPO end to end


def _grpo_overrides(source, **extra):
    from tests.factory import reward_function

    return {**reward_function("tests.reward_probe:checked_answer"), "dataset_config.ppo_datas": [f"{source}::1.0"],
            "dataset_config.num_samples_each_epoch": 8, "rollout_config.n_samples_per_prompt": 4,
            "repeater_config.advantage_estimator": "grpo", "repeater_config.kl_in": "loss", "repeater_config.kl_estimator": "k3",
            "repeater_config.kl_coeff": 0.05, "train_config.policy_clip_high": 0.28,
            "model_configs.actor.trainer_config.train_kwargs.loss_type": "per_seq_sum", "train_config.save_interval": 1, **extra}


@pytest.mark.slow
def test_grpo_distributed_and_resumed_runs_equal_one_uninterrupted_process(tiny_models, tmp_path):
    """GRPO with 4 samples per prompt, the KL in the loss and record answers checked by the reward function: two
    actor ranks in their own processes (each generating its 16 rows in one call) match one process to 1e-5, and a
    run resumed after step 2 equals the uninterrupted one exactly."""
    from tests import reward_probe
    from tests.factory import check_resume_and_ranks

    source = reward_probe.question_records(tmp_path / "questions.jsonl")
    single = _grpo_overrides(source, **{"rollout_config.actor_micro_bs": 16})
    straight = check_resume_and_ranks(
        tmp_path, single, ("reward_mean", "kl", "kl_k3", "policy_loss", "actor_kl_loss", "advantage_mean", "response_len_mean"))
    assert "value_loss" not in straight[0] and "actor_kl_loss" in straight[0]
    assert {len(call["answer"]) for call in reward_probe.CALLS[-3:]} == {32}  # 8 prompts x 4 samples, whole
