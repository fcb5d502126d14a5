"""``rlhf-launch SPEC --check`` and the same checks before ``--local`` and submission (launcher/preflight.py).

Each bad input is reported in one line naming it, with exit status 2, before any rank starts and
before sbatch is called."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from launcher import local, submit
from launcher.cli import main
from launcher.preflight import SAMPLE_RESPONSES
from rlhf.checkpoint import save_checkpoint
from rlhf.core import yaml_io
from rlhf.core.problems import InputError
from rlhf.data import PromptDataError
from rlhf.dist import failure_line
from tests.factory import ROOT, TINY_MODELS, make_spec, reward_function, spec_dict


@pytest.fixture(autouse=True)
def empty_hf_home(tmp_path, monkeypatch) -> Path:
    """An empty Hugging Face home: hub names are looked up here."""
    home = tmp_path / "hf_home"
    monkeypatch.setenv("HF_HOME", str(home))
    for name in ("HF_HUB_CACHE", "HF_DATASETS_CACHE"):
        monkeypatch.delenv(name, raising=False)
    return home


@pytest.fixture
def started(monkeypatch) -> list[str]:
    """Records every attempt to start ranks or call sbatch (and makes none)."""
    calls: list[str] = []

    def record(name):
        def fake(*args, **kwargs):
            calls.append(name)
            return 0 if name != "sbatch" else "1234"
        return fake

    monkeypatch.setattr(local, "run_in_process", record("run_in_process"))
    monkeypatch.setattr(local, "run_local_ranks", record("run_local_ranks"))
    monkeypatch.setattr(submit, "submit", record("sbatch"))
    return calls


def write_spec(tmp_path: Path, overrides: dict | None = None) -> str:
    path = tmp_path / "spec.yaml"
    path.write_text(yaml_io.dump(spec_dict(overrides or {}, run_dir=tmp_path / "runs" / "test")))
    return str(path)


def refused_everywhere(spec: str, extra: list[str], started: list[str], capsys, tmp_path: Path) -> str:
    """Exit status 2 from --check, --local and a submission alike; no rank and no sbatch; returns stderr of --check."""
    assert main([spec, "--check", *extra]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "nothing was run" in err
    assert main([spec, "--local", *extra]) == 2
    assert main([spec, "--partition", "debug", *extra]) == 2
    capsys.readouterr()
    assert started == []
    assert not (tmp_path / "runs" / "test" / "logs").exists() and not (tmp_path / "runs" / "test" / "spec.yaml").exists()
    return err


# ------------------------------------------------------------------------------------------ passing
def test_the_tiny_spec_passes_and_then_runs(tmp_path, capsys, started):
    spec = write_spec(tmp_path)
    assert main([spec, "--check"]) == 0
    out = capsys.readouterr().out
    assert "300 prompts (all checked)" in out and "ready for a Slurm job" in out
    assert started == []  # --check only checks
    assert main([spec, "--local"]) == 0 and started == ["run_in_process"]


@pytest.mark.parametrize("spec", sorted((ROOT / "specs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_example_spec_passes(spec, capsys, request):
    # The hub models and datasets of the GPU specs are not in this machine's cache: warnings for Slurm.
    for prefix, models in (("tiny", "tiny_models"), ("smollm2", "smollm2_dir")):
        if spec.name.startswith(prefix):
            request.getfixturevalue(models)  # the local model folders the spec names, built once
    assert main([str(spec), "--check"]) == 0, capsys.readouterr().err


def test_check_of_the_tiny_spec_is_fast_and_imports_no_torch():
    code = (
        "import sys, io, contextlib, time\n"
        "from launcher.cli import main\n"
        "t = time.monotonic()\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        f"    rc = main([{str(ROOT / 'specs' / 'tiny_cpu.yaml')!r}, '--check'])\n"
        "print(rc, 'torch' in sys.modules, round(time.monotonic() - t, 2))\n"
    )
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    rc, torch_loaded, _ = proc.stdout.split()
    assert (rc, torch_loaded) == ("0", "False"), proc.stderr
    assert time.monotonic() - start < 10  # ~1 s on an idle machine; the bound leaves room for a busy one


def test_no_check_skips_the_checks(tmp_path, capsys, started):
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{not json\n")
    spec = write_spec(tmp_path, {"dataset_config.ppo_datas": [f"{bad}::1.0"]})
    assert main([spec, "--local", "--no-check"]) == 0 and started == ["run_in_process"]
    assert main([spec, "--check", "--no-check"]) == 2 and main([spec, "--check", "--dry-run"]) == 2


# --------------------------------------------------------------------------------------------- data
def test_a_bad_json_line_names_its_file_and_line(tmp_path, capsys, started):
    data = tmp_path / "prompts.jsonl"
    data.write_text('{"prompt": "fine"}\n{"prompt": "broken",\n{"text": "no prompt key"}\n')
    spec = write_spec(tmp_path, {"dataset_config.ppo_datas": [f"{data}::1.0"]})
    err = refused_everywhere(spec, [], started, capsys, tmp_path)
    assert f"dataset_config.ppo_datas.0: {data}, line 2: invalid JSON" in err
    assert f"{data}, line 3: unrecognised record with keys ['text']" in err  # every bad record, not just the first
    errors = [line for line in err.splitlines() if "warning:" not in line]  # tmp_path is under /tmp: warned
    assert len(errors) == 3  # two problems and the summary, one line each


def test_a_missing_local_source_is_refused(tmp_path, capsys, started):
    spec = write_spec(tmp_path, {"dataset_config.ppo_datas": [f"{tmp_path / 'nope.jsonl'}::1.0"]})
    err = refused_everywhere(spec, [], started, capsys, tmp_path)
    assert f"{tmp_path / 'nope.jsonl'}: no such file or folder" in err


def test_a_missing_hf_dataset_names_it_and_how_to_get_it(tmp_path, capsys, started, empty_hf_home):
    spec = write_spec(tmp_path, {"dataset_config.ppo_datas": ["some-org/prompts/helpful::1.0"]})
    assert main([spec, "--check", "--local"]) == 2
    err = capsys.readouterr().err
    assert "dataset_config.ppo_datas.0: Hugging Face dataset 'some-org/prompts' (data_dir 'helpful')" in err
    assert "hf download --repo-type dataset some-org/prompts" in err
    assert main([spec, "--local"]) == 2 and started == []
    # A Slurm job's nodes may have a cache of their own: a warning, and the job is submitted.
    assert main([spec, "--check"]) == 0
    assert "warning: dataset_config.ppo_datas.0" in capsys.readouterr().err
    # Once in the hub cache, it passes here too.
    repo = empty_hf_home / "hub" / "datasets--some-org--prompts"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    (repo / "snapshots" / "abc123" / "helpful").mkdir(parents=True)
    assert main([spec, "--check", "--local"]) == 0


def test_prompts_over_max_seq_len_are_counted(tmp_path, capsys):
    spec = write_spec(tmp_path, {"dataset_config.max_seq_len": 20})
    assert main([spec, "--check"]) == 0
    err = capsys.readouterr().err
    assert "warning: dataset_config.max_seq_len:" in err and "of 300 prompts checked are longer than 20 tokens" in err
    assert "keep only their last 20 tokens" in err


# ------------------------------------------------------------------------------------------- models
def write_safetensors(path: Path, shapes: dict[str, list[int]]) -> None:
    """A float32 safetensors file of zeros with these tensors."""
    header, offset = {}, 0
    for name, shape in shapes.items():
        size = 4
        for n in shape:
            size *= n
        header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(offset))


def reward_folder(tmp_path: Path, head: str) -> Path:
    folder = tmp_path / "reward"
    folder.mkdir()
    (folder / "config.json").write_text((TINY_MODELS / "reward" / "config.json").read_text())
    write_safetensors(folder / "model.safetensors", {
        "model.embed_tokens.weight": [512, 64], "model.layers.0.mlp.up_proj.weight": [128, 64],
        "model.norm.weight": [64], f"{head}.weight": [1, 64], f"{head}.bias": [1],
    })
    return folder


def test_a_value_head_that_cannot_be_found_lists_the_head_like_tensors(tmp_path, capsys, started):
    folder = reward_folder(tmp_path, "reward_head")
    spec = write_spec(tmp_path, {"model_configs.reward.model_path": str(folder)})
    err = refused_everywhere(spec, [], started, capsys, tmp_path)
    assert "model_configs.reward.model_path:" in err and "has no value head named any of 'score', 'v_head'" in err
    assert "'reward_head.weight' [1, 64]" in err and "layers.0" not in err
    assert "set model_configs.reward.head_name" in err
    assert main([spec, "--check", "--set", "model_configs.reward.head_name=reward_head"]) == 0


def test_a_known_head_name_is_found_in_the_headers(tmp_path, capsys):
    spec = write_spec(tmp_path, {"model_configs.reward.model_path": str(reward_folder(tmp_path, "v_head"))})
    assert main([spec, "--check"]) == 0


def test_a_causal_lm_role_refuses_a_classifier(tmp_path, capsys, started):
    spec = write_spec(tmp_path, {"model_configs.reference.model_path": str(TINY_MODELS / "reward")})
    err = refused_everywhere(spec, [], started, capsys, tmp_path)
    assert "model_configs.reference.model_path:" in err and "LlamaForSequenceClassification" in err and "expected a causal LM" in err


def test_a_missing_hub_model_is_an_error_here_and_a_warning_for_slurm(tmp_path, capsys):
    spec = write_spec(tmp_path, {"model_configs.reward.model_path": "some-org/some-reward-7b"})
    assert main([spec, "--check", "--local"]) == 2
    assert "hf download some-org/some-reward-7b" in capsys.readouterr().err
    assert main([spec, "--check"]) == 0
    assert "warning: model_configs.reward.model_path: hub model 'some-org/some-reward-7b'" in capsys.readouterr().err


def test_a_special_token_outside_the_vocabulary(tmp_path, capsys, started):
    spec = write_spec(tmp_path, {"repeater_config.answer_end_id": 5000})
    err = refused_everywhere(spec, [], started, capsys, tmp_path)
    assert "repeater_config.answer_end_id: found 5000, outside the tokenizer's vocabulary (ids 0..511)" in err


# ---------------------------------------------------------------------------------- reward function
@pytest.fixture
def reward_module(tmp_path, monkeypatch) -> str:
    (tmp_path / "my_rewards.py").write_text(
        "def one_arg(texts):\n    return [0.0] * len(texts)\n"
        "def extra(prompts, responses, scale):\n    return [scale] * len(responses)\n"
        "def too_few(prompts, responses):\n    return [1.0]\n"
        "def not_finite(prompts, responses):\n    return [float('nan')] * len(responses)\n"
        "def good(prompts, responses, scale=1.0):\n    return [scale * len(r) for r in responses]\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("my_rewards", None)
    return "my_rewards"


@pytest.mark.parametrize("name, message", [
    ("one_arg", "my_rewards:one_arg takes 1 positional parameter (texts), not 2; expected a function of (prompts, responses)"),
    ("extra", "my_rewards:extra has a third required parameter 'scale'"),
    ("too_few", "returned 1 scores for 2 responses"),
    ("not_finite", "returned score 0 = nan, expected a finite float"),
    ("missing", "cannot load 'my_rewards:missing': AttributeError"),
])
def test_a_bad_reward_function_is_named(tmp_path, capsys, started, reward_module, name, message):
    spec = write_spec(tmp_path, reward_function(f"{reward_module}:{name}"))
    err = refused_everywhere(spec, [], started, capsys, tmp_path)
    assert f"model_configs.reward.reward_function: {message}" in err or message in err


def test_a_good_reward_function_is_called_once(tmp_path, capsys, reward_module):
    spec = write_spec(tmp_path, reward_function(f"{reward_module}:good"))
    assert main([spec, "--check"]) == 0
    assert f"reward function my_rewards:good: [5.0, {len(SAMPLE_RESPONSES[1]):.1f}]" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------- resume
def write_run(run_dir: Path, files: tuple[str, ...] = ("actor.pt", "critic.pt", "loop.pt"), **overrides) -> Path:
    """A run folder written by the tiny spec with ``overrides``, with one complete checkpoint of ``files``."""
    run_dir.mkdir(parents=True)
    (run_dir / "spec.yaml").write_text(yaml_io.dump(make_spec(overrides, run_dir=run_dir).to_dict()))

    def write(folder: Path) -> None:
        for name in files:
            (folder / name).write_bytes(b"x")

    return save_checkpoint(run_dir, 2, write)


def other_model(tmp_path: Path) -> Path:
    folder = tmp_path / "bigger"
    folder.mkdir()
    config = json.loads((TINY_MODELS / "actor" / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "hidden_size": 128, "num_hidden_layers": 4}))
    return folder


def test_a_checkpoint_from_another_spec_is_refused(tmp_path, capsys, started):
    checkpoint = write_run(tmp_path / "other", **{"model_configs.actor.model_path": str(other_model(tmp_path))})
    spec = write_spec(tmp_path)
    err = refused_everywhere(spec, ["--resume", str(checkpoint)], started, capsys, tmp_path)
    assert f"--resume: {checkpoint} was written by the run of {tmp_path / 'other' / 'spec.yaml'}, whose actor is" in err
    assert "4 layers of width 128" in err and "2 layers of width 64" in err and "expected the same model" in err


def test_a_checkpoint_of_the_same_spec_passes(tmp_path, capsys):
    checkpoint = write_run(tmp_path / "same")
    assert main([write_spec(tmp_path), "--check", "--resume", str(checkpoint)]) == 0


def test_a_checkpoint_without_a_role_is_refused(tmp_path, capsys, started):
    checkpoint = write_run(tmp_path / "partial", files=("actor.pt", "loop.pt"))
    err = refused_everywhere(write_spec(tmp_path), ["--resume", str(checkpoint)], started, capsys, tmp_path)
    assert f"--resume: {checkpoint} has no critic.pt for the critic" in err


def test_an_incomplete_checkpoint_is_refused(tmp_path, capsys, started):
    checkpoint = tmp_path / "run" / "checkpoints" / "step-00000004"
    checkpoint.mkdir(parents=True)
    err = refused_everywhere(write_spec(tmp_path), ["--resume", str(checkpoint)], started, capsys, tmp_path)
    assert "--resume: resume" in err and "no valid COMPLETE marker" in err


# ------------------------------------------------------------------------------------------- output
def test_a_run_folder_under_tmp_is_a_warning_for_slurm(tmp_path, capsys):
    spec = write_spec(tmp_path)
    assert main([spec, "--check", "--output-dir", "/tmp/runs-of-test"]) == 0
    assert "warning: run.output_dir: the run folder /tmp/runs-of-test/test is under a node-local folder" in capsys.readouterr().err
    assert main([spec, "--check", "--local", "--output-dir", "/tmp/runs-of-test"]) == 0
    assert "node-local" not in capsys.readouterr().err


def test_an_unwritable_output_folder_is_refused(tmp_path, capsys, started):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    err = refused_everywhere(write_spec(tmp_path), ["--output-dir", str(blocker / "runs")], started, capsys, tmp_path)
    assert f"run.output_dir: {blocker} is a file" in err


# ------------------------------------------------------------------------------------------ runtime
def test_an_input_error_inside_a_rank_is_one_line():
    exc = PromptDataError("data/x.jsonl: /abs/x.jsonl, line 2: invalid JSON (Expecting value)")
    assert isinstance(exc, InputError)
    assert failure_line("rlhf: global rank 0 (actor 0)", exc) == f"rlhf: global rank 0 (actor 0): {exc}"
    assert failure_line("rlhf: rank 1", KeyError("x")) == "rlhf: rank 1 failed: KeyError: 'x'"


def test_a_prompt_file_broken_after_the_check_fails_in_one_line(tmp_path):
    data = tmp_path / "prompts.jsonl"
    data.write_text('{"prompt": "fine"}\n{"prompt": "broken",\n')
    spec = write_spec(tmp_path, {"dataset_config.ppo_datas": [f"{data}::1.0"]})
    proc = subprocess.run([sys.executable, "-m", "launcher.cli", spec, "--local", "--no-check"],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 1
    failure = [line for line in proc.stderr.splitlines() if "training failed" in line]
    assert failure and f"{data}, line 2: invalid JSON" in failure[0], proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_in_rank_processes_an_input_error_is_one_line_naming_the_rank(tmp_path):
    data = tmp_path / "prompts.jsonl"
    data.write_text('{"prompt": "fine"}\n{"prompt": "broken",\n')
    spec = write_spec(tmp_path, {"dataset_config.ppo_datas": [f"{data}::1.0"]})
    proc = subprocess.run([sys.executable, "-m", "launcher.cli", spec, "--local", "--no-check", "--processes"],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode != 0
    logs = "".join(p.read_text() for p in (tmp_path / "runs").rglob("logs/*.log")) if (tmp_path / "runs").exists() else ""
    output = proc.stderr + logs
    assert f"{data}, line 2: invalid JSON" in output, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
