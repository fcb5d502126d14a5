"""Where the roles run, behind the few operations the PPO loop needs.

``SingleProcess``: every role in this process; sharding and gathering are no-ops.
``Distributed``: one role per rank as the resource plan lays them out; a role computes its
shard of the batch and ``gather`` hands every rank the whole result, in the original order.
The PPO loop is written once against this interface (rlhf/loop.py).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from rlhf.dist import PeerGroup, Topology
from rlhf.exchange import gather_from, shard_bounds
from rlhf.rollout import Batch, select


class SingleProcess:
    rank = 0
    is_leader = True
    world_size = 1

    def runs(self, role: str) -> bool:
        return True

    def shard_of(self, role: str) -> tuple[int, int]:
        """(index, count) of this rank among the role's data-parallel ranks."""
        return 0, 1

    def group(self, role: str):
        return None

    def shard(self, role: str, batch: Batch) -> Batch:
        return batch

    def gather(self, role: str, local: Batch | None, keys: list[str], pad: dict[str, int] | None = None) -> Batch:
        assert local is not None
        return {k: local[k] for k in keys}

    def share(self, obj: Any, role: str) -> Any:
        return obj

    def barrier(self) -> None:
        pass

    def is_role_leader(self, role: str) -> bool:
        return True

    def is_replica_leader(self, role: str) -> bool:
        return True

    def ranks_of(self, role: str) -> list[int]:
        return [0]

    def sync_group(self):
        return None

    def any(self, flag: bool) -> bool:
        return flag


class Distributed:
    """Roles on ranks. torch's default group is this process's role (rlhf/dist.py); exchanges
    between roles use PeerGroups: ``global`` over every rank, ``weight-sync`` over actor rank 0
    and the generator ranks."""

    def __init__(self, topo: Topology, device: torch.device, store):
        self.topo, self.device = topo, device
        self.rank, self.world_size = topo.rank, topo.world_size
        self.is_leader = topo.rank == 0
        self.everyone = PeerGroup(store, "global", list(range(topo.world_size)), topo.rank, device)
        gen = topo.plan.role("generator")
        sync = [topo.ranks_of("actor")[0], *gen.ranks] if not gen.shared_with else []
        self._sync = PeerGroup(store, "weight-sync", sync, topo.rank, device) if topo.rank in sync else None

    def runs(self, role: str) -> bool:
        return self.topo.runs(role)

    def ranks_of(self, role: str) -> list[int]:
        return self.topo.ranks_of(role)

    def shard_of(self, role: str) -> tuple[int, int]:
        ranks = self.topo.ranks_of(role)
        data = self.topo.plan.role(role).data
        per_replica = len(ranks) // data  # tensor-parallel ranks of one replica share a shard
        return ranks.index(self.rank) // per_replica, data

    def replica_leaders(self, role: str) -> list[int]:
        ranks = self.topo.ranks_of(role)
        per_replica = len(ranks) // self.topo.plan.role(role).data
        return ranks[::per_replica]

    def is_replica_leader(self, role: str) -> bool:
        return self.rank in self.replica_leaders(role)

    def group(self, role: str):
        """The data-parallel group of a role this process runs: torch's default group."""
        assert self.runs(role), f"global rank {self.rank} does not run {role}"
        return dist.group.WORLD

    def sync_group(self):
        return self._sync

    def shard(self, role: str, batch: Batch) -> Batch:
        index, parts = self.shard_of(role)
        size = next(iter(batch.values())).shape[0]
        start, stop = shard_bounds(size, parts, index)
        return select(batch, slice(start, stop))

    def gather(self, role: str, local: Batch | None, keys: list[str], pad: dict[str, int] | None = None) -> Batch:
        return gather_from(self.replica_leaders(role), local, keys, self.device, self.everyone, self.rank, pad)

    def share(self, obj: Any, role: str) -> Any:
        """A small Python object (metrics, a path) from the role's first rank to every rank."""
        return self.everyone.broadcast_object(obj, self.topo.ranks_of(role)[0])

    def barrier(self) -> None:
        self.everyone.barrier()

    def any(self, flag: bool) -> bool:
        """True on every rank when it is true on any (signals reach ranks at different times)."""
        return self.everyone.any(flag)

    def is_role_leader(self, role: str) -> bool:
        return self.topo.ranks_of(role)[0] == self.rank
