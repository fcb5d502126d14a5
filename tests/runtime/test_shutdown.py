"""The end of a completed run: every rank exits 0, even when some are slower than global rank 0 to
shut their groups down. Rank 0 serves the rendezvous store, and a rank whose watchdog still runs
takes a lost store for a dead rank 0 (exit status 3): rank 0 must stay until every watchdog has stopped.

Real ranks on gloo, forked processes that meet as ``python -m rlhf_launch.runtime.worker`` does (``rendezvous``,
``Watchdog``, ``Distributed``), then end as it does, with every rank but 0 made slow on purpose.
"""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
import time

import torch

from rlhf_launch.frontend.backends.local import free_port
from rlhf_launch.runtime import dist as rlhf_dist
from rlhf_launch.runtime.dist import (
    DONE,
    HEARTBEAT_S,
    Deadlines,
    PeerGroup,
    Topology,
    Watchdog,
    beat_key,
    init_role_group,
    leave,
    rendezvous,
)
from tests.conftest import ROOT
from tests.factory import load

CPU = torch.device("cpu")
SLOW_S = 4 * HEARTBEAT_S  # several watchdog polls: one after rank 0 left would find its store gone


def _rank(rank: int, plan, port: int) -> None:
    from rlhf_launch.runtime.cluster import Distributed

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    role, role_rank = plan.role_of_rank(rank)
    topo = Topology(rank, plan.world_size, role, role_rank, 0, plan)
    store = rendezvous(topo, 30)
    watchdog = Watchdog(store, topo)
    init_role_group(topo, CPU, store, 30)
    cluster = Distributed(topo, CPU, store)
    if rank != 0:
        shutdown = PeerGroup.shutdown

        def slow_shutdown(self) -> None:  # e.g. NCCL communicators that take a while to release
            time.sleep(SLOW_S)
            shutdown(self)

        PeerGroup.shutdown = slow_shutdown
    cluster.close()  # as rlhf_launch/runtime/worker.py ends a run
    leave(watchdog)


def test_every_rank_of_a_completed_run_exits_zero_though_rank_0_is_first_done():
    plan = load().plan
    assert plan.world_size >= 3
    ctx = multiprocessing.get_context("fork")  # the ranks start in milliseconds, without importing torch again
    port = free_port()
    procs = [ctx.Process(target=_rank, args=(rank, plan, port), daemon=True) for rank in range(plan.world_size)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + 60
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    assert [p.exitcode for p in procs] == [0] * plan.world_size
    assert Deadlines.of().heartbeat_s > SLOW_S  # the slow ranks are not taken for dead by rank 0's watchdog either


def test_rank_0_waits_for_the_stragglers_only_so_long_and_names_them():
    plan = load().plan
    store = torch.distributed.HashStore()
    watchdog = Watchdog(store, Topology(0, plan.world_size, *plan.role_of_rank(0), 0, plan))
    watchdog.stop()
    store.set(beat_key(2), DONE)
    started = time.monotonic()
    assert watchdog.wait_for_everyone(0.3) == [r for r in range(plan.world_size) if r not in (0, 2)]
    assert 0.3 <= time.monotonic() - started < 5
    store.set(rlhf_dist.FAILED_KEY, "critic rank 0 (global rank 1) failed: ...")
    started = time.monotonic()
    assert watchdog.wait_for_everyone(30) != []  # a reported failure: nothing left to wait for
    assert time.monotonic() - started < 5


EXIT_WHILE_BEATING = """
import sys, time
import torch
from rlhf_launch.runtime import dist as rlhf_dist
from rlhf_launch.runtime.dist import Topology, Watchdog
from tests.factory import load

rlhf_dist.HEARTBEAT_S = 0.0001  # the heartbeat thread is then nearly always inside a store call
plan = load().plan
store = torch.distributed.TCPStore("127.0.0.1", 0, 1, is_master=True, wait_for_workers=False)
watchdog = Watchdog(store, Topology(0, plan.world_size, *plan.role_of_rank(0), 0, plan))
time.sleep(0.3)
watchdog.stop()
sys.exit(0)  # an orderly end: the interpreter's own teardown, as rlhf_launch/runtime/worker.py's main returns
"""


def test_a_rank_that_stops_its_watchdog_exits_cleanly():
    """A daemon thread still inside a C++ store call when the interpreter exits is unwound by force, which aborts
    the process (status -6, 'terminate called without an active exception'): a completed run's rank would fail.
    ``stop`` joins the thread, so the exit is clean every time."""
    for _ in range(3):  # without the join, the first one aborts
        proc = subprocess.run([sys.executable, "-c", EXIT_WHILE_BEATING], capture_output=True, text=True, timeout=120, cwd=ROOT)
        assert proc.returncode == 0, (proc.returncode, proc.stderr[-2000:])
