"""``rlhf-launch SPEC --check`` and the same checks before ``--local`` and submission (rlhf_launch/frontend/preflight/).

Each bad input is reported in one line naming it, with exit status 2, before any rank starts and
before sbatch is called."""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from rlhf_launch.core import yaml_io
from rlhf_launch.core.problems import InputError
from rlhf_launch.frontend.backends import local
from rlhf_launch.frontend.backends import slurm_jobs as submit
from rlhf_launch.frontend.cli import main
from rlhf_launch.frontend.preflight import models as preflight_models
from rlhf_launch.frontend.preflight import records as preflight_records
from rlhf_launch.frontend.preflight.findings import SAMPLE_RESPONSES
from rlhf_launch.runtime.checkpoint import save_checkpoint
from rlhf_launch.runtime.data import PromptDataError
from rlhf_launch.runtime.dist import failure_line
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


def cache_dataset(hf_home: Path, repo: str, data_dir: str | None = None) -> None:
    """A hub-cache snapshot of dataset ``repo`` (with an empty ``data_dir``), as ``hf download`` leaves it."""
    folder = hf_home / "hub" / f"datasets--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True, exist_ok=True)
    (folder / "refs" / "main").write_text("abc123")
    (folder / "snapshots" / "abc123" / (data_dir or "")).mkdir(parents=True, exist_ok=True)


@pytest.mark.parametrize("spec", sorted((ROOT / "specs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_example_spec_passes(spec, capsys, request, tmp_path, empty_hf_home):
    # The hub models of the GPU specs are not in this machine's cache: warnings for Slurm. Their hub datasets
    # would be errors (the nodes read this cache), so they are put in the cache, as a user would before submitting.
    from rlhf_launch.core.data_sources import looks_local, parse_source
    from rlhf_launch.runtime.data import split_hub_name

    for prefix, models in (("tiny", "tiny_models"), ("smollm2", "smollm2_dir")):
        if spec.name.startswith(prefix):
            request.getfixturevalue(models)  # the local model folders the spec names, built once
    for entry in yaml_io.load(spec.read_text())[0]["dataset_config"]["ppo_datas"]:
        if not looks_local(source := parse_source(entry).source):
            cache_dataset(empty_hf_home, *split_hub_name(source))
    # A run folder of its own: the spec's (runs/ next to it) may hold a run of a developer's.
    assert main([str(spec), "--check", "--output-dir", str(tmp_path / "runs")]) == 0, capsys.readouterr().err


def test_check_of_the_tiny_spec_is_fast_and_imports_no_torch(tmp_path):
    # The pre-flight call alone is timed, in a fresh interpreter (torch must stay unimported): not its start-up,
    # which a loaded machine stretches. Lazy imports the checks make (tokenizers, jinja2) are part of its cost.
    code = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from rlhf_launch.frontend.run_dir import run_dir_of\n"
        "from rlhf_launch.frontend.preflight import preflight\n"
        "from rlhf_launch.frontend.spec import load_spec\n"
        f"loaded = load_spec({str(ROOT / 'specs' / 'tiny_cpu.yaml')!r}, [], {{'run.output_dir': {str(tmp_path)!r}}})\n"
        "t = time.monotonic()\n"
        "found = preflight(loaded.spec, Path(run_dir_of(loaded.spec)), None, False)\n"
        "elapsed = time.monotonic() - t\n"
        "errors = [p.message for p in found.problems if p.severity == 'error']\n"
        "print(len(errors), 'torch' in sys.modules, round(elapsed, 2))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    errors, torch_loaded, elapsed = proc.stdout.split()
    assert (errors, torch_loaded) == ("0", "False"), proc.stderr
    assert float(elapsed) <= 3.0  # ~1.5 s on two busy cores


def test_no_check_skips_the_checks(tmp_path, capsys, started):
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{not json\n")
    spec = write_spec(tmp_path, {"dataset_config.ppo_datas": [f"{bad}::1.0"]})
    assert main([spec, "--local", "--no-check"]) == 0 and started == ["run_in_process"]
    assert main([spec, "--check", "--no-check"]) == 2 and main([spec, "--check", "--dry-run"]) == 2


def test_a_check_that_crashes_is_one_line_naming_it_then_its_traceback(tmp_path, capsys, started, monkeypatch):
    def broken(folder):
        raise RuntimeError("boom")

    monkeypatch.setattr(preflight_models, "tensor_shapes", broken)  # read first for the critic
    spec = write_spec(tmp_path)
    assert main([spec, "--check"]) == 2
    err = capsys.readouterr().err
    line = (f"{spec}: model_configs.critic.model_path: the pre-flight check check_models failed on {TINY_MODELS / 'critic'}: "
            "RuntimeError: boom; this is a bug of rlhf-launch (traceback below)")
    assert line in err and "Traceback" in err and err.index(line) < err.index("Traceback")
    assert err.rstrip().endswith("1 error in the run's inputs; nothing was run")  # the other checks ran and found nothing
    assert main([spec, "--local"]) == 2 and started == []


def test_an_input_error_inside_a_check_is_one_line(tmp_path, capsys, monkeypatch):
    def broken(folder):
        raise InputError(f"{folder}/model.safetensors: header cut short")

    monkeypatch.setattr(preflight_models, "tensor_shapes", broken)
    spec = write_spec(tmp_path)
    assert main([spec, "--check"]) == 2
    err = capsys.readouterr().err
    assert f"{spec}: model_configs.critic.model_path: {TINY_MODELS / 'critic'}/model.safetensors: header cut short" in err
    assert "Traceback" not in err


def test_a_run_folder_that_holds_a_run_needs_resume(tmp_path, capsys, started):
    spec = write_spec(tmp_path)
    run_dir = tmp_path / "runs" / "test"
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text("")
    assert main([spec, "--check"]) == 2
    assert f"{spec}: run.output_dir: {run_dir} already holds a run; continue it with --resume" in capsys.readouterr().err
    assert main([spec, "--local"]) == 2 and main([spec, "--partition", "debug"]) == 2 and started == []
    assert main([spec, "--check", "--resume"]) == 0


# --------------------------------------------------------------------------------------------- data
def test_a_bad_json_line_names_its_file_and_line(tmp_path, capsys, started):
    data = tmp_path / "prompts.jsonl"
    data.write_text('{"prompt": "fine"}\n{"prompt": "broken",\n{"text": "no prompt key"}\n')
    spec = write_spec(tmp_path, {"dataset_config.ppo_datas": [f"{data}::1.0"]})
    err = refused_everywhere(spec, [], started, capsys, tmp_path)
    assert f"dataset_config.ppo_datas.0: {data}, line 2: invalid JSON" in err
    assert "line 1 column 21 (char 20)" in err and "line 2 column 1" not in err  # the position within the line itself
    assert f"{data}, line 3: unrecognised record with keys ['text']" in err  # every bad record, not just the first
    errors = [line for line in err.splitlines() if "warning:" not in line]  # tmp_path is under /tmp: warned
    assert len(errors) == 3  # two problems and the summary, one line each


def test_unreadable_prompt_files_are_one_line_each(tmp_path, capsys, started):
    corrupt = tmp_path / "corrupt.parquet"
    corrupt.write_bytes(b"PAR1 not really parquet")
    latin1 = tmp_path / "latin1.jsonl"
    latin1.write_bytes('{"prompt": "fine"}\n{"prompt": "caf\u00e9?"}\n'.encode("latin-1"))
    binary = tmp_path / "binary.json"
    binary.write_bytes(b"\xff\xfe[]")
    spec = write_spec(tmp_path, {"dataset_config.ppo_datas": [f"{corrupt}::1.0", f"{latin1}::1.0", f"{binary}::1.0"]})
    err = refused_everywhere(spec, [], started, capsys, tmp_path)
    assert f"{spec}: dataset_config.ppo_datas.0: {corrupt}: not a parquet file (ArrowInvalid: " in err
    assert f"{spec}: dataset_config.ppo_datas.1: {latin1}, line 2: not UTF-8 text (byte 0xe9 at offset 15 of the line)" in err
    assert f"{spec}: dataset_config.ppo_datas.2: {binary}: not UTF-8 text (byte 0xff at offset 0); expected UTF-8 text" in err


def test_a_large_file_is_sampled_and_counted(tmp_path, capsys, monkeypatch):
    import pyarrow
    import pyarrow.parquet as pq

    monkeypatch.setattr(preflight_records, "LARGE_FILE_BYTES", 1000)
    monkeypatch.setattr(preflight_records, "SAMPLE_RECORDS", 20)
    lines = tmp_path / "big.jsonl"
    lines.write_text("".join(json.dumps({"prompt": f"Question {i}?"}) + "\n" for i in range(100)) + "{not json, past the sample\n")
    assert lines.stat().st_size > 1000
    table = tmp_path / "big.parquet"
    pq.write_table(pyarrow.table({"prompt": [f"Question {i}?" for i in range(50)]}), table)
    spec = write_spec(tmp_path, {"dataset_config.ppo_datas": [f"{lines}::1.0", f"{table}::1.0"]})
    assert main([spec, "--check"]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert f"checked: {lines}: 101 prompts (the first 20 checked)" in out  # the bad last line is counted, not parsed
    assert f"checked: {table}: 50 prompts (the first 20 checked)" in out


def test_a_missing_local_source_is_refused(tmp_path, capsys, started):
    spec = write_spec(tmp_path, {"dataset_config.ppo_datas": [f"{tmp_path / 'nope.jsonl'}::1.0"]})
    err = refused_everywhere(spec, [], started, capsys, tmp_path)
    assert f"{tmp_path / 'nope.jsonl'}: no such file or folder" in err


def test_a_missing_hf_dataset_names_it_and_how_to_get_it(tmp_path, capsys, started, empty_hf_home):
    spec = write_spec(tmp_path, {"dataset_config.ppo_datas": ["some-org/prompts/helpful::1.0"]})
    err = refused_everywhere(spec, [], started, capsys, tmp_path)  # submission too: sbatch is never called
    assert f"{spec}: dataset_config.ppo_datas.0: Hugging Face dataset 'some-org/prompts' (data_dir 'helpful')" in err
    assert "hf download --repo-type dataset some-org/prompts" in err
    assert "the job's nodes read this same cache: the job sets no HF_HOME, HF_HUB_CACHE, HF_DATASETS_CACHE" in err
    # Once in the hub cache, it passes here too.
    cache_dataset(empty_hf_home, "some-org/prompts", "helpful")
    assert main([spec, "--check", "--local"]) == 0 and main([spec, "--check"]) == 0


@pytest.mark.parametrize("setting", [
    {"model_configs.reference.trainer_config.envs": {"HF_HOME": "/shared/hf"}},
    {"slurm.setup": ["export HF_DATASETS_CACHE=/shared/datasets"]},
])
def test_a_missing_hf_dataset_is_a_warning_when_the_nodes_read_another_cache(tmp_path, capsys, started, setting):
    spec = write_spec(tmp_path, {"dataset_config.ppo_datas": ["some-org/prompts::1.0"], **setting})
    assert main([spec, "--check"]) == 0
    err = capsys.readouterr().err
    assert "warning: dataset_config.ppo_datas.0: Hugging Face dataset 'some-org/prompts'" in err
    named = "HF_HOME=/shared/hf in model_configs.reference" if "model_configs.reference.trainer_config.envs" in setting else "slurm.setup.0"
    assert f"the job's nodes read another cache ({named}" in err
    assert main([spec, "--check", "--local"]) == 2 and started == []  # this machine must have it for --local


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


def config_copy(tmp_path: Path, role: str, **changes) -> Path:
    """A folder with only the config.json of the tiny ``role`` model, with ``changes``."""
    folder = tmp_path / f"{role}-config"
    folder.mkdir()
    config = json.loads((TINY_MODELS / role / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **changes}))
    return folder


def test_architectures_written_as_one_string_is_one_name(tmp_path, capsys):
    folder = config_copy(tmp_path, "actor", architectures="LlamaForCausalLM")
    assert main([write_spec(tmp_path, {"model_configs.reference.model_path": str(folder)}), "--check"]) == 0
    other = config_copy(tmp_path, "reward", architectures="LlamaForSequenceClassification")
    assert main([write_spec(tmp_path, {"model_configs.reference.model_path": str(other)}), "--check"]) == 2
    assert f"model_configs.reference.model_path: {other} is a LlamaForSequenceClassification; the reference" in capsys.readouterr().err


@pytest.mark.parametrize("changes, message", [
    ({"architectures": ["T5ForConditionalGeneration"], "is_encoder_decoder": True, "model_type": "t5"},
     "is a T5ForConditionalGeneration, an encoder-decoder model (t5); the critic scores a whole sequence"),
    ({"architectures": ["ViTForImageClassification"]}, "is a ViTForImageClassification, not a text model; the critic"),
    ({"architectures": ["BertForMaskedLM"]}, "is a BertForMaskedLM, loaded for the critic as AutoModelForSequenceClassification"),
])
def test_a_critic_that_cannot_score_text(tmp_path, capsys, changes, message):
    folder = config_copy(tmp_path, "critic", **changes)
    spec = write_spec(tmp_path, {"model_configs.critic.model_path": str(folder)})
    unsure = "MaskedLM" in message  # not clearly wrong: a warning
    assert main([spec, "--check"]) == (0 if unsure else 2)
    assert f"{spec}: {'warning: ' if unsure else ''}model_configs.critic.model_path: {folder} {message}" in capsys.readouterr().err


def test_the_memory_plan_is_recomputed_from_a_cached_hub_config(tmp_path, capsys, empty_hf_home):
    big = {"hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80, "num_attention_heads": 64,
           "num_key_value_heads": 8, "head_dim": 128}
    spec = write_spec(tmp_path, {"model_configs.reward.model_path": "some-org/huge-reward"})
    assert main([spec, "--check"]) == 0
    assert "estimated peak" not in capsys.readouterr().err  # a hub name alone: no size known
    repo = empty_hf_home / "hub" / "models--some-org--huge-reward"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    (repo / "snapshots" / "abc123").mkdir(parents=True)
    (repo / "snapshots" / "abc123" / "config.json").write_text((config_copy(tmp_path, "reward", **big) / "config.json").read_text())
    assert main([spec, "--check"]) == 0
    captured = capsys.readouterr()
    assert "warning: model_configs.reward: reward: estimated peak" in captured.err and "exceeds the" in captured.err
    assert "checked: memory plan recomputed from the cached configs of reward" in captured.out


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


def tokenizer_copy(tmp_path: Path, **settings) -> Path:
    """The tiny actor's folder with ``settings`` in its tokenizer_config.json."""
    folder = tmp_path / "tokenizer"
    shutil.copytree(TINY_MODELS / "actor", folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, **settings}))
    return folder


@pytest.mark.parametrize("settings", [{"pad_token": "<nopad>"}, {"eos_token": "<noeos>"}, {"pad_token": "<nopad>", "eos_token": "<noeos>"}])
def test_a_special_token_named_but_not_in_the_vocabulary(tmp_path, capsys, started, settings):
    folder = tokenizer_copy(tmp_path, **settings)
    spec = write_spec(tmp_path, {"tokenizer_config.tokenizer_path": str(folder)})
    err = refused_everywhere(spec, [], started, capsys, tmp_path)
    for name, token in settings.items():
        short = name.removesuffix("_token")
        assert (f"{spec}: tokenizer_config.{short}_token_id: the {name} {token!r} named in {folder / 'tokenizer_config.json'} "
                f"is not in the vocabulary ({folder / 'tokenizer.json'}): the runtime would add it as a new token") in err
    assert "has no padding token" not in err and "no end-of-sequence token" not in err
    # A role's own tokenizer is held to the same rule.
    spec = write_spec(tmp_path, {"model_configs.reward.tokenizer_config": {"tokenizer_path": str(folder)}})
    assert main([spec, "--check"]) == 2
    short = next(iter(settings)).removesuffix("_token")
    assert f"{spec}: model_configs.reward.tokenizer_config.{short}_token_id: the {short}_token" in capsys.readouterr().err


def test_a_tokenizer_folder_without_tokenizer_files(tmp_path, capsys, started):
    folder = config_copy(tmp_path, "actor")
    spec = write_spec(tmp_path, {"tokenizer_config.tokenizer_path": str(folder)})
    err = refused_everywhere(spec, [], started, capsys, tmp_path)
    assert (f"{spec}: tokenizer_config.tokenizer_path: no tokenizer files (tokenizer.json / tokenizer.model / vocab.json ...) "
            f"in {folder}; expected the folder of a Hugging Face tokenizer") in err


# ---------------------------------------------------------------------------------- reward function
@pytest.fixture
def reward_module(tmp_path, monkeypatch) -> str:
    (tmp_path / "my_rewards.py").write_text(
        "def one_arg(texts):\n    return [0.0] * len(texts)\n"
        "def extra(prompts, responses, scale):\n    return [scale] * len(responses)\n"
        "def too_few(prompts, responses):\n    return [1.0]\n"
        "def not_finite(prompts, responses):\n    return [float('nan')] * len(responses)\n"
        "def good(prompts, responses, scale=1.0):\n    return [scale * len(r) for r in responses]\n"
        "def a_str(prompts, responses):\n    return 'abc'\n"
        "def strings(prompts, responses):\n    return ['1.0', '2.0']\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("my_rewards", None)
    return "my_rewards"


@pytest.mark.parametrize("name, message", [
    ("one_arg", "my_rewards:one_arg takes 1 positional parameter (texts), not 2; expected a function of (prompts, responses)"),
    ("extra", "my_rewards:extra has a third required parameter 'scale'"),
    ("too_few", "returned 1 scores for 2 responses"),
    ("not_finite", "returned score 0 = nan, expected a finite number"),
    ("a_str", "returned a str 'abc', expected a list of 2 numbers, one per response"),
    ("strings", "returned score 0 = '1.0' (a str), expected a number"),
    ("missing", "cannot load 'my_rewards:missing': AttributeError"),
])
def test_a_bad_reward_function_is_named(tmp_path, capsys, started, reward_module, name, message):
    spec = write_spec(tmp_path, reward_function(f"{reward_module}:{name}"))
    err = refused_everywhere(spec, [], started, capsys, tmp_path)
    assert any(line.startswith(f"{spec}: model_configs.reward.reward_function: ") and message in line for line in err.splitlines())


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
    start = f"{spec}: --resume: {checkpoint} was written by the run of {tmp_path / 'other' / 'spec.yaml'}, whose actor is"
    assert any(line.startswith(start) for line in err.splitlines()), err
    assert "4 layers of width 128" in err and "2 layers of width 64" in err and "expected the same model" in err


def test_a_checkpoint_of_the_same_spec_passes(tmp_path, capsys):
    checkpoint = write_run(tmp_path / "same")
    assert main([write_spec(tmp_path), "--check", "--resume", str(checkpoint)]) == 0


def test_a_checkpoint_of_a_run_that_named_the_old_rewards_module_resumes(tmp_path, capsys):
    # rlhf.rewards:vowel_ratio, as run folders written before the built-in reward functions moved name it, is the same reward
    checkpoint = write_run(tmp_path / "old", **reward_function("rlhf.rewards:vowel_ratio"))
    assert main([write_spec(tmp_path, reward_function()), "--check", "--resume", str(checkpoint)]) == 0, capsys.readouterr().err
    other = write_run(tmp_path / "other", **reward_function("rlhf.rewards:brevity"))
    assert main([write_spec(tmp_path, reward_function()), "--check", "--resume", str(other)]) == 2
    assert ("whose reward is the function rlhf_launch.runtime.rewards:brevity, but this spec's is the function "
            "rlhf_launch.runtime.rewards:vowel_ratio") in capsys.readouterr().err


def test_a_checkpoint_without_a_role_is_refused(tmp_path, capsys, started):
    checkpoint = write_run(tmp_path / "partial", files=("actor.pt", "loop.pt"))
    err = refused_everywhere(write_spec(tmp_path), ["--resume", str(checkpoint)], started, capsys, tmp_path)
    assert f"{spec_line_start(tmp_path)}--resume: {checkpoint} has no critic.pt for the critic" in err


def spec_line_start(tmp_path: Path) -> str:
    """How a line about the spec of ``write_spec`` starts."""
    return f"{tmp_path / 'spec.yaml'}: "


def test_a_ppo_checkpoint_is_refused_by_a_grpo_spec(tmp_path, capsys, tiny_models):
    checkpoint = write_run(tmp_path / "ppo")  # actor.pt, critic.pt, loop.pt of a gae run with a reward model
    grpo = str(ROOT / "specs" / "grpo_cpu.yaml")
    assert main([grpo, "--check", "--output-dir", str(tmp_path / "runs"), "--resume", str(checkpoint)]) == 2
    lines = capsys.readouterr().err.splitlines()
    written_by = f"{grpo}: --resume: {checkpoint} was written by the run of {tmp_path / 'ppo' / 'spec.yaml'}, whose "
    for start in (
        f"{grpo}: --resume: {checkpoint} holds critic.pt, the state of a critic, but this spec has no critic "
        "(repeater_config.advantage_estimator grpo uses no critic)",
        written_by + "repeater_config.advantage_estimator is 'gae', but this spec's is 'grpo'; expected the same estimator",
        written_by + f"reward is the reward model {TINY_MODELS / 'reward'}, but this spec's is the function "
        "rlhf_launch.runtime.rewards:vowel_ratio",
    ):
        assert any(line.startswith(start) for line in lines), (start, lines)


def test_a_checkpoint_of_another_estimator_is_refused(tmp_path, capsys, started):
    group = {"rollout_config.n_samples_per_prompt": 4, "repeater_config.norm_adv": False}
    checkpoint = write_run(tmp_path / "rloo", files=("actor.pt", "loop.pt"), **group, **{"repeater_config.advantage_estimator": "rloo"})
    spec = write_spec(tmp_path, {**group, "repeater_config.advantage_estimator": "grpo"})
    err = refused_everywhere(spec, ["--resume", str(checkpoint)], started, capsys, tmp_path)
    errors = [line for line in err.splitlines() if "--resume:" in line]
    assert len(errors) == 1 and "whose repeater_config.advantage_estimator is 'rloo', but this spec's is 'grpo'" in errors[0]


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
    proc = subprocess.run([sys.executable, "-m", "rlhf_launch", spec, "--local", "--no-check"],
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
    proc = subprocess.run([sys.executable, "-m", "rlhf_launch", spec, "--local", "--no-check", "--processes"],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode != 0
    logs = "".join(p.read_text() for p in (tmp_path / "runs").rglob("logs/*.log")) if (tmp_path / "runs").exists() else ""
    output = proc.stderr + logs
    assert f"{data}, line 2: invalid JSON" in output, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
