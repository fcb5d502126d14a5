"""Gradient checkpointing (trainer_config.gradient_checkpointing) of models kept in eval mode: the
decoder layers are really recomputed in the backward pass, the gradients are those of a plain
backward, and forwards without grad (rollout log-probs, generation) are left alone."""

from __future__ import annotations

import datetime
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from rlhf_launch.core.config import TrainKwargs
from rlhf_launch.runtime import ppo
from rlhf_launch.runtime.cluster import SingleProcess
from rlhf_launch.runtime.engine import TorchTrainer
from rlhf_launch.runtime.models import PolicyModule, ValueModule, enable_gradient_checkpointing, load_causal_lm, load_value_model
from rlhf_launch.runtime.roles.common import make_trainer
from rlhf_launch.runtime.rollout import SamplingSettings, hf_generate
from tests.factory import leave_rank, make_spec, served_store
from tests.runtime.test_models import PROMPTS, RESPONSES, left_padded_batch

CPU = torch.device("cpu")
torch.set_num_threads(1)


def _module(tiny_models, kind: str, dtype: str = "float32"):
    if kind == "policy":
        return PolicyModule(load_causal_lm(str(tiny_models / "actor"), dtype, CPU))
    return ValueModule(load_value_model(str(tiny_models / "critic"), dtype, CPU, pad_token_id=0, role="critic"))


def _loss(module, batch) -> torch.Tensor:
    """A loss over the response tokens of a rollout-shaped batch (left-padded prompts, right-padded responses)."""
    input_ids, attention_mask, response_ids, response_mask = batch
    out = module(input_ids, attention_mask, response_ids.shape[1])
    per_token = ppo.logprobs_from_logits(out, response_ids) if out.dim() == 3 else out
    return (per_token * response_mask).sum() / response_mask.sum()


def _layer_calls(module) -> list[bool]:
    """Records each run of the first decoder layer (whether grad was on): a pre-hook fires in the forward
    and again for each recomputation, before the layer does any work."""
    calls: list[bool] = []
    module.model.base_model.layers[0].register_forward_pre_hook(lambda *_: calls.append(torch.is_grad_enabled()))
    return calls


@pytest.mark.parametrize("kind", ["policy", "value"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_checkpointed_gradients_equal_plain_ones(tiny_models, kind, dtype):
    """Through the trainer as the roles use it: bf16 models train as fp32 masters under bf16 autocast, which
    the recomputation must repeat exactly."""
    batch = left_padded_batch(PROMPTS, RESPONSES, pad=0)
    grads = []
    for checkpointing in (False, True):
        module = _module(tiny_models, kind, dtype)
        if checkpointing:
            assert enable_gradient_checkpointing(module) == 2  # both decoder layers of the tiny model
        trainer = TorchTrainer(module, TrainKwargs(lr=1e-3))
        trainer.backward(_loss(trainer.module, batch))
        grads.append({name: p.grad.clone() for name, p in module.named_parameters() if p.grad is not None})
    plain, checkpointed = grads
    assert set(plain) == set(checkpointed) and len(plain) > 10
    for name, grad in plain.items():
        assert grad.abs().max() > 0, name
        torch.testing.assert_close(checkpointed[name], grad, rtol=0, atol=1e-6, msg=name)


@pytest.mark.parametrize("kind", ["policy", "value"])
def test_layers_are_recomputed_in_the_backward_pass_of_an_eval_mode_model(tiny_models, kind):
    """Hugging Face checkpoints only layers in training mode; these models stay in eval mode (dropout off),
    so without the module's own switch the backward would silently keep every activation."""
    batch = left_padded_batch(PROMPTS, RESPONSES, pad=0)
    module = _module(tiny_models, kind)
    enable_gradient_checkpointing(module)
    calls = _layer_calls(module)
    loss = _loss(module, batch)
    assert calls == [True]
    loss.backward()
    assert calls == [True, True]  # run again, for its activations, during the backward pass
    assert not any(m.training for m in module.model.modules())  # nothing left in training mode afterwards

    plain = _module(tiny_models, kind)
    plain_calls = _layer_calls(plain)
    _loss(plain, batch).backward()
    assert plain_calls == [True]


def test_checkpointing_keeps_less_for_the_backward_pass(tiny_models):
    """What autograd holds between forward and backward, measured: with checkpointing only the layers'
    inputs are kept (the checkpoint's own hooks take the layers' saved tensors over)."""
    batch = left_padded_batch(PROMPTS, RESPONSES, pad=0)

    def saved_bytes(module) -> int:
        total = 0

        def pack(t: torch.Tensor):
            nonlocal total
            total += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            _loss(module, batch)
        return total

    plain = saved_bytes(_module(tiny_models, "policy"))
    module = _module(tiny_models, "policy")
    enable_gradient_checkpointing(module)
    assert saved_bytes(module) < 0.6 * plain


def test_inference_and_generation_are_not_checkpointed(tiny_models):
    """Without grad nothing is recomputed and the KV cache stays on: a checkpointing layer would drop it."""
    batch = left_padded_batch(PROMPTS, RESPONSES, pad=0)
    plain, module = _module(tiny_models, "policy"), _module(tiny_models, "policy")
    enable_gradient_checkpointing(module)
    calls = _layer_calls(module)
    with torch.no_grad():
        torch.testing.assert_close(module(*batch[:2], batch[2].shape[1]), plain(*batch[:2], batch[2].shape[1]), rtol=0, atol=0)
    assert calls == [False]

    spec = make_spec(**{"rollout_config.generate_kwargs.do_sample": False, "rollout_config.max_new_tokens": 6})
    settings = SamplingSettings.from_spec(spec, eos_id=2, pad_id=0)
    prompt_ids, prompt_mask = batch[0][:, :6], batch[1][:, :6]

    def generate(model):
        with torch.no_grad():
            return hf_generate(model, prompt_ids, prompt_mask, settings, 3, 0, lambda row: row)["response_ids"]

    assert torch.equal(generate(module.model), generate(plain.model))


def test_the_spec_key_turns_checkpointing_on_for_trained_roles_only(tiny_models):
    spec = make_spec(**{"model_configs.actor.trainer_config.gradient_checkpointing": True})
    actor = _module(tiny_models, "policy")
    make_trainer(spec, "actor", actor, SingleProcess(), CPU)
    assert actor.checkpointing
    critic = _module(tiny_models, "value")
    make_trainer(spec, "critic", critic, SingleProcess(), CPU)
    assert not critic.checkpointing


# --------------------------------------------------------------------------- DDP and DeepSpeed
ZERO3 = {
    "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "train_batch_size": 4, "steps_per_print": 10**9,
    "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},  # every parameter partitioned
}


def _rank_grads(rank: int, port: int, mode: str, model_dir: str, out: str) -> None:
    """One rank of two: the gradient of the same loss, averaged over the ranks, without and with checkpointing."""
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    store = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=datetime.timedelta(seconds=120))
    dist.init_process_group("gloo", store=dist.PrefixStore("actor", store), rank=rank, world_size=2)
    from rlhf_launch.runtime.engine import DeepSpeedTrainer

    ids, mask, response_ids, response_mask = left_padded_batch(PROMPTS[:2], RESPONSES[:2], pad=0)
    mine = tuple(t[rank : rank + 1] for t in (ids, mask, response_ids, response_mask))  # each rank its own row
    result = {}
    for checkpointing in (False, True):
        model = load_causal_lm(model_dir, "float32", CPU, ZERO3 if mode == "zero3" else None)
        module = PolicyModule(model)
        if checkpointing:
            enable_gradient_checkpointing(module)
        calls = _layer_calls(module)
        if mode == "zero3":
            import deepspeed

            trainer = DeepSpeedTrainer(module, TrainKwargs(lr=1e-3), ZERO3)
            trainer.engine.backward(_loss(trainer.module, mine))  # no step: the gradients are read before any update
            grads = {n: deepspeed.utils.safe_get_full_grad(p).clone() for n, p in trainer.inner.named_parameters()}
        else:
            trainer = TorchTrainer(module, TrainKwargs(lr=1e-3), group=dist.group.WORLD, device=CPU)
            trainer.backward(_loss(trainer.module, mine))
            grads = {n: p.grad.clone() for n, p in module.named_parameters()}
        result[checkpointing] = {"grads": grads, "calls": len(calls)}
    if rank == 0:
        torch.save(result, out)
    dist.barrier()
    dist.destroy_process_group()
    leave_rank()


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ddp", "zero3"])
def test_checkpointing_under_ddp_and_zero3_gives_the_same_gradients(tiny_models, tmp_path, mode):
    out = str(tmp_path / "grads.pt")
    with served_store() as port:
        mp.spawn(_rank_grads, args=(port, mode, str(tiny_models / "actor"), out), nprocs=2, join=True)
    result = torch.load(out)
    assert result[False]["calls"] == 1 and result[True]["calls"] == 2  # recomputed under DDP and DeepSpeed alike
    plain, checkpointed = result[False]["grads"], result[True]["grads"]
    assert set(plain) == set(checkpointed)
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, rtol=0, atol=1e-6, msg=name)


@pytest.mark.slow
def test_a_run_with_checkpointing_equals_one_without(tiny_models, tmp_path):
    """End to end, one process: activation checkpointing of actor and critic changes memory, not the run."""
    from tests.factory import assert_runs_agree

    on = {f"model_configs.{role}.trainer_config.gradient_checkpointing": True for role in ("actor", "critic")}
    assert_runs_agree(tmp_path, on, ("reward_mean", "kl", "policy_loss", "value_loss", "entropy", "response_len_mean"), tol=1e-6)
