"""bf16 models trained without DeepSpeed keep fp32 master weights, so small updates survive.

Adam moves each weight by about lr per step; at lr 1e-6 that is far below bf16's spacing at
weights of ~0.02 (~1e-4), so updates applied to bf16 weights round away to nothing.
"""

from __future__ import annotations

import pytest
import torch

from rlhf_launch.core.config import TrainKwargs
from rlhf_launch.runtime.engine import TorchTrainer, keep_fp32_master_weights
from rlhf_launch.runtime.models import PolicyModule, ValueModule, head_scores, load_causal_lm, load_value_model

CPU = torch.device("cpu")


def _ids():
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 200, (4, 16), generator=gen)
    return ids, torch.ones_like(ids)


def _movement(path, dtype: str, steps: int = 3) -> float:
    """Mean absolute change of the weights after ``steps`` Adam steps at lr 1e-6, measured in fp32."""
    torch.manual_seed(0)
    policy = PolicyModule(load_causal_lm(str(path), dtype, CPU))
    before = {k: v.float().clone() for k, v in policy.state_dict().items()}
    trainer = TorchTrainer(policy, TrainKwargs(lr=1e-6, total_steps=100, max_grad_norm=None))
    ids, mask = _ids()
    for _ in range(steps):
        logits = trainer.module(ids, mask, 8)
        trainer.backward(logits.logsumexp(-1).mean())
        trainer.step()
    after = policy.state_dict()
    return sum((after[k].float() - before[k]).abs().sum().item() for k in before) / sum(v.numel() for v in before.values())


def test_a_bf16_model_moves_as_far_as_an_fp32_one(tiny_models):
    fp32 = _movement(tiny_models / "actor", "float32")
    bf16 = _movement(tiny_models / "actor", "bfloat16")
    assert fp32 > 1e-7
    assert bf16 == pytest.approx(fp32, rel=0.2)  # bf16 weights trained directly: bf16 == 0.0


def test_bf16_weights_become_fp32_masters_that_compute_in_bf16(tiny_models):
    policy = PolicyModule(load_causal_lm(str(tiny_models / "actor"), "bfloat16", CPU))
    trainer = TorchTrainer(policy, TrainKwargs(lr=1e-6, total_steps=10))
    assert {p.dtype for p in policy.parameters()} == {torch.float32}
    assert policy.compute_dtype == torch.bfloat16 and trainer.weight_dtype == torch.bfloat16
    seen = []
    hook = policy.model.model.layers[0].mlp.down_proj.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    policy(*_ids(), 8)
    hook.remove()
    assert seen == [torch.bfloat16]


def test_fp32_models_are_left_alone_and_fp16_is_refused(tiny_models):
    policy = PolicyModule(load_causal_lm(str(tiny_models / "actor"), "float32", CPU))
    assert keep_fp32_master_weights(policy) is None and policy.compute_dtype is None
    half = PolicyModule(load_causal_lm(str(tiny_models / "actor"), "float16", CPU))
    with pytest.raises(ValueError, match="loss scaling"):
        keep_fp32_master_weights(half)


def test_value_heads_run_in_fp32(tiny_models):
    reward = load_value_model(str(tiny_models / "reward"), "bfloat16", CPU, pad_token_id=0, role="reward")
    assert reward.score.weight.dtype == torch.float32
    critic = ValueModule(load_value_model(str(tiny_models / "critic"), "bfloat16", CPU, pad_token_id=0, role="critic"))
    TorchTrainer(critic, TrainKwargs(lr=1e-6, total_steps=10))
    hidden = torch.full((2, 3, critic.model.config.hidden_size), 1 / 3)
    # Under an outer bf16 autocast the head still computes in fp32: the result equals the fp32 product.
    with torch.autocast("cpu", dtype=torch.bfloat16):
        values = head_scores(critic.model.score, hidden)
    expected = hidden @ critic.model.score.weight.float().T
    torch.testing.assert_close(values, expected.squeeze(-1), rtol=1e-6, atol=1e-6)


def test_a_bf16_value_head_computes_in_fp32_and_through_its_module_call():
    # A DeepSpeed bf16 critic keeps its ``score`` in bf16: the head must still compute in fp32 (a value of a
    # few units in bf16 keeps two or three digits), and be called as a module, since ZeRO-3 gathers a
    # partitioned head's weights in hooks around that call.
    gen = torch.Generator().manual_seed(0)
    score = torch.nn.Linear(64, 1, bias=True).to(torch.bfloat16)
    with torch.no_grad():
        score.weight.copy_(torch.randn(1, 64, generator=gen))
        score.bias.fill_(0.3)
    hidden = torch.randn(4, 5, 64, generator=gen).to(torch.bfloat16)  # a bf16 model's hidden states
    calls = []
    score.register_forward_pre_hook(lambda module, args: calls.append(module))
    values = head_scores(score, hidden)
    expected = torch.nn.functional.linear(hidden.float(), score.weight.float(), score.bias.float()).squeeze(-1)
    in_bf16 = torch.nn.functional.linear(hidden, score.weight, score.bias).squeeze(-1).float()  # what it computed before
    assert values.dtype == torch.float32 and calls[0] is score
    torch.testing.assert_close(values, expected, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(values, in_bf16, rtol=1e-6, atol=1e-6)
    assert score.weight.dtype == torch.bfloat16  # the weights themselves are left as DeepSpeed keeps them
