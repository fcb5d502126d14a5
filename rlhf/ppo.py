"""PPO math for RLHF, as pure functions of torch tensors.

Conventions: tensors are [B, T] (batch, time) unless stated. ``mask`` is 1 on
response tokens and 0 elsewhere (prompt, left/right padding); within a row the
1s are contiguous and a row may have none. Nothing here does I/O, logging or
communication, and nothing keeps state: callers own every number.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def logprobs_from_logits(logits: Tensor, labels: Tensor) -> Tensor:
    """log p(labels) = log_softmax(logits)[..., labels]; logits [B,T,V], labels [B,T] -> [B,T]."""
    # Half-precision log-softmax is too coarse for PPO ratios that sit near 1.
    if logits.dtype in _LOW_PRECISION:
        logits = logits.float()
    logp = torch.log_softmax(logits, dim=-1)
    return logp.gather(-1, labels.long().unsqueeze(-1)).squeeze(-1)


def entropy_from_logits(logits: Tensor) -> Tensor:
    """H = -sum_v p_v log p_v with p = softmax(logits); [B,T,V] -> [B,T]."""
    if logits.dtype in _LOW_PRECISION:
        logits = logits.float()
    logp = torch.log_softmax(logits, dim=-1)
    p = logp.exp()
    # Filtered-out vocabulary entries (logit -inf) give 0 * -inf; their term is 0.
    return -torch.where(p > 0, p * logp, torch.zeros_like(p)).sum(-1)


def masked_sum(x: Tensor, mask: Tensor, dim=None) -> Tensor:
    """sum_i x_i * m_i (over all elements, or along ``dim``)."""
    # where, not multiply: inf/NaN in padding must not leak into the sum.
    masked = torch.where(mask.bool(), x, torch.zeros_like(x))
    return masked.sum() if dim is None else masked.sum(dim)


def masked_mean(x: Tensor, mask: Tensor, dim=None) -> Tensor:
    """sum_i x_i m_i / sum_i m_i; 0 where the mask is empty."""
    count = mask.to(x.dtype)
    count = count.sum() if dim is None else count.sum(dim)
    return masked_sum(x, mask, dim) / count.clamp(min=1)


def masked_var(x: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    """Var over masked elements: sum m (x - mean)^2 / (n - 1) (unbiased) or / n.

    With n < 2 the Bessel factor n/(n-1) is undefined, so the (zero) biased value
    is returned instead of inf/NaN.
    """
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    n = mask.to(x.dtype).sum()
    if unbiased:
        var = torch.where(n > 1, var * n / (n - 1).clamp(min=1), var)
    return var


def masked_whiten(x: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """(x - mean) / sqrt(var + eps) over the masked elements of the whole batch.

    var is the unbiased masked variance. With shift_mean=False the mean is added
    back (scale only). Elements outside the mask are 0.
    """
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    whitened = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(mask.bool(), whitened, torch.zeros_like(whitened))


def kl_penalty(logprobs: Tensor, ref_logprobs: Tensor, mask: Tensor, kl_coeff: float) -> Tensor:
    """r_t = -kl_coeff * (log pi(a_t) - log pi_ref(a_t)) on response tokens, 0 elsewhere.

    This is the sampled ("k1") KL estimate, unbiased in expectation over a_t ~ pi. The per-token
    penalty is that of Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences"
    (arXiv:1909.08593); k1 is named in Schulman 2020, "Approximating KL Divergence" (blog note).
    """
    kl = logprobs - ref_logprobs
    return torch.where(mask.bool(), -kl_coeff * kl, torch.zeros_like(kl))


def add_score_at_last_token(token_rewards: Tensor, scores: Tensor, mask: Tensor) -> Tensor:
    """r[b, last_b] += scores[b], last_b = max{t : mask[b,t] = 1}; rows with no response unchanged.

    The sequence-level reward-model score is credited to the final action (EOS or truncation), so
    that a response's rewards sum to score - kl_coeff * KL, as in Ziegler et al. 2019 (arXiv:1909.08593).
    """
    m = mask.bool()
    positions = torch.arange(m.shape[1], device=m.device).expand_as(m)
    last = torch.where(m, positions, torch.full_like(positions, -1)).max(dim=1).values
    has = last >= 0
    rows = torch.arange(m.shape[0], device=m.device)
    out = token_rewards.clone()
    out[rows[has], last[has]] += scores.to(out.dtype)[has]
    return out


@torch.no_grad()
def compute_gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float):
    """Generalised advantage estimation over response tokens.

    V_t = values[:, t] is the value of the prefix before action a_t.
        delta_t = r_t + gamma * V_{t+1} - V_t   (V_{t+1} := 0 after the last response token)
        A_t     = delta_t + gamma * lam * A_{t+1}   (A := 0 after the last response token)
        returns = A + V                          (before any whitening of A)
    Both outputs are 0 outside the mask. Computed without grad: they are PPO targets.
    Schulman et al. 2016, "High-Dimensional Continuous Control Using Generalized Advantage
    Estimation" (arXiv:1506.02438).
    """
    m = mask.to(values.dtype)
    T = rewards.shape[1]
    zero = torch.zeros_like(values[:, 0])
    next_adv = zero
    advs = []
    for t in reversed(range(T)):
        # next_m is 0 when t+1 is padding or past T: the episode ended at t.
        next_m = m[:, t + 1] if t + 1 < T else zero
        next_v = torch.where(next_m > 0, values[:, t + 1], zero) if t + 1 < T else zero
        delta = rewards[:, t] + gamma * next_v - values[:, t]
        next_adv = (delta + gamma * lam * next_m * next_adv) * m[:, t]
        advs.append(next_adv)
    advantages = torch.stack(advs[::-1], dim=1)
    returns = torch.where(mask.bool(), advantages + values, torch.zeros_like(values))
    return advantages, returns


def aggregate_loss(
    token_losses: Tensor, mask: Tensor, loss_type: str, num_seqs=None, num_tokens=None
) -> Tensor:
    """Reduce [B,T] token losses to a scalar.

    per_token: sum_{b,t} l m / num_tokens            (num_tokens defaults to sum m)
    per_seq:   sum_b [sum_t l m / max(sum_t m, 1)] / num_seqs  (num_seqs defaults to B)

    The defaults normalise by this batch only. When a minibatch is split into micro
    batches (and across data-parallel ranks), pass the *minibatch* num_tokens /
    num_seqs to every piece: the numerators are sums, so the pieces' losses (and
    gradients) then add up exactly to the full-minibatch loss, whereas averaging
    per-piece means would weight tokens unevenly.
    """
    if loss_type == "per_token":
        denom = mask.to(token_losses.dtype).sum().clamp(min=1) if num_tokens is None else num_tokens
        return masked_sum(token_losses, mask) / denom
    if loss_type == "per_seq":
        denom = token_losses.shape[0] if num_seqs is None else num_seqs
        return masked_mean(token_losses, mask, dim=1).sum() / denom
    raise ValueError(f"unknown loss_type {loss_type!r}; expected 'per_token' or 'per_seq'")


def policy_loss(
    logprobs,
    old_logprobs,
    advantages,
    mask,
    clip_eps,
    loss_type="per_token",
    num_seqs=None,
    num_tokens=None,
):
    """PPO clipped surrogate.

    ratio = exp(logp - old_logp)
    l_t   = max(-A ratio, -A clip(ratio, 1 - eps, 1 + eps)), aggregated by aggregate_loss.
    stats: clipfrac = masked mean of [-A clip(ratio) > -A ratio] (clipped branch active),
           approx_kl = masked mean of 0.5 (logp - old_logp)^2.
    l_t is the negated L^CLIP of Schulman et al. 2017, "Proximal Policy Optimization Algorithms"
    (arXiv:1707.06347), eq. 7; approx_kl is the "k2" estimate of Schulman 2020, "Approximating KL
    Divergence" (blog note).
    """
    # Zero the log-ratio off-mask so garbage there cannot overflow exp and NaN the grads.
    log_ratio = torch.where(mask.bool(), logprobs - old_logprobs, torch.zeros_like(logprobs))
    ratio = log_ratio.exp()
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - clip_eps, 1 + clip_eps)
    loss = aggregate_loss(torch.maximum(unclipped, clipped), mask, loss_type, num_seqs, num_tokens)
    stats = {
        "clipfrac": masked_mean((clipped > unclipped).to(ratio.dtype), mask).detach(),
        "approx_kl": masked_mean(0.5 * log_ratio.detach() ** 2, mask),
    }
    return loss, stats


def value_loss(
    values,
    old_values,
    returns,
    mask,
    clip_eps,
    loss_type="per_token",
    num_seqs=None,
    num_tokens=None,
):
    """Clipped value loss.

    v_clip = old_v + clip(v - old_v, -eps, eps)
    l_t    = 0.5 max((v - R)^2, (v_clip - R)^2), aggregated by aggregate_loss.
    stats: clipfrac = masked mean of [(v_clip - R)^2 > (v - R)^2].
    Not in the PPO paper: the value clipping of OpenAI Baselines' PPO2, examined in Engstrom et al.
    2020, "Implementation Matters in Deep Policy Gradients: A Case Study on PPO and TRPO"
    (arXiv:2005.12729).
    """
    v_clipped = old_values + (values - old_values).clamp(-clip_eps, clip_eps)
    unclipped = (values - returns) ** 2
    clipped = (v_clipped - returns) ** 2
    loss = aggregate_loss(
        0.5 * torch.maximum(unclipped, clipped), mask, loss_type, num_seqs, num_tokens
    )
    stats = {"clipfrac": masked_mean((clipped > unclipped).to(values.dtype), mask).detach()}
    return loss, stats


def update_running_moments(count, mean, m2, x: Tensor):
    """Parallel merge of (count, mean, M2) with a 1-D batch x (Chan, Golub & LeVeque 1979, "Updating
    Formulae and a Pairwise Algorithm for Computing Sample Variances").

    n = n_a + n_b,  delta = mean_b - mean_a
    mean = mean_a + delta n_b / n
    M2   = M2_a + M2_b + delta^2 n_a n_b / n      (M2 = sum of squared deviations)
    Python floats in and out.
    """
    x = x.detach().double().flatten()
    n_b = x.numel()
    if n_b == 0:
        return count, mean, m2
    mean_b = x.mean().item()
    m2_b = ((x - mean_b) ** 2).sum().item()
    n = count + n_b
    delta = mean_b - mean
    return n, mean + delta * n_b / n, m2 + m2_b + delta**2 * count * n_b / n


def running_std(count, m2) -> float:
    """Population std sqrt(M2 / count) of the moments of update_running_moments (Chan et al. 1979);
    1.0 while count < 2 (no scaling yet)."""
    return math.sqrt(m2 / count) if count >= 2 else 1.0
