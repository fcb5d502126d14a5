"""One rank of a job: ``python -m rlhf_launch.runtime.worker --spec RUN_DIR/spec.yaml [--resume auto|PATH]``.

Started by the sbatch script (one srun step per component) or by ``rlhf-launch --local``;
finds its rank and role from the environment and the spec's plan (rlhf_launch/runtime/dist.py), meets the
other ranks, and runs the training (rlhf_launch/runtime/training_run.py). Any failure takes every rank down, naming this one.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from rlhf_launch.runtime.dist import Topology

# Set by ``rlhf-launch --local``: a pipe whose write end only the launcher holds, and its pid.
LAUNCHER_FD_ENV = "RLHF_LAUNCHER_FD"
LAUNCHER_PID_ENV = "RLHF_LAUNCHER_PID"
LAUNCHER_GONE_EXIT = 3


class LauncherGuard:
    """Ends this rank when the ``--local`` launcher that started it is gone.

    The launcher runs its ranks in sessions of their own (a Ctrl-C must reach only the launcher,
    which stops them), so nothing stops them when it dies from a SIGKILL, the OOM killer or a
    closed terminal. Each rank blocks on the read end of a pipe whose write end only the launcher
    holds: the kernel closes it with the launcher, the read returns EOF, and the rank exits. This
    works on Linux and macOS alike (unlike prctl's parent-death signal). Slurm-started ranks have
    no such pipe: srun and Slurm take care of them.
    """

    def __init__(self, fd: int, launcher_pid: str, name: str):
        self.fd, self.launcher_pid, self.name = fd, launcher_pid, name
        self.thread = threading.Thread(target=self._watch, name="rlhf-launcher-guard", daemon=True)
        self.thread.start()

    @classmethod
    def from_env(cls, env=os.environ) -> LauncherGuard | None:
        """A guard when started by ``--local``; the variables are removed, so that processes this
        rank starts do not take a descriptor number that means nothing to them for the pipe."""
        fd = env.pop(LAUNCHER_FD_ENV, None)
        pid = env.pop(LAUNCHER_PID_ENV, "?")
        if fd is None:
            return None
        fd = int(fd)
        os.set_inheritable(fd, False)
        rank = int(env.get("RLHF_RANK_OFFSET", "0")) + int(env.get("SLURM_PROCID", "0"))
        return cls(fd, pid, f"global rank {rank}")

    def _watch(self) -> None:
        while True:
            try:
                if os.read(self.fd, 1) == b"":
                    break
            except InterruptedError:
                continue
            except OSError:
                break  # a closed or bad descriptor: the link to the launcher is lost just the same
        print(f"rlhf: {self.name} stopping: the launcher (pid {self.launcher_pid}) is gone", file=sys.stderr, flush=True)
        os._exit(LAUNCHER_GONE_EXIT)


def _configure_threads() -> None:
    # Under Slurm a task gets --cpus-per-task cores: more threads than that only contend.
    threads = os.environ.get("OMP_NUM_THREADS") or os.environ.get("SLURM_CPUS_PER_TASK")
    if threads:
        import torch

        torch.set_num_threads(int(threads))


def device_env(device: torch.device) -> dict[str, str]:
    """The environment updates that make LOCAL_RANK name ``device``, this rank's GPU among those its
    task sees; none on the CPU.

    DeepSpeed (its engine and zero.Init) takes the device from LOCAL_RANK. A task bound to its own GPU
    (Slurm's --gpu-bind or --gpus-per-task) sees it as device 0 whatever its SLURM_LOCALID: left at the
    local id, LOCAL_RANK would name a device that this task does not have ("invalid device ordinal")."""
    if device.type != "cuda":
        return {}
    return {"LOCAL_RANK": str(device.index or 0)}


def vllm_cache_env(topo: Topology, generator_type: str, env=os.environ) -> dict[str, str]:
    """The environment update that gives this rank's vLLM engine a compile cache of its own on node-local disk
    (``$TMPDIR``, else /tmp): ``<tmp>/rlhf-vllm-cache-<job>-<engine>``; none for a rank that runs no vLLM engine, or
    when VLLM_CACHE_ROOT is set already (the user's choice wins).

    vLLM's default, ~/.cache/vllm, is one folder on a shared home for every engine of the job: engines on one node
    compile into it at the same time, and every node reads it over the network. The tensor-parallel ranks of one
    engine share its folder (vLLM keeps a subfolder per rank); the job is Slurm's job id, or the launcher's pid
    for ``--local``. Must be set before vLLM is imported."""
    if generator_type != "vllm" or not topo.runs("generator") or env.get("VLLM_CACHE_ROOT"):
        return {}
    job = env.get("SLURM_JOB_ID") or f"local{os.getppid()}"
    root = Path(env.get("TMPDIR") or "/tmp") / f"rlhf-vllm-cache-{job}-{topo.replica_index('generator')}"
    return {"VLLM_CACHE_ROOT": str(root)}


def main(argv: list[str] | None = None) -> int:
    """Run this rank to the end of the job; returns the exit status (failures exit from fail_fast)."""
    p = argparse.ArgumentParser(prog="python -m rlhf_launch.runtime.worker", description="One rank of an rlhf-launch job.")
    p.add_argument("--spec", required=True, help="the run's resolved spec (RUN_DIR/spec.yaml)")
    p.add_argument("--resume", default=None, help="auto, or a checkpoint folder")
    args = p.parse_args(argv)
    # First thing: a notice that arrives while torch is still importing must not kill the rank,
    # and a rank whose launcher died while it imports must not go on to train.
    from rlhf_launch.runtime.preemption import PreemptionNotice

    notice = PreemptionNotice()
    guard = LauncherGuard.from_env()
    from rlhf_launch.runtime.run_lock import adopt_from_env

    adopt_from_env()  # global rank 0 of a --local run: the launcher's lock of the run folder, to take over

    from rlhf_launch.core.resolved import ResolvedSpecError, load_resolved

    try:
        resolved = load_resolved(args.spec)
    except ResolvedSpecError as exc:
        print(f"rlhf: {exc}", file=sys.stderr)
        return 2
    spec, run_dir = resolved.spec, resolved.run_dir

    from rlhf_launch.runtime.dist import Deadlines, RendezvousError, Topology, Watchdog, fail_fast, init_role_group, leave, rendezvous

    try:
        topo = Topology.from_env(resolved.plan)
    except RendezvousError as exc:
        print(f"rlhf: {exc}", file=sys.stderr)
        return 2
    # DeepSpeed reads these (and tries MPI discovery without LOCAL_RANK).
    os.environ.update(RANK=str(topo.rank), WORLD_SIZE=str(topo.world_size), LOCAL_RANK=str(topo.local_rank))
    os.environ.update(vllm_cache_env(topo, spec.model_configs.actor.generator_config.generator_type))
    if guard is not None:
        guard.name = topo.describe(topo.rank)
    _configure_threads()
    import torch

    from rlhf_launch.runtime.cluster import Distributed
    from rlhf_launch.runtime.device import pick_device
    from rlhf_launch.runtime.training_run import run

    device = pick_device(spec.run.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    os.environ.update(device_env(device))  # before DeepSpeed reads it
    print(f"rlhf: {topo.describe(topo.rank)} on {device}", file=sys.stderr, flush=True)
    deadlines = Deadlines.of(spec.run)
    try:
        store = rendezvous(topo, deadlines.rendezvous_s)
    except RendezvousError as exc:
        print(f"rlhf: {exc}", file=sys.stderr, flush=True)
        return 3
    # Started before any process group: global rank 0's watchdog fails a start-up that hangs (run.warmup_timeout_s).
    watchdog = Watchdog(store, topo, deadlines)
    try:
        init_role_group(topo, device, store, deadlines.role_s)
        cluster = Distributed(topo, device, store, deadlines)
        run(spec, run_dir, args.resume, cluster=cluster, device=device, notice=notice)
        cluster.close()  # a real barrier: rank 0 hosts the store and must not leave first
    except BaseException as exc:  # noqa: BLE001 - every failure must reach the other ranks
        fail_fast(watchdog, exc)
    leave(watchdog)  # global rank 0, which serves the store, only after every rank has stopped its watchdog
    return 0


if __name__ == "__main__":
    sys.exit(main())
