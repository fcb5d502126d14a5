"""The one table of estimator names, and what the planner and the spec checks need to know about each, without torch.

Every other list of estimator names derives from the tables here: the spec's allowed values
(``AdvantageEstimatorName`` and ``KlEstimatorName``, the types of repeater_config.advantage_estimator and
kl_estimator in rlhf_launch/core/config.py, hence the JSON Schema and the README's key reference), the README's
"Choosing an algorithm" table (``markdown_table``) and the math in rlhf_launch/runtime/ppo.py, where each function is
registered under its name next to its definition (``@ppo.advantage_estimator("gae")``, ``@ppo.kl_estimator("k1")``):
registering a name that is not in these tables fails on import, and tests/runtime/test_ppo_estimators.py fails while a
name here has no function there.

A new advantage estimator, step by step:
  1. a row in ``ESTIMATORS`` below (name, whether it trains a critic or compares the samples of one prompt, the
     advantage in one line, typical settings, source);
  2. its function in rlhf_launch/runtime/ppo.py under ``@advantage_estimator("<name>")``, its formula and source paper
     in its docstring (a group baseline under ``@group_baseline``);
  3. its test in tests/runtime/test_ppo_estimators.py, against a plain-Python loop;
  4. ``rlhf-launch schema``, which rewrites schemas/ and the README from these tables (``rlhf-launch schema --check``
     and tests/core/test_schema.py fail until then).
A new KL estimator is the same with a row in ``KL_ESTIMATORS`` and ``@kl_estimator("<name>")``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class Estimator:
    """One value of ``repeater_config.advantage_estimator``."""

    name: str
    needs_critic: bool  # trains a value model: the plan has a critic role only then
    needs_groups: bool  # compares the n samples of one prompt: n_samples_per_prompt >= 2
    advantage: str  # what the advantage of a token is, in one line
    typical: str  # settings users of other frameworks start from
    source: str


@dataclass(frozen=True)
class KlEstimator:
    """One value of ``repeater_config.kl_estimator``: a per-token estimate of KL(pi || pi_ref) from the sampled
    token, in x = log pi(a_t) - log pi_ref(a_t)."""

    name: str
    formula: str
    properties: str


ESTIMATORS = {e.name: e for e in (
    Estimator("gae", True, False, "GAE over per-token KL-shaped rewards with the critic's values",
              "n_samples_per_prompt 1, kl_coeff 0.01-0.05 in the reward (PPO-RLHF)",
              "Schulman et al. 2016 (arXiv:1506.02438); Ouyang et al. 2022 (arXiv:2203.02155)"),
    Estimator("grpo", False, True, "(r - group mean) / group std, on every token",
              "n 4-16, kl_in loss with k3 and kl_coeff 0.001-0.04",
              "Shao et al. 2024, DeepSeekMath (arXiv:2402.03300)"),
    Estimator("dr_grpo", False, True, "r - group mean, on every token; use loss_type per_seq_sum",
              "n 4-16, kl_coeff 0, loss_type per_seq_sum",
              "Liu et al. 2025 (arXiv:2503.20783)"),
    Estimator("rloo", False, True, "r - mean of the group's other n-1 rewards, on every token",
              "n 2-8, KL in the reward",
              "Ahmadian et al. 2024 (arXiv:2402.14740)"),
    Estimator("reinforce_pp", False, False, "per-token return with the KL penalty, whitened over the batch",
              "n 1 or more, kl_estimator k2 in the reward",
              "Hu 2025, REINFORCE++ (arXiv:2501.03262)"),
    Estimator("reinforce_pp_baseline", False, True, "as reinforce_pp, with the group mean subtracted from each score first",
              "n 4-8, KL in the loss (k2)",
              "Hu 2025, REINFORCE++ (arXiv:2501.03262)"),
)}

# Schulman 2020, "Approximating KL Divergence" (blog note); GRPO puts k3 in its loss (Shao et al. 2024, arXiv:2402.03300).
KL_ESTIMATORS = {k.name: k for k in (
    KlEstimator("k1", "x", "unbiased, can be negative"),
    KlEstimator("k2", "x^2 / 2", "biased, always >= 0, low variance"),
    KlEstimator("k3", "exp(-x) - 1 + x", "unbiased and always >= 0"),
)}

# The spec's allowed values, in table order (the JSON Schema's enum order).
AdvantageEstimatorName = Literal[tuple(ESTIMATORS)]  # type: ignore[valid-type]
KlEstimatorName = Literal[tuple(KL_ESTIMATORS)]  # type: ignore[valid-type]


def estimator(name: str) -> Estimator:
    """The estimator called ``name`` (the schema has already refused unknown names)."""
    return ESTIMATORS[name]


def markdown_table() -> str:
    """The README's table: estimator, critic, n >= 2, what the advantage is, typical settings, source."""
    rows = ["| estimator | trains a critic | needs n ≥ 2 | advantage of a token | typical settings | source |",
            "|---|---|---|---|---|---|"]
    for e in ESTIMATORS.values():
        rows.append(f"| `{e.name}` | {'yes' if e.needs_critic else 'no'} | {'yes' if e.needs_groups else 'no'} | {e.advantage} "
                    f"| {e.typical} | {e.source} |")
    return "\n".join(rows) + "\n"
