"""The scoring passes of a PPO step and their exchange: the actor's and reference's log-probs, the critic's
values and the reward scores of a rollout, each role on its own shard, gathered back in order on every rank.

The passes overlap: every rank first runs each scoring pass of the roles it hosts, then all ranks exchange the
results in one fixed order (``SCORING``), so that roles on different ranks compute at the same time.
``RLHF_SEQUENTIAL_SCORING=1`` in a rank's environment restores the old order (each pass, then its exchange,
role after role); the results are the same, only slower. It exists for bench/score_phase.py, which measures
the difference.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from rlhf_launch.runtime.protocols import Cluster
from rlhf_launch.runtime.rollout import Batch
from rlhf_launch.runtime.timing import Timer, busy, scoring

# The scoring passes, (role, result key), in the order their results are exchanged: every rank gathers
# in this order, so it is part of what the ranks agree on.
SCORING = (("actor", "old_logprobs"), ("reference", "ref_logprobs"), ("critic", "values"), ("reward", "scores"))
SEQUENTIAL_SCORING_ENV = "RLHF_SEQUENTIAL_SCORING"

Compute = Callable[[Batch], Tensor]  # a role's scoring pass over its shard of a rollout


def score_passes(
    cluster: Cluster, passes: list[tuple[str, str, Compute | None]], rollout: Batch, device: torch.device,
    timer: Timer, overlap: bool = True,
) -> dict[str, Tensor]:
    """Each ``(role, key, compute)`` pass's whole result, under ``key``, on every process.

    ``compute`` (None where this process does not run the role) runs over this process's shard of the rollout
    on the role's replica leaders. With ``overlap``, every pass this process runs is computed first, one after
    another, and only then are the results gathered, in the order of ``passes``: a gather waits for the role's
    ranks, so a rank that gathered the actor's log-probs before computing its own reference log-probs would
    hold the reference back until the actor is done. Without ``overlap``, each pass is computed and gathered
    in turn (the order before passes overlapped). Both give the same tensors: the same shards, micro batches
    and gathers, only issued at other times."""
    local: dict[str, Batch] = {}

    def run(role: str, key: str, compute: Compute | None) -> None:
        if compute is not None and cluster.is_replica_leader(role):
            with timer(busy(role)), timer(scoring(role)):
                local[role] = {key: compute(cluster.shard(role, rollout)).to(device)}

    results: dict[str, Tensor] = {}
    if overlap:
        for role, key, compute in passes:
            run(role, key, compute)
    for role, key, compute in passes:
        if not overlap:
            run(role, key, compute)
        results[key] = cluster.gather(role, local.get(role), [key])[key]
    return results


class Scorer:
    """The scoring passes of a loop: ``computes`` maps each scoring role to its pass on this process (None
    where this process does not run the role), and ``score`` runs and exchanges those asked for."""

    def __init__(self, cluster: Cluster, computes: dict[str, Compute | None], device: torch.device, timer: Timer, overlap: bool):
        self.cluster, self.computes, self.device, self.timer, self.overlap = cluster, computes, device, timer, overlap

    def score(self, roles: list[str], rollout: Batch) -> dict[str, Tensor]:
        """The scoring passes of ``roles`` (in ``SCORING`` order) over the rollout, whole, on every process, by
        result key; this process computes the shards of the roles it runs (``score_passes``)."""
        passes = [(role, key, self.computes[role]) for role, key in SCORING if role in roles]
        return score_passes(self.cluster, passes, rollout, self.device, self.timer, self.overlap)
