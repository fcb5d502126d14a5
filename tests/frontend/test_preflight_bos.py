"""The pre-flight warns when the tokenizer adds a BOS token but the prompts rendered through the chat template start
without it (rlhf_launch/frontend/preflight/prompts.py ``check_bos``).

Prompts are encoded as the template renders them, without the special tokens a tokenizer adds to plain text: with
Llama-2's tokenizer, which puts <s> first, and a template without ``{{ bos_token }}``, every role reads prompts without
their <s>. The tiny tokenizer adds no BOS; a test copy is given Llama-2's post-processor."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from rlhf_launch.core import yaml_io
from rlhf_launch.frontend.cli import main
from rlhf_launch.frontend.preflight import preflight
from rlhf_launch.frontend.preflight.findings import SAMPLE_PROMPT
from rlhf_launch.frontend.preflight.prompts import added_bos
from rlhf_launch.frontend.preflight.readers import FastTokenizer, HFTokenizer
from tests.factory import ROOT, make_spec, spec_dict

WARNING = "the tokenizer adds the BOS token '<s>' (id 1) before the texts it encodes, but prompts rendered through"


@pytest.fixture
def template(tiny_models) -> str:
    """The tiny tokenizer's chat template, which renders ``{{ bos_token }}`` first."""
    return (tiny_models / "actor" / "chat_template.jinja").read_text()


@pytest.fixture
def bos_tokenizer(tiny_models, tmp_path) -> Path:
    """A copy of the tiny tokenizer whose post-processor puts <s> before every text, as Llama-2's does."""
    from tokenizers import Tokenizer, processors

    folder = tmp_path / "bos_tokenizer"
    folder.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copyfile(tiny_models / "actor" / name, folder / name)
    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    bos = tokenizer.token_to_id("<s>")
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)])
    tokenizer.save(str(folder / "tokenizer.json"))
    return folder


def without_bos(template: str) -> str:
    assert template.startswith("{{ bos_token }}")
    return template.removeprefix("{{ bos_token }}")


def bos_warnings(tmp_path: Path, overrides: dict) -> list[str]:
    spec = make_spec(overrides, run_dir=tmp_path / "run")
    found = preflight(spec, tmp_path / "run", None, local=True)
    assert [p for p in found.problems if p.severity == "error"] == []
    return [p.format("spec.yaml") for p in found.problems if "BOS" in p.message]


def test_a_template_without_the_bos_the_tokenizer_adds_is_warned_about_in_one_line(bos_tokenizer, template, tmp_path, capsys):
    no_bos = {"tokenizer_config.tokenizer_path": str(bos_tokenizer), "tokenizer_config.chat_template": without_bos(template)}
    [line] = bos_warnings(tmp_path, no_bos)
    assert line.startswith(f"spec.yaml: warning: tokenizer_config.chat_template: {WARNING} this chat template start without it")
    assert line.endswith("so every role reads them without it; start it with '{{ bos_token }}'") and "\n" not in line
    # the same through the command line: one line, and the check still passes
    path = tmp_path / "spec.yaml"
    path.write_text(yaml_io.dump(spec_dict(no_bos, run_dir=tmp_path / "runs" / "test")))
    assert main([str(path), "--check"]) == 0
    assert sum("BOS" in line for line in capsys.readouterr().err.splitlines()) == 1


def test_no_warning_when_the_template_renders_it_or_the_tokenizer_adds_none(bos_tokenizer, template, tiny_models, tmp_path):
    assert bos_warnings(tmp_path, {"tokenizer_config.tokenizer_path": str(bos_tokenizer),
                                   "tokenizer_config.chat_template": template}) == []
    assert bos_warnings(tmp_path, {"tokenizer_config.tokenizer_path": str(bos_tokenizer)}) == []  # its own template has it
    # the tiny tokenizer adds no BOS: a template without one matches what it does to text
    assert bos_warnings(tmp_path, {"tokenizer_config.chat_template": without_bos(template)}) == []


def test_the_tokenizers_own_template_without_it_names_the_key_to_set(bos_tokenizer, template, tmp_path):
    (bos_tokenizer / "chat_template.jinja").write_text(without_bos(template))
    [line] = bos_warnings(tmp_path, {"tokenizer_config.tokenizer_path": str(bos_tokenizer)})
    assert "the tokenizer's own chat template start without it" in line
    assert line.endswith("set tokenizer_config.chat_template to that template with '{{ bos_token }}' first")


def test_a_reward_models_own_tokenizer_is_held_to_the_same_rule(bos_tokenizer, template, tmp_path):
    own = {"tokenizer_path": str(bos_tokenizer), "chat_template": without_bos(template),
           "from_pretrained_kwargs": {"clean_up_tokenization_spaces": False}}  # read by transformers, not tokenizers
    [line] = bos_warnings(tmp_path, {"model_configs.reward.tokenizer_config": own})
    assert line.startswith(f"spec.yaml: warning: model_configs.reward.tokenizer_config.chat_template: {WARNING}")


def test_both_readers_see_what_the_runtime_tokenizer_does(bos_tokenizer, template, tiny_models):
    from rlhf_launch.core.config import TokenizerConfig
    from rlhf_launch.runtime.data import encode_prompt, load_tokenizer

    runtime = load_tokenizer(TokenizerConfig(), str(bos_tokenizer))
    assert runtime("a")["input_ids"][0] == runtime.bos_token_id == 1
    assert encode_prompt(runtime, SAMPLE_PROMPT, without_bos(template))[0] != 1  # what the warning is about
    assert encode_prompt(runtime, SAMPLE_PROMPT, template)[0] == 1
    assert added_bos(FastTokenizer(bos_tokenizer)) == added_bos(HFTokenizer(runtime)) == 1
    plain = load_tokenizer(TokenizerConfig(), str(tiny_models / "actor"))
    assert added_bos(FastTokenizer(tiny_models / "actor")) is None and added_bos(HFTokenizer(plain)) is None


@pytest.mark.parametrize("name", ["llama2_7b.yaml", "llama2_7b_vllm.yaml"])
def test_the_llama2_specs_render_the_bos(name, bos_tokenizer):
    template = yaml_io.load((ROOT / "specs" / name).read_text())[0]["tokenizer_config"]["chat_template"]
    reader = FastTokenizer(bos_tokenizer)
    assert reader.encode(SAMPLE_PROMPT, template)[0] == 1
    assert reader.encode_conversation([*SAMPLE_PROMPT, {"role": "assistant", "content": "Sure."}], template)[0] == 1
    assert reader.encode(SAMPLE_PROMPT, without_bos(template))[0] != 1
