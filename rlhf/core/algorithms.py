"""What the planner and the spec checks need to know about each advantage estimator, without torch.

The math itself is in rlhf/ppo.py (``ADVANTAGE_ESTIMATORS``); a test keeps the two tables in step. The
README's "Choosing an algorithm" table is rendered from this one.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Estimator:
    """One value of ``repeater_config.advantage_estimator``."""

    name: str
    needs_critic: bool  # trains a value model: the plan has a critic role only then
    needs_groups: bool  # compares the n samples of one prompt: n_samples_per_prompt >= 2
    advantage: str  # what the advantage of a token is, in one line
    typical: str  # settings users of other frameworks start from
    source: str


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
