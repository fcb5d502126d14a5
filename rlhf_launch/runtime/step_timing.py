"""The timing metrics of a PPO step: seconds per Timer section (<name>_time_s), and each role's busy seconds,
utilization and scoring time, the maximum over the role's ranks."""

from __future__ import annotations

from rlhf_launch.core import metric_catalogue as mc
from rlhf_launch.runtime.protocols import Cluster
from rlhf_launch.runtime.scoring_exchange import SCORING
from rlhf_launch.runtime.timing import busy, scoring

# Roles whose busy seconds are reported (busy_<role>_s, util_<role>, score_<role>_time_s), in the order of
# the vector the ranks reduce: every rank builds it the same way from the spec.
BUSY_ROLES = mc.TIMED_ROLES


def section_times(sections: dict[str, float]) -> dict[str, float]:
    """<name>_time_s of every Timer section the catalogue names (``mc.SECTION_TIMES``; 0 for one the step did not
    enter). forward/backward/optimizer are timed inside the trainers."""
    return {key: sections.get(name, 0.0) for name, key in mc.SECTION_TIMES.items()}


def role_utilization(cluster: Cluster, roles: list[str], sections: dict[str, float]) -> dict[str, float]:
    """busy_<role>_s, util_<role> and (scoring roles) score_<role>_time_s of a step from this process's Timer ``sections``,
    each the maximum over the role's ranks, on every process: one all-reduce of a short vector.

    A rank's busy seconds of a role are its ``busy(role)`` sections, its utilization those seconds over its own
    step time (so at most 1: the sections lie inside the step); ranks that do not run a role add 0, which
    leaves the maximum to the ranks that do."""
    step = max(sections.get("step", 0.0), 1e-9)
    local = [sections.get(name(role), 0.0) for name in (busy, scoring) for role in roles]
    local += [sections.get(busy(role), 0.0) / step for role in roles]
    top = cluster.max_over_ranks(local)
    n = len(roles)
    scorers = {role for role, _ in SCORING}
    out = {}
    for i, role in enumerate(roles):
        out[mc.BUSY_S.key(role)] = top[i]
        out[mc.UTIL.key(role)] = top[2 * n + i]
        if role in scorers:  # a generator has no scoring pass
            out[mc.SCORE_ROLE_TIME_S.key(role)] = top[n + i]
    return out
