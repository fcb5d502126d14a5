"""The pre-flight on models of their own code (rlhf_launch/frontend/preflight/remote_code.py): a model whose model_type
transformers does not know is refused in one line, before any rank, unless its ``trust_remote_code`` is on and its
folder has the code its config.json's auto_map names; a tokenizer of its own class needs the tokenizer's key."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from rlhf_launch.core import yaml_io
from rlhf_launch.frontend.preflight import preflight
from rlhf_launch.frontend.preflight.remote_code import code_files, missing_code, transformers_knows
from tests.factory import ROOT, make_spec, remote_code, spec_dict


def _errors(spec, tmp_path: Path) -> dict[str, str]:
    """The pre-flight's errors for a --local run: key path -> its messages, joined."""
    found: dict[str, str] = {}
    for p in preflight(spec, tmp_path / "run", None, local=True).problems:
        if p.severity == "error":
            found[p.path] = f"{found[p.path]} | {p.message}" if p.path in found else p.message
    return found


def _copy(remote_code_models: Path, tmp_path: Path, name: str) -> Path:
    folder = tmp_path / name
    shutil.copytree(remote_code_models / name, folder)
    return folder


def test_check_refuses_a_model_of_its_own_code_with_the_key_off_in_one_line(remote_code_models, tmp_path):
    spec_file = tmp_path / "spec.yaml"
    overrides = remote_code(remote_code_models, ("reward",), trust=False)
    spec_file.write_text(yaml_io.dump(spec_dict(overrides, run_dir=tmp_path / "runs" / "test")))
    proc = subprocess.run([sys.executable, "-m", "rlhf_launch", str(spec_file), "--check"], capture_output=True, text=True,
                          timeout=300, cwd=ROOT)
    errors = [line for line in proc.stderr.splitlines() if ": warning: " not in line and "nothing was run" not in line]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert len(errors) == 1, proc.stderr
    assert errors[0].startswith(f"{spec_file}: model_configs.reward.trust_remote_code: ")
    assert "model_type 'tiny_remote', which transformers" in errors[0] and "modeling_tiny_remote.py" in errors[0]
    assert not (tmp_path / "runs" / "test" / "spec.yaml").exists()


def test_models_of_their_own_code_pass_with_their_keys_on(remote_code_models, tmp_path):
    found = preflight(make_spec(remote_code(remote_code_models)), tmp_path / "run", None, local=True)
    assert [p for p in found.problems if p.severity == "error"] == []
    notes = "\n".join(found.notes)
    assert "reward model: model_type 'tiny_remote' through its own code" in notes and "AutoModel" in notes
    assert "actor model: model_type 'tiny_remote' through its own code" in notes and "AutoModelForCausalLM" in notes


def test_a_tokenizer_of_its_own_class_needs_the_tokenizer_key(remote_code_models, tmp_path):
    spec = make_spec({**remote_code(remote_code_models), "tokenizer_config.trust_remote_code": False})
    errors = _errors(spec, tmp_path)
    assert list(errors) == ["tokenizer_config.trust_remote_code"]
    assert "set tokenizer_config.trust_remote_code: true" in errors["tokenizer_config.trust_remote_code"]


def test_missing_code_is_refused_naming_the_files(remote_code_models, tmp_path):
    folder = _copy(remote_code_models, tmp_path, "tiny_remote_reward")
    (folder / "configuration_tiny_remote.py").unlink()  # named by auto_map, and imported by the modeling file
    spec = make_spec({**remote_code(remote_code_models), "model_configs.reward.model_path": str(folder)})
    message = _errors(spec, tmp_path)["model_configs.reward.model_path"]
    assert "lacks its code: configuration_tiny_remote.py" in message


def test_a_model_type_without_code_or_without_a_class_for_the_role_is_refused(remote_code_models, tmp_path):
    no_code = _copy(remote_code_models, tmp_path, "tiny_remote_reward")
    config = json.loads((no_code / "config.json").read_text())
    del config["auto_map"]
    (no_code / "config.json").write_text(json.dumps(config))
    spec = make_spec({**remote_code(remote_code_models), "model_configs.reward.model_path": str(no_code),
                      "model_configs.actor.model_path": str(remote_code_models / "tiny_remote_reward")})
    errors = _errors(spec, tmp_path)
    assert "no code of its own (no auto_map in its config.json)" in errors["model_configs.reward.model_path"]
    assert "names no class the actor can load (AutoConfig, AutoModel); expected one of AutoModelForCausalLM" in (
        errors["model_configs.actor.model_path"])


def test_what_transformers_knows_is_read_without_importing_it():
    code = ("import sys; from rlhf_launch.frontend.preflight.remote_code import transformers_knows as k; "
            "print(k('llama')[0], k('gpt-sw3')[0], k('tiny_remote')[0], 'transformers' in sys.modules, 'torch' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert proc.stdout.split() == ["True", "True", "False", "False", "False"], proc.stderr
    assert transformers_knows("internlm2") == (False, transformers_knows("llama")[1])


@pytest.mark.parametrize(("auto_map", "files"), [
    ({"AutoConfig": "configuration_x.XConfig", "AutoModel": "modeling_x.XModel", "AutoModelForCausalLM": "modeling_x.XForCausalLM"},
     ["configuration_x.py", "modeling_x.py"]),
    ({"AutoTokenizer": [None, "tokenization_x.XTokenizer"]}, ["tokenization_x.py"]),
    ({"AutoConfig": "other/repo--configuration_x.XConfig"}, []),  # another repository's code: not in this folder
])
def test_the_files_an_auto_map_names(auto_map, files):
    assert code_files(auto_map) == files


def test_relative_imports_of_the_code_count_too(tmp_path):
    (tmp_path / "modeling_x.py").write_text("from .configuration_x import XConfig\nfrom . import helpers_x, extra_x\n")
    (tmp_path / "helpers_x.py").write_text("x = 1\n")
    assert missing_code(tmp_path, ["modeling_x.py"]) == ["configuration_x.py", "extra_x.py"]
