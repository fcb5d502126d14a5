"""The GPU check's second script: what one GPU cannot answer, on a machine with two or more GPUs (and, for its
last parts, DeepSpeed and vLLM installed).

    python bench/gpu_check_multi.py --out gpu_check_multi.jsonl    # on 2+ GPUs
    python bench/gpu_check_multi.py --dry                          # list the parts and what each needs; runs nothing

Parts (each time-boxed, one JSON line each, as bench/gpu_check.py writes them; a part that needs more GPUs or a
library this machine lacks writes a line with ``skipped`` and does not fail the run):

  barrier           2 GPUs. Two NCCL ranks on a PeerGroup (rlhf_launch/runtime/dist.py): rank 1 arrives LATE_S
                    late; rank 0's barrier must not return before it (NCCL's wait() alone would only order the
                    stream), ``any`` and ``max`` must agree on both; the memory each communicator costs per rank.
  zero3_layer_sync  2 GPUs, DeepSpeed. The one-rank GRPO spec of the tiny models with the actor under ZeRO-3
                    (data 2 when 3 GPUs are there, else 1) and a separate HF generator: the weight sync gathers one
                    decoder layer at a time; every step's gen_logprob_gap (generator against actor log-probs of the
                    same tokens) must stay under SYNC_GAP, which a missed or wrong layer exceeds.
  vllm_tp_reload    3 GPUs, vLLM. The same spec with a vLLM generator of tensor size 2 beside the actor, greedy:
                    after each update the engine reloads the actor's weights over its two ranks; the gap must stay
                    under VLLM_GAP.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpu_check import Context, Part, Report, run_part, summarize  # noqa: E402 - after the path: runs from a checkout

LATE_S = 3.0
SYNC_GAP = 1e-3  # fp32 tiny models: the generator's log-probs equal the actor's up to summation order
VLLM_GAP = 0.05  # vLLM's kernels against HF's: a first-run figure, to be tightened with measurements
GRPO = ROOT / "specs" / "grpo_cpu.yaml"
BASE_SETS = ["run.device=cuda", "repeater_config.kl_coeff=0", "train_config.max_train_step=3", "train_config.save_interval=0",
             "rollout_config.generate_kwargs.do_sample=false"]


def _skip(why: str) -> dict:
    return {"skipped": why, "ok": True}


def _gpus() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


# ---------------------------------------------------------------------------------------------- barrier
def _barrier_rank(rank: int, port: int, out_dir: str) -> None:
    """One of the two ranks of ``run_barrier`` (a spawned process); writes its figures to out_dir/rank<r>.json."""
    from gpu_check_worker import outside_torch

    from rlhf_launch.runtime.dist import PeerGroup

    torch.cuda.set_device(rank)
    device = torch.device("cuda", rank)
    store = torch.distributed.TCPStore("127.0.0.1", port, 2, is_master=rank == 0, timeout=datetime.timedelta(seconds=60))
    before = outside_torch(device)
    group = PeerGroup(store, "global", [0, 1], rank, device, timeout_s=60)
    group.barrier()  # the communicator is created at its first collective
    communicator_mib = (outside_torch(device) - before) / 2**20
    if rank == 1:
        time.sleep(LATE_S)
    started = time.perf_counter()
    group.barrier()
    waited = time.perf_counter() - started
    figures = {"waited_s": round(waited, 3), "any": group.any(rank == 1), "max": group.max([float(rank)])[0],
               "communicator_mib": round(communicator_mib, 1)}
    group.barrier()
    group.shutdown()
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(figures))


def run_barrier(ctx: Context) -> dict:
    """Two ranks, rank 1 late by LATE_S: rank 0's barrier waits for it (>= 0.8 x LATE_S), ``any`` is true and
    ``max`` is 1 on both."""
    if _gpus() < 2:
        return _skip(f"needs 2 GPUs, found {_gpus()}")
    import torch.multiprocessing as mp

    from rlhf_launch.frontend.backends.local import free_port

    with tempfile.TemporaryDirectory(prefix="gpu-check-barrier-") as tmp:
        mp.spawn(_barrier_rank, args=(free_port(), tmp), nprocs=2, join=True)
        ranks = [json.loads(Path(tmp, f"rank{r}.json").read_text()) for r in (0, 1)]
    ok = ranks[0]["waited_s"] >= 0.8 * LATE_S and all(r["any"] and r["max"] == 1.0 for r in ranks)
    return {"late_s": LATE_S, "ranks": ranks, "ok": ok}


# ---------------------------------------------------------------------------------------------- runs of the launcher
def _launch(sets: list[str], deadline_s: float, tmp: Path) -> tuple[int | None, list[dict], str]:
    """``rlhf-launch GRPO --local --processes`` with ``sets`` (each rank on a GPU of its own); its exit status (None
    past ``deadline_s``), its metrics and the tail of its stderr."""
    from rlhf_launch.runtime.metrics import read_metrics

    command = [sys.executable, "-m", "rlhf_launch", str(GRPO), "--local", "--processes", "--output-dir", str(tmp),
               "--set", "run.name=multi", *[x for s in sets for x in ("--set", s)]]
    try:
        proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=deadline_s,
                              env={**os.environ, "HF_HUB_OFFLINE": "1"})
    except subprocess.TimeoutExpired as exc:  # its output comes as bytes whatever text= says
        return None, [], (exc.stderr or b"").decode(errors="replace")[-1500:]
    metrics = read_metrics(tmp / "multi") if (tmp / "multi" / "metrics.jsonl").exists() else []
    return proc.returncode, metrics, proc.stderr[-1500:]


def _gap_line(sets: list[str], deadline_s: float, limit: float) -> dict:
    """BASE_SETS and ``sets`` launched (``_launch``): exit 0 and three steps whose gen_logprob_gap is within ``limit``."""
    from rlhf_launch.demo.tiny_models import build

    build()
    with tempfile.TemporaryDirectory(prefix="gpu-check-multi-") as tmp:
        rc, metrics, stderr = _launch([*BASE_SETS, *sets], deadline_s, Path(tmp))
    gaps = [r.get("gen_logprob_gap") for r in metrics]
    ok = rc == 0 and len(gaps) == 3 and all(g is not None and abs(g) <= limit for g in gaps)
    return {"rc": rc, "gen_logprob_gap": gaps, "limit": limit, "stderr_tail": None if rc == 0 else stderr, "ok": ok}


def run_zero3_layer_sync(ctx: Context) -> dict:
    """The actor under ZeRO-3 and a separate HF generator: every step's gap <= SYNC_GAP."""
    if _gpus() < 2:
        return _skip(f"needs 2 GPUs, found {_gpus()}")
    if importlib.util.find_spec("deepspeed") is None:
        return _skip("needs DeepSpeed")
    data = 2 if _gpus() >= 3 else 1
    return {"actor_data": data, **_gap_line([
        f"model_configs.actor.trainer_config.parallel.data={{size: {data}, mode: deepspeed}}",
        "model_configs.actor.trainer_config.deepspeed_config={zero_optimization: {stage: 3}}",
        "model_configs.actor.generator_config={shared_with_trainer: false, generator_type: hf}",
    ], 300, SYNC_GAP)}


def run_vllm_tp_reload(ctx: Context) -> dict:
    """A vLLM generator of tensor size 2 beside the actor: every step's gap <= VLLM_GAP."""
    if _gpus() < 3:
        return _skip(f"needs 3 GPUs (the actor and an engine over 2), found {_gpus()}")
    if importlib.util.find_spec("vllm") is None:
        return _skip("needs vLLM")
    return _gap_line([
        "model_configs.actor.generator_config={shared_with_trainer: false, generator_type: vllm, "
        "parallel: {data: {size: 1}, tensor: {size: 2}}, gpu_memory_utilization: 0.5}",
    ], 400, VLLM_GAP)


PARTS = (
    Part("barrier", run_barrier, 90, 0),
    Part("zero3_layer_sync", run_zero3_layer_sync, 330, 0),
    Part("vllm_tp_reload", run_vllm_tp_reload, 430, 0),
)
NEEDS = {"barrier": "2 GPUs", "zero3_layer_sync": "2 GPUs, DeepSpeed", "vllm_tp_reload": "3 GPUs, vLLM"}


def main(argv: list[str] | None = None) -> int:
    """Run the parts (or with --dry list them); 1 when any part failed, 2 without CUDA (and no --dry)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry", action="store_true", help="list the parts, what each needs and checks; run nothing")
    p.add_argument("--out", type=Path, help="also write the JSON lines to this file (rewritten after every part)")
    p.add_argument("--parts", help=f"comma-separated subset of {','.join(x.name for x in PARTS)}")
    args = p.parse_args(argv)
    chosen = [x for x in PARTS if args.parts is None or x.name in args.parts.split(",")]
    if args.dry:
        for part in chosen:
            print(json.dumps({"part": part.name, "needs": NEEDS[part.name], "box_s": part.box_s,
                              "checks": " ".join(part.run.__doc__.split())}))
        return 0
    report = Report(args.out)
    if not torch.cuda.is_available():
        report.write({"part": "summary", "ok": False, "failed": [], "error": "no CUDA device", "seconds": 0.0})
        print("gpu_check_multi: no CUDA device here; --dry lists the parts", file=sys.stderr)
        return 2
    ctx = Context(torch.device("cuda", 0), None, False)
    for i, part in enumerate(chosen):
        run_part(part, ctx, report, part.box_s, [x.name for x in chosen[i + 1 :]], None)
    summarize(report, ctx.started)
    return 1 if report.failed() else 0


if __name__ == "__main__":
    raise SystemExit(main())
