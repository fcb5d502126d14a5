"""bench/gpu_check.py runs where a GPU is lent for a few minutes only: its code paths are run
here on CPU at toy sizes, so that it does not break unnoticed."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT


@pytest.mark.slow
def test_the_gpu_check_runs_at_toy_sizes_on_cpu(tiny_models, tmp_path):
    out = tmp_path / "gpu_check.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--smoke", "--device", "cpu", "--out", str(out)],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    parts = {r["part"]: r for r in json.loads(out.read_text())}
    assert set(parts) == {"a_tiny_spec_bf16", "b_actor_training", "c_peak_memory", "b_decode"}
    assert parts["b_actor_training"]["step_s"] > 0 and parts["b_decode"]["tokens_per_s"] > 0
    assert parts["c_peak_memory"]["plan_estimate_gib"] > 0
