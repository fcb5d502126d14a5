"""The repeater's experience against a plain-loop implementation written here."""

from __future__ import annotations

import math

import pytest
import torch

from rlhf_launch.runtime import ppo
from rlhf_launch.runtime.experience import ExperienceSettings, RewardMoments, make_experience
from tests.factory import make_spec

settings_of = ExperienceSettings.from_spec  # the repeater's keys of a spec


def plain_experience(logp, ref, values, scores, mask, kl_coeff, gamma, lam, lo, hi, norm):
    B, T = len(mask), len(mask[0])
    adv = [[0.0] * T for _ in range(B)]
    ret = [[0.0] * T for _ in range(B)]
    for b in range(B):
        steps = [t for t in range(T) if mask[b][t]]
        if not steps:
            continue
        rewards = {t: -kl_coeff * (logp[b][t] - ref[b][t]) for t in steps}
        rewards[steps[-1]] += min(max(scores[b], lo), hi)
        running = 0.0
        for i in reversed(range(len(steps))):
            t = steps[i]
            next_value = values[b][steps[i + 1]] if i + 1 < len(steps) else 0.0
            delta = rewards[t] + gamma * next_value - values[b][t]
            running = delta + gamma * lam * running
            adv[b][t] = running
            ret[b][t] = running + values[b][t]
    if norm:
        flat = [adv[b][t] for b in range(B) for t in range(T) if mask[b][t]]
        mean = sum(flat) / len(flat)
        var = sum((x - mean) ** 2 for x in flat) / (len(flat) - 1)
        adv = [[(adv[b][t] - mean) / math.sqrt(var + 1e-8) if mask[b][t] else 0.0 for t in range(T)] for b in range(B)]
    return adv, ret


@pytest.mark.parametrize("norm, gamma, lam", [(True, 1.0, 0.95), (False, 0.9, 0.8)])
def test_experience_matches_plain_loops(norm, gamma, lam):
    s = make_spec({"repeater_config.norm_adv": norm, "repeater_config.gamma": gamma, "repeater_config.gae_lambda": lam,
                   "repeater_config.kl_coeff": 0.1, "rollout_config.clip_reward_min": -1.5, "rollout_config.clip_reward_max": 1.5})
    g = torch.Generator().manual_seed(0)
    B, T = 4, 6
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1], [1, 0, 0, 0, 0, 0], [1, 1, 1, 1, 0, 0]])
    logp, ref, values = (torch.randn(B, T, generator=g, dtype=torch.float64) for _ in range(3))
    scores = torch.tensor([0.5, 3.0, -4.0, 1.0], dtype=torch.float64)  # two outside the clip range
    rollout = {"response_mask": mask, "response_ids": torch.zeros(B, T, dtype=torch.long),
               "finished": torch.tensor([True, False, True, True])}
    exp, metrics = make_experience(settings_of(s), rollout, logp, ref, values, scores, RewardMoments())
    adv, ret = plain_experience(logp.tolist(), ref.tolist(), values.tolist(), scores.tolist(), mask.tolist(),
                                0.1, gamma, lam, -1.5, 1.5, norm)
    torch.testing.assert_close(exp["advantages"], torch.tensor(adv, dtype=torch.float64), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(exp["returns"], torch.tensor(ret, dtype=torch.float64), rtol=1e-9, atol=1e-9)
    assert metrics["reward_mean"] == pytest.approx(0.125)
    assert metrics["reward_clipped_mean"] == pytest.approx((0.5 + 1.5 - 1.5 + 1.0) / 4)
    assert metrics["truncated_frac"] == pytest.approx(0.25)
    expected_kl = sum(sum((logp[b, t] - ref[b, t]).item() for t in range(T) if mask[b, t]) for b in range(B)) / B
    assert metrics["kl"] == pytest.approx(expected_kl)


def test_reward_scale_divides_by_the_running_std():
    s = make_spec({"repeater_config.reward_scale": True, "repeater_config.kl_coeff": 0.0, "repeater_config.norm_adv": False,
                   "repeater_config.gamma": 1.0, "repeater_config.gae_lambda": 1.0})
    moments = RewardMoments()
    mask = torch.ones(2, 1, dtype=torch.long)
    zeros = torch.zeros(2, 1, dtype=torch.float64)
    rollout = {"response_mask": mask, "response_ids": torch.zeros(2, 1, dtype=torch.long), "finished": torch.tensor([True, True])}
    seen = []
    for batch in ([0.2, 1.0], [-0.6, 0.4]):
        seen += batch
        exp, _ = make_experience(settings_of(s), rollout, zeros, zeros, zeros, torch.tensor(batch, dtype=torch.float64), moments)
        mean = sum(seen) / len(seen)
        std = math.sqrt(sum((x - mean) ** 2 for x in seen) / len(seen))
        assert exp["returns"][:, 0].tolist() == pytest.approx([x / std for x in batch])
    assert moments.count == 4


def plain_normalized(seen, batch, eps=1e-8):
    """XTuner's norm_rewards by hand: the running statistics take in the batch first, then
    (x - mean) / (population std + eps) over every clipped score seen so far."""
    seen = seen + batch
    mean = sum(seen) / len(seen)
    std = math.sqrt(sum((x - mean) ** 2 for x in seen) / len(seen))
    return seen, [(x - mean) / (std + eps) for x in batch]


NORM_SETTINGS = {"repeater_config.norm_rewards": True, "repeater_config.kl_coeff": 0.1, "repeater_config.norm_adv": False,
                 "repeater_config.gamma": 0.9, "repeater_config.gae_lambda": 0.8,
                 "rollout_config.clip_reward_min": -1.5, "rollout_config.clip_reward_max": 1.5}


@pytest.mark.parametrize("reward_scale", [False, True], ids=["norm_rewards", "with-reward_scale"])
def test_norm_rewards_matches_plain_loops_over_several_batches(reward_scale):
    s = make_spec({**NORM_SETTINGS, "repeater_config.reward_scale": reward_scale})
    g = torch.Generator().manual_seed(3)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [0, 1, 1, 0]])
    rollout = {"response_mask": mask, "response_ids": torch.zeros(3, 4, dtype=torch.long),
               "finished": torch.tensor([True, False, True])}
    moments, seen = RewardMoments(), []
    for batch in ([0.5, 3.0, -0.2], [1.0, -4.0, 0.25], [0.3, 0.3, -1.0]):  # some outside the clip range
        logp, ref, values = (torch.randn(3, 4, generator=g, dtype=torch.float64) for _ in range(3))
        scores = torch.tensor(batch, dtype=torch.float64)
        exp, _ = make_experience(settings_of(s), rollout, logp, ref, values, scores, moments)
        seen, normalized = plain_normalized(seen, [min(max(x, -1.5), 1.5) for x in batch])
        adv, ret = plain_experience(logp.tolist(), ref.tolist(), values.tolist(), normalized, mask.tolist(),
                                    0.1, 0.9, 0.8, -math.inf, math.inf, False)
        assert exp["score_rewards"].tolist() == pytest.approx(normalized, rel=1e-9)
        assert exp["scores"].tolist() == batch
        torch.testing.assert_close(exp["advantages"], torch.tensor(adv, dtype=torch.float64), rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(exp["returns"], torch.tensor(ret, dtype=torch.float64), rtol=1e-9, atol=1e-9)
    assert (moments.count, moments.mean) == (9, pytest.approx(sum(seen) / 9))


def test_without_normalisation_the_moments_stay_untouched():
    s = make_spec({**NORM_SETTINGS, "repeater_config.norm_rewards": False})
    mask = torch.ones(2, 2, dtype=torch.long)
    zeros = torch.zeros(2, 2, dtype=torch.float64)
    rollout = {"response_mask": mask, "response_ids": torch.zeros(2, 2, dtype=torch.long), "finished": torch.tensor([True, True])}
    moments = RewardMoments()
    exp, _ = make_experience(settings_of(s), rollout, zeros, zeros, zeros, torch.tensor([2.0, -0.5], dtype=torch.float64), moments)
    assert exp["score_rewards"].tolist() == [1.5, -0.5]
    assert moments == RewardMoments()


# --------------------------------------------------------------------------- estimators, KL estimators, kl_in
def _grouped_batch(groups=2, n=4, T=5, seed=7):
    g = torch.Generator().manual_seed(seed)
    B = groups * n
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    mask = (torch.arange(T)[None, :] < lengths[:, None]).long()
    logp, ref = (torch.randn(B, T, generator=g, dtype=torch.float64) * 0.3 for _ in range(2))
    scores = torch.randn(B, generator=g, dtype=torch.float64)
    rollout = {"response_mask": mask, "response_ids": torch.zeros(B, T, dtype=torch.long), "finished": torch.ones(B, dtype=torch.bool)}
    return rollout, logp, ref, scores


@pytest.mark.parametrize("estimator", ["grpo", "dr_grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline"])
@pytest.mark.parametrize("kl_estimator", ["k1", "k2", "k3"])
def test_critic_free_estimators_use_the_ppo_functions(estimator, kl_estimator):
    settings = ExperienceSettings(advantage_estimator=estimator, kl_estimator=kl_estimator, kl_coeff=0.05, group_size=4, gamma=0.9,
                                  clip_reward_min=-1.0, clip_reward_max=1.0)
    rollout, logp, ref, scores = _grouped_batch()
    mask = rollout["response_mask"]
    exp, metrics = make_experience(settings, rollout, logp, ref, None, scores, RewardMoments())
    kl_rewards = -0.05 * ppo.kl_estimate(logp, ref, mask, kl_estimator)
    expected, _ = ppo.advantages_and_returns(estimator, scores.clamp(-1, 1), kl_rewards, mask, group_size=4, gamma=0.9)
    torch.testing.assert_close(exp["advantages"], expected, rtol=1e-12, atol=1e-12)
    assert "returns" not in exp and "old_values" not in exp and "ref_logprobs" not in exp
    assert "value_mean" not in metrics and "return_mean" not in metrics
    if kl_estimator != "k1":
        expected_kl = ppo.masked_sum(ppo.kl_estimate(logp, ref, mask, kl_estimator), mask, dim=1).mean()
        assert metrics[f"kl_{kl_estimator}"] == pytest.approx(float(expected_kl))


def plain_grpo(logp, ref, scores, mask, n, kl_coeff, kl_in_reward):
    """GRPO by hand: each sequence's reward is its score plus (with the KL in the reward) -kl_coeff * sum_t k3_t;
    its advantage (r - group mean) / (unbiased group std + 1e-6), on every response token."""
    totals = []
    for b in range(len(mask)):
        total = scores[b]
        if kl_in_reward:
            for t in range(len(mask[b])):
                if mask[b][t]:
                    x = logp[b][t] - ref[b][t]
                    total -= kl_coeff * (math.exp(-x) - 1 + x)
        totals.append(total)
    adv = []
    for b in range(len(mask)):
        group = totals[b // n * n : b // n * n + n]
        mean = sum(group) / n
        std = math.sqrt(sum((x - mean) ** 2 for x in group) / (n - 1))
        adv.append([(totals[b] - mean) / (std + 1e-6) if m else 0.0 for m in mask[b]])
    return adv


@pytest.mark.parametrize("kl_in", ["reward", "loss"])
def test_grpo_matches_a_plain_loop(kl_in):
    settings = ExperienceSettings.from_spec(make_spec({
        "repeater_config.advantage_estimator": "grpo", "repeater_config.kl_estimator": "k3", "repeater_config.kl_in": kl_in,
        "repeater_config.kl_coeff": 0.1, "rollout_config.n_samples_per_prompt": 4,
        "rollout_config.clip_reward_min": -10.0, "rollout_config.clip_reward_max": 10.0,
    }))
    assert (settings.group_size, settings.needs_critic) == (4, False)
    rollout, logp, ref, scores = _grouped_batch(groups=3)
    exp, _ = make_experience(settings, rollout, logp, ref, None, scores, RewardMoments())
    adv = plain_grpo(logp.tolist(), ref.tolist(), scores.tolist(), rollout["response_mask"].tolist(), 4, 0.1, kl_in == "reward")
    torch.testing.assert_close(exp["advantages"], torch.tensor(adv, dtype=torch.float64), rtol=1e-9, atol=1e-9)
    # The actor needs the reference's log-probs only when it adds the KL to its loss.
    assert ("ref_logprobs" in exp) == (kl_in == "loss")


def test_gae_needs_values():
    rollout, logp, ref, scores = _grouped_batch()
    with pytest.raises(ValueError, match="needs the critic's values"):
        make_experience(ExperienceSettings(), rollout, logp, ref, None, scores, RewardMoments())


# --------------------------------------------------------------------------- behaviour log-probs
@pytest.mark.parametrize("cap", [None, 1.2])
def test_generator_logprob_gap_and_truncated_is_weights_match_plain_loops(cap):
    rollout, logp, _, scores = _grouped_batch()
    g = torch.Generator().manual_seed(3)
    gen = logp + 0.2 * torch.randn(logp.shape, generator=g, dtype=torch.float64)
    rollout = {**rollout, "gen_logprobs": gen.masked_fill(rollout["response_mask"] == 0, 0.0)}
    settings = ExperienceSettings(advantage_estimator="grpo", kl_coeff=0.0, group_size=4, tis_cap=cap)
    exp, metrics = make_experience(settings, rollout, logp, None, None, scores, RewardMoments())
    mask = rollout["response_mask"]
    gaps, weights = [], torch.zeros_like(logp)
    for i in range(logp.shape[0]):
        for t in range(logp.shape[1]):
            if mask[i, t]:
                gaps.append(abs(float(logp[i, t] - gen[i, t])))
                weights[i, t] = min(math.exp(float(logp[i, t] - gen[i, t])), cap or math.inf)
    assert metrics["gen_logprob_gap"] == pytest.approx(sum(gaps) / len(gaps))
    if cap is None:
        assert "is_weights" not in exp and "tis_weight_mean" not in metrics
    else:
        torch.testing.assert_close(exp["is_weights"], weights)
        assert metrics["tis_weight_mean"] == pytest.approx(float(weights[mask.bool()].mean()))
        assert metrics["tis_weight_max"] == pytest.approx(float(weights.max())) and metrics["tis_weight_max"] <= cap
