"""The catalogue of the per-step metrics: every key of ``<run_dir>/metrics.jsonl``, its unit, what it means and
which module logs it. One table, without torch: the code that logs a metric spells its key with the constant
defined here, the front end (``rlhf-launch plot``, ``rlhf-launch status``) reads the same constants, and the
README's list of metrics is rendered from it (``markdown_table``; ``rlhf-launch schema`` writes it and a test fails
when it drifts). tests/runtime/test_metric_catalogue.py fails when code logs a key the catalogue lacks.

A step's record holds only what the step measured: without a reference (kl_coeff 0) there is no kl, kl_<estimator>
or actor_kl_loss (a 0 would read as "the policy has not moved"); without a critic (advantage_estimator other than
gae) no value_loss, value_mean, return_mean or critic_*; the options' metrics (dynamic sampling, PPO-ptx, a
generator's log-probs, truncated importance sampling) only with the option. A key with a placeholder in angle
brackets (``busy_<role>_s``) is a family: one key per value of the placeholder.

Adding a metric: its entry below (``_metric``, or ``_family`` for one key per role or estimator), its constant where
the code logs it, and ``rlhf-launch schema`` to rewrite the README.
"""

from __future__ import annotations

from dataclasses import dataclass

from rlhf_launch.core.algorithms import KL_ESTIMATORS
from rlhf_launch.core.config import ROLES

EXPERIENCE = "rlhf_launch/runtime/experience.py"
ACTOR = "rlhf_launch/runtime/roles/actor.py"
CRITIC = "rlhf_launch/runtime/roles/critic.py"
LOOP = "rlhf_launch/runtime/loop.py"
STEP_TIMING = "rlhf_launch/runtime/step_timing.py"
DYNAMIC_SAMPLING = "rlhf_launch/runtime/dynamic_sampling.py"

TIMED_ROLES = ("generator", *ROLES)  # the roles whose busy seconds are reported, a separate generator included
SCORING_ROLES = ROLES  # the roles with a scoring pass (a generator has none)


@dataclass(frozen=True)
class Metric:
    """One metrics.jsonl key, or a family of keys: ``name`` holds one ``<placeholder>`` then, which takes each of
    ``values``."""

    name: str
    unit: str  # "" for a share, a count or a ratio
    meaning: str
    logged_by: str  # the module (path from the repository root) that logs it
    values: tuple[str, ...] = ()

    @property
    def _parts(self) -> tuple[str, str]:
        """The text before and after the placeholder."""
        head, _, rest = self.name.partition("<")
        return head, rest.partition(">")[2]

    def key(self, value: str) -> str:
        """The key of this family for ``value`` (e.g. busy_<role>_s, actor -> busy_actor_s)."""
        head, tail = self._parts
        return f"{head}{value}{tail}"

    def value_of(self, key: str) -> str | None:
        """The placeholder's value in ``key`` when ``key`` has this family's shape (util_<role>: util_actor -> actor),
        whatever the value; None otherwise."""
        head, tail = self._parts
        inner = key[len(head):len(key) - len(tail)] if len(key) > len(head) + len(tail) else ""
        return inner if inner and key.startswith(head) and key.endswith(tail) else None

    def keys(self) -> tuple[str, ...]:
        """Every key this entry stands for: its name, or one key per value of a family."""
        return tuple(self.key(v) for v in self.values) if self.values else (self.name,)


CATALOGUE: dict[str, Metric] = {}


def _add(metric: Metric) -> Metric:
    if metric.name in CATALOGUE:
        raise ValueError(f"metric {metric.name} is catalogued twice")
    CATALOGUE[metric.name] = metric
    return metric


def _metric(name: str, unit: str, meaning: str, logged_by: str) -> str:
    """Catalogue one key; returns the key, the constant code logs it under."""
    return _add(Metric(name, unit, meaning, logged_by)).name


def _family(name: str, unit: str, meaning: str, logged_by: str, values: tuple[str, ...]) -> Metric:
    """Catalogue a family of keys (``name`` with one <placeholder>); code logs ``family.key(value)``."""
    return _add(Metric(name, unit, meaning, logged_by, values))


# --------------------------------------------------------------------------- the rollout and its experience
REWARD_MEAN = _metric("reward_mean", "", "Mean raw score of the step's responses (with dynamic sampling: of the kept groups, picked for "
                      "their mixed rewards).", EXPERIENCE)
REWARD_STD = _metric("reward_std", "", "Standard deviation of the raw scores (0 for a single response).", EXPERIENCE)
REWARD_CLIPPED_MEAN = _metric("reward_clipped_mean", "", "Mean score after clipping to rollout_config.clip_reward_min / "
                              "clip_reward_max, before any normalisation.", EXPERIENCE)
KL = _metric("kl", "nats", "k1 estimate of KL(pi_old || pi_ref): mean over responses of sum_t x, x the log-prob ratio of the "
             "sampled token (old actor vs reference), whatever repeater_config.kl_estimator is. Only with a reference.", EXPERIENCE)
KL_BY_ESTIMATOR = _family("kl_<estimator>", "nats", "The same sum by the spec's kl_estimator when it is not k1 (the KL the "
                          "reward or the loss uses). Only with a reference.", EXPERIENCE, tuple(k for k in KL_ESTIMATORS if k != "k1"))
RESPONSE_LEN_MEAN = _metric("response_len_mean", "tokens", "Mean response length.", EXPERIENCE)
TRUNCATED_FRAC = _metric("truncated_frac", "", "Share of the responses without a stop token (cut at max_new_tokens).", EXPERIENCE)
ADVANTAGE_MEAN = _metric("advantage_mean", "", "Mean advantage over the response tokens.", EXPERIENCE)
VALUE_MEAN = _metric("value_mean", "", "Mean of the critic's values over the response tokens (gae only).", EXPERIENCE)
RETURN_MEAN = _metric("return_mean", "", "Mean of the critic's targets, the GAE returns, over the response tokens (gae only).",
                      EXPERIENCE)
GEN_LOGPROB_GAP = _metric("gen_logprob_gap", "nats", "Mean |actor log-prob - generator log-prob| over the response tokens: about "
                          "1e-7 when the generator holds the actor's weights in the same numerics; larger with a lagging "
                          "generator or other kernels (vLLM in bf16). Only when the generator returns its log-probs.", EXPERIENCE)
TIS_WEIGHT_MEAN = _metric("tis_weight_mean", "", "Mean truncated importance weight min(pi_old / pi_gen, tis_cap) over the response "
                          "tokens (train_config.tis_cap).", EXPERIENCE)
TIS_WEIGHT_MAX = _metric("tis_weight_max", "", "Largest truncated importance weight of the step (train_config.tis_cap).", EXPERIENCE)

# --------------------------------------------------------------------------- the updates
POLICY_LOSS = _metric("policy_loss", "", "The actor's loss (PPO's clipped surrogate; with kl_in loss, the KL term included), "
                      "averaged over the optimizer steps.", ACTOR)
ENTROPY = _metric("entropy", "nats", "Mean per-token entropy of the policy over the response tokens, during the update.", ACTOR)
ACTOR_LR = _metric("actor_lr", "", "The actor's learning rate.", ACTOR)
ACTOR_CLIPFRAC = _metric("actor_clipfrac", "", "Share of the response tokens whose clipped ratio term is the active one.", ACTOR)
ACTOR_APPROX_KL = _metric("actor_approx_kl", "nats", "k2 estimate of KL(pi_old || pi_new), the mean of (logp_new - logp_old)^2 / 2 "
                          "per token: how far one PPO update moved the policy (not the KL to the reference).", ACTOR)
ACTOR_KL_LOSS = _metric("actor_kl_loss", "nats", "With kl_in loss: the KL term of the actor's loss before kl_coeff (new policy vs "
                        "reference, by kl_estimator, aggregated like the policy loss). Only with a reference.", ACTOR)
ACTOR_GRAD_NORM = _metric("actor_grad_norm", "", "Gradient norm of the actor's updates before clipping, averaged over them.", ACTOR)
ACTOR_PTX_LOSS = _metric("actor_ptx_loss", "nats", "PPO-ptx (train_config.pretrain_loss_weight > 0): mean token negative "
                         "log-likelihood of the pretraining text before the weight, averaged over the optimizer steps.", ACTOR)
VALUE_LOSS = _metric("value_loss", "", "The critic's clipped value loss, averaged over the optimizer steps (gae only).", CRITIC)
CRITIC_LR = _metric("critic_lr", "", "The critic's learning rate (gae only).", CRITIC)
CRITIC_CLIPFRAC = _metric("critic_clipfrac", "", "Share of the response tokens whose clipped value term is the active one (gae only).",
                          CRITIC)
CRITIC_GRAD_NORM = _metric("critic_grad_norm", "", "Gradient norm of the critic's updates before clipping, averaged over them (gae "
                           "only).", CRITIC)

# --------------------------------------------------------------------------- dynamic sampling (DAPO)
FILTERED_FRAC = _metric("filtered_frac", "", "rollout_config.dynamic_sampling: share of the groups generated over the step's rounds "
                        "whose n rewards were all equal (dropped).", DYNAMIC_SAMPLING)
SAMPLING_ROUNDS = _metric("sampling_rounds", "", "rollout_config.dynamic_sampling: generate rounds the step took.", DYNAMIC_SAMPLING)
DYNAMIC_TOPPED_UP = _metric("dynamic_topped_up", "", "rollout_config.dynamic_sampling: dropped groups put back when "
                            "dynamic_sampling_max_draws rounds did not fill the batch.", DYNAMIC_SAMPLING)
REWARD_GENERATED_MEAN = _metric("reward_generated_mean", "", "rollout_config.dynamic_sampling: mean raw score of every response "
                                "generated in the step's rounds, kept or dropped: the policy's reward on the prompt distribution "
                                "(what reward_mean is without dynamic sampling).", DYNAMIC_SAMPLING)

# --------------------------------------------------------------------------- time (differ between any two runs)
STEP_TIME_S = _metric("step_time_s", "s", "Wall-clock time of the step.", STEP_TIMING)
GENERATE_TIME_S = _metric("generate_time_s", "s", "Time spent generating (with a rollout sampled ahead: waiting for it).",
                          STEP_TIMING)
SCORE_TIME_S = _metric("score_time_s", "s", "Time of the scoring phase (log-probs, values, rewards and their exchanges), measured "
                       "by rank 0; the passes of different ranks overlap, so it approaches the largest score_<role>_time_s.",
                       STEP_TIMING)
TRAIN_TIME_S = _metric("train_time_s", "s", "Time of the critic and actor updates.", STEP_TIMING)
WEIGHT_SYNC_TIME_S = _metric("weight_sync_time_s", "s", "Time sending the actor's new weights to a separate generator.", STEP_TIMING)
FORWARD_TIME_S = _metric("forward_time_s", "s", "Time in the trainers' forward passes of the updates.", STEP_TIMING)
BACKWARD_TIME_S = _metric("backward_time_s", "s", "Time in the trainers' backward passes.", STEP_TIMING)
OPTIMIZER_TIME_S = _metric("optimizer_time_s", "s", "Time in the trainers' optimizer steps.", STEP_TIMING)
# Timer section -> its key, in the order a record lists them.
SECTION_TIMES = {"step": STEP_TIME_S, "generate": GENERATE_TIME_S, "score": SCORE_TIME_S, "train": TRAIN_TIME_S,
                 "weight_sync": WEIGHT_SYNC_TIME_S, "forward": FORWARD_TIME_S, "backward": BACKWARD_TIME_S,
                 "optimizer": OPTIMIZER_TIME_S}
GEN_TOKENS_PER_S = _metric("gen_tokens_per_s", "tokens/s", "Response tokens generated per second of generation (every round's with "
                           "dynamic sampling; over the generator's busy seconds when it samples ahead).", LOOP)
BUSY_S = _family("busy_<role>_s", "s", "Seconds of the step the role spent on its own compute (generate; its scoring forward over "
                 "its shard; its PPO update; not weight sync, not waiting in exchanges): the maximum over its ranks. Only for "
                 "the roles the job plans.", STEP_TIMING, TIMED_ROLES)
UTIL = _family("util_<role>", "", "busy_<role>_s over the step's wall-clock time, the maximum over the role's ranks (at most 1). A "
               "shared generator is its own role on the actor's ranks: those ranks are busy util_generator + util_actor.",
               STEP_TIMING, TIMED_ROLES)
SCORE_ROLE_TIME_S = _family("score_<role>_time_s", "s", "Seconds of the role's scoring forward alone, the maximum over its ranks.",
                            STEP_TIMING, SCORING_ROLES)


def all_keys() -> frozenset[str]:
    """Every key a step may log."""
    return frozenset(key for metric in CATALOGUE.values() for key in metric.keys())


def uncatalogued(keys) -> list[str]:
    """The ``keys`` that are not in the catalogue, sorted."""
    known = all_keys()
    return sorted(k for k in keys if k not in known)


def markdown_table() -> str:
    """The README's list of metrics: key, unit, meaning, the module that logs it."""
    rows = ["| key | unit | meaning | logged by |", "|---|---|---|---|"]
    for m in CATALOGUE.values():
        name = f"`{m.name}`" + (f" ({', '.join(m.values)})" if m.values else "")
        meaning = m.meaning.replace("|", "\\|").replace("<", "\\<")  # a table cell; <role> is not an HTML tag
        rows.append(f"| {name} | {m.unit} | {meaning} | `{m.logged_by.removeprefix('rlhf_launch/')}` |")
    return "\n".join(rows) + "\n"
