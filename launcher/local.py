"""``rlhf-launch SPEC --local``: every rank of the plan as a process on this machine, with the
environment the sbatch script gives them on Slurm (rlhf/dist.py reads it). Global rank 0's
output goes to this terminal; the others' to RUN_DIR/logs. When one process fails, the others
are stopped and the failed role and rank are named.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from rlhf.core.plan import Plan

STOP_GRACE_S = 10


@dataclass
class RankProcess:
    rank: int
    role: str
    role_rank: int
    process: subprocess.Popen
    log: Path | None

    @property
    def name(self) -> str:
        return f"{self.role} rank {self.role_rank} (global rank {self.rank})"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_environments(plan: Plan, port: int, threads: int) -> list[dict[str, str]]:
    """What Slurm and the sbatch script set for each task, as strings, by global rank."""
    envs = []
    for comp in plan.components:
        for task in range(comp.gpus):
            envs.append({
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(port),
                "RLHF_WORLD_SIZE": str(plan.world_size),
                "RLHF_HET_GROUP": str(comp.index),
                "RLHF_RANK_OFFSET": str(comp.first_rank),
                "SLURM_PROCID": str(task),
                "SLURM_LOCALID": str(task % comp.gpus_per_node),
                "SLURM_NTASKS": str(comp.gpus),
                "OMP_NUM_THREADS": str(threads),
            })
    return envs


def start_ranks(plan: Plan, spec_file: Path, run_dir: Path, resume: str | None, rank0_to_terminal: bool = True) -> list[RankProcess]:
    logs = run_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    threads = max(1, (os.cpu_count() or 1) // plan.world_size)
    command = [sys.executable, "-m", "rlhf.worker", "--spec", str(spec_file)] + (["--resume", resume] if resume else [])
    procs = []
    for rank, env in enumerate(rank_environments(plan, free_port(), threads)):
        role, role_rank = plan.role_of_rank(rank)
        log = None if rank == 0 and rank0_to_terminal else logs / f"local-rank{rank}-{role}{role_rank}.log"
        out = None if log is None else open(log, "w")
        process = subprocess.Popen(command, env={**os.environ, **env}, stdout=out, stderr=subprocess.STDOUT if out else None, start_new_session=True)
        if out:
            out.close()
        procs.append(RankProcess(rank, role, role_rank, process, log))
    return procs


def stop(procs: list[RankProcess]) -> None:
    for p in procs:
        if p.process.poll() is None:
            os.killpg(p.process.pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_GRACE_S
    for p in procs:
        try:
            p.process.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            os.killpg(p.process.pid, signal.SIGKILL)
            p.process.wait()


def monitor(procs: list[RankProcess]) -> int:
    """Wait for every rank; the first failure stops the rest. Returns the job's exit status."""
    try:
        while True:
            running = False
            for p in procs:
                code = p.process.poll()
                if code is None:
                    running = True
                elif code != 0:
                    where = f"; its log: {p.log}" if p.log else ""
                    print(f"rlhf-launch: {p.name} exited with status {code}; stopping the other ranks{where}", file=sys.stderr, flush=True)
                    stop(procs)
                    return code if code > 0 else 128 - code
            if not running:
                return 0
            time.sleep(0.5)
    except KeyboardInterrupt:
        stop(procs)
        raise


class Terminated(Exception):
    pass


def _raise_terminated(signum, frame):
    raise Terminated(signal.Signals(signum).name)


def run_local_ranks(plan: Plan, spec_file: Path, run_dir: Path, resume: str | None) -> int:
    """Start every rank and wait; being terminated terminates the ranks too (they run in
    sessions of their own, so that a Ctrl-C reaches only this process, which stops them)."""
    previous = {sig: signal.signal(sig, _raise_terminated) for sig in (signal.SIGTERM, signal.SIGHUP)}
    procs: list[RankProcess] = []

    def forward_notice(signum, frame):  # as the sbatch script does: every rank checkpoints and stops
        for p in procs:
            if p.process.poll() is None:
                os.kill(p.process.pid, signal.SIGUSR1)

    previous[signal.SIGUSR1] = signal.signal(signal.SIGUSR1, forward_notice)
    try:
        procs = start_ranks(plan, spec_file, run_dir, resume)
        return monitor(procs)
    except Terminated as exc:
        stop(procs)
        print(f"rlhf-launch: {exc}: stopped every rank", file=sys.stderr)
        return 143
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
