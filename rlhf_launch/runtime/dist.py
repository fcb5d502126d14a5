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

from rlhf_launch.core.config import RunConfig
from rlhf_launch.core.plan import Plan
from rlhf_launch.core.problems import InputError

FAILED_KEY = "rlhf_launch/runtime/failed"
HEARTBEAT_S = 1.0
STOP_JOIN_S = 30.0  # a heartbeat's store calls end within their own timeouts; beyond this, leave anyway
LEAVE_TIMEOUT_S = 120.0  # how long global rank 0, which serves the store, waits at the end for every rank to stop
LINGER_S = 5.0  # how long global rank 0, which serves the store, stays after a failure for the others to read it
DONE_POLL_S = 0.05
# A rank's beat key holds its beat count while it runs, then one of these: it stopped its watchdog after an orderly
# end (DONE), or it read the job's failure and is exiting (STOPPED).
DONE, STOPPED = b"done", b"stopped"


def beat_key(rank: int) -> str:
    """The store key of global rank ``rank``'s heartbeat: one key per rank, read by global rank 0 alone."""
    return f"rlhf_launch/runtime/beat/{rank}"


def warm_key(rank: int) -> str:
    """The store key of global rank ``rank``'s warm-up: the last of ``WARM_UP`` that it has reached."""
    return f"rlhf_launch/runtime/warm/{rank}"


# The stages of a rank's warm-up, each posted as the rank enters it: its role's group (init_role_group, where NCCL
# creates the communicator given a device_id), then the exchange groups between roles and their first collectives
# (``Distributed``), then done. Ranks that stay behind the others when the deadline passes are the ones named.
WARM_UP = {"role group": "its role's group", "exchange groups": "the exchange groups' first collective", "done": ""}


@dataclass(frozen=True)
class Deadlines:
    """How long a rank waits for the others, from the spec's ``run`` section: at the rendezvous, for the warm-up of
    every rank's process groups, in a collective inside a role and in an exchange between roles, and for a heartbeat."""

    rendezvous_s: float
    warmup_s: float
    role_s: float
    exchange_s: float
    heartbeat_s: float

    @staticmethod
    def of(run: RunConfig | None = None) -> Deadlines:
        """The deadlines of ``run`` (the spec's defaults when None)."""
        run = run or RunConfig()
        return Deadlines(run.rendezvous_timeout_s, run.warmup_timeout_s, run.role_timeout_s, run.exchange_timeout_s,
                         run.heartbeat_timeout_s)


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

    def replica_index(self, role: str) -> int:
        """The index of this process's data-parallel replica of ``role`` (a vLLM engine, for a separate generator):
        the tensor-parallel ranks of one replica share it."""
        ranks = self.ranks_of(role)
        per_replica = len(ranks) // self.plan.role(role).data
        return ranks.index(self.rank) // per_replica

    def default_group_ranks(self) -> list[int]:
        """The global ranks of this process's torch default group: its role's data-parallel ranks,
        or for a separate generator its engine's ranks (engines of different replicas are
        independent, and vLLM takes the default group to be one engine's world)."""
        role = self.plan.role(self.role)
        ranks = list(role.ranks)
        if self.role != "generator":
            return ranks
        per_engine = len(ranks) // role.data
        first = self.replica_index(self.role) * per_engine
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


def device_id_for(device: torch.device) -> torch.device | None:
    """The ``device_id`` for ``init_process_group``: this rank's GPU on CUDA (with its index, as ``pick_device``
    chose it from the local rank), None on the CPU. With it, NCCL binds the group to that GPU and creates the
    communicator at once instead of at the first collective, so that a stuck start-up shows inside the warm-up
    deadline and no collective runs on a device it guessed."""
    if device.type != "cuda":
        return None
    return torch.device("cuda", device.index if device.index is not None else torch.cuda.current_device())


def rendezvous(topo: Topology, timeout_s: float) -> dist.TCPStore:
    """Meet every rank at MASTER_ADDR:MASTER_PORT, or fail naming the ranks that never came; returns the store,
    which global rank 0 serves.

    Each rank posts its first heartbeat before it arrives, so that every beat key exists once all have
    (``Watchdog``). The process groups come after the watchdog has started (``init_role_group``, then
    ``Distributed``'s warm-up), so that a start-up that hangs there fails within run.warmup_timeout_s."""
    host, port = os.environ.get("MASTER_ADDR", "127.0.0.1"), int(os.environ.get("MASTER_PORT", "29500"))
    timeout = datetime.timedelta(seconds=timeout_s)
    try:
        store = dist.TCPStore(host, port, topo.world_size, is_master=topo.rank == 0, timeout=timeout, wait_for_workers=False)
    except Exception as exc:  # noqa: BLE001 - any connection failure gets the same explanation
        raise RendezvousError(
            f"{topo.describe(topo.rank)} could not reach the rendezvous at {host}:{port} within {timeout_s:.0f} s: {exc}"
        ) from None
    store.set(beat_key(topo.rank), "0")
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
    return store


def init_role_group(topo: Topology, device: torch.device, store: dist.Store, timeout_s: float) -> None:
    """Make torch's default process group this process's ROLE (its data-parallel ranks), or for a generator rank
    its engine's ranks: libraries such as DeepSpeed and vLLM take the default group to be their whole world and
    issue group-less barriers and collectives on it. Its collectives time out after ``timeout_s``
    (run.role_timeout_s). Exchanges between roles run on PeerGroups built on the same store: ``global`` over
    every rank, and one per exchange (rlhf_launch/runtime/cluster.py)."""
    post_warm_up(store, topo.rank, "role group")
    ranks = topo.default_group_ranks()
    dist.init_process_group(
        backend_for(device), store=dist.PrefixStore(f"rlhf_launch/runtime/role/{topo.role}/{ranks[0]}", store),
        rank=ranks.index(topo.rank), world_size=len(ranks), timeout=datetime.timedelta(seconds=timeout_s),
        device_id=device_id_for(device),
    )


def post_warm_up(store: dist.Store, rank: int, stage: str) -> None:
    """Tell global rank 0's watchdog that ``rank`` has reached ``stage`` of its warm-up (one of ``WARM_UP``)."""
    assert stage in WARM_UP, stage
    store.set(warm_key(rank), stage)


class PeerGroup:
    """A process group over some global ranks, built on the rendezvous store directly.

    Only its members construct it (unlike torch's ``new_group``, which every rank of the
    default group must call), and ranks are global ranks in every method. Its collectives time out
    after ``timeout_s`` (run.exchange_timeout_s, its default when None).
    """

    def __init__(self, store: dist.Store, name: str, ranks: list[int], rank: int, device: torch.device,
                 timeout_s: float | None = None):
        self.ranks, self.device = list(ranks), device
        prefix = dist.PrefixStore(f"rlhf_launch/runtime/group/{name}", store)
        size, me = len(self.ranks), self.ranks.index(rank)
        timeout = datetime.timedelta(seconds=timeout_s if timeout_s is not None else Deadlines.of().exchange_s)
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

    A process that raises writes the reason under FAILED_KEY; one that dies silently stops beating; one whose
    process groups never form misses the warm-up deadline. Every rank beats (one key of its own) and reads
    FAILED_KEY once per HEARTBEAT_S; global rank 0 alone also reads every rank's beat (``Liveness``), in one
    store call, and writes the failure for all: O(world) store calls per beat, not O(world²). Every process then
    exits non-zero naming the failed role and rank.
    """

    def __init__(self, store: dist.Store, topo: Topology, deadlines: Deadlines | None = None):
        self.store, self.topo = own_connection(store), topo
        self.deadlines = deadlines or Deadlines.of()
        self.liveness = Liveness(self.store, topo, self.deadlines) if topo.rank == 0 else None
        self.stopped = threading.Event()
        self.failing = threading.Event()  # this process is reporting its own failure: its exit is fail_fast's
        self.thread = threading.Thread(target=self._run, name="rlhf-watchdog", daemon=True)
        self.thread.start()

    def report_failure(self, exc: BaseException) -> None:
        """Tell every other process that this one failed and why (nothing when the store is gone)."""
        self._fail_job(f"{self.topo.describe(self.topo.rank)} failed: {type(exc).__name__}: {exc}")

    def stop(self) -> None:
        """This process is done: it stops beating, and the others must not count that as a failure.

        The thread is joined before this returns: a daemon thread still inside a store call (C++) when the
        interpreter exits is torn down by a forced unwind through that call, which aborts the whole process
        ("terminate called without an active exception", status -6) and fails a run that completed."""
        self.stopped.set()
        self.thread.join(timeout=STOP_JOIN_S)
        try:
            self.store.set(beat_key(self.topo.rank), DONE)
        except Exception:  # noqa: BLE001 - rank 0 may have finished and closed the store first
            pass

    def wait_for_everyone(self, timeout_s: float) -> list[int]:
        """Wait until every rank has stopped its watchdog (``stop``), at most ``timeout_s``, or until one
        reports a failure; returns the ranks that have not stopped (none when all have)."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                beats = read_beats(self.store, self.topo.world_size)
                missing = [r for r, beat in enumerate(beats) if beat != DONE]
                if not missing or self.store.check([FAILED_KEY]):
                    return missing
            except Exception:  # noqa: BLE001 - no store left to wait on
                return []
            if time.monotonic() > deadline:
                return missing
            time.sleep(DONE_POLL_S)

    def _run(self) -> None:
        beats = 0
        while not self.stopped.wait(HEARTBEAT_S):
            if self.failing.is_set():
                continue
            try:
                beats += 1
                self.store.set(beat_key(self.topo.rank), str(beats))
                if self.store.check([FAILED_KEY]):
                    self._exit(self.store.get(FAILED_KEY).decode())
                reason = self.liveness.poll() if self.liveness is not None else None
                if reason is not None and not self.stopped.is_set():
                    self._fail_job(reason)
                    self._exit(reason)
            except Exception as exc:  # noqa: BLE001 - losing the store means losing global rank 0
                if not self.stopped.is_set():
                    self._exit(f"{self.topo.describe(0)} is unreachable (rendezvous store lost: {exc})")

    def _fail_job(self, reason: str) -> None:
        """Write why the job fails for every rank to read; global rank 0, which serves the store, then stays until
        the others have read it (at most LINGER_S): leaving at once would leave them only a lost store to report."""
        self.failing.set()
        try:
            self.store.set(FAILED_KEY, reason)
            if self.topo.rank != 0:
                self.store.set(beat_key(self.topo.rank), STOPPED)
                return
            deadline = time.monotonic() + LINGER_S
            while time.monotonic() < deadline:
                beats = read_beats(self.store, self.topo.world_size)
                if all(beat in (DONE, STOPPED) for beat in beats[1:]):
                    return
                time.sleep(DONE_POLL_S)
        except Exception:  # noqa: BLE001 - the store may be gone with rank 0; exiting is what matters
            pass

    def _exit(self, reason: str) -> None:
        try:
            self.store.set(beat_key(self.topo.rank), STOPPED)  # rank 0 may be waiting for it before it closes the store
        except Exception:  # noqa: BLE001 - the store may be gone already
            pass
        print(f"rlhf: {self.topo.describe(self.topo.rank)} stopping: {reason}", file=sys.stderr, flush=True)
        os._exit(3)


def own_connection(store: dist.Store) -> dist.Store:
    """A client of ``store`` with a connection of its own. A TCPStore client runs one call at a time: a process
    group that waits in ``get`` for a peer's address (gloo's connect, NCCL's unique id) would hold up a watchdog
    sharing its client for as long, silencing its heartbeat and rank 0's checks exactly when a start-up hangs."""
    try:
        return store.clone()
    except (AttributeError, NotImplementedError, RuntimeError):  # an older torch, or a store that cannot
        if isinstance(store, dist.TCPStore):
            return dist.TCPStore(store.host, store.port, is_master=False, timeout=store.timeout)
        return store


def read_beats(store: dist.Store, world_size: int) -> list[bytes | None]:
    """Every rank's beat key, in rank order, in one store call (None for a rank that has not beaten yet)."""
    keys = [beat_key(rank) for rank in range(world_size)]
    if store.check(keys):
        return list(store.multi_get(keys))
    return [store.get(key) if store.check([key]) else None for key in keys]


class Liveness:
    """What global rank 0's watchdog checks once per beat: that every rank's heartbeat moves, and until every
    rank has warmed up, the warm-up deadline. ``poll`` returns why the job must fail, or None.

    A rank is stale after run.heartbeat_timeout_s of watching without its beat changing. Only time this rank
    watched counts: after a pause of its own (a call that held its interpreter lock), each rank's clock resumes
    where it stood rather than jumping, so that a rank 0 that was stalled takes nobody for dead."""

    def __init__(self, store: dist.Store, topo: Topology, deadlines: Deadlines, clock=time.monotonic):
        self.store, self.topo, self.deadlines, self.clock = store, topo, deadlines, clock
        self.started = self.last_poll = clock()
        self.seen: dict[int, tuple[bytes | None, float]] = {}  # rank -> (last beat, seconds watched without change)
        self.warm = False

    def poll(self) -> str | None:
        """Why the job must fail now (ranks that stopped beating, or that missed the warm-up deadline), or None."""
        now = self.clock()
        watched, self.last_poll = min(now - self.last_poll, 3 * HEARTBEAT_S), now
        stale = []
        for rank, beat in enumerate(read_beats(self.store, self.topo.world_size)):
            if beat in (DONE, STOPPED):
                continue
            previous, unchanged = self.seen.get(rank, (beat, 0.0))
            unchanged = unchanged + watched if beat == previous else 0.0
            self.seen[rank] = (beat, unchanged)
            if unchanged > self.deadlines.heartbeat_s:
                stale.append(rank)
        if stale:
            names = ", ".join(self.topo.describe(r) for r in stale)
            return (f"{names} stopped responding: no heartbeat for {self.deadlines.heartbeat_s:.0f} s (a process that died, or "
                    "one call that held its Python interpreter lock that long: if it was alive, raise run.heartbeat_timeout_s)")
        return self._warm_up_overdue(now)

    def _warm_up_overdue(self, now: float) -> str | None:
        if self.warm:
            return None
        keys = [warm_key(rank) for rank in range(self.topo.world_size)]
        if self.store.check(keys) and all(stage == b"done" for stage in self.store.multi_get(keys)):
            self.warm = True
            return None
        if now - self.started <= self.deadlines.warmup_s:
            return None
        stages = list(WARM_UP)
        reached = [stages.index(self.store.get(key).decode()) if self.store.check([key]) else -1 for key in keys]
        behind = [rank for rank, stage in enumerate(reached) if stage == min(reached)]
        names = ", ".join(self.topo.describe(r) for r in behind)
        where = "never began its process groups" if min(reached) < 0 else f"never got past {WARM_UP[stages[min(reached)]]}"
        others = len(reached) - len(behind) - reached.count(len(stages) - 1)
        waiting = f" ({others} other rank(s) wait for them there)" if others else ""
        return (f"warm-up not done after {self.deadlines.warmup_s:.0f} s: {names} {where}{waiting}; a stuck NCCL start-up, "
                "or a rank held up before it: raise run.warmup_timeout_s if the start-up is only slow")


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

    A communication error usually means that a peer died: global rank 0's watchdog then gets the time it
    needs to find which one stopped beating (run.heartbeat_timeout_s), so that the message names it rather
    than this rank; this rank's watchdog exits as soon as the failure is written."""
    if watchdog is not None and _is_peer_failure(exc):
        time.sleep(watchdog.deadlines.heartbeat_s + 3 * HEARTBEAT_S)
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
