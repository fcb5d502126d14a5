"""The resource plan: GPU counts, packing onto nodes, rank layout and memory estimates."""

from __future__ import annotations

import json

import pytest

from rlhf.core import memory
from rlhf.core.model_shape import ModelShape, model_shape, params_from_name, shape_from_config
from rlhf.core.plan import build_plan
from tests.factory import layout, load, load_sized, reward_function, sized_spec, vllm_generator, zero

# The layout of a 7B job: actor and critic on 8 GPUs each under ZeRO-3 (which fits them on 80 GiB GPUs),
# reference and reward on 2.
SEVEN_B = {**layout(actor=8, critic=8, reference=2, reward=2), **zero(3)}
SEVEN_B_VLLM = {**SEVEN_B, **vllm_generator(data=1, tensor=2)}


def test_separate_vllm_generator_needs_22_gpus_in_three_components():
    plan = load_sized(SEVEN_B_VLLM).plan
    assert plan.total_gpus == 22
    gpus = {r.name: r.gpus for r in plan.roles}
    assert gpus == {"actor": 8, "critic": 8, "reference": 2, "reward": 2, "generator": 2}
    comps = [(c.name, c.roles, c.nodes, c.gpus_per_node) for c in plan.components]
    assert comps == [
        ("trainer", ["actor", "critic"], 2, 8),
        ("inference", ["reference", "reward"], 1, 4),
        ("generator", ["generator"], 1, 2),
    ]
    assert plan.total_nodes == 4
    assert plan.role("critic").nodes == [1] and plan.role("generator").nodes == [3]


def test_shared_generator_adds_no_gpus():
    plan = load_sized(SEVEN_B).plan
    assert plan.total_gpus == 20
    gen = plan.role("generator")
    assert gen.gpus == 0 and gen.shared_with == "actor" and gen.component == plan.role("actor").component


def test_every_rank_has_exactly_one_role():
    plan = load_sized(SEVEN_B_VLLM).plan
    seen = [plan.role_of_rank(r) for r in range(plan.world_size)]
    assert seen[0] == ("actor", 0) and seen[8] == ("critic", 0) and seen[16] == ("reference", 0)
    assert seen[18] == ("reward", 0) and seen[21] == ("generator", 1)
    for role in plan.roles:
        assert [s for s in seen if s[0] == role.name] == [(role.name, i) for i in range(role.gpus)]
    with pytest.raises(ValueError):
        plan.role_of_rank(22)


def test_components_that_cannot_be_packed_evenly_are_errors():
    spec = sized_spec(SEVEN_B)
    spec.model_configs.critic.trainer_config.parallel.data.size = 1  # trainer: 9 GPUs on 8-GPU nodes
    plan = build_plan(spec)
    assert any(p.path == "slurm.gpus_per_node" and "9 GPUs" in p.message for p in plan.problems)


def test_generator_nodes_hold_whole_tensor_parallel_groups():
    spec = sized_spec(SEVEN_B_VLLM)
    spec.slurm.gpus_per_node = 4
    spec.model_configs.actor.generator_config.parallel.data.size = 3  # 6 GPUs: 2 nodes x 3 splits a TP pair
    assert any("tensor-parallel" in p.message for p in build_plan(spec).problems)
    spec.model_configs.actor.generator_config.parallel.data.size = 4  # 8 GPUs: 2 nodes x 4
    assert not build_plan(spec).problems


def test_reward_function_runs_on_the_reference_ranks():
    loaded = load(reward_function("rlhf.rewards:vowel_ratio"))
    reward = loaded.plan.role("reward")
    assert reward.gpus == 0 and reward.shared_with == "reference"
    assert loaded.plan.total_gpus == 3


@pytest.mark.parametrize(
    "name, params",
    [("internlm/internlm2-chat-1_8b-sft", 1.8e9), ("OpenLLMAI/Llama-2-7b-rm-anthropic_hh-lmsys-oasst-webgpt", 7e9),
     ("HuggingFaceTB/SmolLM2-135M-Instruct", 135e6), ("meta-llama/Llama-3.1-70B", 70e9), ("gpt2", None)],
)
def test_sizes_read_from_names(name, params):
    assert params_from_name(name) == (pytest.approx(params) if params else None)


def test_parameter_count_from_config_matches_the_real_model():
    torch = pytest.importorskip("torch")
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=1000, hidden_size=64, intermediate_size=160, num_hidden_layers=3, num_attention_heads=4,
                      num_key_value_heads=2, tie_word_embeddings=False)
    with torch.device("meta"):
        real = sum(p.numel() for p in LlamaForCausalLM(cfg).parameters())
    assert shape_from_config(cfg.to_dict(), "config.json").params == real


def test_local_config_json_is_read(tmp_path):
    config = {"hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32, "intermediate_size": 11008, "vocab_size": 32000}
    (tmp_path / "config.json").write_text(json.dumps(config))
    shape = model_shape(str(tmp_path), None)
    assert shape.source == "config.json" and 6.5e9 < shape.params < 6.9e9  # LLaMA-2 7B: 6.74e9


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_training_memory_by_zero_stage(stage):
    """Hand-computed: mixed precision keeps 2 + 2 + 12 bytes per parameter, ZeRO splits them."""
    shape = ModelShape(8e9, 32, 4096, 4096, 32000, "test")
    # A separate generator: the actor's peak is then training alone, without a KV cache.
    spec = sized_spec(layout(actor=8, critic=8), **zero(stage, "actor"), **vllm_generator(), **{
        "train_config.actor_micro_bs": 1, "dataset_config.max_seq_len": 1024, "rollout_config.max_new_tokens": 1024})
    m = memory.training(spec.model_configs.actor, shape, spec, micro=1, logits=False)
    gib = 1024**3
    expected = {0: (16, 16, 96), 1: (16, 16, 12), 2: (16, 2, 12), 3: (2, 2, 12)}[stage]
    assert (m.weights_gib * gib / 1e9, m.gradients_gib * gib / 1e9, m.optimizer_gib * gib / 1e9) == pytest.approx(expected)
    assert m.activations_gib * gib == pytest.approx(34 * 2048 * 1 * 4096 * 32 * 2)


def test_kv_cache_of_a_vllm_generator():
    shape = ModelShape(7e9, 32, 4096, 4096, 32000, "test")
    spec = sized_spec(vllm_generator(data=1, tensor=2), **{
        "dataset_config.num_samples_each_epoch": 64, "dataset_config.max_seq_len": 1024, "rollout_config.max_new_tokens": 1024,
        "model_configs.actor.torch_dtype": "bfloat16"})
    m = memory.generator(spec.model_configs.actor, shape, spec)
    per_token = 2 * 32 * 4096 * 2
    assert m.kv_cache_gib * 1024**3 == pytest.approx(per_token * 2048 * 64 / 2)
    assert m.weights_gib * 1024**3 == pytest.approx(7e9 * 2 / 2)


def test_memory_over_the_gpu_is_a_warning_with_advice():
    loaded = load_sized(SEVEN_B, params_b=7, **{"slurm.gpu_memory_gb": 24})
    warnings = [p.message for p in loaded.warnings]
    assert any("actor: estimated peak" in w and "exceeds the 24 GiB" in w for w in warnings)


def test_plan_json_has_the_documented_fields():
    data = load_sized(SEVEN_B_VLLM).plan.to_json()
    assert {"total_gpus", "total_nodes", "roles", "components"} <= set(data)
    assert {"name", "gpus", "data", "tensor", "pipeline", "component"} <= set(data["roles"][0])
    assert {"index", "nodes", "gpus_per_node", "roles"} <= set(data["components"][0])


def test_plan_table_shows_tiny_estimates_without_an_empty_breakdown(tiny_models):
    from launcher.show_plan import plan_table

    tiny = plan_table(load().plan, 80)
    assert "< 0.1" in tiny and "()" not in tiny
    large = plan_table(load_sized(SEVEN_B, params_b=7).plan, 80)
    assert "(weights " in large
