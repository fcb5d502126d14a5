"""One rank of a job: ``python -m rlhf.worker --spec RUN_DIR/spec.yaml [--resume auto|PATH]``.

Started by the sbatch script (one srun step per component) or by ``rlhf-launch --local``;
finds its rank and role from the environment and the spec's plan (rlhf/dist.py), meets the
other ranks, and runs the PPO loop. Any failure takes every rank down, naming this one.
"""

from __future__ import annotations

import argparse
import os
import sys


def _configure_threads() -> None:
    # Under Slurm a task gets --cpus-per-task cores: more threads than that only contend.
    threads = os.environ.get("OMP_NUM_THREADS") or os.environ.get("SLURM_CPUS_PER_TASK")
    if threads:
        import torch

        torch.set_num_threads(int(threads))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m rlhf.worker", description="One rank of an rlhf-launch job.")
    p.add_argument("--spec", required=True, help="the run's resolved spec (RUN_DIR/spec.yaml)")
    p.add_argument("--resume", default=None, help="auto, or a checkpoint folder")
    args = p.parse_args(argv)
    # First thing: a notice that arrives while torch is still importing must not kill the rank.
    from rlhf.preemption import PreemptionNotice

    notice = PreemptionNotice()

    from rlhf.core.resolved import ResolvedSpecError, load_resolved

    try:
        resolved = load_resolved(args.spec)
    except ResolvedSpecError as exc:
        print(f"rlhf: {exc}", file=sys.stderr)
        return 2
    spec, run_dir = resolved.spec, resolved.run_dir

    from rlhf.dist import RendezvousError, Topology, Watchdog, fail_fast, rendezvous

    try:
        topo = Topology.from_env(resolved.plan)
    except RendezvousError as exc:
        print(f"rlhf: {exc}", file=sys.stderr)
        return 2
    # DeepSpeed reads these (and tries MPI discovery without LOCAL_RANK).
    os.environ.update(RANK=str(topo.rank), WORLD_SIZE=str(topo.world_size), LOCAL_RANK=str(topo.local_rank))
    _configure_threads()
    import torch

    from rlhf.cluster import Distributed
    from rlhf.loop import pick_device, run

    device = pick_device(spec.run.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    print(f"rlhf: {topo.describe(topo.rank)} on {device}", file=sys.stderr, flush=True)
    try:
        store = rendezvous(topo, device, spec.run.rendezvous_timeout_s)
    except RendezvousError as exc:
        print(f"rlhf: {exc}", file=sys.stderr, flush=True)
        return 3
    watchdog = Watchdog(store, topo)
    try:
        cluster = Distributed(topo, device, store)
        run(spec, run_dir, args.resume, cluster=cluster, device=device, notice=notice)
        cluster.barrier()
    except BaseException as exc:  # noqa: BLE001 - every failure must reach the other ranks
        fail_fast(watchdog, exc)
    watchdog.stop()
    torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
