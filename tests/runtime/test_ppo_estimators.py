"""The critic-free estimators, KL estimators and aggregations of rlhf_launch/runtime/ppo.py, against plain-Python loops."""

import math
import statistics

import pytest
import torch
from torch.testing import assert_close

from rlhf_launch.runtime import ppo

F64 = torch.float64
GROUP_ESTIMATORS = ["grpo", "dr_grpo", "rloo", "reinforce_pp_baseline"]


def case(seed: int, groups: int = 3, n: int = 4, T: int = 6):
    """Scores [G*n], per-token KL rewards and log-probs [G*n, T], a mask with left offsets and an empty row."""
    gen = torch.Generator().manual_seed(seed)
    B = groups * n
    mask = torch.zeros(B, T, dtype=F64)
    for b in range(B):
        start = b % 3
        length = 0 if b == 1 else 1 + (b * 5) % (T - start)
        mask[b, start:start + length] = 1
    scores = torch.randn(B, generator=gen, dtype=F64)
    kl = torch.randn(B, T, generator=gen, dtype=F64) * 0.1 * mask
    return scores, kl, mask, gen


# ---------------------------------------------------------------- loop references
def ref_group(scores: list[float], n: int, estimator: str) -> list[float]:
    out = []
    for g in range(len(scores) // n):
        group = scores[g * n:(g + 1) * n]
        mean = sum(group) / n
        for i, r in enumerate(group):
            if estimator == "grpo":
                out.append((r - mean) / (statistics.stdev(group) + 1e-6))
            elif estimator == "rloo":
                out.append(r - sum(x for j, x in enumerate(group) if j != i) / (n - 1))
            else:
                out.append(r - mean)
    return out


def ref_returns(rewards: list[list[float]], mask: list[list[float]], gamma: float) -> list[list[float]]:
    out = []
    for r_row, m_row in zip(rewards, mask, strict=True):
        idx = [t for t, m in enumerate(m_row) if m]
        row = [0.0] * len(r_row)
        g = 0.0
        for t in reversed(idx):
            g = r_row[t] + gamma * g
            row[t] = g
        out.append(row)
    return out


def ref_whiten(x: list[list[float]], mask: list[list[float]]) -> list[list[float]]:
    elems = [v for xr, mr in zip(x, mask, strict=True) for v, m in zip(xr, mr, strict=True) if m]
    mean, var = statistics.fmean(elems), statistics.variance(elems)
    return [[(v - mean) / math.sqrt(var + 1e-8) if m else 0.0 for v, m in zip(xr, mr, strict=True)] for xr, mr in zip(x, mask, strict=True)]


def ref_token_rewards(scores: list[float], kl: list[list[float]], mask: list[list[float]]) -> list[list[float]]:
    out = [list(row) for row in kl]
    for b, m_row in enumerate(mask):
        idx = [t for t, m in enumerate(m_row) if m]
        if idx:
            out[b][idx[-1]] += scores[b]
    return out


# ---------------------------------------------------------------- KL estimators
def test_kl_estimators_known_answers():
    logp, ref = torch.tensor([[math.log(0.5)]], dtype=F64), torch.tensor([[math.log(0.25)]], dtype=F64)
    mask = torch.ones(1, 1)
    x = math.log(2)
    assert ppo.kl_estimate(logp, ref, mask, "k1").item() == pytest.approx(x)
    assert ppo.kl_estimate(logp, ref, mask, "k2").item() == pytest.approx(x * x / 2)
    assert ppo.kl_estimate(logp, ref, mask, "k3").item() == pytest.approx(0.5 - 1 + x)


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_kl_estimators_match_loop_and_vanish_off_mask(estimator):
    _, _, mask, gen = case(0)
    logp, ref = torch.randn(mask.shape, generator=gen, dtype=F64), torch.randn(mask.shape, generator=gen, dtype=F64)
    formula = {"k1": lambda x: x, "k2": lambda x: x * x / 2, "k3": lambda x: math.exp(-x) - 1 + x}[estimator]
    expected = [[formula(a - b) if m else 0.0 for a, b, m in zip(ra, rb, rm, strict=True)]
                for ra, rb, rm in zip(logp.tolist(), ref.tolist(), mask.tolist(), strict=True)]
    assert_close(ppo.kl_estimate(logp, ref, mask, estimator), torch.tensor(expected, dtype=F64))


def test_k3_is_unbiased_and_nonnegative_where_k1_is_not():
    # Sample a ~ p; E_p[k1] = E_p[k3] = KL(p || q); k3 >= 0 on every sample.
    p, q = torch.tensor([0.7, 0.2, 0.1], dtype=F64), torch.tensor([0.3, 0.3, 0.4], dtype=F64)
    kl = (p * (p / q).log()).sum().item()
    a = torch.multinomial(p, 200_000, replacement=True, generator=torch.Generator().manual_seed(0))
    logp, logq, mask = p.log()[a][None], q.log()[a][None], torch.ones(1, a.numel())
    k1, k3 = ppo.kl_estimate(logp, logq, mask, "k1"), ppo.kl_estimate(logp, logq, mask, "k3")
    assert k1.mean().item() == pytest.approx(kl, abs=0.01) and k3.mean().item() == pytest.approx(kl, abs=0.01)
    assert (k3 >= 0).all() and (k1 < 0).any()


def test_unknown_kl_estimator_is_named():
    with pytest.raises(ValueError, match="k4"):
        ppo.kl_estimate(torch.zeros(1, 1), torch.zeros(1, 1), torch.ones(1, 1), "k4")


# ---------------------------------------------------------------- group baselines
@pytest.mark.parametrize("estimator", GROUP_ESTIMATORS)
@pytest.mark.parametrize("n", [2, 4])
def test_group_advantages_match_loop(estimator, n):
    scores, *_ = case(1, groups=3, n=n)
    expected = torch.tensor(ref_group(scores.tolist(), n, estimator), dtype=F64)
    assert_close(ppo.group_advantages(scores, n, estimator), expected)


def test_group_advantages_known_answers():
    scores = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0], dtype=F64)  # groups of 3: [1, 0, 0], [1, 1, 1]
    assert_close(ppo.group_advantages(scores, 3, "dr_grpo"), torch.tensor([2 / 3, -1 / 3, -1 / 3, 0, 0, 0], dtype=F64))
    assert_close(ppo.group_advantages(scores, 3, "rloo"), torch.tensor([1.0, -0.5, -0.5, 0, 0, 0], dtype=F64))
    std = math.sqrt(1 / 3)  # unbiased std of [1, 0, 0]
    grpo = ppo.group_advantages(scores, 3, "grpo")
    assert grpo[0].item() == pytest.approx((2 / 3) / (std + 1e-6)) and grpo[3:].abs().max() == 0


def test_group_advantages_refuse_what_they_cannot_compute():
    with pytest.raises(ValueError, match="groups of 4"):
        ppo.group_advantages(torch.zeros(6), 4, "grpo")
    with pytest.raises(ValueError, match="at least 2"):
        ppo.group_advantages(torch.zeros(3), 1, "rloo")
    with pytest.raises(ValueError, match="unknown group estimator"):
        ppo.group_advantages(torch.zeros(4), 2, "gae")


def test_informative_groups_are_those_with_unequal_scores():
    scores = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.5, 0.5])
    assert ppo.informative_groups(scores, 2).tolist() == [False, True, False, False]
    assert ppo.informative_groups(scores, 4).tolist() == [True, True]


# ---------------------------------------------------------------- returns and the estimator table
@pytest.mark.parametrize("gamma", [1.0, 0.9])
def test_discounted_returns_match_loop(gamma):
    _, kl, mask, _ = case(2)
    expected = torch.tensor(ref_returns(kl.tolist(), mask.tolist(), gamma), dtype=F64)
    assert_close(ppo.discounted_returns(kl, mask, gamma), expected)


@pytest.mark.parametrize("estimator", ["reinforce_pp", "reinforce_pp_baseline"])
def test_reinforce_pp_advantages_match_loop(estimator):
    scores, kl, mask, _ = case(3)
    s = scores.tolist() if estimator == "reinforce_pp" else ref_group(scores.tolist(), 4, "reinforce_pp_baseline")
    returns = ref_returns(ref_token_rewards(s, kl.tolist(), mask.tolist()), mask.tolist(), 0.95)
    expected = torch.tensor(ref_whiten(returns, mask.tolist()), dtype=F64)
    adv, targets = ppo.advantages_and_returns(estimator, scores, kl, mask, group_size=4, gamma=0.95)
    assert_close(adv, expected)
    assert targets is None


@pytest.mark.parametrize("estimator", ["grpo", "dr_grpo", "rloo"])
def test_group_estimators_put_the_sequence_advantage_on_every_token(estimator):
    scores, kl, mask, _ = case(4)
    rows = zip(scores.tolist(), kl.tolist(), mask.tolist(), strict=True)
    totals = [s + sum(k for k, m in zip(kr, mr, strict=True) if m) for s, kr, mr in rows]
    per_seq = ref_group(totals, 4, estimator)
    expected = torch.tensor([[a if m else 0.0 for m in mr] for a, mr in zip(per_seq, mask.tolist(), strict=True)], dtype=F64)
    adv, targets = ppo.advantages_and_returns(estimator, scores, kl, mask, group_size=4)
    assert_close(adv, expected)
    assert targets is None


@pytest.mark.parametrize("whiten", [True, False])
def test_gae_estimator_is_compute_gae_over_kl_and_score(whiten):
    scores, kl, mask, gen = case(5)
    values = torch.randn(mask.shape, generator=gen, dtype=F64)
    adv, returns = ppo.advantages_and_returns("gae", scores, kl, mask, values=values, gamma=0.9, lam=0.8, whiten=whiten)
    expected_adv, expected_returns = ppo.compute_gae(ppo.add_score_at_last_token(kl, scores, mask), values, mask, 0.9, 0.8)
    assert_close(returns, expected_returns)
    assert_close(adv, ppo.masked_whiten(expected_adv, mask) if whiten else expected_adv)
    with pytest.raises(ValueError, match="critic"):
        ppo.advantages_and_returns("gae", scores, kl, mask)


def test_every_named_estimator_runs_and_unknown_names_are_refused():
    scores, kl, mask, gen = case(6)
    values = torch.randn(mask.shape, generator=gen, dtype=F64)
    for name in ppo.ADVANTAGE_ESTIMATORS:
        adv, _ = ppo.advantages_and_returns(name, scores, kl, mask, values=values, group_size=4)
        assert adv.shape == mask.shape and torch.isfinite(adv).all() and (adv[mask == 0] == 0).all(), name
    with pytest.raises(ValueError, match="advantage_estimator 'ppo'"):
        ppo.advantages_and_returns("ppo", scores, kl, mask)


# ---------------------------------------------------------------- loss aggregation and clip-higher
def test_per_seq_sum_divides_by_the_constant_length():
    _, kl, mask, _ = case(7)
    losses = kl.abs()
    expected = sum(sum(x for x, m in zip(lr, mr, strict=True) if m) / 10 for lr, mr in zip(losses.tolist(), mask.tolist(), strict=True))
    assert ppo.aggregate_loss(losses, mask, "per_seq_sum", max_len=10).item() == pytest.approx(expected / losses.shape[0])
    # Micro batches given the minibatch's sequence count add up to the whole.
    halves = [ppo.aggregate_loss(losses[i:i + 6], mask[i:i + 6], "per_seq_sum", num_seqs=12, max_len=10) for i in (0, 6)]
    assert sum(h.item() for h in halves) == pytest.approx(expected / 12)
    with pytest.raises(ValueError, match="max_len"):
        ppo.aggregate_loss(losses, mask, "per_seq_sum")


def test_clip_higher_widens_only_the_upper_bound():
    ratio = torch.tensor([[1.25, 0.7]], dtype=F64)
    logp, old, mask = ratio.log(), torch.zeros(1, 2, dtype=F64), torch.ones(1, 2)
    positive, negative = torch.ones(1, 2, dtype=F64), -torch.ones(1, 2, dtype=F64)
    symmetric, _ = ppo.policy_loss(logp, old, positive, mask, 0.2, loss_type="per_token")
    higher, _ = ppo.policy_loss(logp, old, positive, mask, 0.2, loss_type="per_token", clip_eps_high=0.28)
    assert symmetric.item() == pytest.approx(-(1.2 + 0.7) / 2)  # 1.25 clipped at 1.2
    assert higher.item() == pytest.approx(-(1.25 + 0.7) / 2)  # inside [0.8, 1.28]
    lower, _ = ppo.policy_loss(logp, old, negative, mask, 0.2, loss_type="per_token", clip_eps_high=0.28)
    assert lower.item() == pytest.approx((1.25 + 0.8) / 2)  # the lower bound stays 1 - 0.2


def test_the_registries_agree_with_the_tables_and_the_spec():
    import typing

    from rlhf_launch.core import algorithms, config, schema

    hints = schema.hints(config.RepeaterConfig)
    assert set(ppo.ADVANTAGE_ESTIMATORS) == set(algorithms.ESTIMATORS)
    assert list(typing.get_args(hints["advantage_estimator"])) == list(algorithms.ESTIMATORS)
    assert [name for name, e in algorithms.ESTIMATORS.items() if e.needs_critic] == ["gae"]
    assert set(ppo.GROUP_BASELINES) == {name for name, e in algorithms.ESTIMATORS.items() if e.needs_groups}
    assert set(ppo.KL_ESTIMATORS) == set(algorithms.KL_ESTIMATORS)
    assert list(typing.get_args(hints["kl_estimator"])) == list(algorithms.KL_ESTIMATORS)


def test_every_registered_estimator_states_its_formula_and_source():
    for fn in (*ppo.ADVANTAGE_ESTIMATORS.values(), *ppo.KL_ESTIMATORS.values(), *ppo.GROUP_BASELINES.values()):
        assert fn.__doc__ and any(word in fn.__doc__ for word in ("arXiv", "Schulman")), fn.__name__


def test_registering_a_name_the_table_lacks_or_twice_fails():
    with pytest.raises(ValueError, match="'ppo2' is not in the table of rlhf_launch/core/algorithms.py"):
        ppo.advantage_estimator("ppo2")(lambda x: (x.scores, None))
    with pytest.raises(ValueError, match="'k4' is not in the table"):
        ppo.kl_estimator("k4")(lambda x: x)
    with pytest.raises(ValueError, match="group estimator 'gae' is not in the table"):
        ppo.group_baseline("gae")(lambda g: g)
    with pytest.raises(ValueError, match="'grpo' is registered twice"):
        ppo.advantage_estimator("grpo")(lambda x: (x.scores, None))
    assert ppo.ADVANTAGE_ESTIMATORS["grpo"].__name__ == "_grpo_advantages"
