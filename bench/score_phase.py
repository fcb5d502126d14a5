"""The score phase of a PPO step with overlapping scoring passes against the old one-role-at-a-time order.

    .venv/bin/python bench/score_phase.py              # 6 steps per order (the first dropped), ~2 min on 2 cores
    .venv/bin/python bench/score_phase.py --steps 10 --rounds 2

specs/tiny_cpu.yaml's layout: actor, critic, reference and reward on four ranks, one process each
(``rlhf-launch --local --processes``). Each round runs the job twice: once with ``RLHF_SEQUENTIAL_SCORING=1`` (every
rank computes a pass and gathers it, role after role: the order before the passes overlapped) and once as shipped
(every rank runs its passes, then the ranks exchange all results). Per step it reads from metrics.jsonl:

  score phase       score_time_s, rank 0's score section (its own pass, the wait for the others, the exchanges)
  slowest pass      max of score_<role>_time_s over the four roles (each measured on the role's own rank)
  sum of passes     their sum: what a fully one-after-the-other score phase cannot beat

and prints the medians and the ratios score phase / slowest pass (1 = perfect overlap, ~4 = none with four
equal passes) and overlapped / sequential score phase. Every rank gets max(1, cores // 4) torch threads (the
launcher's rule): with fewer cores than ranks the passes share the cores, so the overlap is bounded by the
cores (two passes at a time on 2 cores) and each pass itself runs slower while others run. This file lives in
bench/, outside pytest's testpaths: a manual benchmark, not a test.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.local_job import print_columns, run_local_job  # noqa: E402 - after the repository is on the path
from rlhf_launch.runtime.scoring_exchange import SEQUENTIAL_SCORING_ENV  # noqa: E402

SPEC = REPO / "specs" / "tiny_cpu.yaml"
ROLES = ("actor", "reference", "critic", "reward")
# Bigger scoring forwards than the tiny spec's default (32 rows x 24 tokens), so that they, not the exchanges,
# make up the score phase; no checkpoints, so that a step is only the step.
OVERRIDES = [
    "dataset_config.num_samples_each_epoch=64",
    "rollout_config.max_new_tokens=48",
    "rollout_config.generate_kwargs.min_new_tokens=48",
    "rollout_config.actor_micro_bs=64",
    "repeater_config.actor_micro_bs=64",
    "repeater_config.ref_micro_bs=64",
    "repeater_config.critic_micro_bs=64",
    "rollout_config.reward_micro_bs=64",
    "train_config.ppo_minibatch=64",
    "train_config.value_minibatch=64",
    "train_config.ppo_epochs=1",
    "train_config.save_interval=0",
]


def run_job(out: Path, name: str, steps: int, sequential: bool) -> list[dict]:
    """The tiny job over four processes for ``steps`` steps; its metrics rows."""
    env = {k: v for k, v in os.environ.items() if k != SEQUENTIAL_SCORING_ENV}
    if sequential:
        env[SEQUENTIAL_SCORING_ENV] = "1"
    return run_local_job(SPEC, out, name, [*OVERRIDES, f"train_config.max_train_step={steps}"], env=env)


def figures(rows: list[dict]) -> dict[str, float]:
    """Medians over the steps of the score phase, the slowest and the sum of the passes, and the step."""
    phase = [r["score_time_s"] for r in rows]
    slowest = [max(r[f"score_{role}_time_s"] for role in ROLES) for r in rows]
    total = [sum(r[f"score_{role}_time_s"] for role in ROLES) for r in rows]
    out = {"phase": statistics.median(phase), "slowest": statistics.median(slowest), "sum": statistics.median(total),
           "ratio": statistics.median(p / s for p, s in zip(phase, slowest, strict=True)),
           "step": statistics.median(r["step_time_s"] for r in rows)}
    for role in ROLES:
        out[role] = statistics.median(r[f"score_{role}_time_s"] for r in rows)
        out[f"util_{role}"] = statistics.median(r[f"util_{role}"] for r in rows)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=6, help="steps per run; the first is dropped (default 6)")
    parser.add_argument("--rounds", type=int, default=1, help="sequential + overlapped runs, alternating (default 1)")
    args = parser.parse_args(argv)
    if args.steps < 2:
        parser.error("--steps must be >= 2 (the first step is dropped)")
    print(f"{os.cpu_count()} CPU(s), load avg {os.getloadavg()[0]:.2f}; 4 ranks x max(1, {os.cpu_count()} // 4) threads")
    print("overrides: " + " ".join(OVERRIDES))
    rows: dict[str, list[dict]] = {"sequential": [], "overlapped": []}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-score-") as tmp:
        for round_ in range(args.rounds):
            for mode in rows:
                print(f"[round {round_ + 1}/{args.rounds}] {mode}: {args.steps} steps ...", flush=True)
                rows[mode] += run_job(Path(tmp), f"{mode}-{round_}", args.steps, mode == "sequential")[1:]
    got = {mode: figures(r) for mode, r in rows.items()}
    print()
    seq, over = got["sequential"], got["overlapped"]
    keys = [("score phase (rank 0)", "phase"), ("slowest pass", "slowest"), ("sum of the four passes", "sum"),
            *((f"  {role} pass", role) for role in ROLES), ("step", "step")]
    print_columns(f"medians over {len(rows['overlapped'])} steps, seconds", ("sequential", "overlapped"), [
        *((label, (seq[key], over[key]), ".4f") for label, key in keys),
        ("score phase / slowest pass", (seq["ratio"], over["ratio"]), ".3f"),
        *((f"  util_{role}", (seq[f"util_{role}"], over[f"util_{role}"]), ".3f") for role in ROLES),
    ])
    print(f"overlapped / sequential score phase: {got['overlapped']['phase'] / got['sequential']['phase']:.3f}")
    print(f"\ntotal {time.perf_counter() - started:.1f} s; load avg now {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
