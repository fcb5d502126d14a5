"""attn_implementation: eager and sdpa compute the same log-probs and values on the rollout's layout
(left-padded prompts, right-padded responses), and flash_attention_2 falls back to sdpa on CPU."""

from __future__ import annotations

import pytest
import torch

from rlhf_launch.runtime import models, ppo
from rlhf_launch.runtime.models import PolicyModule, ValueModule, load_causal_lm, load_value_model
from tests.runtime.test_models import left_padded_batch

CPU = torch.device("cpu")
torch.set_num_threads(1)

# Prompts of very different lengths, so that most rows carry left padding, and responses that end early.
PROMPTS = [[1, 5, 9, 14, 15, 16, 17, 18, 19, 20], [1, 7], [1, 30, 31], [1, 40, 41, 42, 43, 44]]
RESPONSES = [[60, 61, 62, 2], [50, 51, 52, 53, 54, 55, 2], [70], [80, 81, 82, 83, 84]]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_eager_and_sdpa_log_probs_agree_on_left_padded_batches(tiny_models, dtype):
    input_ids, attention_mask, response_ids, response_mask = left_padded_batch(PROMPTS, RESPONSES, pad=0)
    assert (attention_mask[:, 0] == 0).sum() == 3  # left padding in all rows but the longest prompt's
    out = {}
    for kernel in ("eager", "sdpa"):
        model = load_causal_lm(str(tiny_models / "actor"), dtype, CPU, attn_implementation=kernel)
        assert model.config._attn_implementation == kernel
        with torch.no_grad():
            logits = PolicyModule(model)(input_ids, attention_mask, response_ids.shape[1])
        out[kernel] = ppo.logprobs_from_logits(logits, response_ids)
    mask = response_mask.bool()
    difference = (out["eager"] - out["sdpa"])[mask].abs().max().item()
    # bf16 rounds each kernel's intermediate results differently: agreement to bf16 precision only.
    assert difference <= (1e-5 if dtype == "float32" else 2e-2), difference


def test_eager_and_sdpa_values_agree_on_left_padded_batches(tiny_models):
    input_ids, attention_mask, response_ids, response_mask = left_padded_batch(PROMPTS, RESPONSES, pad=0)
    out = {}
    for kernel in ("eager", "sdpa"):
        model = load_value_model(str(tiny_models / "critic"), "float32", CPU, pad_token_id=0, role="critic",
                                 attn_implementation=kernel)
        with torch.no_grad():
            out[kernel] = ValueModule(model)(input_ids, attention_mask, response_ids.shape[1])
    torch.testing.assert_close(out["eager"][response_mask.bool()], out["sdpa"][response_mask.bool()], rtol=0, atol=1e-5)


def test_flash_attention_falls_back_to_sdpa_on_cpu_with_one_warning(tiny_models, capsys, monkeypatch):
    monkeypatch.setattr(models, "_FELL_BACK", set())
    actor = load_causal_lm(str(tiny_models / "actor"), "float32", CPU, attn_implementation="flash_attention_2")
    critic = load_value_model(str(tiny_models / "critic"), "float32", CPU, pad_token_id=0, role="critic",
                              attn_implementation="flash_attention_2")
    assert actor.config._attn_implementation == critic.config._attn_implementation == "sdpa"
    lines = [line for line in capsys.readouterr().out.splitlines() if "flash_attention_2" in line]
    assert lines == ["rlhf: warning: attn_implementation flash_attention_2 needs a CUDA GPU, and this process runs on cpu; using sdpa"]


def test_flash_attention_is_kept_where_it_can_run(monkeypatch):
    import transformers.utils

    monkeypatch.setattr(transformers.utils, "is_flash_attn_2_available", lambda: True)
    assert models.attention_kernel("flash_attention_2", torch.device("cuda", 0)) == "flash_attention_2"
    monkeypatch.setattr(transformers.utils, "is_flash_attn_2_available", lambda: False)
    assert models.attention_kernel("flash_attention_2", torch.device("cuda", 0)) == "sdpa"
    assert models.attention_kernel("eager", CPU) == "eager"


@pytest.mark.slow
def test_eager_and_sdpa_runs_agree(tiny_models, tmp_path):
    """End to end, one process: every model on eager attention gives the sdpa run's metrics to 1e-5."""
    from tests.factory import assert_runs_agree

    eager = {f"model_configs.{role}.attn_implementation": "eager" for role in ("actor", "reference", "critic", "reward")}
    assert_runs_agree(tmp_path, eager, ("reward_mean", "kl", "policy_loss", "value_loss", "entropy", "response_len_mean"))
