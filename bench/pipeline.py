"""A PPO step with generation overlapped with training (rollout_config.max_staleness 1) against the synchronous step.

    .venv/bin/python bench/pipeline.py                 # 7 steps per mode (the first two dropped), ~1 min on 2 cores
    .venv/bin/python bench/pipeline.py --steps 10 --new-tokens 64

specs/tiny_cpu.yaml with a separate Hugging Face generator group: five ranks, one process each
(``rlhf-launch --local --processes``): generator, actor, critic, reference, reward. Generation and training get
cores of their own: once the ranks have started, the bench pins the generator's process to the first half of the
machine's cores and the four trainer and scorer processes to the other half (``os.sched_setaffinity``); every
rank runs max(1, cores // 5) torch threads (the launcher's rule). ``--new-tokens`` sets the response length,
which sets how long generation takes against training: the target holds where the two take similar time.

Each mode runs the same job, synchronous (max_staleness 0: generate, then score and train) and asynchronous
(max_staleness 1: the generator samples step k+1's rollout while the trainers score and train on step k's). Per
step it reads step_time_s and the per-role busy seconds and utilization from metrics.jsonl and prints their
medians, the ratio asynchronous / synchronous step time (target <= 0.7) and, as a check that the two runs did the
same work, their generated tokens. The first two steps are dropped: an asynchronous run samples its first
rollout before anything can overlap. This file lives in bench/, outside pytest's testpaths: a manual benchmark.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.local_job import print_columns, run_local_job  # noqa: E402 - after the repository is on the path

SPEC = REPO / "specs" / "tiny_cpu.yaml"
ROLES = ("generator", "actor", "critic", "reference", "reward")
DROPPED = 2
OVERRIDES = [
    "model_configs.actor.generator_config={shared_with_trainer: false, generator_type: hf}",
    "dataset_config.num_samples_each_epoch=32",
    "train_config.ppo_epochs=1",
    "train_config.save_interval=0",
]


def rank_processes(launcher_pid: int) -> dict[int, int]:
    """pid -> global rank of the launcher's rank processes that have started (read from /proc)."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            env = dict(item.split("=", 1) for item in (entry / "environ").read_bytes().decode(errors="replace").split("\0") if "=" in item)
        except OSError:
            continue
        if env.get("RLHF_LAUNCHER_PID") == str(launcher_pid) and "RLHF_RANK_OFFSET" in env:
            found[int(entry.name)] = int(env["RLHF_RANK_OFFSET"]) + int(env["SLURM_PROCID"])
    return found


def pin(launcher: subprocess.Popen, generator_ranks: set[int], world: int, deadline_s: float = 120.0) -> str:
    """Pin the generator ranks to the first half of the cores and the others to the second; how they were pinned."""
    cores = sorted(os.sched_getaffinity(0))
    half = max(1, len(cores) // 2)
    generation, training = set(cores[:half]), set(cores[half:] or cores)
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline and launcher.poll() is None:
        ranks = rank_processes(launcher.pid)
        if len(ranks) == world:
            for pid, rank in ranks.items():
                os.sched_setaffinity(pid, generation if rank in generator_ranks else training)
            return f"generator on cores {sorted(generation)}, the other ranks on {sorted(training)}"
        time.sleep(0.05)
    return "not pinned: the ranks did not all start"


def run_job(out: Path, name: str, steps: int, sets: list[str]) -> tuple[list[dict], str]:
    """The job over five pinned processes for ``steps`` steps; its metrics rows and how it was pinned."""
    from rlhf_launch.frontend.spec import load_spec

    overrides = [*OVERRIDES, *sets, f"train_config.max_train_step={steps}"]
    plan = load_spec(SPEC, overrides).plan
    pinned = []
    rows = run_local_job(SPEC, out, name, overrides,
                         started=lambda launcher: pinned.append(pin(launcher, set(plan.role("generator").ranks), plan.world_size)))
    return rows, pinned[0]


def figures(rows: list[dict]) -> dict[str, float]:
    """Medians over the steps: step time, per-role busy seconds and utilization, generated tokens."""
    out = {"step": statistics.median(r["step_time_s"] for r in rows),
           "train": statistics.median(r["train_time_s"] + r["score_time_s"] for r in rows),
           "tokens": statistics.median(r["response_len_mean"] for r in rows)}
    for role in ROLES:
        out[f"busy_{role}"] = statistics.median(r.get(f"busy_{role}_s", 0.0) for r in rows)
        out[f"util_{role}"] = statistics.median(r.get(f"util_{role}", 0.0) for r in rows)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=7, help=f"steps per run; the first {DROPPED} are dropped (default 7)")
    parser.add_argument("--new-tokens", type=int, default=128, help="response length, min = max (default 128)")
    args = parser.parse_args(argv)
    if args.steps <= DROPPED:
        parser.error(f"--steps must be > {DROPPED}")
    length = [f"rollout_config.max_new_tokens={args.new_tokens}", f"rollout_config.generate_kwargs.min_new_tokens={args.new_tokens}"]
    print(f"{os.cpu_count()} CPU(s), load avg {os.getloadavg()[0]:.2f}")
    print("overrides: " + " ".join([*OVERRIDES, *length]))
    started = time.perf_counter()
    got = {}
    with tempfile.TemporaryDirectory(prefix="bench-pipeline-") as tmp:
        for mode, staleness in (("synchronous", 0), ("asynchronous", 1)):
            print(f"{mode}: {args.steps} steps ...", flush=True)
            rows, pinned = run_job(Path(tmp), mode, args.steps, [*length, f"rollout_config.max_staleness={staleness}"])
            print(f"  {pinned}")
            got[mode] = figures(rows[DROPPED:])
    sync, lagged = got["synchronous"], got["asynchronous"]
    print()
    print_columns(f"medians over {args.steps - DROPPED} steps", ("synchronous", "asynchronous"), [
        ("step time, s", (sync["step"], lagged["step"]), ".3f"),
        ("score + train (rank 0), s", (sync["train"], lagged["train"]), ".3f"),
        *((f"  busy_{role}, s", (sync[f"busy_{role}"], lagged[f"busy_{role}"]), ".3f") for role in ROLES),
        *((f"  util_{role}", (sync[f"util_{role}"], lagged[f"util_{role}"]), ".3f") for role in ROLES),
        ("response tokens (the same work)", (sync["tokens"], lagged["tokens"]), ".1f"),
    ])
    print(f"asynchronous / synchronous step time: {lagged['step'] / sync['step']:.3f} (target <= 0.7)")
    print(f"generation / (score + train), synchronous: {sync['busy_generator'] / max(sync['train'], 1e-9):.2f}")
    print(f"\ntotal {time.perf_counter() - started:.1f} s; load avg now {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
