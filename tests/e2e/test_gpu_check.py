"""bench/gpu_check.py runs where a GPU is lent for a few minutes only: here its --dry mode runs every part on CPU
at toy sizes, so that its logic (lines, thresholds, time boxes, --out) does not break unnoticed."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from tests.conftest import ROOT

BENCH = ROOT / "bench"
COMMON = {"part", "ok", "seconds", "error"}
# What the README's "GPU check" section promises each line holds.
FIELDS = {
    "versions": {"torch", "cuda", "nccl", "flash_attn", "transformers", "device_name", "gemm_tflops", "copy_gbps",
                 "datasheet_tflops", "datasheet_gbps", "gemm_of_datasheet", "copy_of_datasheet"},
    "masters": {"movement_fp32", "movement_masters", "movement_bf16", "masters_over_fp32", "bf16_over_fp32",
                "published_bf16_over_fp32", "masters_peak_gib", "masters_plan_gib", "masters_peak_over_plan"},
    "probe_7b": {"train", "train_gc", "infer", "memory_checked"},
    "numerics": {"float32", "bfloat16"},
    "worker": {"backend", "deadline_s", "run", "checkpoints", "exported", "resumed", "resume_max_diff", "communicator_mib"},
}
PROBE_CASE = {"oom", "peak_gib", "plan_gib", "peak_over_plan", "tokens_per_s", "tflops", "of_gemm", "plan_breakdown_gib", "ok"}
NUMERICS_DTYPE = {"logprobs_max_diff", "values_max_diff", "scores_max_diff", "gc_policy_grad_rel", "gc_value_grad_rel", "gc_layers",
                  "limits", "ok"}


def gpu_check(tmp_path, *args, env=None):
    out = tmp_path / "gpu_check.jsonl"
    proc = subprocess.run([sys.executable, str(BENCH / "gpu_check.py"), "--dry", "--out", str(out), *args],
                          capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)
    lines = [json.loads(x) for x in out.read_text().splitlines()] if out.exists() else []
    return proc, {x["part"]: x for x in lines}, [x["part"] for x in lines]


def _bench_module(name: str):
    sys.path.insert(0, str(BENCH))
    try:
        return __import__(name)
    finally:
        sys.path.remove(str(BENCH))


@pytest.mark.slow
def test_every_part_writes_its_line_with_the_fields_its_readme_line_promises(tiny_models, tmp_path):
    proc, lines, order = gpu_check(tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert order == [*FIELDS, "summary"]
    for part, fields in FIELDS.items():
        assert COMMON | fields <= set(lines[part]), (part, sorted(COMMON | fields - set(lines[part])))
        assert lines[part]["ok"] is True and lines[part]["error"] is None, lines[part]
    assert lines["summary"] == {**lines["summary"], "ok": True, "failed": []}
    # Each part measured something, and the masters check tells the three precisions apart.
    masters = lines["masters"]
    assert masters["masters_over_fp32"] >= 0.9 and masters["bf16_over_fp32"] < 0.5, masters
    for case in ("train", "train_gc", "infer"):
        assert PROBE_CASE <= set(lines["probe_7b"][case]) and lines["probe_7b"][case]["tokens_per_s"] > 0
    assert lines["probe_7b"]["memory_checked"] is False  # no device memory to measure on CPU
    for dtype in ("float32", "bfloat16"):
        assert NUMERICS_DTYPE <= set(lines["numerics"][dtype]) and lines["numerics"][dtype]["gc_layers"] > 0
    assert lines["numerics"]["float32"]["logprobs_max_diff"] <= 1e-4
    worker = lines["worker"]
    assert worker["backend"] == "gloo" and worker["checkpoints"] == [1, 2] and worker["exported"]
    assert worker["run"]["rc"] == 0 and worker["resumed"]["steps"] == [2] and worker["resume_max_diff"] <= 1e-4
    assert set(worker["communicator_mib"]) == {"default", "global", "weight-sync"}
    assert lines["versions"]["gemm_tflops"] > 0 and lines["versions"]["copy_gbps"] > 0


def test_failed_and_timed_out_parts_write_their_lines_and_fail_the_exit_status(tmp_path):
    """One part past its time box (a Python loop that the box's signal interrupts), the next one raising: both lines
    say why, --out holds them and the summary, and the exit status is 1. The variable is read as the flag is."""
    env = {**os.environ, "GPU_CHECK_FAIL": "versions:stall"}
    proc, lines, order = gpu_check(tmp_path, "--parts", "versions,masters", "--fail", "masters", "--box-scale", "0.1", env=env)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert order == ["versions", "masters", "summary"]
    assert lines["versions"]["ok"] is False and lines["versions"]["error"] == "timed out after 3 s (its time box)"
    assert lines["masters"]["ok"] is False and lines["masters"]["error"] == "RuntimeError: forced failure (--fail)"
    assert lines["summary"]["failed"] == ["versions", "masters"]
    assert "gpu_check: FAILED: versions, masters" in proc.stdout


def test_a_part_deaf_to_its_time_box_is_ended_and_the_rest_are_skipped(tmp_path):
    """A part stuck where the box's signal cannot reach it (as a hung collective is): after the grace period the
    check writes its line, the later parts as skipped and the summary, and exits 1."""
    proc, lines, order = gpu_check(tmp_path, "--parts", "versions,masters", "--fail", "versions:hang", "--box-scale", "0.1")
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert order == ["versions", "masters", "summary"]
    assert lines["versions"]["error"].startswith("timed out after 3 s and did not stop")
    assert lines["masters"]["error"] == "skipped: an earlier part hung" and lines["masters"]["ok"] is False


def test_the_readme_names_every_part_and_field_the_test_checks():
    text = (ROOT / "README.md").read_text()
    section = text[text.index("### The GPU check") :]
    section = section[: section.index("\n## ")]
    named = {*COMMON, *FIELDS, *PROBE_CASE, *NUMERICS_DTYPE, *(f for fields in FIELDS.values() for f in fields)}
    assert not sorted(f for f in named if f"`{f}`" not in section)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the answer on a machine without a GPU")
def test_without_a_gpu_the_check_says_so_and_exits_2(tmp_path, capsys):
    out = tmp_path / "out.jsonl"
    assert _bench_module("gpu_check").main(["--parts", "versions", "--out", str(out)]) == 2
    assert json.loads(out.read_text())["error"] == "no CUDA device"
    assert "--dry runs every part on CPU" in capsys.readouterr().err


def test_a_bad_fail_flag_names_the_parts(capsys):
    with pytest.raises(SystemExit, match="expected PART.*versions, masters, probe_7b, numerics, worker"):
        _bench_module("gpu_check").forced_failures(["mastres"], None)


def test_the_probe_threshold():
    within_plan = _bench_module("gpu_check_parts").within_plan
    assert within_plan(12.0, 10.0, False, 80.0) is True  # 1.2 x: the limit
    assert within_plan(12.1, 10.0, False, 80.0) is False  # the plan under-counts by more than 20 %
    assert within_plan(None, 10.0, False, None) is None  # CPU: nothing measured
    assert within_plan(70.0, 90.0, True, 80.0) is True  # out of memory where the plan said it would not fit
    assert within_plan(70.0, 60.0, True, 80.0) is False  # out of memory where the plan said it fits


def test_the_two_gpu_script_lists_its_parts_without_running_them(capsys):
    assert _bench_module("gpu_check_multi").main(["--dry"]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [x["part"] for x in lines] == ["barrier", "zero3_layer_sync", "vllm_tp_reload"]
    assert all(x["needs"] and x["checks"] for x in lines)
