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


def test_trainer_level_dtype_moves_to_the_model(tmp_path):
    text = SEED.read_text().replace(
        'trainer_config=dict(trainer_type="huggingface", parallel=dict(_parallel)),\n    ),\n    critic',
        'trainer_config=dict(torch_dtype="auto", trainer_type="huggingface", parallel=dict(_parallel)),\n    ),\n    critic',
    )
    text = text.replace('model_type="reference",\n        torch_dtype=torch.bfloat16,', 'model_type="reference",')
    data = convert_file(write(tmp_path, text))
    assert data["model_configs"]["reference"]["torch_dtype"] == "auto"
    assert "torch_dtype" not in data["model_configs"]["reference"]["trainer_config"]


def test_help_warns_that_converting_executes(capsys):
    with pytest.raises(SystemExit):
        main(["convert", "--help"])
    assert "EXECUTES" in capsys.readouterr().out
