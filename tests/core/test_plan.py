"""The resource plan: GPU counts, packing onto nodes, rank layout and memory estimates."""

from __future__ import annotations

import json

import pytest

from rlhf_launch.core import memory
from rlhf_launch.core.model_shape import ModelShape, model_shape, params_from_name, shape_from_config
from rlhf_launch.core.plan import build_plan
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


def test_nine_gpus_on_8_gpu_nodes_take_8_plus_1():
    spec = sized_spec(SEVEN_B)
    spec.model_configs.critic.trainer_config.parallel.data.size = 1  # trainer: 9 GPUs on 8-GPU nodes
    plan = build_plan(spec)
    assert not [p for p in plan.problems if p.severity == "error"] and plan.components[0].ranks_per_node == [8, 1]


def test_generator_nodes_hold_whole_tensor_parallel_groups():
    spec = sized_spec(SEVEN_B_VLLM)
    spec.slurm.gpus_per_node = 4
    spec.model_configs.actor.generator_config.parallel.data.size = 3  # 6 GPUs: 4 + 2, no TP pair split
    assert build_plan(spec).components[2].ranks_per_node == [4, 2]
    spec.model_configs.actor.generator_config.parallel.data.size = 4  # 8 GPUs: 2 nodes x 4
    assert not build_plan(spec).problems


def test_reward_function_runs_on_the_reference_ranks():
    loaded = load(reward_function("rlhf_launch.runtime.rewards:vowel_ratio"))
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
    """Hand-computed, GB of an 8B model on 8 ranks: mixed precision keeps 2 bytes of weights, the 2 bytes of 16-bit
    gradients backward makes and DeepSpeed's fp32 gradient partition of 4, and 12 of optimizer states; ZeRO splits
    them (ZeRO-3 adds the gathered module's 16-bit weights and gradients, 2 + 2 bytes of its parameters)."""
    shape = ModelShape(8e9, 32, 4096, 4096, 32000, "test")
    # A separate generator: the actor's peak is then training alone, without a KV cache.
    spec = sized_spec(layout(actor=8, critic=8), **zero(stage, "actor"), **vllm_generator(), **{
        "train_config.actor_micro_bs": 1, "dataset_config.max_seq_len": 1024, "rollout_config.max_new_tokens": 1024,
        "repeater_config.actor_micro_bs": 1})
    m = memory.training(spec.model_configs.actor, shape, spec, micro=1, logits=False)
    gib = 1024**3
    gathered = 2 * (8e9 - 32000 * 4096) / 32 / 1e9
    expected = {0: (16, 48, 96), 1: (16, 20, 12), 2: (16, 20, 12), 3: (2 + gathered, 4 + gathered, 12)}[stage]
    assert (m.weights_gib * gib / 1e9, m.gradients_gib * gib / 1e9, m.optimizer_gib * gib / 1e9) == pytest.approx(expected)
    layer = 16 * 4096 + 2 * (2 * 4096 + 2 * 4096) + 8 * round(8 * 4096 / 3)  # 16-bit, gated MLP of 8/3 x hidden
    assert m.activations_gib * gib == pytest.approx(layer * 2048 * 1 * 33)  # every layer and one more for the backward
    assert m.phase == "training"


# 7B-like shape with 32 heads; a separate generator, so that the actor's peak is training alone.
SHAPE = ModelShape(7e9, 32, 4096, 4096, 32000, "test", heads=32)
TRAINING = {**layout(actor=8, critic=8), **zero(3, "actor"), **vllm_generator(), "train_config.actor_micro_bs": 2,
            "dataset_config.max_seq_len": 1024, "rollout_config.max_new_tokens": 1024, "repeater_config.actor_micro_bs": 2}
LAYER = memory.layer_bytes_per_token(SHAPE, "16bit")  # 16-bit bytes per token of one decoder layer


def _training_activations(**overrides) -> float:
    spec = sized_spec(TRAINING, **overrides)
    phases = memory.training_phases(spec.model_configs.actor, SHAPE, spec, micro=2, logits=False)
    return next(m for m in phases if m.phase == "training").activations_gib * 1024**3


def test_gradient_checkpointing_keeps_layer_inputs_and_two_layers():
    """Without recomputation every layer's activations and one more layer's for the backward's work; with full
    recomputation (Korthikanti et al. 2022) each layer's 2 x s x b x h input plus the layer being recomputed and
    the backward's."""
    s, b, h, layers = 2048, 2, 4096, 32
    plain = _training_activations()
    checkpointed = _training_activations(**{"model_configs.actor.trainer_config.gradient_checkpointing": True})
    assert plain == pytest.approx(LAYER * s * b * (layers + 1))
    assert checkpointed == pytest.approx(2 * s * b * h * layers + 2 * LAYER * s * b)
    assert plain / checkpointed > 8
    # Checkpointing the reference changes nothing: it only runs inference.
    spec = sized_spec(TRAINING, **{"model_configs.reference.trainer_config.gradient_checkpointing": True})
    plan_ref = memory.inference(spec.model_configs.reference, SHAPE, spec, micro=8, logits=False)
    spec = sized_spec(TRAINING)
    assert plan_ref == memory.inference(spec.model_configs.reference, SHAPE, spec, micro=8, logits=False)


def test_eager_attention_adds_the_score_matrices_of_every_head():
    """Eager attention materialises 5 x heads x s^2 x b bytes per layer (scores, softmax; Korthikanti eq. 1);
    sdpa and flash_attention_2 keep none of it."""
    s, b, h, heads, layers = 2048, 2, 4096, 32, 32
    sdpa = _training_activations()
    flash = _training_activations(**{"model_configs.actor.attn_implementation": "flash_attention_2"})
    eager = _training_activations(**{"model_configs.actor.attn_implementation": "eager"})
    assert sdpa == flash
    assert eager - sdpa == pytest.approx(5 * heads * s * s * b * (layers + 1))
    both = _training_activations(**{"model_configs.actor.attn_implementation": "eager",
                                    "model_configs.actor.trainer_config.gradient_checkpointing": True})
    assert both == pytest.approx(2 * s * b * h * layers + 2 * (LAYER * s * b + 5 * heads * s * s * b))
    # Inference holds one layer at a time, scores included under eager.
    spec = sized_spec(TRAINING, **{"model_configs.reward.attn_implementation": "eager"})
    reward = memory.inference(spec.model_configs.reward, SHAPE, spec, micro=2, logits=False).activations_gib * 1024**3
    assert reward == pytest.approx(memory.inference_layer_bytes_per_token(SHAPE, "16bit") * s * b + 5 * heads * s * s * b)


def test_float32_activations_take_their_own_count_and_the_trainer_level_dtype_wins():
    bf16 = _training_activations()
    fp32 = memory.layer_bytes_per_token(SHAPE, "fp32") * 2048 * 2 * 33
    assert _training_activations(**{"model_configs.actor.torch_dtype": "float32"}) == pytest.approx(fp32)
    assert 1.8 * bf16 < fp32 < 2 * bf16  # the fp32 RMSNorm input is there in both
    # XTuner's place for the dtype wins over the model-level one.
    assert _training_activations(**{"model_configs.actor.trainer_config.torch_dtype": "float32"}) == pytest.approx(fp32)


def test_checkpointing_brings_a_long_sequence_layout_under_the_gpu():
    """The plan's memory warning for 4k-token sequences in micro batches of 8 goes away with checkpointing."""
    long = {**SEVEN_B_VLLM, "dataset_config.max_seq_len": 2048, "rollout_config.max_new_tokens": 2048,
            "train_config.actor_micro_bs": 8, "train_config.critic_micro_bs": 8}

    def over(overrides) -> list[str]:
        """The trained roles whose estimate exceeds the GPU (the generator's KV cache is another matter)."""
        roles = [p.message.split(":")[0] for p in load_sized(overrides, params_b=7).warnings if "estimated peak" in p.message]
        return sorted(r for r in roles if r in ("actor", "critic"))

    assert over(long) == ["actor", "critic"]
    checkpointed = {**long, **{f"model_configs.{r}.trainer_config.gradient_checkpointing": True for r in ("actor", "critic")}}
    assert over(checkpointed) == []


def _plain_packing(gpus: int, per_node: int) -> list[int]:
    """Full nodes first, the rest on the last, counted one rank at a time."""
    counts: list[int] = []
    for _ in range(gpus):
        if not counts or counts[-1] == per_node:
            counts.append(0)
        counts[-1] += 1
    return counts


ONE_ROW_MICRO_BATCHES = {"train_config.actor_micro_bs": 1, "train_config.critic_micro_bs": 1}  # any data size divides the batches


@pytest.mark.parametrize("actor, critic, per_node", [(12, 8, 8), (4, 1, 2), (8, 1, 8), (6, 1, 4)])
def test_a_component_that_does_not_split_evenly_fills_nodes_in_order(actor, critic, per_node):
    loaded = load_sized({**layout(actor=actor, critic=critic), **ONE_ROW_MICRO_BATCHES, "slurm.gpus_per_node": per_node})
    trainer = loaded.plan.components[0]
    gpus = actor + critic
    assert trainer.ranks_per_node == _plain_packing(gpus, per_node) and sum(trainer.ranks_per_node) == gpus
    assert not trainer.even and trainer.gpus_per_node == per_node and trainer.nodes == len(trainer.ranks_per_node)
    # each role's nodes are those its ranks land on, rank by rank
    for role in ("actor", "critic"):
        r = loaded.plan.role(role)
        assert r.nodes == sorted({(rank - trainer.first_rank) // per_node + trainer.first_node for rank in r.ranks})
    assert loaded.plan.components[1].first_node == trainer.nodes


def test_an_even_split_stays_equal_nodes():
    plan = load_sized({**layout(actor=6, critic=6), **ONE_ROW_MICRO_BATCHES}).plan  # 12 GPUs on 8-GPU nodes
    assert plan.components[0].ranks_per_node == [6, 6] and plan.components[0].even


def test_uneven_generator_nodes_hold_whole_tensor_parallel_groups():
    spec = sized_spec(SEVEN_B_VLLM)
    spec.slurm.gpus_per_node = 3
    spec.model_configs.actor.generator_config.parallel.data.size = 3  # 6 GPUs in pairs on 3-GPU nodes: 2 + 2 + 2
    assert build_plan(spec).components[2].ranks_per_node == [2, 2, 2]
    spec.slurm.gpus_per_node = 4
    spec.model_configs.actor.generator_config.parallel.data.size = 5  # 10 GPUs: 4 + 4 + 2
    assert build_plan(spec).components[2].ranks_per_node == [4, 4, 2]


def test_the_plan_table_shows_an_uneven_component_node_by_node():
    from rlhf_launch.frontend.show_plan import plan_table

    spec = sized_spec(SEVEN_B)
    spec.model_configs.critic.trainer_config.parallel.data.size = 1  # trainer: 9 GPUs on 8-GPU nodes
    uneven = plan_table(build_plan(spec), spec.slurm.gpu_memory_gb)
    assert "component 0 (trainer): 8 + 1 ranks on 2 nodes" in uneven
    even = plan_table(build_plan(sized_spec(SEVEN_B)), 80)
    assert "component 0 (trainer): 2 node(s) x 8 GPUs" in even


def _frozen_zero3(*roles: str) -> dict:
    return {f"model_configs.{role}.trainer_config.{key}": value for role in roles
            for key, value in (("parallel.data.mode", "deepspeed"), ("deepspeed_config", {"zero_optimization": {"stage": 3}}))}


@pytest.mark.parametrize("data", [2, 4])
def test_zero3_inference_keeps_a_share_of_the_weights_plus_the_gathered_layer(data):
    """Hand-computed: 2 bytes x (params / data + the largest module a forward gathers whole), here a
    decoder layer of (params - one embedding) / layers; activations are those of the whole model."""
    shape = ModelShape(20e9, 48, 6144, 1024, 32000, "test", heads=48)
    sizes = layout(reference=data, reward=data)
    whole = sized_spec(sizes, params_b=20)
    sharded = sized_spec({**sizes, **_frozen_zero3("reference", "reward")}, params_b=20)
    layer = (20e9 - 32000 * 6144) / 48
    assert memory.gathered_params(shape) == pytest.approx(layer)
    for role, micro, logits in (("reference", 8, True), ("reward", 32, False)):
        a = memory.inference(whole.model_configs.roles()[role], shape, whole, micro, logits)
        b = memory.inference(sharded.model_configs.roles()[role], shape, sharded, micro, logits)
        assert a.weights_gib * 1024**3 == pytest.approx(2 * 20e9)
        assert b.weights_gib * 1024**3 == pytest.approx(2 * (20e9 / data + layer))
        assert 0.9 * data < a.weights_gib / b.weights_gib < data
        assert b.activations_gib == a.activations_gib
    # InternLM2-20B's 92544 x 6144 embedding is larger than any of its layers: that is what is gathered.
    assert memory.gathered_params(ModelShape(20e9, 48, 6144, 1024, 92544, "test")) == 92544 * 6144


def test_a_20b_reference_and_reward_fit_40_gib_gpus_only_sharded():
    """The plan (and so --dry-run) warns that whole 20B bf16 models overflow 40 GiB GPUs; sharded over two
    ranks by ZeRO-3 they fit, and the table shows the estimate."""
    from rlhf_launch.frontend.show_plan import plan_table

    sizes = {**layout(reference=2, reward=2), "slurm.gpu_memory_gb": 40}
    whole = load_sized(sizes, params_b=20)
    sharded = load_sized({**sizes, **_frozen_zero3("reference", "reward")}, params_b=20)
    warned = lambda loaded: {p.path for p in loaded.warnings if "estimated peak" in p.message}  # noqa: E731
    assert {"model_configs.reference", "model_configs.reward"} <= warned(whole)
    assert not {"model_configs.reference", "model_configs.reward"} & warned(sharded)
    for role in ("reference", "reward"):
        assert sharded.plan.role(role).memory.weights_gib < 0.55 * whole.plan.role(role).memory.weights_gib
    table = plan_table(sharded.plan, 40)
    assert f"{sharded.plan.role('reference').memory.total_gib:.1f}" in table
