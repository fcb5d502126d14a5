"""The memory plan against DeepSpeed's own estimator, and what it counts besides the model states: DeepSpeed's
buckets, the logits' fp32 copies, the CUDA context and communicators, and vLLM's headroom."""

from __future__ import annotations

import contextlib
import io
import re

import pytest

from rlhf_launch.core import memory
from rlhf_launch.core.model_shape import ModelShape, model_shape, shape_from_config, vocab_from_name
from rlhf_launch.frontend.spec import load_spec
from tests.conftest import ROOT
from tests.factory import layout, load_sized, sized_spec, vllm_generator, zero

LLAMA2_7B = {"hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32,
             "intermediate_size": 11008, "vocab_size": 32000, "model_type": "llama"}
# InternLM2-7B's dimensions (its own model type; the same decoder as Llama with grouped KV heads)
INTERNLM2_7B = {"hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
                "intermediate_size": 14336, "vocab_size": 92544, "model_type": "llama"}
LLAMA2_70B = {"hidden_size": 8192, "num_hidden_layers": 80, "num_attention_heads": 64, "num_key_value_heads": 8,
              "intermediate_size": 28672, "vocab_size": 32000, "model_type": "llama"}


def _deepspeed_counts(config: dict) -> tuple[int, int]:
    """(total parameters, largest layer's parameters) as DeepSpeed's model_to_params counts them, of the model built
    without memory (meta tensors, whose data pointers are all 0: tied weights are told apart by identity instead)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config))
    total = sum({id(p): p.numel() for p in model.parameters()}.values())
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    return total, largest


def test_the_parameter_counts_are_the_ones_the_live_estimator_reads():
    """On a model with real weights, ``estimate_zero3_model_states_mem_needs_all_live`` prints the figure that
    ``estimate_zero3_model_states_mem_needs`` gives for the counts of ``_deepspeed_counts``."""
    stage3 = pytest.importorskip("deepspeed.runtime.zero.stage3")
    transformers = pytest.importorskip("transformers")
    config = {**LLAMA2_7B, "hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 4}
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        stage3.estimate_zero3_model_states_mem_needs_all_live(transformers.LlamaForCausalLM(transformers.LlamaConfig(**config)),
                                                              num_gpus_per_node=8)
    line = next(x for x in printed.getvalue().splitlines() if "offload_param=none, offload_optimizer=none, zero_init=1" in x)
    live_gib = float(re.search(r"\|\s*([\d.]+)GB", line).group(1))
    total, largest = _deepspeed_counts(config)
    _, gpu, _ = stage3.estimate_zero3_model_states_mem_needs(total, largest, num_gpus_per_node=8, cpu_offload=False,
                                                             cpu_offload_params=False, zero_init=True)
    assert live_gib == pytest.approx(gpu / 2**30, abs=0.006)


def _seed_actor(spec_file: str):
    return load_spec(ROOT / "specs" / spec_file).spec.model_configs.actor


@pytest.mark.parametrize("label, config, actor, gpus", [
    ("internlm2 7B, specs/internlm2_7b.yaml", INTERNLM2_7B, lambda: _seed_actor("internlm2_7b.yaml"), (8, 1)),
    ("llama2 7B, specs/llama2_7b.yaml", LLAMA2_7B, lambda: _seed_actor("llama2_7b.yaml"), (8, 1)),
    ("llama2 70B on 4 nodes", LLAMA2_70B, lambda: sized_spec({**layout(actor=32, critic=32), **zero(3)}, params_b=70).model_configs.actor,
     (8, 4)),
])
def test_zero3_model_states_match_deepspeeds_estimator(label, config, actor, gpus):
    """Weights, gradients and optimizer states of a ZeRO-3 bf16 rank within 10 % of DeepSpeed's estimate (18 bytes
    per parameter over the ranks and 4 per parameter of the largest layer)."""
    stage3 = pytest.importorskip("deepspeed.runtime.zero.stage3")
    model = actor()
    per_node, nodes = gpus
    assert model.trainer_config.parallel.data.size == per_node * nodes and memory.zero_stage(model) == 3
    total, largest = _deepspeed_counts(config)
    _, deepspeed, _ = stage3.estimate_zero3_model_states_mem_needs(total, largest, num_gpus_per_node=per_node, num_nodes=nodes,
                                                                   cpu_offload=False, cpu_offload_params=False, zero_init=True)
    shape = shape_from_config(config, "config.json")
    assert shape.params == total
    weights, grads, optim = memory.model_states(model, shape)
    planned = weights + grads + optim
    print(f"{label}: planned {planned / 2**30:.2f} GiB, DeepSpeed {deepspeed / 2**30:.2f} GiB")
    assert planned == pytest.approx(deepspeed, rel=0.1)
    assert grads > 4 * total / (per_node * nodes)  # the fp32 gradient partition, not 2 bytes


def test_the_buckets_come_from_the_deepspeed_config_or_its_defaults():
    spec = sized_spec({**layout(actor=8, critic=8), **zero(3)})
    actor = spec.model_configs.actor
    assert memory.zero_buffers(actor, trained=True) == 2 * (5e8 + 5e7)
    assert memory.zero_buffers(actor, trained=False) == 2 * 5e7
    actor.trainer_config.deepspeed_config["zero_optimization"].update(reduce_bucket_size=1e8, stage3_prefetch_bucket_size="auto")
    assert memory.zero_buffers(actor, trained=True) == 2 * (1e8 + 5e7)
    assert memory.zero_buffers(sized_spec(layout()).model_configs.actor, trained=True) == 0  # no DeepSpeed, no buckets


def test_the_logits_keep_their_fp32_copies_and_the_entropys():
    """29 bytes per response token and vocabulary entry while the actor trains, 10 in an inference forward."""
    spec = sized_spec({**layout(actor=8, critic=8), **zero(3), **vllm_generator(), "repeater_config.actor_micro_bs": 2})
    shape = ModelShape(7e9, 32, 4096, 4096, 32000, "test")
    phases = {m.phase: m for m in memory.training_phases(spec.model_configs.actor, shape, spec, 2, logits=True)}
    responses = 2 * (spec.rollout_config.max_new_tokens + 1)
    assert phases["training"].logits_gib * memory.GIB == pytest.approx(29 * 32000 * responses)
    reference = memory.inference(spec.model_configs.reference, shape, spec, 8, logits=True)
    assert reference.logits_gib * memory.GIB == pytest.approx(10 * 32000 * 4 * responses)
    critic = memory.training(spec.model_configs.critic, shape, spec, 2, logits=False)
    assert critic.logits_gib == 0


def test_overhead_counts_the_context_and_every_communicator():
    vllm = load_sized({**layout(actor=8, critic=8), **zero(3), **vllm_generator(tensor=2)}).plan
    shared = load_sized({**layout(actor=8, critic=8), **zero(3)}).plan
    context, comm = memory.CUDA_CONTEXT_GIB, memory.NCCL_COMMUNICATOR_GIB
    assert vllm.role("actor").memory.overhead_gib == context + 3 * comm  # role, global, weight sync
    assert shared.role("actor").memory.overhead_gib == context + 2 * comm
    assert vllm.role("generator").memory.overhead_gib == context + 4 * comm  # engine, global, weight sync, tensor parallel
    assert vllm.role("reference").memory.overhead_gib == context + 2 * comm


def _vllm_warnings(util: float, tensor: int = 2, gpu: float = 80) -> list[str]:
    loaded = load_sized({**layout(actor=8, critic=8), **zero(3), **vllm_generator(tensor=tensor), "slurm.gpu_memory_gb": gpu,
                         "model_configs.actor.generator_config.gpu_memory_utilization": util})
    return [p.message for p in loaded.warnings if p.path == "model_configs.actor.generator_config.gpu_memory_utilization"]


def test_vllm_needs_headroom_outside_what_it_takes():
    """vLLM takes util x memory whole: the rest must hold the context, the communicators, two weight-sync chunks and
    a layer being reloaded; its KV cache is not compared with the pool (a share that does not fit runs in waves)."""
    assert _vllm_warnings(0.9) == []
    too_greedy = _vllm_warnings(0.98)
    assert len(too_greedy) == 1 and "found 0.98" in too_greedy[0] and "use at most 0.9" in too_greedy[0], too_greedy
    shape = model_shape("tests-factory/policy", 7)
    spec = sized_spec({**layout(actor=8, critic=8), **zero(3), **vllm_generator(tensor=2)})
    estimate = memory.generator(spec.model_configs.actor, shape, spec, 4)
    chunk = 2 * memory.gathered_params(shape)
    assert memory.vllm_headroom_gib(estimate) * memory.GIB == pytest.approx(
        (memory.CUDA_CONTEXT_GIB + 4 * memory.NCCL_COMMUNICATOR_GIB) * memory.GIB + 2 * chunk + chunk / 2)
    # Half of a 7B model per rank (6.5 GiB) leaves no room for any KV cache in half of a 12 GiB GPU.
    assert any("cannot hold the weights" in w for w in _vllm_warnings(0.5, gpu=12))


def test_names_give_the_vocabulary_of_their_family():
    assert vocab_from_name("internlm/internlm2-chat-7b-sft") == 92544
    assert vocab_from_name("meta-llama/Llama-3.1-70B") == 128256
    assert vocab_from_name("OpenLLMAI/Llama-2-7b-rm-anthropic_hh-lmsys-oasst-webgpt") == 32000
    assert model_shape("internlm/internlm2-chat-7b-sft", None).vocab == 92544


def test_the_seed_plan_shows_the_corrected_memory_and_flags_micro_batch_4():
    """specs/internlm2_7b.yaml with InternLM2-7B's real dimensions (as the pre-flight reads them from the cached
    config): the actor's training peak is about 51 GiB at micro batch 2, and micro batch 4 no longer fits 80 GiB."""
    spec = load_spec(ROOT / "specs" / "internlm2_7b.yaml").spec
    shape = shape_from_config(INTERNLM2_7B, "config.json")
    phases = {m.phase: m.total_gib for m in memory.training_phases(spec.model_configs.actor, shape, spec, 2, logits=True)}
    assert 48 < phases["training"] < 56
    assert memory.training_phases(spec.model_configs.actor, shape, spec, 4, logits=True)[0].total_gib > spec.slurm.gpu_memory_gb
