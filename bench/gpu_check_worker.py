"""Part 5 of bench/gpu_check.py: one worker rank as a job starts it, and the memory of its communicators.

The spec is specs/grpo_cpu.yaml (the tiny models) with kl_coeff 0: no reference and no critic, the reward a
Python function on the actor's rank, so the plan has one rank, the only layout one GPU can hold under NCCL (a
communicator does not take two ranks on one device). ``run.device`` is the device under test: cuda (NCCL), or
cpu (gloo) in --dry."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from rlhf_launch.core import yaml_io
from rlhf_launch.frontend.backends.local import free_port, rank_environments
from rlhf_launch.frontend.spec import load_spec
from rlhf_launch.runtime.checkpoint import checkpoint_name, checkpoints_dir
from rlhf_launch.runtime.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[1]
SPEC = ROOT / "specs" / "grpo_cpu.yaml"
STEPS = 2
COMPARED = ("reward_mean", "response_len_mean", "policy_loss", "entropy", "actor_grad_norm")
RESUME_TOLERANCE = 1e-4  # |resumed - straight| of each COMPARED metric at the resumed step


def one_rank_spec(device: torch.device, output_dir: Path, name: str):
    """The loaded one-rank spec (``load_spec``: validated and resolved as the launcher does), saving every step."""
    return load_spec(SPEC, [
        f"run.device={device.type}", "repeater_config.kl_coeff=0", f"train_config.max_train_step={STEPS}",
        "train_config.save_interval=1", f"run.output_dir={output_dir}", f"run.name={name}",
    ])


def worker_run(device: torch.device, deadline_s: float, children: list[subprocess.Popen]) -> dict:
    """Two runs of ``python -m rlhf_launch.runtime.worker`` with the environment a job gives its rank: ``STEPS``
    steps from the start, each saving a checkpoint, then the final export; then a second run folder resumed from the
    first run's step-1 checkpoint, which runs step 2 again. Threshold: both exit 0 within ``deadline_s`` each, with
    every checkpoint complete, the actor exported, and the resumed step's metrics equal to the first run's
    (RESUME_TOLERANCE). ``children``: where the running worker is listed, for the caller to kill on a time-out."""
    from rlhf_launch.demo.tiny_models import build

    build()
    with tempfile.TemporaryDirectory(prefix="gpu-check-worker-") as tmp:
        straight = _run(one_rank_spec(device, Path(tmp), "straight"), None, deadline_s, children)
        run_dir = Path(tmp) / "straight"
        saved = [s for s in range(1, STEPS + 1) if (checkpoints_dir(run_dir) / checkpoint_name(s) / "COMPLETE").exists()]
        exported = (run_dir / "final" / "actor" / "model.safetensors").exists()
        first = read_metrics(run_dir) if (run_dir / "metrics.jsonl").exists() else []
        resumed = {"rc": None, "error": "not run: the first run saved no step-1 checkpoint"}
        later = []
        if 1 in saved:
            resumed = _run(one_rank_spec(device, Path(tmp), "resumed"), checkpoints_dir(run_dir) / checkpoint_name(1), deadline_s, children)
            later = read_metrics(Path(tmp) / "resumed") if (Path(tmp) / "resumed" / "metrics.jsonl").exists() else []
    diff = _largest_difference(first, later)
    ok = (straight["rc"] == 0 and resumed["rc"] == 0 and saved == list(range(1, STEPS + 1)) and exported
          and [r["step"] for r in later] == list(range(2, STEPS + 1)) and diff is not None and diff <= RESUME_TOLERANCE)
    return {
        "backend": "nccl" if device.type == "cuda" else "gloo", "deadline_s": deadline_s, "run": straight,
        "checkpoints": saved, "exported": exported, "resumed": {**resumed, "steps": [r["step"] for r in later]},
        "resume_max_diff": diff, "threshold": f"exit 0 within the deadline, checkpoints and export, resume diff <= {RESUME_TOLERANCE}",
        "ok": ok,
    }


def _run(loaded, resume: Path | None, deadline_s: float, children: list[subprocess.Popen]) -> dict:
    """One worker rank on ``loaded`` (its spec written into its run folder as the launcher writes it): exit status,
    seconds to exit, seconds to its first step's line (rendezvous, warm-up and loading), the tail of its stderr."""
    run_dir = Path(loaded.spec.run.output_dir) / loaded.spec.run.name
    run_dir.mkdir(parents=True)
    (run_dir / "spec.yaml").write_text(yaml_io.dump(loaded.spec.to_dict()))
    env = {**os.environ, **rank_environments(loaded.plan, free_port(), min(os.cpu_count() or 1, 8))[0], "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "rlhf_launch.runtime.worker", "--spec", str(run_dir / "spec.yaml")]
    if resume is not None:
        command += ["--resume", str(resume)]
    log = run_dir / "worker.stderr"
    started = time.perf_counter()
    with open(log, "w") as err:
        proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=err, text=True, start_new_session=True)
    children.append(proc)
    first_step: list[float] = []
    reader = threading.Thread(target=_watch_steps, args=(proc, started, first_step), daemon=True)
    reader.start()
    try:
        rc = proc.wait(timeout=deadline_s)
        error = None if rc == 0 else f"exit status {rc}"
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        rc, error = None, f"still running after the deadline of {deadline_s:.0f} s"
    reader.join(timeout=5)
    stderr = log.read_text(errors="replace")
    return {
        "rc": rc, "error": error, "seconds": round(time.perf_counter() - started, 1),
        "first_step_s": round(first_step[0], 1) if first_step else None, "traceback": "Traceback" in stderr,
        "stderr_tail": stderr[-1500:] if rc != 0 else None,
    }


def _watch_steps(proc: subprocess.Popen, started: float, first_step: list[float]) -> None:
    """Note when the worker prints its first step line ('step 1/...'); the rest of its stdout is read and dropped."""
    for line in proc.stdout:
        if not first_step and line.startswith("step "):
            first_step.append(time.perf_counter() - started)


def _largest_difference(first: list[dict], later: list[dict]) -> float | None:
    """Largest |difference| of a COMPARED metric between the two runs' common steps; None without a common step."""
    by_step = {r["step"]: r for r in first}
    pairs = [(by_step[r["step"]], r) for r in later if r["step"] in by_step]
    if not pairs:
        return None
    return max(abs(a[k] - b[k]) for a, b in pairs for k in COMPARED if k in a and k in b)


def communicator_memory(device: torch.device) -> dict[str, float]:
    """MiB that each communicator of a one-rank job costs beyond torch's own allocations: the default group (made
    as the runtime makes a role's, with ``device_id`` on a GPU, and through its first collective) and two
    PeerGroups (rlhf_launch.runtime.dist: the ``global`` one and a second, as the weight sync's), each through its
    first barrier. On a GPU: device memory used outside torch's caching allocator (the NCCL buffers); on CPU: the
    process's resident memory (rough)."""
    import datetime

    import torch.distributed as dist

    from rlhf_launch.runtime.dist import PeerGroup, backend_for

    timeout = datetime.timedelta(seconds=60)
    store = dist.TCPStore("127.0.0.1", free_port(), 1, is_master=True, timeout=timeout, wait_for_workers=False)
    costs, groups = {}, []
    try:
        before = outside_torch(device)
        dist.init_process_group(backend_for(device), store=dist.PrefixStore("default", store), rank=0, world_size=1,
                                timeout=timeout, device_id=device if device.type == "cuda" else None)
        token = torch.ones(1, device=device)
        dist.all_reduce(token)
        float(token)  # read back: the communicator exists once its first collective has run
        costs["default"] = outside_torch(device) - before
        for name in ("global", "weight-sync"):
            before = outside_torch(device)
            group = PeerGroup(store, name, [0], 0, device, timeout_s=60)
            group.barrier()
            groups.append(group)
            costs[name] = outside_torch(device) - before
    finally:
        for group in groups:
            group.shutdown()
        if dist.is_initialized():
            dist.destroy_process_group()
        del store
    return {k: round(v / 2**20, 1) for k, v in costs.items()}


def outside_torch(device: torch.device) -> int:
    """Bytes in use that torch's allocator does not account for: on a GPU, the device's used memory less what torch
    has reserved; on CPU, the resident set."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        free, total = torch.cuda.mem_get_info(device)
        return total - free - torch.cuda.memory_reserved(device)
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
