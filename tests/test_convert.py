"""Converting XTuner-RLHF Python configs."""

from __future__ import annotations

import sys

import pytest
import yaml

from launcher.cli import main
from launcher.convert import ConvertError, convert_file, to_yaml
from launcher.spec import validate
from tests.conftest import ROOT

SEED = ROOT / "tests" / "fixtures" / "xtuner" / "internlm2_1_8b.py"


def strip_comments(text: str) -> str:
    return "".join(line for line in text.splitlines(keepends=True) if not line.startswith("#"))


def test_seed_converts_to_the_shipped_spec():
    assert to_yaml(convert_file(SEED)) == strip_comments((ROOT / "specs" / "internlm2_1_8b.yaml").read_text())


def test_converted_seed_validates():
    data = convert_file(SEED)
    loaded = validate(data, "seed", SEED.parent)
    assert loaded.spec.model_configs.actor.torch_dtype == "bfloat16"
    assert loaded.spec.model_configs.actor.trainer_config.train_kwargs.total_steps == 10**9


def test_conversion_does_not_import_torch(tmp_path):
    sys.modules.pop("torch", None) if "torch" not in sys.modules else None
    had_torch = "torch" in sys.modules
    convert_file(SEED)
    assert ("torch" in sys.modules) == had_torch


def test_cli_prints_yaml_and_exits_zero(capsys):
    assert main(["convert", str(SEED)]) == 0
    out = capsys.readouterr().out
    assert yaml.safe_load(out)["model_configs"]["actor"]["model_type"] == "actor"


def write(tmp_path, text):
    path = tmp_path / "cfg.py"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    "text, message",
    [
        ("import torch\nx = torch.cuda.device_count()\n", "provides only torch dtypes"),
        ("model_configs = dict(\n", "executing the config failed: SyntaxError"),
        ("raise SystemExit(3)\n", "the config exited"),
        ("rollout_config = dict(a=1)\n", "no module-level model_configs"),
        ("model_configs = dict(actor=dict(f=object()))\n", "model_configs.actor.f: found object"),
    ],
)
def test_bad_configs_are_reported(tmp_path, text, message):
    with pytest.raises(ConvertError) as info:
        convert_file(write(tmp_path, text))
    assert message in str(info.value)


def test_cli_reports_errors_with_status_2(tmp_path, capsys):
    assert main(["convert", str(tmp_path / "nope.py")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_invalid_converted_config_shows_every_problem(tmp_path, capsys):
    text = SEED.read_text().replace("kl_coeff=0.02", "kl_coef=0.02") + "\nprompt_dataset_config = dict(x=1)\n"
    assert main(["convert", str(write(tmp_path, text))]) == 2
    err = capsys.readouterr().err
    assert "repeater_config.kl_coef: unknown key (did you mean 'kl_coeff'?)" in err
    assert "prompt_dataset_config: unknown key" in err


def test_trainer_level_dtype_stays_and_wins(tmp_path):
    """XTuner loads with trainer_config.torch_dtype only; the spec keeps it there and resolves to it."""
    text = SEED.read_text().replace(
        'trainer_config=dict(trainer_type="huggingface", parallel=dict(_parallel)),\n    ),\n    critic',
        'trainer_config=dict(torch_dtype="auto", trainer_type="huggingface", parallel=dict(_parallel)),\n    ),\n    critic',
    )
    data = convert_file(write(tmp_path, text))
    assert data["model_configs"]["reference"]["trainer_config"]["torch_dtype"] == "auto"
    loaded = validate(data, "cfg", tmp_path)
    assert loaded.spec.model_configs.reference.torch_dtype == "auto"  # over the model-level bfloat16
    assert [w.path for w in loaded.warnings if "torch_dtype" in w.path] == ["model_configs.reference.torch_dtype"]


MEMORY = ROOT / "tests" / "fixtures" / "xtuner" / "memory_and_precision.py"


def test_memory_and_precision_keys_convert_validate_and_plan():
    notes: list[str] = []
    data = convert_file(MEMORY, notes)
    models = data["model_configs"]
    assert {role: m.get("attn_implementation") for role, m in models.items()} == {
        "actor": "flash_attention_2", "reference": "flash_attention_2", "critic": "flash_attention_2", "reward": "sdpa"}
    assert not any("use_flash_attn" in m or "use_flash_attn" in m["trainer_config"] for m in models.values())
    assert models["critic"]["head_name"] == "v_head" and "head_name" not in models["critic"]["trainer_config"]
    # XTuner reads use_flash_attn in trainer_config only: the model-level one is dropped with a note.
    assert notes == ["model_configs.actor.use_flash_attn (false) is ignored, as XTuner ignores it; "
                     "trainer_config.use_flash_attn (true) is used"]

    loaded = validate(data, "memory", MEMORY.parent)
    spec = loaded.spec.model_configs
    assert [spec.actor.torch_dtype, spec.reference.torch_dtype, spec.critic.torch_dtype] == ["bfloat16", "auto", "bfloat16"]
    assert spec.actor.trainer_config.gradient_checkpointing and spec.critic.trainer_config.gradient_checkpointing
    assert spec.critic.head_name == spec.reward.head_name == "v_head"
    assert "model_configs.reference.torch_dtype" in [w.path for w in loaded.warnings]
    # The plan counts the checkpointed critic's activations: far less than the same spec without checkpointing.
    without = convert_file(MEMORY)
    without["model_configs"]["critic"]["trainer_config"]["gradient_checkpointing"] = False
    plain = validate(without, "memory", MEMORY.parent).plan.role("critic").memory.activations_gib
    assert loaded.plan.role("critic").memory.activations_gib < plain / 5


def test_convert_prints_notes_after_the_spec(capsys):
    assert main(["convert", str(MEMORY)]) == 0
    captured = capsys.readouterr()
    assert yaml.safe_load(captured.out)["model_configs"]["actor"]["attn_implementation"] == "flash_attention_2"
    assert "rlhf-launch convert: note: model_configs.actor.use_flash_attn (false) is ignored" in captured.err


def test_two_different_head_names_are_refused(tmp_path):
    reward = 'model_type="reward",\n        head_name='
    text = MEMORY.read_text().replace(f'{reward}"v_head",', f'{reward}"value_head",')
    flash = 'use_flash_attn=False,\n            '
    text = text.replace(f"{flash}parallel", f'{flash}head_name="v_head",\n            parallel')
    with pytest.raises(ConvertError, match="model_configs.reward: head_name 'value_head' and trainer_config.head_name 'v_head' differ"):
        convert_file(write(tmp_path, text))


def test_help_warns_that_converting_executes(capsys):
    with pytest.raises(SystemExit):
        main(["convert", "--help"])
    assert "EXECUTES" in capsys.readouterr().out
