"""The repeater's experience against a plain-loop implementation written here."""

from __future__ import annotations

import math

import pytest
import torch

from rlhf.experience import RewardMoments, make_experience
from tests.factory import make_spec


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
    exp, metrics = make_experience(s, rollout, logp, ref, values, scores, RewardMoments())
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
        exp, _ = make_experience(s, rollout, zeros, zeros, zeros, torch.tensor(batch, dtype=torch.float64), moments)
        mean = sum(seen) / len(seen)
        std = math.sqrt(sum((x - mean) ** 2 for x in seen) / len(seen))
        assert exp["returns"][:, 0].tolist() == pytest.approx([x / std for x in batch])
    assert moments.count == 4
