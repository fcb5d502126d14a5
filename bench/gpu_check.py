"""The GPU check: the questions a first GPU run must answer, in one ~8-minute run on one H100 or H200,
with only torch, transformers and this project installed (no DeepSpeed, vLLM, datasets or network).

    python bench/gpu_check.py --out gpu_check.jsonl          # on a machine with a CUDA GPU
    python bench/gpu_check.py --dry --out gpu_check.jsonl    # every part on CPU at toy sizes (gloo for NCCL)

Five parts, each time-boxed, each with its own threshold; each writes one JSON line (stdout and ``--out``,
which is rewritten after every part, so it holds every finished part even when a later one hangs):

  versions     torch, CUDA, NCCL, flash-attn; the measured rooflines: a bf16 GEMM's TFLOP/s, a device copy's GB/s
  masters      lr 1e-6 on a ~0.75B Llama: fp32, bf16 with fp32 master weights (runtime/engine.py), pure bf16
  probe_7b     a Llama-7B-shaped model of random bf16 weights: forward + backward at micro 2 x 2048 with and
               without gradient checkpointing, an inference forward at micro 8; peak memory against the plan
  numerics     a left- and right-padded batch against its rows run alone (log-probs, values, scores), in fp32
               and bf16, and gradient checkpointing on against off
  worker       one NCCL worker rank (python -m rlhf_launch.runtime.worker) on a one-rank GRPO spec of the tiny
               models: start-up, checkpoints, export and exit within a deadline, then --resume for one step;
               the memory each communicator costs

A line holds ``part``, ``ok``, ``seconds``, ``error`` (null, or why the part failed: an exception, a time box
run out) and the part's figures; the README's "GPU check" section says how to read each. The exit status is 1
when any part failed, 2 when there is no CUDA device (without --dry). What needs two GPUs (barrier semantics,
ZeRO-3 layer sync, vLLM TP reload) is bench/gpu_check_multi.py.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import gpu_check_parts as parts  # noqa: E402 - after the path: runs from a checkout
import gpu_check_worker as worker  # noqa: E402

FAIL_ENV = "GPU_CHECK_FAIL"
FAIL_MODES = ("raise", "stall", "hang")


@dataclass(frozen=True)
class Sizes:
    """What each part runs: the GPU sizes, or toy ones for --dry."""

    gemm: int  # square bf16 GEMM side
    copy_mib: int  # device copy size
    timed_iters: int  # timed repetitions of a roofline or a probe step
    masters: parts.LlamaShape
    masters_batch: tuple[int, int, int]  # sequences, prompt, response
    masters_steps: int
    probe: parts.LlamaShape
    probe_batch: tuple[int, int, int]  # training micro batch, prompt, response
    probe_infer_micro: int
    numerics_lengths: tuple[int, int]  # padded prompt and response columns
    worker_deadline_s: float  # each worker run: start to exit


GPU = Sizes(
    gemm=8192, copy_mib=2048, timed_iters=3,
    masters=parts.LlamaShape(hidden=2048, layers=12, heads=16, kv_heads=16, intermediate=5632, vocab=32000),  # 0.75B
    masters_batch=(4, 256, 256), masters_steps=3,
    probe=parts.LlamaShape(hidden=4096, layers=32, heads=32, kv_heads=32, intermediate=11008, vocab=32000),  # Llama-2 7B
    probe_batch=(2, 1024, 1024), probe_infer_micro=8,
    numerics_lengths=(64, 48),
    worker_deadline_s=80,
)
DRY = Sizes(
    gemm=256, copy_mib=16, timed_iters=1,
    masters=parts.LlamaShape(hidden=64, layers=2, heads=4, kv_heads=4, intermediate=172, vocab=512),
    masters_batch=(2, 16, 16), masters_steps=2,
    probe=parts.LlamaShape(hidden=64, layers=2, heads=4, kv_heads=4, intermediate=172, vocab=512),
    probe_batch=(2, 16, 16), probe_infer_micro=8,
    numerics_lengths=(12, 10),
    worker_deadline_s=60,
)


@dataclass
class Context:
    """What every part gets: the device, the sizes, and the lines of the parts before it."""

    device: torch.device
    sizes: Sizes | None  # None: bench/gpu_check_multi.py, whose parts take no sizes
    dry: bool
    lines: dict[str, dict] = field(default_factory=dict)
    children: list[subprocess.Popen] = field(default_factory=list)  # started by the running part, killed on a hard time-out
    started: float = field(default_factory=time.perf_counter)


@dataclass(frozen=True)
class Part:
    """One part: its function (returns its figures and ``ok``) and its time boxes in seconds, on a GPU and in --dry."""

    name: str
    run: Callable[[Context], dict]
    box_s: float
    dry_box_s: float


def run_versions(ctx: Context) -> dict:
    """Part 1: library versions and the measured rooflines (a bf16 GEMM, a device copy) against the device's
    datasheet figures where known; threshold: both at least half of the datasheet (on CPU: both measured)."""
    info = parts.versions(ctx.device)
    gemm_tflops = parts.gemm_tflops(ctx.device, ctx.sizes.gemm, ctx.sizes.timed_iters)
    copy_gbps = parts.copy_gbps(ctx.device, ctx.sizes.copy_mib, ctx.sizes.timed_iters)
    sheet = parts.datasheet(info["device_name"])
    gemm_of = gemm_tflops / sheet[0] if sheet else None
    copy_of = copy_gbps / sheet[1] if sheet else None
    ok = gemm_tflops > 0 and copy_gbps > 0 and (sheet is None or (gemm_of >= 0.5 and copy_of >= 0.5))
    return {
        **info, "gemm_tflops": parts.sig(gemm_tflops), "copy_gbps": parts.sig(copy_gbps),
        "datasheet_tflops": sheet[0] if sheet else None, "datasheet_gbps": sheet[1] if sheet else None,
        "gemm_of_datasheet": parts.rounded(gemm_of, 3), "copy_of_datasheet": parts.rounded(copy_of, 3), "ok": ok,
    }


def run_masters(ctx: Context) -> dict:
    """Part 2: weight movement at lr 1e-6 (gpu_check_parts.masters); threshold: masters >= 0.9 of fp32's."""
    batch, prompt, response = ctx.sizes.masters_batch
    return parts.masters(ctx.device, ctx.sizes.masters, batch, prompt, response, ctx.sizes.masters_steps)


def run_probe(ctx: Context) -> dict:
    """Part 3: the 7B-shape probe (gpu_check_parts.probe); threshold: every peak <= 1.2 x the plan."""
    micro, prompt, response = ctx.sizes.probe_batch
    gemm = ctx.lines.get("versions", {}).get("gemm_tflops")
    return parts.probe(ctx.device, ctx.sizes.probe, micro, prompt, response, ctx.sizes.probe_infer_micro, ctx.sizes.timed_iters, gemm)


def run_numerics(ctx: Context) -> dict:
    """Part 4: padding and gradient checkpointing numerics on the tiny models (gpu_check_parts.numerics)."""
    return parts.numerics(ctx.device, *ctx.sizes.numerics_lengths)


def run_worker(ctx: Context) -> dict:
    """Part 5: a one-rank worker and its resume (gpu_check_worker.worker_run), then the communicators' memory."""
    result = worker.worker_run(ctx.device, ctx.sizes.worker_deadline_s, ctx.children)
    result["communicator_mib"] = worker.communicator_memory(ctx.device)
    return result


PARTS = (
    Part("versions", run_versions, 45, 30),
    Part("masters", run_masters, 120, 90),
    Part("probe_7b", run_probe, 150, 90),
    Part("numerics", run_numerics, 60, 90),
    Part("worker", run_worker, 200, 180),
)


class PartTimeout(BaseException):
    """A part ran out of its time box (BaseException: no ``except Exception`` inside a library swallows it)."""


class Report:
    """The JSON lines: each printed, and the whole ``--out`` file rewritten (atomically) after every part."""

    def __init__(self, out: Path | None):
        self.out, self.lines = out, []
        self.lock = threading.Lock()

    def write(self, line: dict) -> None:
        """Print ``line`` and rewrite ``--out`` with every line so far."""
        with self.lock:
            self.lines.append(line)
            print(json.dumps(line), flush=True)
            if self.out is not None:
                tmp = self.out.with_name(self.out.name + ".tmp")
                tmp.write_text("".join(json.dumps(x) + "\n" for x in self.lines))
                os.replace(tmp, self.out)

    def failed(self) -> list[str]:
        """The parts whose line says not ok."""
        return [x["part"] for x in self.lines if x.get("part") != "summary" and not x.get("ok")]


def forced_failures(flags: list[str], env: str | None) -> dict[str, str]:
    """``--fail PART[:MODE]`` flags and the comma-separated GPU_CHECK_FAIL variable: part -> raise, stall or hang."""
    forced = {}
    for item in [*flags, *(env.split(",") if env else [])]:
        name, _, mode = item.strip().partition(":")
        if name not in {p.name for p in PARTS} or (mode or "raise") not in FAIL_MODES:
            raise SystemExit(f"gpu_check: --fail {item}: expected PART[:{'|'.join(FAIL_MODES)}] with PART one of "
                             f"{', '.join(p.name for p in PARTS)}")
        forced[name] = mode or "raise"
    return forced


def _force(mode: str) -> None:
    """What a forced failure does: raise; stall (a Python loop, which the time box interrupts); hang (deaf to the
    time box's signal, as a call stuck in C is: only the hard deadline ends it)."""
    if mode == "raise":
        raise RuntimeError("forced failure (--fail)")
    if mode == "hang":
        signal.signal(signal.SIGALRM, signal.SIG_IGN)
    while True:
        time.sleep(0.1)


def _grace(box: float) -> float:
    return 0.25 * box + 2.0


def run_part(part: Part, ctx: Context, report: Report, box: float, remaining: list[str], forced: str | None) -> None:
    """Run one part in its time box and write its line, whatever happens.

    The box is enforced twice: SIGALRM raises PartTimeout in the part at its next Python instruction; a part stuck
    in C (a collective, a kernel) never gets there, so a timer thread, ``_grace`` later, writes this part's line,
    a skipped line for every part after it and the summary, kills the part's children and ends the process."""
    started = time.perf_counter()
    armed = [True]  # off once the part is over: an alarm due just then must not escape the clean-up

    def on_alarm(signum, frame):
        if armed[0]:
            raise PartTimeout(f"timed out after {box:.0f} s (its time box)")

    def hard_deadline():
        _kill(ctx.children)
        report.write(_line(part.name, started, error=f"timed out after {box:.0f} s and did not stop within {_grace(box):.0f} s more"))
        for name in remaining:
            report.write(_line(name, started, error="skipped: an earlier part hung", seconds=0.0))
        summarize(report, ctx.started)
        os._exit(1)

    hard = threading.Timer(box + _grace(box), hard_deadline)
    hard.daemon = True
    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, box)
    hard.start()
    try:
        if forced is not None:
            _force(forced)
        figures = part.run(ctx)
        line = _line(part.name, started, **figures)
    except PartTimeout as exc:
        line = _line(part.name, started, error=str(exc))
    except Exception as exc:  # noqa: BLE001 - a failed part is reported in its line and the next part runs
        traceback.print_exc(file=sys.stderr)
        line = _line(part.name, started, error=f"{type(exc).__name__}: {exc}")
    finally:
        armed[0] = False
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        hard.cancel()
        _kill(ctx.children)  # a worker still running when its part raised or timed out
    ctx.lines[part.name] = line
    report.write(line)
    _release(ctx.device)


def _build_tiny_models() -> None:
    """The tiny models that numerics and worker load, built (once; tens of seconds) before any time box starts. A
    failure here is left to those parts to report."""
    started = time.perf_counter()
    try:
        from rlhf_launch.demo.tiny_models import build

        build()
    except Exception as exc:  # noqa: BLE001 - the parts that need the models say so in their lines
        print(f"gpu_check: building the tiny models failed: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
    print(f"gpu_check: tiny models ready in {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)


def _kill(children: list[subprocess.Popen]) -> None:
    """End the processes a part started (each in a session of its own, with whatever it started) and forget them."""
    for child in children:
        if child.poll() is None:
            with contextlib.suppress(OSError):
                os.killpg(child.pid, signal.SIGKILL)
    children.clear()


def _line(name: str, started: float, error: str | None = None, seconds: float | None = None, **figures) -> dict:
    ok = bool(figures.pop("ok", False)) and error is None
    elapsed = round(time.perf_counter() - started, 1) if seconds is None else seconds
    return {"part": name, "ok": ok, "seconds": elapsed, "error": error, **figures}


def summarize(report: Report, started: float) -> None:
    """Write the summary line (every failed part) and say in one line whether the run passed."""
    failed = report.failed()
    report.write({"part": "summary", "ok": not failed, "failed": failed, "seconds": round(time.perf_counter() - started, 1)})
    print(f"gpu_check: {'ok' if not failed else 'FAILED: ' + ', '.join(failed)}", flush=True)


def _release(device: torch.device) -> None:
    """Whatever a part left on the device goes before the next one measures memory."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def main(argv: list[str] | None = None) -> int:
    """Run the selected parts; 0 when every one passed, 1 when any failed, 2 without a CUDA device (and no --dry)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry", action="store_true", help="every part on CPU at toy sizes, gloo for NCCL: checks the script's logic")
    p.add_argument("--device", help="where the parts run (default: cuda, or cpu with --dry)")
    p.add_argument("--out", type=Path, help="also write the JSON lines to this file (rewritten after every part)")
    p.add_argument("--parts", help=f"comma-separated subset of {','.join(x.name for x in PARTS)} (default: all, in that order)")
    p.add_argument("--fail", action="append", default=[], metavar="PART[:MODE]",
                   help=f"make PART fail on purpose (MODE raise, stall or hang; default raise), to check the reporting; "
                        f"also the variable {FAIL_ENV}")
    p.add_argument("--box-scale", type=float, default=1.0, help="multiply every time box by this (e.g. 2 on a slow machine)")
    args = p.parse_args(argv)
    forced = forced_failures(args.fail, os.environ.get(FAIL_ENV))
    chosen = [x for x in PARTS if args.parts is None or x.name in args.parts.split(",")]
    unknown = set(args.parts.split(",")) - {x.name for x in PARTS} if args.parts else set()
    if unknown or not chosen:
        p.error(f"--parts: unknown {', '.join(sorted(unknown)) or '(none chosen)'}; choose from {', '.join(x.name for x in PARTS)}")
    device = torch.device(args.device or ("cpu" if args.dry else "cuda"))
    report = Report(args.out)
    if device.type == "cuda" and not torch.cuda.is_available():
        report.write({"part": "summary", "ok": False, "failed": [], "error": "no CUDA device", "seconds": 0.0})
        print("gpu_check: no CUDA device here; --dry runs every part on CPU at toy sizes", file=sys.stderr)
        return 2
    if device.type == "cuda":
        device = torch.device("cuda", device.index or 0)  # an index: init_process_group's device_id needs one
        torch.cuda.set_device(device)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is fetched: every model is built here
    ctx = Context(device, DRY if args.dry else GPU, args.dry)
    if {"numerics", "worker"} & {x.name for x in chosen}:
        _build_tiny_models()
    for i, part in enumerate(chosen):
        box = (part.dry_box_s if args.dry else part.box_s) * args.box_scale
        run_part(part, ctx, report, box, [x.name for x in chosen[i + 1 :]], forced.get(part.name))
    summarize(report, ctx.started)
    return 1 if report.failed() else 0


if __name__ == "__main__":
    raise SystemExit(main())
