"""The command line: dry runs, JSON, flags, exit statuses; no torch on login nodes."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from rlhf_launch.frontend.backends.local import local_gaps
from rlhf_launch.frontend.cli import main
from rlhf_launch.frontend.spec import load_spec
from tests.conftest import ROOT, SPECS

VLLM = str(ROOT / "specs" / "llama2_7b_vllm.yaml")


def test_dry_run_prints_the_plan_then_the_script(capsys):
    assert main([VLLM, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "Resource plan: 22 GPUs on 4 nodes" in out
    assert out.index("Resource plan") < out.index("#!/bin/bash")
    assert out.count("#SBATCH hetjob") == 2


def test_dry_run_json(capsys):
    assert main([VLLM, "--dry-run", "--json", "--partition", "gpu"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["total_gpus"] == 22 and data["total_nodes"] == 4
    assert {r["name"] for r in data["roles"]} == {"actor", "reference", "critic", "reward", "generator"}
    assert [c["index"] for c in data["components"]] == [0, 1, 2]
    assert data["sbatch"].count("#SBATCH --partition=gpu") == 3


def test_flags_override_the_spec(capsys, tmp_path):
    args = [VLLM, "--dry-run", "--json", "--account", "proj", "--qos", "high", "--time", "2-00:00:00",
            "--gpus-per-node", "4", "--output-dir", str(tmp_path), "--set", "run.name=exp1"]
    assert main(args) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["run_dir"] == str(tmp_path / "exp1")
    assert data["total_nodes"] == 6  # 16 trainer GPUs on 4-GPU nodes: 4 nodes, + 1 inference + 1 generator
    for option in ("--account=proj", "--qos=high", "--time=2-00:00:00"):
        assert f"#SBATCH {option}" in data["sbatch"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--partition", "gpu;touch /tmp/x"], "slurm.partition: found 'gpu;touch /tmp/x'"),
        (["--time", "$(id)"], "slurm.time: found '$(id)'"),
        (["--gpus-per-node", "0"], "slurm.gpus_per_node: found 0, expected a value >= 1"),
        (["--set", "repeater_config.gamma=2"], "repeater_config.gamma: found 2"),
    ],
)
def test_bad_flags_exit_2(capsys, args, message):
    assert main([VLLM, "--dry-run", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and "nothing was run" in err


@pytest.mark.parametrize("module", ["rlhf_launch", "rlhf_launch.frontend.cli"])
def test_missing_spec_exits_2_without_traceback(module):
    # ``python -m rlhf_launch`` is the ``rlhf-launch`` command, as is the command line's own module
    proc = subprocess.run([sys.executable, "-m", module, "/nonexistent.yaml", "--dry-run"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "cannot read the spec" in proc.stderr and "Traceback" not in proc.stderr


def test_json_needs_dry_run(capsys):
    assert main([VLLM, "--json"]) == 2


@pytest.mark.parametrize("spec", SPECS, ids=lambda p: p.name)
def test_dry_run_imports_no_heavy_library(spec):
    code = (
        "import sys, io, contextlib\n"
        "from rlhf_launch.frontend.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        f"    rc = main([{str(spec)!r}, '--dry-run', '--json'])\n"
        "heavy = sorted(m for m in ('torch', 'transformers', 'deepspeed', 'vllm', 'datasets') if m in sys.modules)\n"
        "print(rc, heavy)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert proc.stdout.strip() == "0 []", proc.stderr


def test_schema_check_command():
    assert main(["schema", "--check"]) == 0


@pytest.mark.parametrize("check", [True, False], ids=["checked", "no-check"])
def test_local_run_needs_its_local_model_folders(tmp_path, capsys, check):
    args = [
        str(SPECS[0].parent / "tiny_cpu.yaml"),
        "--local",
        "--output-dir", str(tmp_path),
        "--set", f"model_configs.critic.model_path={tmp_path / 'missing'}",
    ] + ([] if check else ["--no-check"])
    assert main(args) == 2
    err = capsys.readouterr().err
    if check:  # the pre-flight check finds it (rlhf_launch/frontend/preflight/)
        assert f"model_configs.critic.model_path: local folder {tmp_path / 'missing'} does not exist" in err
    else:
        assert f"model_configs.critic.model_path: {tmp_path / 'missing'}" in err and "build or download them first" in err
    assert not (tmp_path / "tiny_cpu" / "logs").exists()  # no rank was started


def test_local_run_of_a_vllm_generator_needs_vllm_installed():
    spec = load_spec(VLLM).spec
    assert local_gaps(spec, find_module=lambda name: object()) is None
    problem = local_gaps(spec, find_module=lambda name: None)
    assert "generator_type is 'vllm' but vLLM is not installed here" in problem and "generator_type: hf" in problem
    spec.model_configs.actor.generator_config.generator_type = "hf"
    assert local_gaps(spec, find_module=lambda name: None) is None


def test_status_shows_the_last_samples_of_a_run_that_writes_them(tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "status.json").write_text(json.dumps({"state": "running", "step": 2, "max_train_step": 9}))
    assert main(["status", str(run_dir)]) == 0
    assert "last samples" not in capsys.readouterr().out
    samples = [{"step": step, "row": row, "prompt": f"user: question {step}.{row}", "response": "answer " * 50,
                "score": 0.5 * row, "reward": -0.25, "response_len": 50} for step in (1, 2) for row in range(3)]
    (run_dir / "rollouts.jsonl").write_text("".join(json.dumps(s) + "\n" for s in samples))
    assert main(["status", str(run_dir)]) == 0
    out = capsys.readouterr().out.splitlines()
    start = out.index(f"  last samples ({run_dir / 'rollouts.jsonl'}):")
    shown = out[start + 1 : start + 4]
    assert [line.split("  score")[0].strip() for line in shown] == ["step 2 row 0", "step 2 row 1", "step 2 row 2"]
    assert all('"user: question 2.' in line and len(line) <= 130 for line in shown)
