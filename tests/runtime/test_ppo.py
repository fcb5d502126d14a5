"""Tests for rlhf_launch/runtime/ppo.py against plain-Python loop references and hand-computed answers."""

import math
import statistics

import numpy as np
import pytest
import torch
from torch.testing import assert_close

from rlhf_launch.runtime import ppo

F64 = torch.float64

# (T, [(start, length) per row]): left offsets, right padding, an all-zero row, full rows.
LAYOUTS = [
    (1, [(0, 1)]),
    (5, [(0, 5), (2, 3), (1, 2), (0, 0)]),
    (7, [(3, 4), (0, 1), (0, 0), (2, 2), (6, 1)]),
]


def make_mask(T, spans, dtype=F64):
    mask = torch.zeros(len(spans), T, dtype=dtype)
    for b, (start, length) in enumerate(spans):
        mask[b, start : start + length] = 1
    return mask


def rand(gen, *shape):
    return torch.randn(*shape, generator=gen, dtype=F64)


def layouts():
    for i, (T, spans) in enumerate(LAYOUTS):
        yield torch.Generator().manual_seed(1234 + i), make_mask(T, spans)


def scalar(x):
    return torch.tensor(x, dtype=F64)


# ---------------------------------------------------------------- loop references


def ref_masked_elems(x, m):
    return [
        v
        for row_x, row_m in zip(x.tolist(), m.tolist(), strict=True)
        for v, k in zip(row_x, row_m, strict=True)
        if k
    ]


def ref_log_softmax(row):
    mx = max(row)
    lse = mx + math.log(sum(math.exp(v - mx) for v in row))
    return [v - lse for v in row]


def ref_gae(rewards, values, mask, gamma, lam):
    R, V, M = rewards.tolist(), values.tolist(), mask.tolist()
    B, T = len(R), len(R[0])
    adv = [[0.0] * T for _ in range(B)]
    ret = [[0.0] * T for _ in range(B)]
    for b in range(B):
        idx = [t for t in range(T) if M[b][t]]
        a_next = 0.0
        for k in reversed(range(len(idx))):
            t = idx[k]
            v_next = V[b][idx[k + 1]] if k + 1 < len(idx) else 0.0
            a_next = R[b][t] + gamma * v_next - V[b][t] + gamma * lam * a_next
            adv[b][t] = a_next
            ret[b][t] = a_next + V[b][t]
    return torch.tensor(adv, dtype=F64), torch.tensor(ret, dtype=F64)


def ref_aggregate(losses, mask, loss_type, num_seqs=None, num_tokens=None):
    L, M = losses.tolist(), mask.tolist()
    if loss_type == "per_token":
        n = num_tokens if num_tokens is not None else sum(sum(r) for r in M)
        return sum(
            x * m for rl, rm in zip(L, M, strict=True) for x, m in zip(rl, rm, strict=True)
        ) / max(n, 1)
    per_seq = [
        sum(x * m for x, m in zip(rl, rm, strict=True)) / max(sum(rm), 1)
        for rl, rm in zip(L, M, strict=True)
    ]
    return sum(per_seq) / (num_seqs if num_seqs is not None else len(L))


def ref_policy_tokens(logp, old, adv, eps):
    losses, clipped_flags, kls = [], [], []
    for lp_r, o_r, a_r in zip(logp.tolist(), old.tolist(), adv.tolist(), strict=True):
        lrow, crow, krow = [], [], []
        for lp, o, a in zip(lp_r, o_r, a_r, strict=True):
            ratio = math.exp(lp - o)
            unclipped = -a * ratio
            clipped = -a * min(max(ratio, 1 - eps), 1 + eps)
            lrow.append(max(unclipped, clipped))
            crow.append(1.0 if clipped > unclipped else 0.0)
            krow.append(0.5 * (lp - o) ** 2)
        losses.append(lrow)
        clipped_flags.append(crow)
        kls.append(krow)
    return [torch.tensor(t, dtype=F64) for t in (losses, clipped_flags, kls)]


def ref_value_tokens(v, old, ret, eps):
    losses, flags = [], []
    for v_r, o_r, r_r in zip(v.tolist(), old.tolist(), ret.tolist(), strict=True):
        lrow, frow = [], []
        for vv, o, r in zip(v_r, o_r, r_r, strict=True):
            vc = o + min(max(vv - o, -eps), eps)
            lrow.append(0.5 * max((vv - r) ** 2, (vc - r) ** 2))
            frow.append(1.0 if (vc - r) ** 2 > (vv - r) ** 2 else 0.0)
        losses.append(lrow)
        flags.append(frow)
    return torch.tensor(losses, dtype=F64), torch.tensor(flags, dtype=F64)


def ref_masked_mean_scalar(x, mask):
    elems = ref_masked_elems(x, mask)
    return sum(elems) / len(elems) if elems else 0.0


# ---------------------------------------------------------------- logits


@pytest.mark.parametrize("shape", [(1, 1, 2), (2, 3, 5), (3, 4, 11)])
def test_logprobs_from_logits_matches_loop(shape):
    gen = torch.Generator().manual_seed(sum(shape))
    logits = rand(gen, *shape) * 3
    labels = torch.randint(0, shape[-1], shape[:2], generator=gen)
    expected = [
        [ref_log_softmax(logits[b, t].tolist())[labels[b, t].item()] for t in range(shape[1])]
        for b in range(shape[0])
    ]
    assert_close(ppo.logprobs_from_logits(logits, labels), torch.tensor(expected, dtype=F64))


def test_logprobs_from_logits_upcasts_half_precision():
    gen = torch.Generator().manual_seed(0)
    logits = rand(gen, 2, 3, 7)
    labels = torch.randint(0, 7, (2, 3), generator=gen)
    out = ppo.logprobs_from_logits(logits.bfloat16(), labels)
    assert out.dtype == torch.float32
    assert_close(out, ppo.logprobs_from_logits(logits.bfloat16().float(), labels))


@pytest.mark.parametrize("shape", [(1, 1, 2), (2, 3, 5), (3, 4, 11)])
def test_entropy_from_logits_matches_loop(shape):
    gen = torch.Generator().manual_seed(10 + sum(shape))
    logits = rand(gen, *shape) * 2
    expected = []
    for b in range(shape[0]):
        row = []
        for t in range(shape[1]):
            logp = ref_log_softmax(logits[b, t].tolist())
            row.append(-sum(math.exp(lp) * lp for lp in logp))
        expected.append(row)
    assert_close(ppo.entropy_from_logits(logits), torch.tensor(expected, dtype=F64))


def test_entropy_known_answers_and_masked_vocab():
    uniform = torch.zeros(1, 1, 4, dtype=F64)
    assert_close(ppo.entropy_from_logits(uniform), torch.full((1, 1), math.log(4), dtype=F64))
    # Two of four entries filtered (-inf, as after top-k): uniform over the remaining two.
    filtered = torch.tensor([[[0.0, -math.inf, 0.0, -math.inf]]], dtype=F64)
    assert_close(ppo.entropy_from_logits(filtered), torch.full((1, 1), math.log(2), dtype=F64))
    one_hot = torch.tensor([[[5.0, -math.inf, -math.inf]]], dtype=F64)
    assert_close(ppo.entropy_from_logits(one_hot), torch.zeros(1, 1, dtype=F64))


# ---------------------------------------------------------------- masked statistics


@pytest.mark.parametrize("case", range(len(LAYOUTS)))
def test_masked_sum_mean_match_loop(case):
    gen, mask = list(layouts())[case]
    x = rand(gen, *mask.shape)
    elems = ref_masked_elems(x, mask)
    assert_close(ppo.masked_sum(x, mask), scalar(sum(elems)))
    assert_close(ppo.masked_mean(x, mask), scalar(sum(elems) / len(elems)))
    rows = [ref_masked_elems(x[b : b + 1], mask[b : b + 1]) for b in range(x.shape[0])]
    assert_close(ppo.masked_sum(x, mask, dim=1), torch.tensor([sum(r) for r in rows], dtype=F64))
    row_means = [sum(r) / len(r) if r else 0.0 for r in rows]
    assert_close(ppo.masked_mean(x, mask, dim=1), torch.tensor(row_means, dtype=F64))
    cols = [ref_masked_elems(x[:, t : t + 1].T, mask[:, t : t + 1].T) for t in range(x.shape[1])]
    col_means = [sum(c) / len(c) if c else 0.0 for c in cols]
    assert_close(ppo.masked_mean(x, mask, dim=0), torch.tensor(col_means, dtype=F64))


def test_masked_mean_empty_mask_is_zero_not_nan():
    x = torch.ones(2, 3, dtype=F64)
    mask = torch.zeros(2, 3, dtype=F64)
    assert_close(ppo.masked_mean(x, mask), scalar(0.0))
    assert_close(ppo.masked_mean(x, mask, dim=1), torch.zeros(2, dtype=F64))


def test_masked_ops_ignore_non_finite_padding_and_accept_bool_mask():
    x = torch.tensor([[1.0, 2.0, math.inf], [math.nan, 4.0, 6.0]], dtype=F64)
    mask = torch.tensor([[True, True, False], [False, True, True]])
    assert_close(ppo.masked_sum(x, mask), scalar(13.0))
    assert_close(ppo.masked_mean(x, mask, dim=1), torch.tensor([1.5, 5.0], dtype=F64))


@pytest.mark.parametrize("case", range(1, len(LAYOUTS)))
def test_masked_var_matches_statistics(case):
    gen, mask = list(layouts())[case]
    x = rand(gen, *mask.shape) * 3 + 1
    elems = ref_masked_elems(x, mask)
    assert_close(ppo.masked_var(x, mask), scalar(statistics.variance(elems)))
    assert_close(ppo.masked_var(x, mask, unbiased=False), scalar(statistics.pvariance(elems)))


def test_masked_var_single_element_is_zero_not_inf():
    x = torch.tensor([[3.0, 7.0]], dtype=F64)
    assert_close(ppo.masked_var(x, torch.tensor([[0.0, 1.0]], dtype=F64)), scalar(0.0))


@pytest.mark.parametrize("case", range(1, len(LAYOUTS)))
@pytest.mark.parametrize("shift_mean", [True, False])
def test_masked_whiten_matches_loop(case, shift_mean):
    gen, mask = list(layouts())[case]
    x = rand(gen, *mask.shape) * 4 + 2
    elems = ref_masked_elems(x, mask)
    mean, var = statistics.mean(elems), statistics.variance(elems)
    expected = [
        [
            ((v - mean) / math.sqrt(var + 1e-8) + (0.0 if shift_mean else mean)) if m else 0.0
            for v, m in zip(rx, rm, strict=True)
        ]
        for rx, rm in zip(x.tolist(), mask.tolist(), strict=True)
    ]
    out = ppo.masked_whiten(x, mask, shift_mean=shift_mean)
    assert_close(out, torch.tensor(expected, dtype=F64))


def test_masked_whiten_moments_and_zero_outside_mask():
    gen = torch.Generator().manual_seed(7)
    mask = make_mask(6, [(2, 4), (0, 3), (0, 0)])
    x = rand(gen, 3, 6) * 5 - 3
    x[mask == 0] = 1e6  # padding garbage must neither influence stats nor survive
    out = ppo.masked_whiten(x, mask)
    assert_close(ppo.masked_mean(out, mask), scalar(0.0), atol=1e-12, rtol=0)
    assert_close(ppo.masked_var(out, mask), scalar(1.0), atol=1e-7, rtol=0)
    assert torch.all(out[mask == 0] == 0)
    kept = ppo.masked_whiten(x, mask, shift_mean=False)
    assert_close(ppo.masked_mean(kept, mask), ppo.masked_mean(x, mask))
    assert_close(ppo.masked_var(kept, mask), scalar(1.0), atol=1e-7, rtol=0)
    assert torch.all(kept[mask == 0] == 0)


# ---------------------------------------------------------------- rewards


def test_kl_penalty_known_answer():
    logp = torch.tensor([[-1.0, -2.0, -0.5, -3.0]], dtype=F64)
    ref = torch.tensor([[-1.5, -1.0, -0.5, -9.0]], dtype=F64)
    mask = torch.tensor([[0.0, 1.0, 1.0, 0.0]], dtype=F64)
    # t=1: -0.1 * (-2 - -1) = 0.1; t=2: 0; t=0,3 outside the mask.
    expected = torch.tensor([[0.0, 0.1, 0.0, 0.0]], dtype=F64)
    assert_close(ppo.kl_penalty(logp, ref, mask, 0.1), expected)


@pytest.mark.parametrize("case", range(len(LAYOUTS)))
def test_kl_penalty_matches_loop(case):
    gen, mask = list(layouts())[case]
    logp, ref = rand(gen, *mask.shape), rand(gen, *mask.shape)
    expected = [
        [-0.05 * (a - r) if m else 0.0 for a, r, m in zip(ra, rr, rm, strict=True)]
        for ra, rr, rm in zip(logp.tolist(), ref.tolist(), mask.tolist(), strict=True)
    ]
    assert_close(ppo.kl_penalty(logp, ref, mask, 0.05), torch.tensor(expected, dtype=F64))


def test_add_score_at_last_token_known_answer():
    rewards = torch.tensor(
        [[1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0], [2.0, 2.0, 2.0, 2.0]], dtype=F64
    )
    mask = torch.tensor([[0, 1, 1, 0], [1, 1, 1, 1], [0, 0, 0, 0]], dtype=F64)
    scores = torch.tensor([10.0, -3.0, 99.0], dtype=F64)
    before = rewards.clone()
    out = ppo.add_score_at_last_token(rewards, scores, mask)
    expected = torch.tensor(
        [[1.0, 1.0, 11.0, 1.0], [0.0, 0.0, 0.0, -3.0], [2.0, 2.0, 2.0, 2.0]], dtype=F64
    )
    assert_close(out, expected)
    assert_close(rewards, before)  # input untouched: a new tensor is returned


@pytest.mark.parametrize("case", range(len(LAYOUTS)))
def test_add_score_at_last_token_matches_loop(case):
    gen, mask = list(layouts())[case]
    rewards, scores = rand(gen, *mask.shape), rand(gen, mask.shape[0])
    expected = rewards.tolist()
    for b, row in enumerate(mask.tolist()):
        ones = [t for t, m in enumerate(row) if m]
        if ones:
            expected[b][ones[-1]] += scores[b].item()
    assert_close(
        ppo.add_score_at_last_token(rewards, scores, mask.bool()), torch.tensor(expected, dtype=F64)
    )


# ---------------------------------------------------------------- GAE


def test_gae_known_answer_gamma1_lam1():
    rewards = torch.tensor([[1.0, 2.0, 3.0]], dtype=F64)
    values = torch.tensor([[0.5, 0.25, 4.0]], dtype=F64)
    mask = torch.ones(1, 3, dtype=F64)
    adv, ret = ppo.compute_gae(rewards, values, mask, gamma=1.0, lam=1.0)
    # A_t = sum_{k>=t} r_k - V_t: 6 - 0.5, 5 - 0.25, 3 - 4; returns = reward-to-go.
    assert_close(adv, torch.tensor([[5.5, 4.75, -1.0]], dtype=F64))
    assert_close(ret, torch.tensor([[6.0, 5.0, 3.0]], dtype=F64))


def test_gae_known_answer_discounted_with_offset_and_padding():
    # Response at columns 1..2; column 0 is prompt, column 3 is padding (its value must be ignored).
    rewards = torch.tensor([[7.0, 1.0, 2.0, 5.0]], dtype=F64)
    values = torch.tensor([[9.0, 1.0, 3.0, 100.0]], dtype=F64)
    mask = torch.tensor([[0.0, 1.0, 1.0, 0.0]], dtype=F64)
    adv, ret = ppo.compute_gae(rewards, values, mask, gamma=0.5, lam=0.5)
    # delta_2 = 2 + 0 - 3 = -1 ; A_2 = -1
    # delta_1 = 1 + 0.5*3 - 1 = 1.5 ; A_1 = 1.5 + 0.25*(-1) = 1.25
    assert_close(adv, torch.tensor([[0.0, 1.25, -1.0, 0.0]], dtype=F64))
    assert_close(ret, torch.tensor([[0.0, 2.25, 2.0, 0.0]], dtype=F64))


def test_gae_lam0_is_one_step_td():
    rewards = torch.tensor([[0.0, 1.0, -1.0]], dtype=F64)
    values = torch.tensor([[2.0, 3.0, 4.0]], dtype=F64)
    adv, _ = ppo.compute_gae(rewards, values, torch.ones(1, 3, dtype=F64), gamma=0.9, lam=0.0)
    assert_close(adv, torch.tensor([[0.0 + 0.9 * 3 - 2, 1.0 + 0.9 * 4 - 3, -1.0 - 4]], dtype=F64))


@pytest.mark.parametrize("case", range(len(LAYOUTS)))
@pytest.mark.parametrize(("gamma", "lam"), [(1.0, 0.95), (0.9, 0.8), (0.99, 1.0)])
def test_gae_matches_loop(case, gamma, lam):
    gen, mask = list(layouts())[case]
    rewards, values = rand(gen, *mask.shape), rand(gen, *mask.shape)
    adv, ret = ppo.compute_gae(rewards, values, mask, gamma, lam)
    ref_adv, ref_ret = ref_gae(rewards, values, mask, gamma, lam)
    assert_close(adv, ref_adv)
    assert_close(ret, ref_ret)
    assert torch.all(adv[mask == 0] == 0) and torch.all(ret[mask == 0] == 0)


def test_gae_carries_no_grad():
    values = torch.ones(1, 2, dtype=F64, requires_grad=True)
    adv, ret = ppo.compute_gae(torch.ones(1, 2, dtype=F64), values, torch.ones(1, 2), 1.0, 1.0)
    assert not adv.requires_grad and not ret.requires_grad


# ---------------------------------------------------------------- loss aggregation


def test_aggregate_loss_known_answer_per_token_vs_per_seq():
    losses = torch.tensor([[1.0, 2.0, 3.0, 9.0], [4.0, 9.0, 9.0, 9.0]], dtype=F64)
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]], dtype=F64)
    assert_close(ppo.aggregate_loss(losses, mask, "per_token"), scalar(10.0 / 4))
    assert_close(ppo.aggregate_loss(losses, mask, "per_seq"), scalar((2.0 + 4.0) / 2))
    assert_close(ppo.aggregate_loss(losses, mask, "per_token", num_tokens=8), scalar(10.0 / 8))
    assert_close(ppo.aggregate_loss(losses, mask, "per_seq", num_seqs=4), scalar(6.0 / 4))


@pytest.mark.parametrize("case", range(len(LAYOUTS)))
@pytest.mark.parametrize("loss_type", ["per_token", "per_seq"])
def test_aggregate_loss_matches_loop(case, loss_type):
    gen, mask = list(layouts())[case]
    losses = rand(gen, *mask.shape)
    assert_close(
        ppo.aggregate_loss(losses, mask, loss_type), scalar(ref_aggregate(losses, mask, loss_type))
    )


@pytest.mark.parametrize("loss_type", ["per_token", "per_seq"])
def test_aggregate_loss_micro_batches_sum_to_full_batch(loss_type):
    T, spans = LAYOUTS[2]
    mask = make_mask(T, spans)
    losses = rand(torch.Generator().manual_seed(3), *mask.shape)
    full = ppo.aggregate_loss(losses, mask, loss_type)
    kwargs = {"num_seqs": mask.shape[0], "num_tokens": mask.sum()}
    pieces = [
        ppo.aggregate_loss(losses[s], mask[s], loss_type, **kwargs)
        for s in (slice(0, 2), slice(2, 5))
    ]
    assert_close(sum(pieces), full)
    # Without the shared normalisers the pieces' mean is NOT the full loss on this uneven split.
    naive = (
        sum(ppo.aggregate_loss(losses[s], mask[s], loss_type) for s in (slice(0, 2), slice(2, 5)))
        / 2
    )
    assert not torch.isclose(naive, full)


def test_aggregate_loss_empty_mask_and_unknown_type():
    losses = torch.ones(2, 3, dtype=F64)
    mask = torch.zeros(2, 3, dtype=F64)
    assert_close(ppo.aggregate_loss(losses, mask, "per_token"), scalar(0.0))
    assert_close(ppo.aggregate_loss(losses, mask, "per_seq"), scalar(0.0))
    with pytest.raises(ValueError):
        ppo.aggregate_loss(losses, mask, "per_sequence")


# ---------------------------------------------------------------- policy / value losses


def test_policy_loss_known_answer_clipping():
    eps = 0.2
    # ratios e^{ln 1.5}=1.5 (above), e^{ln 0.5}=0.5 (below) for A = +1 and A = -1.
    log_ratio = torch.tensor(
        [[math.log(1.5), math.log(1.5), math.log(0.5), math.log(0.5)]], dtype=F64
    )
    old = torch.full((1, 4), -1.0, dtype=F64)
    adv = torch.tensor([[1.0, -1.0, 1.0, -1.0]], dtype=F64)
    mask = torch.ones(1, 4, dtype=F64)
    loss, stats = ppo.policy_loss(old + log_ratio, old, adv, mask, eps)
    # A>0, r=1.5: max(-1.5, -1.2) = -1.2 (clipped)   A<0, r=1.5: max(1.5, 1.2) = 1.5
    # A>0, r=0.5: max(-0.5, -0.8) = -0.5             A<0, r=0.5: max(0.5, 0.8) = 0.8 (clipped)
    assert_close(loss, scalar((-1.2 + 1.5 - 0.5 + 0.8) / 4))
    assert_close(stats["clipfrac"], scalar(0.5))
    assert_close(
        stats["approx_kl"], scalar(0.5 * (2 * math.log(1.5) ** 2 + 2 * math.log(0.5) ** 2) / 4)
    )
    for v in stats.values():
        assert v.ndim == 0 and not v.requires_grad


@pytest.mark.parametrize("case", range(len(LAYOUTS)))
@pytest.mark.parametrize("loss_type", ["per_token", "per_seq"])
def test_policy_loss_matches_loop(case, loss_type):
    gen, mask = list(layouts())[case]
    old = rand(gen, *mask.shape) - 2
    logp = old + 0.4 * rand(gen, *mask.shape)
    adv = rand(gen, *mask.shape)
    loss, stats = ppo.policy_loss(logp, old, adv, mask, 0.2, loss_type=loss_type)
    tok, flags, kls = ref_policy_tokens(logp, old, adv, 0.2)
    assert_close(loss, scalar(ref_aggregate(tok, mask, loss_type)))
    assert_close(stats["clipfrac"], scalar(ref_masked_mean_scalar(flags, mask)))
    assert_close(stats["approx_kl"], scalar(ref_masked_mean_scalar(kls, mask)))


def test_policy_loss_gradients_flow_and_vanish_where_clipped():
    eps = 0.2
    old = torch.tensor([[-1.0, -1.0, -1.0, -1.0, -1.0]], dtype=F64)
    # Token 0 unclipped (r=1.1, A>0), token 1 clipped (r=1.5, A>0), token 2 unclipped (r=1.5, A<0),
    # token 3 is padding with a garbage old logprob that would overflow exp if not masked.
    logp = torch.tensor(
        [[-1.0 + math.log(1.1), -1.0 + math.log(1.5), -1.0 + math.log(1.5), 0.0, 0.0]], dtype=F64
    )
    old[0, 3] = -1e4
    logp.requires_grad_(True)
    adv = torch.tensor([[2.0, 1.0, -1.0, 5.0, 5.0]], dtype=F64)
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0, 0.0]], dtype=F64)
    loss, _ = ppo.policy_loss(logp, old, adv, mask, eps)
    loss.backward()
    grad = logp.grad
    assert torch.isfinite(loss) and torch.all(torch.isfinite(grad))
    # d/dlogp of -A*ratio/3 = -A*ratio/3.
    assert_close(grad, torch.tensor([[-2.0 * 1.1 / 3, 0.0, 1.5 / 3, 0.0, 0.0]], dtype=F64))


def test_value_loss_known_answer():
    eps = 0.5
    old = torch.tensor([[0.0, 0.0, 0.0, 0.0]], dtype=F64)
    values = torch.tensor([[2.0, 2.0, 0.25, 9.0]], dtype=F64)
    returns = torch.tensor([[2.0, 0.0, 1.0, 0.0]], dtype=F64)
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]], dtype=F64)
    loss, stats = ppo.value_loss(values, old, returns, mask, eps)
    # t0: v_clip=0.5 -> max(0, 2.25)=2.25 (clipped)   t1: v_clip=0.5 -> max(4, 0.25)=4
    # t2: v_clip=0.25 -> max(0.5625, 0.5625) (tie: not counted as clipped)   t3 padding
    assert_close(loss, scalar(0.5 * (2.25 + 4.0 + 0.5625) / 3))
    assert_close(stats["clipfrac"], scalar(1.0 / 3))


@pytest.mark.parametrize("case", range(len(LAYOUTS)))
@pytest.mark.parametrize("loss_type", ["per_token", "per_seq"])
def test_value_loss_matches_loop(case, loss_type):
    gen, mask = list(layouts())[case]
    old, returns = rand(gen, *mask.shape), rand(gen, *mask.shape)
    values = old + 0.5 * rand(gen, *mask.shape)
    loss, stats = ppo.value_loss(values, old, returns, mask, 0.2, loss_type=loss_type)
    tok, flags = ref_value_tokens(values, old, returns, 0.2)
    assert_close(loss, scalar(ref_aggregate(tok, mask, loss_type)))
    assert_close(stats["clipfrac"], scalar(ref_masked_mean_scalar(flags, mask)))


def test_value_loss_gradients_flow():
    gen = torch.Generator().manual_seed(5)
    mask = make_mask(4, [(1, 3), (0, 2)])
    values = rand(gen, 2, 4).requires_grad_(True)
    loss, _ = ppo.value_loss(values, values.detach() + 0.1, rand(gen, 2, 4), mask, 0.2)
    loss.backward()
    assert torch.all(torch.isfinite(values.grad))
    assert torch.all(values.grad[mask == 0] == 0) and torch.any(values.grad[mask == 1] != 0)


# ---------------------------------------------------------------- running moments


def test_running_moments_match_concatenated_data():
    gen = torch.Generator().manual_seed(11)
    chunks = [rand(gen, n) * 3 + 5 for n in (1, 4, 0, 7, 2)]
    count, mean, m2 = 0, 0.0, 0.0
    seen = []
    for chunk in chunks:
        count, mean, m2 = ppo.update_running_moments(count, mean, m2, chunk)
        seen += chunk.tolist()
        assert count == len(seen)
        assert mean == pytest.approx(statistics.fmean(seen), rel=1e-12, abs=1e-12)
        assert m2 == pytest.approx(
            float(np.sum((np.array(seen) - np.mean(seen)) ** 2)), rel=1e-10, abs=1e-12
        )
        expected_std = statistics.pstdev(seen) if len(seen) >= 2 else 1.0
        assert ppo.running_std(count, m2) == pytest.approx(expected_std, rel=1e-10)
    assert ppo.running_std(count, m2) == pytest.approx(float(np.std(np.array(seen))), rel=1e-10)


def test_running_std_defaults_to_one_before_two_samples():
    assert ppo.running_std(0, 0.0) == 1.0
    count, mean, m2 = ppo.update_running_moments(0, 0.0, 0.0, torch.tensor([3.0]))
    assert (count, mean, m2) == (1, 3.0, 0.0)
    assert ppo.running_std(count, m2) == 1.0
    count, mean, m2 = ppo.update_running_moments(count, mean, m2, torch.tensor([5.0]))
    assert (count, mean, m2) == (2, 4.0, 2.0)
    assert ppo.running_std(count, m2) == pytest.approx(1.0)
    count, mean, m2 = ppo.update_running_moments(count, mean, m2, torch.tensor([0.0, 8.0]))
    assert (count, mean, m2) == (4, 4.0, 34.0)
    assert ppo.running_std(count, m2) == pytest.approx(math.sqrt(34.0 / 4))


def test_normalize_by_moments_matches_the_population_formula():
    gen = torch.Generator().manual_seed(7)
    seen: list[float] = []
    count, mean, m2 = 0, 0.0, 0.0
    for size in (3, 1, 5):
        batch = rand(gen, size)
        seen += batch.tolist()
        count, mean, m2 = ppo.update_running_moments(count, mean, m2, batch)
        mu = sum(seen) / len(seen)
        sigma = math.sqrt(sum((x - mu) ** 2 for x in seen) / len(seen))
        expected = [(x - mu) / (sigma + 1e-8) for x in batch.tolist()]
        assert ppo.normalize_by_moments(batch, count, mean, m2).tolist() == pytest.approx(expected, rel=1e-9, abs=1e-12)


def test_normalize_by_moments_of_constant_scores_is_zero_and_needs_a_count():
    batch = torch.full((4,), 0.7, dtype=F64)
    count, mean, m2 = ppo.update_running_moments(0, 0.0, 0.0, batch)
    assert ppo.normalize_by_moments(batch, count, mean, m2).tolist() == [0.0] * 4
    with pytest.raises(ValueError, match="at least one value"):
        ppo.normalize_by_moments(batch, 0, 0.0, 0.0)


def ref_is_weights(old, gen, mask, cap):
    """min(exp(old - gen), cap) on the mask, 0 off it, one token at a time."""
    out = torch.zeros_like(old)
    for i in range(old.shape[0]):
        for t in range(old.shape[1]):
            if mask[i, t]:
                out[i, t] = min(math.exp(float(old[i, t] - gen[i, t])), cap)
    return out


@pytest.mark.parametrize("case", range(len(LAYOUTS)))
def test_truncated_is_weights_match_loop(case):
    gen, mask = list(layouts())[case]
    old = rand(gen, *mask.shape) - 2
    behaviour = old + 0.8 * rand(gen, *mask.shape)
    behaviour[mask == 0] = 1e4  # garbage off the mask must not overflow
    weights = ppo.truncated_is_weights(old, behaviour, mask, cap=1.3)
    assert_close(weights, ref_is_weights(old, behaviour, mask, 1.3))
    assert float(weights.max()) <= 1.3


@pytest.mark.parametrize("loss_type", ["per_token", "per_seq"])
def test_policy_loss_with_is_weights_matches_loop_and_weights_get_no_grad(loss_type):
    gen, mask = list(layouts())[1]
    old = rand(gen, *mask.shape) - 2
    logp = (old + 0.4 * rand(gen, *mask.shape)).requires_grad_(True)
    adv = rand(gen, *mask.shape)
    weights = (0.5 + rand(gen, *mask.shape).abs()).requires_grad_(True)
    loss, _ = ppo.policy_loss(logp, old, adv, mask, 0.2, loss_type=loss_type, is_weights=weights)
    tok, _, _ = ref_policy_tokens(logp.detach(), old, adv, 0.2)
    assert_close(loss.detach(), scalar(ref_aggregate(tok * weights.detach(), mask, loss_type)))
    loss.backward()
    assert weights.grad is None and logp.grad is not None
