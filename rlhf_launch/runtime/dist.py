"""Where this process stands in the job: rank, role and groups; the rendezvous; and the
watchdog that takes every process down when one of them fails.

Environment (set by the sbatch script on Slurm, or by ``rlhf-launch --local``):
  RLHF_HET_GROUP, RLHF_RANK_OFFSET   this step's component and the global rank of its first task
  SLURM_PROCID, SLURM_LOCALID        rank of the task within its component / on its node
  RLHF_WORLD_SIZE, MASTER_ADDR, MASTER_PORT
Global rank = RLHF_RANK_OFFSET + SLURM_PROCID; the role follows from the resource plan.
"""

from __future__ import annotations

import datetime
import os
import sys
import threading
import time
import traceback
from dataclasses import dataclass

import torch
import torch.distributed as dist

from rlhf_launch.core.plan import Plan
from rlhf_launch.core.problems import InputError

FAILED_KEY = "rlhf_launch/runtime/failed"
HEARTBEAT_S = 1.0
STALE_AFTER_S = 20.0
STOP_JOIN_S = 30.0  # a heartbeat's store calls end within their own timeouts; beyond this, leave anyway
LEAVE_TIMEOUT_S = 120.0  # how long global rank 0, which serves the store, waits at the end for every rank to stop
DONE_POLL_S = 0.05


class RendezvousError(RuntimeError):
    """The ranks of a job could not meet: a missing variable, an unreachable store or ranks that never came."""


@dataclass(frozen=True)
class Topology:
    """This process's place in the job: global rank, world size, role, rank within the role, rank on its node."""

    rank: int
    world_size: int
    role: str
    role_rank: int
    local_rank: int
    plan: Plan

    @staticmethod
    def from_env(plan: Plan, env: dict[str, str] | None = None) -> Topology:
        """The topology from the variables that the sbatch script or ``--local`` sets (``env`` instead of
        os.environ when given); RendezvousError when one is missing or the world size is not the plan's."""
        env = dict(os.environ if env is None else env)
        try:
            rank = int(env["RLHF_RANK_OFFSET"]) + int(env["SLURM_PROCID"])
            world = int(env.get("RLHF_WORLD_SIZE", plan.world_size))
        except KeyError as exc:
            raise RendezvousError(
                f"missing environment variable {exc.args[0]}: start workers with rlhf-launch (sbatch script or --local)"
            ) from None
        if world != plan.world_size:
            raise RendezvousError(f"RLHF_WORLD_SIZE={world} but the spec's plan has {plan.world_size} ranks: the job and its spec disagree")
        role, role_rank = plan.role_of_rank(rank)
        return Topology(rank, world, role, role_rank, int(env.get("SLURM_LOCALID", "0")), plan)

    def ranks_of(self, role: str) -> list[int]:
        """Global ranks that run ``role`` (a shared role runs on its host's ranks); none for a role the plan
        does not have (a critic-free estimator's critic, the reference with kl_coeff 0)."""
        if not self.plan.has(role):
            return []
        r = self.plan.role(role)
        host = self.plan.role(r.shared_with) if r.shared_with else r
        return list(host.ranks)

    def runs(self, role: str) -> bool:
        """Whether this process runs ``role``."""
        return self.rank in self.ranks_of(role)

    def default_group_ranks(self) -> list[int]:
        """The global ranks of this process's torch default group: its role's data-parallel ranks,
        or for a separate generator its engine's ranks (engines of different replicas are
        independent, and vLLM takes the default group to be one engine's world)."""
        role = self.plan.role(self.role)
        ranks = list(role.ranks)
        if self.role != "generator":
            return ranks
        per_engine = len(ranks) // role.data
        first = ranks.index(self.rank) // per_engine * per_engine
        return ranks[first : first + per_engine]

    def index_in(self, role: str) -> int:
        """This process's position among the ranks that run ``role``."""
        return self.ranks_of(role).index(self.rank)

    def describe(self, rank: int) -> str:
        """'<role> rank <n> (global rank <r>)' for a global rank, for messages."""
        role, role_rank = self.plan.role_of_rank(rank)
        return f"{role} rank {role_rank} (global rank {rank})"


def backend_for(device: torch.device) -> str:
    """The torch.distributed backend for ``device``: nccl on CUDA, gloo otherwise."""
    return "nccl" if device.type == "cuda" else "gloo"


def rendezvous(topo: Topology, device: torch.device, timeout_s: float) -> dist.TCPStore:
    """Meet every rank at MASTER_ADDR:MASTER_PORT, or fail naming the ranks that never came.

    Then torch's default process group becomes this process's ROLE (its data-parallel ranks),
    or for a generator rank its engine's ranks: libraries such as DeepSpeed and vLLM take the
    default group to be their whole world and issue group-less barriers and collectives on it.
    Exchanges between roles run on PeerGroups built on the same store: ``global`` over every
    rank, and one per exchange.
    """
    host, port = os.environ.get("MASTER_ADDR", "127.0.0.1"), int(os.environ.get("MASTER_PORT", "29500"))
    timeout = datetime.timedelta(seconds=timeout_s)
    try:
        store = dist.TCPStore(host, port, topo.world_size, is_master=topo.rank == 0, timeout=timeout, wait_for_workers=False)
    except Exception as exc:  # noqa: BLE001 - any connection failure gets the same explanation
        raise RendezvousError(
            f"{topo.describe(topo.rank)} could not reach the rendezvous at {host}:{port} within {timeout_s:.0f} s: {exc}"
        ) from None
    store.set(f"rlhf_launch/runtime/arrived/{topo.rank}", "1")
    deadline = time.monotonic() + timeout_s
    while True:
        missing = [r for r in range(topo.world_size) if not store.check([f"rlhf_launch/runtime/arrived/{r}"])]
        if not missing:
            break
        if time.monotonic() > deadline:
            names = ", ".join(topo.describe(r) for r in missing)
            raise RendezvousError(f"rendezvous timed out after {timeout_s:.0f} s at {host}:{port}; never arrived: {names}")
        time.sleep(0.2)
    ranks = topo.default_group_ranks()
    dist.init_process_group(
        backend_for(device), store=dist.PrefixStore(f"rlhf_launch/runtime/role/{topo.role}/{ranks[0]}", store),
        rank=ranks.index(topo.rank), world_size=len(ranks), timeout=max(timeout, datetime.timedelta(minutes=10)),
    )
    return store


class PeerGroup:
    """A process group over some global ranks, built on the rendezvous store directly.

    Only its members construct it (unlike torch's ``new_group``, which every rank of the
    default group must call), and ranks are global ranks in every method.
    """

    def __init__(self, store: dist.Store, name: str, ranks: list[int], rank: int, device: torch.device, timeout_s: float = 1800):
        self.ranks, self.device = list(ranks), device
        prefix = dist.PrefixStore(f"rlhf_launch/runtime/group/{name}", store)
        size, me = len(self.ranks), self.ranks.index(rank)
        timeout = datetime.timedelta(seconds=timeout_s)
        if backend_for(device) == "nccl":
            options = dist.ProcessGroupNCCL.Options()
            options._timeout = timeout
            self.pg = dist.ProcessGroupNCCL(prefix, me, size, options)
        else:
            self.pg = dist.ProcessGroupGloo(prefix, me, size, timeout)

    def broadcast(self, tensor: torch.Tensor, src: int) -> torch.Tensor:
        """Broadcast ``tensor`` in place from global rank ``src`` to every member; returns it."""
        opts = dist.BroadcastOptions()
        opts.rootRank, opts.rootTensor = self.ranks.index(src), 0
        self.pg.broadcast([tensor], opts).wait()
        return tensor

    def barrier(self) -> None:
        """Return only when every member has reached it.

        ``wait()`` alone does not block the host under NCCL (it only orders the device stream), so
        the count is read back to the host: that read cannot complete before every member joined.
        Checkpoint completion and the end of a run depend on it."""
        token = torch.ones(1, device=self.device)
        self.pg.allreduce([token]).wait()
        arrived = int(token.item())
        if arrived != len(self.ranks):
            raise RuntimeError(f"barrier over {len(self.ranks)} ranks counted {arrived}")

    def shutdown(self) -> None:
        """Release the communicator (after a barrier: no member may still be using it)."""
        shutdown = getattr(self.pg, "shutdown", None)
        if shutdown is not None:
            shutdown()

    def any(self, flag: bool) -> bool:
        """True on every member when ``flag`` is true on any (read back to the host, so it blocks
        like ``barrier``)."""
        return bool(self.max([1.0 if flag else 0.0])[0])

    def max(self, values: list[float]) -> list[float]:
        """The element-wise maximum of every member's ``values`` (same length on all), on every member, in one
        all-reduce; float64, so that seconds keep their digits, and read back to the host like ``barrier``."""
        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        opts = dist.AllreduceOptions()
        opts.reduceOp = dist.ReduceOp.MAX
        self.pg.allreduce([tensor], opts).wait()
        return tensor.tolist()

    def broadcast_object(self, obj, src: int):
        """A small Python object (metrics, a path); not for the hot path."""
        import pickle

        me = self.ranks[self.pg.rank()]
        payload = torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8) if me == src else None
        size = torch.tensor([payload.numel() if payload is not None else 0], dtype=torch.int64, device=self.device)
        self.broadcast(size, src)
        buffer = payload.to(self.device) if payload is not None else torch.empty(int(size), dtype=torch.uint8, device=self.device)
        self.broadcast(buffer, src)
        return obj if me == src else pickle.loads(buffer.cpu().numpy().tobytes())


class Watchdog:
    """Takes this process down when any other fails, instead of waiting in a collective.

    A process that raises writes the reason under FAILED_KEY; one that dies silently stops
    beating. Every process polls both, and exits non-zero naming the failed role and rank.
    """

    def __init__(self, store: dist.TCPStore, topo: Topology):
        self.store, self.topo = store, topo
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, name="rlhf-watchdog", daemon=True)
        self.thread.start()

    def report_failure(self, exc: BaseException) -> None:
        """Tell every other process that this one failed and why (nothing when the store is gone)."""
        reason = f"{self.topo.describe(self.topo.rank)} failed: {type(exc).__name__}: {exc}"
        try:
            self.store.set(FAILED_KEY, reason)
        except Exception:  # noqa: BLE001 - the store may be gone with rank 0; exiting is what matters
            pass

    def stop(self) -> None:
        """This process is done: it stops beating, and the others must not count that as a failure.

        The thread is joined before this returns: a daemon thread still inside a store call (C++) when the
        interpreter exits is torn down by a forced unwind through that call, which aborts the whole process
        ("terminate called without an active exception", status -6) and fails a run that completed."""
        self.stopped.set()
        self.thread.join(timeout=STOP_JOIN_S)
        try:
            self.store.set(f"rlhf_launch/runtime/done/{self.topo.rank}", "1")
        except Exception:  # noqa: BLE001 - rank 0 may have finished and closed the store first
            pass

    def wait_for_everyone(self, timeout_s: float) -> list[int]:
        """Wait until every rank has stopped its watchdog (``stop``), at most ``timeout_s``, or until one
        reports a failure; returns the ranks that have not stopped (none when all have)."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                missing = [r for r in range(self.topo.world_size) if not self.store.check([f"rlhf_launch/runtime/done/{r}"])]
                if not missing or self.store.check([FAILED_KEY]):
                    return missing
            except Exception:  # noqa: BLE001 - no store left to wait on
                return []
            if time.monotonic() > deadline:
                return missing
            time.sleep(DONE_POLL_S)

    def _run(self) -> None:
        last_seen: dict[int, tuple[str, float]] = {}
        while not self.stopped.wait(HEARTBEAT_S):
            try:
                self.store.set(f"rlhf_launch/runtime/beat/{self.topo.rank}", str(time.time()))
                if self.store.check([FAILED_KEY]):
                    self._exit(self.store.get(FAILED_KEY).decode())
                now = time.monotonic()
                for rank in range(self.topo.world_size):
                    if self.store.check([f"rlhf_launch/runtime/done/{rank}"]):
                        continue
                    key = f"rlhf_launch/runtime/beat/{rank}"
                    beat = self.store.get(key).decode() if self.store.check([key]) else ""
                    previous = last_seen.get(rank)
                    if previous is None or previous[0] != beat:
                        last_seen[rank] = (beat, now)
                    elif now - previous[1] > STALE_AFTER_S and not self.stopped.is_set():
                        self._exit(f"{self.topo.describe(rank)} stopped responding for {STALE_AFTER_S:.0f} s")
            except Exception as exc:  # noqa: BLE001 - losing the store means losing global rank 0
                if not self.stopped.is_set():
                    self._exit(f"{self.topo.describe(0)} is unreachable (rendezvous store lost: {exc})")

    def _exit(self, reason: str) -> None:
        print(f"rlhf: {self.topo.describe(self.topo.rank)} stopping: {reason}", file=sys.stderr, flush=True)
        os._exit(3)


def leave(watchdog: Watchdog, timeout_s: float = LEAVE_TIMEOUT_S) -> None:
    """The last step of a rank after an orderly end (``Distributed.close``): destroy torch's default
    group, stop the watchdog, and on global rank 0 wait (at most ``timeout_s``) until every rank has.

    Rank 0 serves the rendezvous store, so it goes last: a rank still shutting its groups down
    (NCCL may take seconds) has its watchdog running, which would take the lost store for a dead
    rank 0 and exit with status 3, failing a completed run. A rank still missing after ``timeout_s``
    is named, and rank 0 leaves all the same (the run's results are written)."""
    dist.destroy_process_group()  # before ``stop``: the group's store may be rank 0's
    watchdog.stop()
    if watchdog.topo.rank != 0:
        return
    missing = watchdog.wait_for_everyone(timeout_s)
    if missing:
        names = ", ".join(watchdog.topo.describe(r) for r in missing)
        print(f"rlhf: {watchdog.topo.describe(0)} leaving after {timeout_s:.0f} s with {names} still shutting down",
              file=sys.stderr, flush=True)


def fail_fast(watchdog: Watchdog | None, exc: BaseException) -> None:
    """Report a failure of this process to the others, then exit at once: a process that
    raised must not wait in the collectives of an orderly shutdown.

    A communication error usually means that a peer died: the watchdog then gets a moment
    to find which one stopped beating, so that the message names it rather than this rank."""
    if watchdog is not None and _is_peer_failure(exc):
        time.sleep(STALE_AFTER_S + 3 * HEARTBEAT_S)  # the watchdog exits first if it finds the dead peer
    where = watchdog.topo.describe(watchdog.topo.rank) if watchdog is not None else "this rank"
    print(failure_line(f"rlhf: {where}", exc), file=sys.stderr, flush=True)
    if not isinstance(exc, InputError):  # a bug: its traceback, after the line that says what failed
        traceback.print_exception(exc)
    if watchdog is not None:
        watchdog.report_failure(exc)
    sys.stderr.flush()
    os._exit(1)


def failure_line(where: str, exc: BaseException) -> str:
    """The one line that reports a failure: an unusable input (``InputError``) by its own message,
    which says where and what was found; anything else with its type, as a bug."""
    if isinstance(exc, InputError):
        return f"{where}: {exc}"
    return f"{where} failed: {type(exc).__name__}: {exc}"


def _is_peer_failure(exc: BaseException) -> bool:
    text = str(exc)
    signs = ("Connection closed by peer", "Connection reset", "Broken pipe", "NCCL", "timed out", "Timed out")
    return isinstance(exc, RuntimeError) and any(s in text for s in signs)
