"""Start-up with a deadline, and heartbeats per rank (rlhf_launch/runtime/dist.py).

Every rank posts "warm-up done" once its process groups have run their first collective; global rank 0's
watchdog fails the job after run.warmup_timeout_s, naming the ranks that never did. Every rank beats on one key
of its own and only global rank 0 reads them, in one store call per beat; a rank whose beat stops for
run.heartbeat_timeout_s is named to every rank.

The whole-job tests run real ranks on gloo, forked processes that meet as ``python -m rlhf_launch.runtime.worker``
does (``rendezvous``, ``Watchdog``, ``init_role_group``, ``Distributed``), each writing its stderr to a file. The
``Liveness`` tests run rank 0's checks on a real in-memory store with a clock the test advances.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
import time
from pathlib import Path

import pytest
import torch

from rlhf_launch.frontend.backends.local import free_port
from rlhf_launch.runtime.cluster import Distributed  # imported once here, not in every forked rank
from rlhf_launch.runtime.dist import (
    DONE,
    Deadlines,
    Liveness,
    Topology,
    Watchdog,
    beat_key,
    init_role_group,
    post_warm_up,
    rendezvous,
)
from tests.factory import layout, load

CPU = torch.device("cpu")


def _rank(rank: int, plan, port: int, deadlines: Deadlines, log: Path, misbehave: dict[int, str]) -> None:
    """One rank, as the worker starts it; ``misbehave[rank]`` makes it sleep through its warm-up ("sleep") or die
    without a word after it ("die")."""
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(fd, 2)  # torch's own warnings
    sys.stderr = os.fdopen(fd, "w", buffering=1)  # the rank's messages (pytest has replaced sys.stderr)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    topo = Topology(rank, plan.world_size, *plan.role_of_rank(rank), 0, plan)
    store = rendezvous(topo, 30)
    Watchdog(store, topo, deadlines)
    init_role_group(topo, CPU, store, deadlines.role_s)
    if misbehave.get(rank) == "sleep":
        time.sleep(120)  # its heartbeat goes on (a sleep holds no lock): only the warm-up deadline can end the job
    Distributed(topo, CPU, store, deadlines)
    if misbehave.get(rank) == "die":
        os._exit(9)  # no report, no goodbye: only its silence tells
    time.sleep(120)  # the others wait, as in a collective, until the watchdog takes them down
    os._exit(0)


def _run_job(tmp_path: Path, deadlines: Deadlines, misbehave: dict[int, str], limit_s: float) -> tuple[list[int | None], list[str], float]:
    """The exit codes and stderr of every rank of the default plan's job, and how long the job took."""
    plan = load().plan
    ctx = multiprocessing.get_context("fork")
    port = free_port()
    logs = [tmp_path / f"rank{rank}.log" for rank in range(plan.world_size)]
    procs = [ctx.Process(target=_rank, args=(rank, plan, port, deadlines, logs[rank], misbehave), daemon=True)
             for rank in range(plan.world_size)]
    started = time.monotonic()
    for p in procs:
        p.start()
    for p in procs:
        p.join(max(0.0, started + limit_s - time.monotonic()))
    took = time.monotonic() - started
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    return [p.exitcode for p in procs], [log.read_text() if log.exists() else "" for log in logs], took


def test_a_rank_that_sleeps_through_its_warm_up_fails_the_job_naming_it(tmp_path):
    deadlines = Deadlines(rendezvous_s=30, warmup_s=2, role_s=60, exchange_s=60, heartbeat_s=60)
    codes, logs, took = _run_job(tmp_path, deadlines, {2: "sleep"}, limit_s=60)
    assert codes == [3, 3, 3, 3], (codes, logs)
    assert took < 30
    reason = "warm-up not done after 2 s: reference rank 0 (global rank 2) never got past its role's group (3 other rank(s) wait"
    for rank, log in enumerate(logs):
        assert reason in log, (rank, log)
        assert "raise run.warmup_timeout_s" in log
        assert "unreachable" not in log  # rank 0 stayed until every rank had read why


def test_a_rank_that_dies_silently_is_named_to_every_rank(tmp_path):
    deadlines = Deadlines(rendezvous_s=30, warmup_s=30, role_s=60, exchange_s=60, heartbeat_s=5)
    codes, logs, took = _run_job(tmp_path, deadlines, {1: "die"}, limit_s=60)
    assert codes[1] == 9 and [codes[r] for r in (0, 2, 3)] == [3, 3, 3], (codes, logs)
    assert took < 30
    for rank in (0, 2, 3):
        assert "critic rank 0 (global rank 1) stopped responding: no heartbeat for 5 s" in logs[rank], (rank, logs[rank])
        assert "raise run.heartbeat_timeout_s" in logs[rank]


# --------------------------------------------------------------------------- rank 0's checks, step by step
class Clock:
    """A monotonic clock that moves only when told."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class CountingStore:
    """A real in-memory store that counts the calls made on it."""

    def __init__(self) -> None:
        self.inner, self.calls = torch.distributed.HashStore(), 0

    def __getattr__(self, name: str):
        method = getattr(self.inner, name)

        def counted(*args):
            self.calls += 1
            return method(*args)

        return counted


def _liveness(plan, heartbeat_s: float = 10, warmup_s: float = 30) -> tuple[Liveness, CountingStore, Clock]:
    store, clock = CountingStore(), Clock()
    for rank in range(plan.world_size):
        store.inner.set(beat_key(rank), "0")  # as the rendezvous leaves them
    topo = Topology(0, plan.world_size, *plan.role_of_rank(0), 0, plan)
    deadlines = Deadlines(rendezvous_s=30, warmup_s=warmup_s, role_s=60, exchange_s=60, heartbeat_s=heartbeat_s)
    return Liveness(store, topo, deadlines, clock), store, clock


def _beat_all(store: CountingStore, world: int, count: int, but: tuple[int, ...] = ()) -> None:
    for rank in range(world):
        if rank not in but:
            store.inner.set(beat_key(rank), str(count))


def test_a_stale_beat_is_named_after_the_timeout_and_not_before():
    plan = load().plan
    liveness, store, clock = _liveness(plan)
    for rank in range(plan.world_size):
        post_warm_up(store.inner, rank, "done")
    for count in range(1, 11):  # rank 3 beats no more; 10 s of one-second polls
        clock.now += 1
        _beat_all(store, plan.world_size, count, but=(3,))
        assert liveness.poll() is None, count
    clock.now += 1
    _beat_all(store, plan.world_size, 11, but=(3,))
    reason = liveness.poll()
    assert reason is not None and reason.startswith("reward rank 0 (global rank 3) stopped responding: no heartbeat for 10 s")
    store.inner.set(beat_key(3), DONE)  # a rank that stopped its watchdog after an orderly end is not stale
    clock.now += 30
    _beat_all(store, plan.world_size, 12, but=(3,))
    assert liveness.poll() is None


def test_a_pause_of_rank_0_itself_takes_nobody_for_dead():
    """Rank 0's own watchdog thread may not run for a while (a call that held the interpreter lock), and
    another rank may be in the same long call (every rank loading its optimizer shard on resume): the time
    rank 0 could not watch is not counted against the others."""
    plan = load().plan
    liveness, store, clock = _liveness(plan)
    for rank in range(plan.world_size):
        post_warm_up(store.inner, rank, "done")
    clock.now += 1
    _beat_all(store, plan.world_size, 1)
    assert liveness.poll() is None
    clock.now += 300  # rank 0 stalled, and rank 3 with it; the others beat meanwhile
    _beat_all(store, plan.world_size, 300, but=(3,))
    assert liveness.poll() is None
    for count in (301, 302):  # rank 3 comes back a little after rank 0
        clock.now += 1
        _beat_all(store, plan.world_size, count, but=(3,))
        assert liveness.poll() is None
    _beat_all(store, plan.world_size, 303)
    assert liveness.poll() is None


def test_the_warm_up_deadline_names_the_ranks_furthest_behind():
    """The ranks that reached a stage wait there for those that did not: the ones furthest behind are named."""
    plan = load().plan
    liveness, store, clock = _liveness(plan, heartbeat_s=1000, warmup_s=30)
    for rank in (0, 3):
        post_warm_up(store.inner, rank, "exchange groups")
    post_warm_up(store.inner, 1, "role group")
    clock.now += 30
    assert liveness.poll() is None  # not past it yet
    clock.now += 1
    assert liveness.poll().startswith(
        "warm-up not done after 30 s: reference rank 0 (global rank 2) never began its process groups (3 other rank(s) wait")
    post_warm_up(store.inner, 2, "exchange groups")
    assert liveness.poll().startswith(
        "warm-up not done after 30 s: critic rank 0 (global rank 1) never got past its role's group (3 other rank(s) wait")
    post_warm_up(store.inner, 1, "exchange groups")
    reason = liveness.poll()  # every rank in the exchange groups' first collective, none through: all are named
    assert reason.startswith("warm-up not done after 30 s: actor rank 0 (global rank 0), critic rank 0 (global rank 1), reference "
                             "rank 0 (global rank 2), reward rank 0 (global rank 3) never got past the exchange groups' first collective;")
    assert "raise run.warmup_timeout_s" in reason
    for rank in range(plan.world_size):
        post_warm_up(store.inner, rank, "done")
    assert liveness.poll() is None  # all done: the deadline no longer applies
    clock.now += 1000
    assert liveness.poll() is None


@pytest.mark.parametrize("sizes", [(1, 1, 1, 1), (2, 2, 2, 2)])
def test_rank_0_reads_every_beat_in_a_fixed_number_of_store_calls(sizes):
    """O(world) work per beat in all: each rank writes its own key, and rank 0's poll makes the same few store
    calls (each beat key read in one multi_get), whatever the world size."""
    plan = load(layout(*sizes)).plan
    liveness, store, clock = _liveness(plan)
    for rank in range(plan.world_size):
        post_warm_up(store.inner, rank, "done")
    clock.now += 1
    liveness.poll()  # the first poll finds everyone warm
    store.calls = 0
    for count in range(1, 6):
        clock.now += 1
        _beat_all(store, plan.world_size, count)
        assert liveness.poll() is None
    assert store.calls == 5 * 2  # per poll: one check that every beat key exists, one multi_get


def test_deadlines_come_from_the_spec():
    spec = load(**{"run.warmup_timeout_s": 90, "run.role_timeout_s": 700, "run.exchange_timeout_s": 2400,
                   "run.heartbeat_timeout_s": 300, "run.rendezvous_timeout_s": 50}).spec
    assert Deadlines.of(spec.run) == Deadlines(rendezvous_s=50, warmup_s=90, role_s=700, exchange_s=2400, heartbeat_s=300)
    defaults = Deadlines.of()
    assert defaults.heartbeat_s >= 120 and defaults.warmup_s > 0 and defaults.exchange_s >= defaults.role_s
