"""The optimizer side: learning-rate schedule and exact gradient accumulation."""

from __future__ import annotations

import copy

import pytest
import torch

from rlhf_launch.core.config import TrainKwargs
from rlhf_launch.runtime import ppo
from rlhf_launch.runtime.engine import TorchTrainer, lr_factor
from rlhf_launch.runtime.roles.common import train_minibatches
from rlhf_launch.runtime.timing import Timer


def test_linear_decay_to_the_final_rate():
    kw = TrainKwargs(lr=1.0, total_steps=10, lr_decay_rate=0.1)
    assert [round(lr_factor(s, kw), 6) for s in (0, 5, 10, 20)] == [1.0, 0.55, 0.1, 0.1]
    model = torch.nn.Linear(2, 1)
    trainer = TorchTrainer(model, kw)
    for _ in range(5):
        model(torch.ones(1, 2)).sum().backward()
        trainer.step()
    assert trainer.lr == pytest.approx(0.55)


def make_experience(n=8, t=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = (torch.arange(t).expand(n, t) < torch.randint(1, t + 1, (n, 1), generator=g)).long()
    return {"x": torch.randn(n, t, 3, generator=g), "target": torch.randn(n, t, generator=g), "response_mask": mask}


@pytest.mark.parametrize("loss_type", ["per_token", "per_seq"])
def test_micro_batches_accumulate_to_the_minibatch_gradient(loss_type):
    """One optimizer step over micro batches of 2 equals one over the whole minibatch of 8."""
    torch.manual_seed(0)
    base = torch.nn.Linear(3, 1)
    experience = make_experience()

    def run(micro_bs):
        model = copy.deepcopy(base)
        trainer = TorchTrainer(model, TrainKwargs(lr=0.1, max_grad_norm=None))

        def loss_fn(micro, num_seqs, num_tokens):
            err = (model(micro["x"]).squeeze(-1) - micro["target"]) ** 2
            return ppo.aggregate_loss(err, micro["response_mask"], loss_type, num_seqs, num_tokens), {}

        stats = train_minibatches(trainer, experience, loss_fn, minibatch=8, micro_bs=micro_bs, epochs=1, seed=3, timer=Timer())
        return model, stats

    whole, s1 = run(8)
    parts, s2 = run(2)
    torch.testing.assert_close(whole.weight, parts.weight, rtol=1e-6, atol=1e-7)
    assert s1["loss"] == pytest.approx(s2["loss"], rel=1e-6)


def test_gradient_clipping_reports_the_norm():
    model = torch.nn.Linear(1, 1, bias=False)
    model.weight.data.fill_(0.0)
    trainer = TorchTrainer(model, TrainKwargs(lr=1.0, max_grad_norm=0.5))
    (model(torch.tensor([[10.0]])) - 0.0).sum().backward()
    assert trainer.step() == pytest.approx(10.0)
    # Adam's first step moves by lr whatever the gradient's size, so the weight cannot show the
    # clipping; its first moment, (1 - beta1) x the gradient it was given, does.
    assert trainer.optimizer.state[model.weight]["exp_avg"].item() == pytest.approx(0.1 * 0.5)
    assert model.weight.item() == pytest.approx(-1.0, rel=1e-6)
    assert model.weight.grad is None  # zeroed for the next minibatch's accumulation


def test_frozen_models_get_inference_batch_keys_and_the_model_precision(monkeypatch):
    """DeepSpeed wants train_batch_size and friends even without an optimizer: one inference micro batch
    per rank and one accumulation step, from the same derivation the trainers use; a bf16 model gets
    bf16.enabled (zero.Init would otherwise load it in fp32), a given precision is kept."""
    import rlhf_launch.runtime.engine as engine
    from tests.factory import layout, make_spec

    stage3 = {"zero_optimization": {"stage": 3}}
    spec = make_spec({**layout(reference=2, reward=2), "repeater_config.ref_micro_bs": 4, "rollout_config.reward_micro_bs": 2,
                      "model_configs.reference.trainer_config.parallel.data.mode": "deepspeed",
                      "model_configs.reference.trainer_config.deepspeed_config": stage3,
                      "model_configs.reference.torch_dtype": "bfloat16",
                      "model_configs.reward.trainer_config.parallel.data.mode": "deepspeed",
                      "model_configs.reward.trainer_config.deepspeed_config": {**stage3, "fp16": {"enabled": False}}})
    assert engine.inference_deepspeed_config(spec, "reference") is None  # no process group: the model runs whole
    monkeypatch.setattr(engine.dist, "is_initialized", lambda: True)
    reference = engine.inference_deepspeed_config(spec, "reference")
    assert {k: reference[k] for k in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size")} == {
        "train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1, "train_batch_size": 8}
    assert reference["bf16"] == {"enabled": True} and "gradient_clipping" not in reference and "optimizer" not in reference
    reward = engine.inference_deepspeed_config(spec, "reward")
    assert (reward["train_batch_size"], reward["fp16"], "bf16" in reward) == (4, {"enabled": False}, False)
    assert spec.model_configs.reference.trainer_config.deepspeed_config == stage3  # the spec's own dict is left alone


def test_an_inference_engine_without_deepspeed_runs_micro_batches_whole_and_refuses_zero_0_to_2():
    from rlhf_launch.runtime.engine import InferenceEngine

    module = torch.nn.Linear(3, 2)
    inference = InferenceEngine(module)
    batch = {"x": torch.randn(5, 3)}
    calls = []

    def forward(b):
        calls.append(b["x"].shape[0])
        return module(b["x"])

    assert (inference.engine, inference.lockstep) == (None, False)
    torch.testing.assert_close(inference.in_micro_batches(forward, batch, 2), module(batch["x"]).detach())
    assert calls == [2, 2, 1]
    with pytest.raises(ValueError, match="ZeRO stage 3"):
        InferenceEngine(module, {"zero_optimization": {"stage": 2}})


def _trained_deepspeed(role: str, dtype: str, ds: dict) -> dict:
    from tests.factory import layout

    return {**layout(critic=2), f"model_configs.{role}.torch_dtype": dtype,
            f"model_configs.{role}.trainer_config.parallel.data.mode": "deepspeed",
            f"model_configs.{role}.trainer_config.deepspeed_config": ds}


@pytest.mark.parametrize(("dtype", "expected"), [("bfloat16", {"bf16": {"enabled": True}}), ("float16", {"fp16": {"enabled": True}}),
                                                 ("float32", {})])
def test_a_trained_half_precision_model_gets_deepspeeds_fp32_master_weights(dtype, expected):
    """Without bf16/fp16 enabled DeepSpeed would apply Adam to the bf16 weights themselves, where updates
    of ~lr round away: the trained role's config gets the precision of its model, as a frozen one's does."""
    from rlhf_launch.runtime.engine import deepspeed_config
    from tests.factory import make_spec

    stage2 = {"zero_optimization": {"stage": 2}}
    spec = make_spec(_trained_deepspeed("critic", dtype, stage2))
    config = deepspeed_config(spec.model_configs.critic, spec.train_micro_batch("critic"), spec.train_minibatch("critic"))
    assert {k: config[k] for k in ("bf16", "fp16") if k in config} == expected
    assert spec.model_configs.critic.trainer_config.deepspeed_config == stage2  # the spec's own dict is left alone


def test_a_deepspeed_trainer_keeps_master_weights_for_half_parameters_whatever_the_spec_said():
    """torch_dtype 'auto' may load a bf16 checkpoint in bf16: the trainer enables the precision of the
    parameters it is given when the config names none."""
    from rlhf_launch.runtime.engine import with_model_precision

    stage2 = {"zero_optimization": {"stage": 2}}
    half = torch.nn.Linear(2, 2).to(torch.bfloat16)
    assert with_model_precision(stage2, half) == {**stage2, "bf16": {"enabled": True}}
    assert stage2 == {"zero_optimization": {"stage": 2}}
    assert with_model_precision(stage2, torch.nn.Linear(2, 2)) == stage2
    disabled = {**stage2, "fp16": {"enabled": False}}
    with pytest.raises(ValueError, match="no fp32 master weights"):
        with_model_precision(disabled, half)


@pytest.mark.parametrize("section", ["bf16", "fp16"])
def test_the_checks_refuse_a_trained_bf16_model_whose_deepspeed_config_disables_half_precision(section):
    from rlhf_launch.core.problems import SpecError
    from tests.factory import make_spec

    with pytest.raises(SpecError) as caught:
        make_spec(_trained_deepspeed("actor", "bfloat16", {"zero_optimization": {"stage": 2}, section: {"enabled": False}}))
    errors = {p.path: p.message for p in caught.value.errors}
    message = errors.get(f"model_configs.actor.trainer_config.deepspeed_config.{section}", "")
    assert "no fp32 master weights" in message and "\n" not in message, errors
