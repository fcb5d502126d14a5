"""Token alignment of log-probs and values, checked against a plain per-prefix loop."""

from __future__ import annotations

import pytest
import torch

from rlhf_launch.runtime import ppo
from rlhf_launch.runtime.models import PolicyModule, ValueModule, load_causal_lm, load_value_model, sequence_scores

torch.set_num_threads(1)


def left_padded_batch(prompts: list[list[int]], responses: list[list[int]], pad: int):
    P = max(map(len, prompts))
    R = max(map(len, responses))
    prompt_ids = torch.tensor([[pad] * (P - len(p)) + p for p in prompts])
    prompt_mask = torch.tensor([[0] * (P - len(p)) + [1] * len(p) for p in prompts])
    response_ids = torch.tensor([r + [pad] * (R - len(r)) for r in responses])
    response_mask = torch.tensor([[1] * len(r) + [0] * (R - len(r)) for r in responses])
    return torch.cat([prompt_ids, response_ids], 1), torch.cat([prompt_mask, response_mask], 1), response_ids, response_mask


PROMPTS = [[1, 5, 9, 14], [1, 7], [1, 30, 31, 32, 33, 34]]
RESPONSES = [[40, 41, 42], [50, 51, 52, 53, 2], [60]]


@pytest.fixture(scope="module")
def models(tiny_models):
    actor = load_causal_lm(str(tiny_models / "actor"), "float32", torch.device("cpu"))
    critic = load_value_model(str(tiny_models / "critic"), "float32", torch.device("cpu"), pad_token_id=0)
    return actor, critic


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logprob_of_each_response_token_given_its_own_prefix(models, temperature):
    actor, _ = models
    input_ids, attention_mask, response_ids, response_mask = left_padded_batch(PROMPTS, RESPONSES, pad=0)
    with torch.no_grad():
        logits = PolicyModule(actor)(input_ids, attention_mask, response_ids.shape[1], temperature)
        batched = ppo.logprobs_from_logits(logits, response_ids)
    for b, (prompt, response) in enumerate(zip(PROMPTS, RESPONSES, strict=False)):
        for t, token in enumerate(response):
            prefix = torch.tensor([prompt + response[:t]])
            with torch.no_grad():
                last = actor(input_ids=prefix).logits[0, -1] / temperature
            expected = torch.log_softmax(last.double(), -1)[token]
            assert batched[b, t].item() == pytest.approx(expected.item(), abs=2e-5)


def test_value_of_each_response_token_is_that_of_its_prefix(models):
    _, critic = models
    input_ids, attention_mask, response_ids, _ = left_padded_batch(PROMPTS, RESPONSES, pad=0)
    with torch.no_grad():
        values = ValueModule(critic)(input_ids, attention_mask, response_ids.shape[1])
    for b, (prompt, response) in enumerate(zip(PROMPTS, RESPONSES, strict=False)):
        for t in range(len(response)):
            prefix = torch.tensor([prompt + response[:t]])
            with torch.no_grad():
                hidden = critic.base_model(input_ids=prefix).last_hidden_state[0, -1]
                expected = critic.score(hidden).item()
            assert values[b, t].item() == pytest.approx(expected, abs=2e-5)


def test_sequence_score_is_read_at_the_last_real_token(models):
    _, critic = models
    input_ids, attention_mask, *_ = left_padded_batch(PROMPTS, RESPONSES, pad=0)
    with torch.no_grad():
        scores = sequence_scores(critic, input_ids, attention_mask)
        for b, (prompt, response) in enumerate(zip(PROMPTS, RESPONSES, strict=False)):
            alone = critic(input_ids=torch.tensor([prompt + response])).logits[0, 0]
            assert scores[b].item() == pytest.approx(alone.item(), abs=2e-5)


def test_eos_equal_to_pad_still_scores_the_response_end(models):
    """LLaMA-2 pads with its eos token: the score must be read at the response's own eos."""
    _, critic = models
    input_ids, attention_mask, *_ = left_padded_batch([[1, 5]], [[40, 2]], pad=2)
    with torch.no_grad():
        score = sequence_scores(critic, input_ids, attention_mask)[0]
        alone = critic.score(critic.base_model(input_ids=torch.tensor([[1, 5, 40, 2]])).last_hidden_state[0, -1])
    assert score.item() == pytest.approx(alone.item(), abs=2e-5)


def test_frozen_models_load_whole_without_a_process_group(tiny_models):
    """With data.mode deepspeed but no process group (one process runs every role) the reference and the
    reward load whole, frozen, and score as the plain loaders' models do; the reward's head stays fp32."""
    from rlhf_launch.runtime.models import load_frozen
    from tests.factory import make_spec

    deepspeed = {f"model_configs.{role}.trainer_config.{key}": value for role in ("reference", "reward")
                 for key, value in (("parallel.data.mode", "deepspeed"), ("deepspeed_config", {"zero_optimization": {"stage": 3}}))}
    spec = make_spec({**deepspeed, "model_configs.reward.torch_dtype": "bfloat16"})
    reference, ref_engine = load_frozen(spec, "reference", torch.device("cpu"))
    reward, reward_engine = load_frozen(spec, "reward", torch.device("cpu"), pad_token_id=0)
    assert ref_engine.engine is None and reward_engine.engine is None and not ref_engine.lockstep
    assert not any(p.requires_grad for model in (reference, reward) for p in model.parameters())
    assert reward.score.weight.dtype == torch.float32 and next(reward.base_model.parameters()).dtype == torch.bfloat16
    input_ids, mask, response_ids, _ = left_padded_batch(PROMPTS, RESPONSES, pad=0)
    plain = load_causal_lm(str(tiny_models / "actor"), "float32", torch.device("cpu"))
    with torch.no_grad():
        torch.testing.assert_close(PolicyModule(reference)(input_ids, mask, response_ids.shape[1]),
                                   PolicyModule(plain)(input_ids, mask, response_ids.shape[1]), atol=0, rtol=0)
        assert sequence_scores(reward, input_ids, mask).isfinite().all()
