"""The plan's checkpoint, disk and preemption figures, and the host memory each component asks Slurm for."""

from __future__ import annotations

import json
import math
import re

import pytest

from rlhf_launch.core import budget, memory
from rlhf_launch.frontend.cli import main
from rlhf_launch.frontend.spec import load_spec
from tests.conftest import ROOT
from tests.factory import layout, load_sized, zero

SEED = ROOT / "specs" / "internlm2_7b.yaml"


def test_the_seed_plan_states_each_checkpoint_the_disk_and_the_notice():
    """InternLM2 7B actor and critic under ZeRO-3 bf16: 14 bytes per parameter each (bf16 weights, fp32 masters and
    two moments), three checkpoints at once and the two exported bf16 models."""
    plan = load_spec(SEED).plan
    per_role = 14 * 7e9 / memory.GIB
    assert plan.role("actor").checkpoint_gib == pytest.approx(per_role) and plan.role("critic").checkpoint_gib == pytest.approx(per_role)
    assert plan.role("reference").checkpoint_gib is None
    b = plan.budget
    assert b.disk_gib == pytest.approx(3 * 2 * per_role + 2 * 2 * 7e9 / memory.GIB)
    assert 550 < b.disk_gib < 620  # about 600 GB, as the review found
    assert b.write_seconds == pytest.approx(2 * 14 * 7e9 / 1e9)  # at the default 1 GB/s
    assert plan.signal_seconds == b.signal_seconds == math.ceil((b.step_seconds + b.write_seconds + 60) / 10) * 10
    assert 30 < b.step_seconds < 300 and plan.signal_seconds > 120  # the old default could not hold a checkpoint


def test_dry_run_shows_them_in_the_table_and_in_json(capsys):
    assert main([str(SEED), "--dry-run", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["checkpoint_gib"] == {"actor": 91.3, "critic": 91.3} and data["disk_gib"] == pytest.approx(573.7, abs=0.1)
    assert data["signal_seconds"] == data["signal_seconds_needed"]
    assert f"#SBATCH --signal=B:USR1@{data['signal_seconds']}\n" in data["sbatch"]
    actor = next(r for r in data["roles"] if r["name"] == "actor")
    assert actor["checkpoint_gib"] == 91.3 and set(actor["memory_phases_gib"]) == {"training", "scoring", "generating"}
    assert actor["memory_gib"]["buffers_gib"] > 0 and actor["memory_gib"]["overhead_gib"] > 0
    assert main([str(SEED), "--dry-run"]) == 0
    table = capsys.readouterr().out
    assert "checkpoint GiB" in table and "checkpoint: 182.5 GiB each; disk: 573.7 GiB" in table
    assert f"preemption notice: {data['signal_seconds']} s" in table and "training 52.8" in table


def test_a_notice_shorter_than_a_step_and_a_checkpoint_write_is_warned_about(capsys):
    """The same warning the local Slurm test sees at submit (tests/e2e/test_slurm_preemption_notice.py), without
    Slurm: one line naming slurm.signal_seconds and the value needed."""
    needed = load_spec(SEED).plan.signal_seconds
    assert main([str(SEED), "--dry-run", "--set", "slurm.signal_seconds=120"]) == 0
    lines = [line for line in capsys.readouterr().err.splitlines() if "slurm.signal_seconds" in line]
    assert len(lines) == 1 and "warning" in lines[0] and "found 120" in lines[0] and f"use at least {needed}" in lines[0]
    assert main([str(SEED), "--dry-run", "--set", f"slurm.signal_seconds={needed}"]) == 0
    assert "slurm.signal_seconds" not in capsys.readouterr().err
    # A faster file system needs a shorter notice.
    fast = load_spec(SEED, ["slurm.checkpoint_write_gb_per_s=10"]).plan
    assert fast.signal_seconds < needed


def _mems(loaded) -> list[str | None]:
    return [c.mem for c in loaded.plan.components]


def test_each_component_asks_for_the_host_memory_of_its_fullest_node():
    """A 7B ZeRO-3 trainer rank: 8 GiB of libraries and its eighth of a 14-byte-per-parameter checkpoint; a DDP
    reference or reward rank: the libraries and the whole bf16 model loaded on the host; a quarter of headroom."""
    plan = load_spec(SEED).plan
    trainer = 8 * (budget.HOST_BASE_GIB + 14 * 7e9 / 8 / memory.GIB) * budget.HOST_HEADROOM
    inference = 4 * (budget.HOST_BASE_GIB + 2 * 7e9 / memory.GIB) * budget.HOST_HEADROOM
    assert _mems(load_spec(SEED)) == [f"{math.ceil(trainer)}G", f"{math.ceil(inference)}G"]
    # the inference component takes 4 GPUs of an 8-GPU node, and half of what a full node would ask
    assert plan.components[1].gpus == 4 and math.ceil(inference) < 0.6 * math.ceil(trainer)


def test_slurm_mem_wins_and_cpu_runs_keep_all_of_each_node():
    sizes = {**layout(actor=8, critic=8), **zero(3)}
    assert _mems(load_sized({**sizes, "slurm.mem": "500G"})) == ["500G", "500G"]
    assert _mems(load_sized({**sizes, "run.device": "cpu"})) == [None, None]
    text = load_spec(ROOT / "specs" / "tiny_cpu.yaml").plan
    assert [c.mem for c in text.components] == [None, None]


def test_unknown_model_sizes_keep_the_old_defaults():
    """Without a size for a trained model there are no figures: the notice is 120 s and --mem is 0."""
    loaded = load_sized(params_b=7, **{"model_configs.critic.num_params_b": None, "model_configs.critic.model_path": "org/critic"})
    assert loaded.plan.budget is None and loaded.plan.signal_seconds == 120
    assert re.search(r"--mem=0\b", _render(loaded)) is not None


def _render(loaded) -> str:
    from rlhf_launch.frontend.backends.slurm_script import JobFiles, render_sbatch

    return render_sbatch(loaded.spec, loaded.plan, JobFiles("/runs/x", "/usr/bin/python"))
