"""Where the roles run, behind the few operations the PPO loop needs.

``SingleProcess``: every role in this process; sharding and gathering are no-ops.
``Distributed``: one role per rank as the resource plan lays them out; a role computes its
shard of the batch and ``gather`` hands every rank the whole result, in the original order.
The PPO loop is written once against this interface (rlhf_launch/runtime/loop.py).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from rlhf_launch.runtime.dist import Deadlines, PeerGroup, Topology, post_warm_up
from rlhf_launch.runtime.exchange import gather_from, shard_bounds
from rlhf_launch.runtime.rollout import Batch, select


class SingleProcess:
    """Every role in this one process: sharding and gathering are no-ops, and this process leads everything."""

    rank = 0
    is_leader = True
    world_size = 1

    def runs(self, role: str) -> bool:
        """True: this process runs every role."""
        return True

    def shard_of(self, role: str) -> tuple[int, int]:
        """(index, count) of this rank among the role's data-parallel ranks."""
        return 0, 1

    def group(self, role: str):
        """None: no process group, so trainers are plain torch."""
        return None

    def shard(self, role: str, batch: Batch) -> Batch:
        """The whole batch: the one replica takes every row."""
        return batch

    def gather(self, role: str, local: Batch | None, keys: list[str], pad: dict[str, int] | None = None) -> Batch:
        """The ``keys`` of ``local``, which already is the whole batch."""
        assert local is not None
        return {k: local[k] for k in keys}

    def share(self, obj: Any, role: str) -> Any:
        """``obj`` itself: there is no other process."""
        return obj

    def barrier(self) -> None:
        """Nothing to wait for."""

    def is_role_leader(self, role: str) -> bool:
        """True: this process is every role's only rank."""
        return True

    def is_replica_leader(self, role: str) -> bool:
        """True: this process is every replica's only rank."""
        return True

    def ranks_of(self, role: str) -> list[int]:
        """[0]: every role runs on rank 0."""
        return [0]

    def sync_group(self):
        """None: a separate generator in this process takes the actor's weights by ``load``."""
        return None

    def any(self, flag: bool) -> bool:
        """``flag`` itself."""
        return flag

    def max_over_ranks(self, values: list[float]) -> list[float]:
        """``values`` themselves: this is the only rank."""
        return list(values)


class Distributed:
    """Roles on ranks. torch's default group is this process's role (rlhf_launch/runtime/dist.py); exchanges
    between roles use PeerGroups: ``global`` over every rank, ``weight-sync`` over actor rank 0
    and the generator ranks; their collectives time out after ``deadlines.exchange_s`` (run.exchange_timeout_s)."""

    def __init__(self, topo: Topology, device: torch.device, store, deadlines: Deadlines | None = None):
        self.topo, self.device = topo, device
        self.rank, self.world_size = topo.rank, topo.world_size
        self.is_leader = topo.rank == 0
        timeout_s = (deadlines or Deadlines.of()).exchange_s
        post_warm_up(store, topo.rank, "exchange groups")  # gloo connects every pair in a group's constructor
        self.everyone = PeerGroup(store, "global", list(range(topo.world_size)), topo.rank, device, timeout_s)
        gen = topo.plan.role("generator")
        sync = [topo.ranks_of("actor")[0], *gen.ranks] if not gen.shared_with else []
        self._sync = PeerGroup(store, "weight-sync", sync, topo.rank, device, timeout_s) if topo.rank in sync else None
        self._warm_up()
        post_warm_up(store, topo.rank, "done")  # global rank 0's watchdog fails the job if one rank never gets here

    def _warm_up(self) -> None:
        """Run one collective on every group now, before any model is loaded: NCCL creates a
        group's communicator and buffers at its first collective, and by then a vLLM engine may
        hold 90 % of the GPU. Each result is read back, so every rank has arrived when this returns.
        A rank stuck here is named by global rank 0's watchdog after run.warmup_timeout_s."""
        token = torch.ones(1, device=self.device)
        dist.all_reduce(token)  # the default group: this rank's role (or engine)
        token.item()
        self.everyone.barrier()
        if self._sync is not None:
            self._sync.barrier()

    def close(self) -> None:
        """The end of the job on this rank: wait for every rank (one may still be exporting its
        model), then shut the peer groups down. The default group is destroyed by the worker."""
        self.everyone.barrier()
        for group in (self._sync, self.everyone):
            if group is not None:
                group.shutdown()

    def runs(self, role: str) -> bool:
        """Whether this rank runs ``role`` (a shared role runs on its host's ranks)."""
        return self.topo.runs(role)

    def ranks_of(self, role: str) -> list[int]:
        """Global ranks that run ``role``, in order (for a shared role, its host's)."""
        return self.topo.ranks_of(role)

    def shard_of(self, role: str) -> tuple[int, int]:
        """(index, count) of this rank's replica among the role's data-parallel replicas; the
        tensor-parallel ranks of one replica share its index."""
        return self.topo.replica_index(role), self.topo.plan.role(role).data

    def replica_leaders(self, role: str) -> list[int]:
        """The first global rank of each of the role's replicas, in replica order: the ranks ``gather`` reads;
        none for a role the plan does not have."""
        ranks = self.topo.ranks_of(role)
        if not ranks:
            return []
        per_replica = len(ranks) // self.topo.plan.role(role).data
        return ranks[::per_replica]

    def is_replica_leader(self, role: str) -> bool:
        """Whether this rank is the first of its replica of ``role`` (it reports the replica's results)."""
        return self.rank in self.replica_leaders(role)

    def group(self, role: str):
        """The data-parallel group of a role this process runs: torch's default group."""
        assert self.runs(role), f"global rank {self.rank} does not run {role}"
        return dist.group.WORLD

    def sync_group(self):
        """The weight-sync PeerGroup, or None on ranks outside it and when the generator is shared."""
        return self._sync

    def shard(self, role: str, batch: Batch) -> Batch:
        """This replica's contiguous share of the rows of ``batch``; shares differ by at most one
        row, the first ones larger (``shard_bounds``)."""
        index, parts = self.shard_of(role)
        size = next(iter(batch.values())).shape[0]
        start, stop = shard_bounds(size, parts, index)
        return select(batch, slice(start, stop))

    def gather(self, role: str, local: Batch | None, keys: list[str], pad: dict[str, int] | None = None) -> Batch:
        """The ``keys`` of every replica leader's ``local`` rows, concatenated in replica order on every
        rank; a second dimension is right-padded to the widest shard with ``pad[key]`` (default 0). KeyError for a
        role the plan does not have: the loop never asks one (a silent empty result would hide the bug)."""
        self.topo.plan.role(role)
        return gather_from(self.replica_leaders(role), local, keys, self.device, self.everyone, self.rank, pad)

    def share(self, obj: Any, role: str) -> Any:
        """A small Python object (metrics, a path) from the role's first rank to every rank; KeyError for a role
        the plan does not have."""
        self.topo.plan.role(role)
        return self.everyone.broadcast_object(obj, self.topo.ranks_of(role)[0])

    def barrier(self) -> None:
        """Return when every rank of the job has reached it."""
        self.everyone.barrier()

    def any(self, flag: bool) -> bool:
        """True on every rank when it is true on any (signals reach ranks at different times)."""
        return self.everyone.any(flag)

    def max_over_ranks(self, values: list[float]) -> list[float]:
        """The element-wise maximum over every rank of the job of ``values`` (the same length everywhere), on
        every rank: one small all-reduce (per-role busy seconds, rlhf_launch/runtime/step_timing.py)."""
        return self.everyone.max(values)

    def is_role_leader(self, role: str) -> bool:
        """Whether this rank is the role's first global rank (never, for a role the plan does not have)."""
        return self.topo.ranks_of(role)[:1] == [self.rank]
