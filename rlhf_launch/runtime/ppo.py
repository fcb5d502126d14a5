"""PPO math for RLHF, as pure functions of torch tensors.

Conventions: tensors are [B, T] (batch, time) unless stated. ``mask`` is 1 on
response tokens and 0 elsewhere (prompt, left/right padding); within a row the
1s are contiguous and a row may have none. Nothing here does I/O, logging or
communication, and nothing keeps state: callers own every number.

Each advantage and KL estimator is registered next to its definition under its name from the one table of
names, rlhf_launch/core/algorithms.py (``@advantage_estimator``, ``@kl_estimator``, ``@group_baseline``); that
module's docstring says how to add one.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from rlhf_launch.core import algorithms

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
    token_losses: Tensor, mask: Tensor, loss_type: str, num_seqs=None, num_tokens=None, max_len=None
) -> Tensor:
    """Reduce [B,T] token losses to a scalar.

    per_token:   sum_{b,t} l m / num_tokens                       (num_tokens defaults to sum m)
    per_seq:     sum_b [sum_t l m / max(sum_t m, 1)] / num_seqs    (num_seqs defaults to B)
    per_seq_sum: sum_b [sum_t l m / max_len] / num_seqs            (max_len: the constant max_new_tokens)

    per_seq_sum is Dr. GRPO's aggregation (Liu et al. 2025, arXiv:2503.20783): dividing by a constant
    instead of each response's length removes the bias towards long wrong and short right answers.

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
    if loss_type == "per_seq_sum":
        if max_len is None:
            raise ValueError("per_seq_sum needs max_len (max_new_tokens)")
        denom = token_losses.shape[0] if num_seqs is None else num_seqs
        return masked_sum(token_losses, mask) / max_len / denom
    raise ValueError(f"unknown loss_type {loss_type!r}; expected 'per_token', 'per_seq' or 'per_seq_sum'")


def policy_loss(
    logprobs,
    old_logprobs,
    advantages,
    mask,
    clip_eps,
    loss_type="per_token",
    num_seqs=None,
    num_tokens=None,
    clip_eps_high=None,
    max_len=None,
    is_weights=None,
):
    """PPO clipped surrogate.

    ratio = exp(logp - old_logp)
    l_t   = w_t max(-A ratio, -A clip(ratio, 1 - eps, 1 + eps_high)), aggregated by aggregate_loss;
            eps_high defaults to eps (a larger one is DAPO's clip-higher, Yu et al. 2025, arXiv:2503.14476);
            w_t = ``is_weights`` (constants, truncated_is_weights) corrects for a generator whose policy differs
            from the actor's old one; 1 without them.
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
    high = clip_eps if clip_eps_high is None else clip_eps_high
    clipped = -advantages * ratio.clamp(1 - clip_eps, 1 + high)
    per_token = torch.maximum(unclipped, clipped)
    if is_weights is not None:
        per_token = per_token * is_weights.detach()
    loss = aggregate_loss(per_token, mask, loss_type, num_seqs, num_tokens, max_len)
    stats = {
        "clipfrac": masked_mean((clipped > unclipped).to(ratio.dtype), mask).detach(),
        "approx_kl": masked_mean(0.5 * log_ratio.detach() ** 2, mask),
    }
    return loss, stats


def truncated_is_weights(old_logprobs: Tensor, behaviour_logprobs: Tensor, mask: Tensor, cap: float) -> Tensor:
    """Truncated importance weights of the tokens a generator sampled, 0 off the mask.

    w_t = min(pi_old(a_t) / pi_gen(a_t), cap) = min(exp(old_logp_t - gen_logp_t), cap)

    pi_gen is the policy the generator sampled with: an older copy of the weights (an asynchronous
    rollout) or the same weights in another engine's numerics (vLLM). Truncation bounds the variance
    that a rare token with a tiny pi_gen would add. Truncated importance sampling is that of IMPALA
    (Espeholt et al. 2018, arXiv:1802.01561, eq. 1, whose rho-bar is ``cap``); applied to the PPO
    policy loss against a rollout engine's log-probs as in Yao et al. 2025, "Your Efficient RL Framework
    Secretly Brings You Off-Policy RL Training" (TIS).
    """
    log_ratio = torch.where(mask.bool(), old_logprobs - behaviour_logprobs, torch.zeros_like(old_logprobs))
    return torch.where(mask.bool(), log_ratio.exp().clamp(max=cap), torch.zeros_like(log_ratio))


def value_loss(
    values,
    old_values,
    returns,
    mask,
    clip_eps,
    loss_type="per_token",
    num_seqs=None,
    num_tokens=None,
    max_len=None,
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
        0.5 * torch.maximum(unclipped, clipped), mask, loss_type, num_seqs, num_tokens, max_len
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


def normalize_by_moments(x: Tensor, count, mean, m2, eps: float = 1e-8) -> Tensor:
    """(x - mean) / (sqrt(M2 / count) + eps): x standardised by running moments that already include x.

    sqrt(M2 / count) is the population std of update_running_moments (Chan et al. 1979). eps is added to
    the std, not the variance, as in XTuner's RLHF repeater (``RunningStates``, xtuner/rlhf/repeaters/base.py,
    itself after stable-baselines3's RunningMeanStd), so constant scores give 0 rather than a division by 0.
    The moments must count at least one value (x's own), else there is nothing to normalise by.
    """
    if count <= 0:
        raise ValueError(f"normalize_by_moments needs moments of at least one value, got count {count}")
    return (x - mean) / (math.sqrt(m2 / count) + eps)


# --------------------------------------------------------------------------- the registries
# Each estimator's function is registered under its name from the one table of names (rlhf_launch/core/algorithms.py,
# which the torch-free planner, the spec and the README read); tests/runtime/test_ppo_estimators.py fails while the
# registries and the tables disagree.
ADVANTAGE_ESTIMATORS: dict[str, Callable[[AdvantageInputs], tuple[Tensor, Tensor | None]]] = {}
KL_ESTIMATORS: dict[str, Callable[[Tensor], Tensor]] = {}
GROUP_BASELINES: dict[str, Callable[[Tensor], Tensor]] = {}
_MIN_GROUP: dict[str, int] = {}  # group estimator -> the fewest samples per prompt it is defined for
Decorator = Callable[[Callable], Callable]


def _registering(registry: dict[str, Callable], allowed: Iterable[str], kind: str, names: tuple[str, ...]) -> Decorator:
    """A decorator registering a function in ``registry`` under each of ``names``, which must be ``allowed`` (names of a
    table of rlhf_launch/core/algorithms.py) and not registered yet: a wrong name fails when this module loads."""
    allowed = tuple(allowed)

    def decorate(fn: Callable) -> Callable:
        for name in names:
            if name not in allowed:
                raise ValueError(f"{kind} {name!r} is not in the table of rlhf_launch/core/algorithms.py ({', '.join(allowed)}); "
                                 "add its row there first")
            if name in registry:
                raise ValueError(f"{kind} {name!r} is registered twice")
            registry[name] = fn
        return fn
    return decorate


def advantage_estimator(name: str) -> Decorator:
    """``@advantage_estimator(name)``: registers an AdvantageInputs -> (advantages, returns or None) function as
    repeater_config.advantage_estimator ``name``, a name of ``rlhf_launch.core.algorithms.ESTIMATORS``."""
    return _registering(ADVANTAGE_ESTIMATORS, algorithms.ESTIMATORS, "advantage_estimator", (name,))


def kl_estimator(name: str) -> Decorator:
    """``@kl_estimator(name)``: registers a log-ratio -> per-token KL estimate function as repeater_config.kl_estimator
    ``name``, a name of ``rlhf_launch.core.algorithms.KL_ESTIMATORS``."""
    return _registering(KL_ESTIMATORS, algorithms.KL_ESTIMATORS, "kl_estimator", (name,))


def group_baseline(*names: str, min_group: int = 1) -> Decorator:
    """``@group_baseline(name, ...)``: registers a [G, n] -> [G, n] function of the scores of each prompt's n samples
    as the sequence advantages of the group estimators ``names`` (those of rlhf_launch.core.algorithms.ESTIMATORS that
    need groups); ``min_group``: the fewest samples per prompt it is defined for."""
    register = _registering(GROUP_BASELINES, [n for n, e in algorithms.ESTIMATORS.items() if e.needs_groups], "group estimator", names)

    def decorate(fn: Callable) -> Callable:
        _MIN_GROUP.update(dict.fromkeys(names, min_group))
        return register(fn)
    return decorate


# --------------------------------------------------------------------------- KL estimators
@kl_estimator("k1")
def _k1(log_ratio: Tensor) -> Tensor:
    """k1 = x, x = log pi(a_t) - log pi_ref(a_t): unbiased, can be negative (Schulman 2020, "Approximating KL Divergence")."""
    return log_ratio


@kl_estimator("k2")
def _k2(log_ratio: Tensor) -> Tensor:
    """k2 = x^2 / 2: biased, always >= 0, low variance (Schulman 2020, "Approximating KL Divergence")."""
    return 0.5 * log_ratio**2


@kl_estimator("k3")
def _k3(log_ratio: Tensor) -> Tensor:
    """k3 = exp(-x) - 1 + x: unbiased and always >= 0 (Schulman 2020, "Approximating KL Divergence"; the KL term of
    GRPO's loss, Shao et al. 2024, arXiv:2402.03300, eq. 4)."""
    # expm1 keeps it accurate (and >= 0) near x = 0.
    return torch.expm1(-log_ratio) + log_ratio


def kl_estimate(logprobs: Tensor, ref_logprobs: Tensor, mask: Tensor, estimator: str = "k1") -> Tensor:
    """Per-token estimate of KL(pi || pi_ref) from the sampled token, 0 off the mask; x = log pi(a_t) - log pi_ref(a_t):

    k1 = x                      unbiased, can be negative
    k2 = x^2 / 2                biased, always >= 0, low variance
    k3 = exp(-x) - 1 + x        unbiased and always >= 0 (the estimator GRPO puts in its loss)

    Schulman 2020, "Approximating KL Divergence" (blog note); k3 in the loss is DeepSeekMath's GRPO (Shao et al.
    2024, arXiv:2402.03300, eq. 4).
    """
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"unknown kl_estimator {estimator!r}; expected one of {sorted(KL_ESTIMATORS)}")
    log_ratio = torch.where(mask.bool(), logprobs - ref_logprobs, torch.zeros_like(logprobs))
    kl = KL_ESTIMATORS[estimator](log_ratio)
    return torch.where(mask.bool(), kl, torch.zeros_like(kl))


# --------------------------------------------------------------------------- group baselines
def _groups(scores: Tensor, group_size: int) -> Tensor:
    if group_size < 1 or scores.shape[0] % group_size:
        raise ValueError(f"{scores.shape[0]} scores do not form groups of {group_size}")
    return scores.reshape(-1, group_size)


@group_baseline("grpo", min_group=2)
def _grpo(groups: Tensor) -> Tensor:
    """(r - mean_g) / (std_g + 1e-6), std_g unbiased: Shao et al. 2024, DeepSeekMath (arXiv:2402.03300)."""
    return (groups - groups.mean(1, keepdim=True)) / (groups.std(1, unbiased=True, keepdim=True) + 1e-6)


@group_baseline("dr_grpo", "reinforce_pp_baseline")
def _mean_baseline(groups: Tensor) -> Tensor:
    """r - mean_g: Dr. GRPO (Liu et al. 2025, "Understanding R1-Zero-Like Training", arXiv:2503.20783) and the
    baseline of REINFORCE++ with a group baseline (Hu 2025, arXiv:2501.03262)."""
    return groups - groups.mean(1, keepdim=True)


@group_baseline("rloo", min_group=2)
def _leave_one_out(groups: Tensor) -> Tensor:
    """r - (sum_g - r) / (n - 1), the mean of the other n - 1: Ahmadian et al. 2024, "Back to Basics" (arXiv:2402.14740)."""
    n = groups.shape[1]
    return groups - (groups.sum(1, keepdim=True) - groups) / (n - 1)


def group_advantages(scores: Tensor, group_size: int, estimator: str) -> Tensor:
    """Sequence-level advantages [B] from scores [B]; rows i*n .. i*n+n-1 are the n samples of prompt i.

    grpo:                  (r - mean_g) / (std_g + 1e-6), std_g unbiased   Shao et al. 2024, DeepSeekMath (arXiv:2402.03300)
    dr_grpo:               r - mean_g                                       Liu et al. 2025, "Understanding R1-Zero-Like
                                                                            Training" (arXiv:2503.20783)
    rloo:                  r - (sum_g - r) / (n - 1)                        Ahmadian et al. 2024, "Back to Basics"
                                                                            (arXiv:2402.14740)
    reinforce_pp_baseline: r - mean_g (whitened later over tokens)          Hu 2025, REINFORCE++ (arXiv:2501.03262)

    grpo and rloo need n >= 2 (the spec check says so).
    """
    if estimator not in GROUP_BASELINES:
        raise ValueError(f"unknown group estimator {estimator!r}; expected one of {sorted(GROUP_BASELINES)}")
    if group_size < _MIN_GROUP[estimator]:
        raise ValueError(f"{estimator} needs at least {_MIN_GROUP[estimator]} samples per prompt, got {group_size}")
    return GROUP_BASELINES[estimator](_groups(scores, group_size)).reshape(-1)


def informative_groups(scores: Tensor, group_size: int) -> Tensor:
    """bool [G]: groups whose n scores are not all equal. A group of equal scores has zero advantage under
    every group baseline and gives no gradient; DAPO's dynamic sampling drops it (Yu et al. 2025, arXiv:2503.14476)."""
    groups = _groups(scores, group_size)
    return (groups != groups[:, :1]).any(dim=1)


@torch.no_grad()
def discounted_returns(rewards: Tensor, mask: Tensor, gamma: float) -> Tensor:
    """G_t = r_t + gamma * G_{t+1} over response tokens (G := 0 after the last one), 0 off the mask: the
    Monte-Carlo return of REINFORCE (Williams 1992) as REINFORCE++ uses it per token (Hu 2025, arXiv:2501.03262)."""
    m = mask.to(rewards.dtype)
    out = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        running = (rewards[:, t] + gamma * running) * m[:, t]
        out[:, t] = running
    return out


# --------------------------------------------------------------------------- advantage estimators
@dataclass(frozen=True)
class AdvantageInputs:
    """What an advantage estimator may read: the sequence ``scores`` [B], the per-token KL penalty ``kl_rewards``
    [B, T] (zeros when the KL term sits in the loss), the response ``mask`` [B, T], the critic's ``values`` [B, T]
    (gae only), the ``group_size`` n (rows i*n .. i*n+n-1 are prompt i's), and gamma, lam and whiten
    (repeater_config.gamma, gae_lambda, norm_adv)."""

    scores: Tensor
    kl_rewards: Tensor
    mask: Tensor
    values: Tensor | None = None
    group_size: int = 1
    gamma: float = 1.0
    lam: float = 0.95
    whiten: bool = True

    @property
    def token_rewards(self) -> Tensor:
        """r_t = kl_rewards_t plus the score at the last response token (add_score_at_last_token)."""
        return add_score_at_last_token(self.kl_rewards, self.scores, self.mask)


@advantage_estimator("gae")
def _gae(x: AdvantageInputs) -> tuple[Tensor, Tensor]:
    """GAE over r_t with the critic's values (compute_gae), whitened over the batch when ``whiten``; the returns are
    the critic's targets. Schulman et al. 2016 (arXiv:1506.02438), with the KL-shaped rewards of Ziegler et al. 2019
    (arXiv:1909.08593) as in InstructGPT (Ouyang et al. 2022, arXiv:2203.02155)."""
    if x.values is None:
        raise ValueError("gae needs the critic's values")
    advantages, returns = compute_gae(x.token_rewards, x.values, x.mask, x.gamma, x.lam)
    return (masked_whiten(advantages, x.mask) if x.whiten else advantages), returns


@advantage_estimator("reinforce_pp")
def _reinforce_pp(x: AdvantageInputs) -> tuple[Tensor, None]:
    """A_t = masked_whiten(G)_t, G_t = discounted_returns(r, gamma): no critic, no group. Hu 2025, REINFORCE++
    (arXiv:2501.03262)."""
    return masked_whiten(discounted_returns(x.token_rewards, x.mask, x.gamma), x.mask), None


@advantage_estimator("reinforce_pp_baseline")
def _reinforce_pp_baseline(x: AdvantageInputs) -> tuple[Tensor, None]:
    """reinforce_pp with each score first replaced by score - mean of its group (group_advantages). Hu 2025,
    REINFORCE++ (arXiv:2501.03262)."""
    return _reinforce_pp(replace(x, scores=group_advantages(x.scores, x.group_size, "reinforce_pp_baseline")))


def _on_every_token(x: AdvantageInputs, estimator: str) -> tuple[Tensor, None]:
    """group_advantages of each sequence's reward R = score + sum_t kl_rewards_t, the same on every response token."""
    totals = x.scores.to(x.kl_rewards.dtype) + masked_sum(x.kl_rewards, x.mask, dim=1)
    per_seq = group_advantages(totals, x.group_size, estimator)
    return torch.where(x.mask.bool(), per_seq[:, None].expand(x.mask.shape), torch.zeros_like(x.kl_rewards)), None


@advantage_estimator("grpo")
def _grpo_advantages(x: AdvantageInputs) -> tuple[Tensor, None]:
    """A_t = (R - mean_g R) / (std_g R + 1e-6) on every token, R the sequence's reward, std unbiased. Shao et al. 2024,
    DeepSeekMath (arXiv:2402.03300)."""
    return _on_every_token(x, "grpo")


@advantage_estimator("dr_grpo")
def _dr_grpo_advantages(x: AdvantageInputs) -> tuple[Tensor, None]:
    """A_t = R - mean_g R on every token, R the sequence's reward. Liu et al. 2025, Dr. GRPO (arXiv:2503.20783)."""
    return _on_every_token(x, "dr_grpo")


@advantage_estimator("rloo")
def _rloo_advantages(x: AdvantageInputs) -> tuple[Tensor, None]:
    """A_t = R - (sum_g R - R) / (n - 1) on every token, R the sequence's reward. Ahmadian et al. 2024, "Back to
    Basics" (arXiv:2402.14740)."""
    return _on_every_token(x, "rloo")


@torch.no_grad()
def advantages_and_returns(estimator: str, scores: Tensor, kl_rewards: Tensor, mask: Tensor, *, values: Tensor | None = None,
                           group_size: int = 1, gamma: float = 1.0, lam: float = 0.95, whiten: bool = True):
    """Per-token advantages [B, T], and the critic's targets for gae (else None), by the estimator named
    ``estimator``. ``scores`` [B] are the sequence scores; ``kl_rewards`` [B, T] the per-token KL penalty (zeros
    when the KL term sits in the loss instead). Token rewards are r_t = kl_rewards_t plus the score at the last
    response token (add_score_at_last_token).

    gae:                   GAE over r_t with the critic's values (compute_gae), whitened over the batch when
                           ``whiten`` (repeater_config.norm_adv).
    reinforce_pp:          masked_whiten(G), G_t = discounted_returns(r, gamma): no critic, no group (Hu 2025,
                           REINFORCE++, arXiv:2501.03262).
    reinforce_pp_baseline: the same with each score first replaced by score - mean of its group.
    grpo, dr_grpo, rloo:   group_advantages of each sequence's reward sum_t r_t, the same on every token.
    """
    if estimator not in ADVANTAGE_ESTIMATORS:
        raise ValueError(f"unknown advantage_estimator {estimator!r}; expected one of {sorted(ADVANTAGE_ESTIMATORS)}")
    return ADVANTAGE_ESTIMATORS[estimator](AdvantageInputs(scores, kl_rewards, mask, values, group_size, gamma, lam, whiten))


# --------------------------------------------------------------------------- PPO-ptx
def lm_loss(logits: Tensor, input_ids: Tensor, attention_mask: Tensor, num_tokens: int) -> Tensor:
    """The pretraining (language-model) loss of PPO-ptx over a micro batch, as its part of a larger batch:

        L_ptx = -(1 / num_tokens) * sum_i sum_{t >= 1, mask_i,t = 1} log pi(x_i,t | x_i,<t)

    ``logits`` [B, T-1, V] predict tokens 1..T-1 of ``input_ids`` [B, T] (right-padded, ``attention_mask`` 1 on real
    tokens; the first token of a sequence is never predicted). ``num_tokens`` is the count of predicted tokens of
    the whole batch the micro batch belongs to, so that micro batches and ranks add up to its mean token NLL.

    InstructGPT's PPO-ptx objective (Ouyang et al. 2022, arXiv:2203.02155, eq. 2) adds gamma * E_{x ~ D_pretrain}
    [log pi(x)] to the RL objective; minimising weight * L_ptx is that term with gamma = weight, per token.
    """
    targets = input_ids[:, 1:]
    mask = attention_mask[:, 1:].to(logits.dtype)
    token_logprobs = logprobs_from_logits(logits, targets)
    return -(token_logprobs * mask).sum() / max(num_tokens, 1)


def predicted_tokens(attention_mask: Tensor) -> int:
    """Tokens ``lm_loss`` predicts in a right-padded batch: every real token but each sequence's first."""
    return int(attention_mask[:, 1:].sum())
