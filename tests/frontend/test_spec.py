"""Loading and validating specs: every problem at once, one precise line each."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import yaml

from rlhf_launch.core.problems import SpecError
from rlhf_launch.frontend.spec import load_spec
from tests.conftest import ROOT, SPECS
from tests.factory import load

BASE = yaml.safe_load((ROOT / "specs" / "internlm2_1_8b.yaml").read_text())


def write(tmp_path: Path, data, name="spec.yaml") -> Path:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data, sort_keys=False))
    return path


def problems(tmp_path: Path, data, overrides=(), settings=None) -> list[str]:
    with pytest.raises(SpecError) as info:
        load_spec(write(tmp_path, data), overrides, settings)
    return [p.format("spec.yaml") for p in info.value.problems]


def errors(tmp_path, data, **kw) -> list[str]:
    return [line for line in problems(tmp_path, data, **kw) if " warning: " not in line]


def edit(**paths):
    data = copy.deepcopy(BASE)
    for dotted, value in paths.items():
        node = data
        *parents, last = dotted.split("__")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    return data


@pytest.mark.parametrize("spec_file", SPECS, ids=lambda p: p.name)
def test_shipped_specs_load(spec_file):
    loaded = load_spec(spec_file)
    assert loaded.plan.total_gpus > 0


def test_unknown_key_suggests_the_closest(tmp_path):
    data = edit(repeater_config__kl_coef=0.1)
    (line,) = errors(tmp_path, data)
    assert "repeater_config.kl_coef: unknown key (did you mean 'kl_coeff'?)" in line


def test_unknown_key_without_close_match_lists_the_keys(tmp_path):
    (line,) = errors(tmp_path, edit(run__zzz=1))
    assert "run.zzz: unknown key; expected one of: device, exchange_timeout_s, heartbeat_timeout_s, name, output_dir, " in line


def test_every_problem_is_reported_at_once_with_lines(tmp_path):
    text = (ROOT / "specs" / "internlm2_1_8b.yaml").read_text()
    text = text.replace("kl_coeff: 0.02", "kl_coef: 0.02").replace("gamma: 1.0", "gamma: 1.5")
    text = text.replace("mode: ddp}", "mode: dpp}", 1).replace("ppo_minibatch: 64", "ppo_minibatch: '64'")
    text = text.replace("clip_reward_max: 1.5", "clip_reward_max: -3.0")
    lines = errors(tmp_path, text)
    assert len(lines) == 5, lines
    expect = {
        "repeater_config.kl_coef": "did you mean 'kl_coeff'",
        "repeater_config.gamma": "found 1.5, expected a value <= 1",
        "model_configs.actor.trainer_config.parallel.data.mode": "found 'dpp', expected one of 'ddp', 'deepspeed' (did you mean 'ddp'?)",
        "train_config.ppo_minibatch": "found '64', expected an integer",
        "rollout_config.clip_reward_min": "found -1.5, expected less than clip_reward_max (-3.0)",
    }
    for key, message in expect.items():
        (match,) = [line for line in lines if f" {key}:" in line]
        assert message in match
        line_no = int(match.split(":")[1])
        assert key.split(".")[-1] in text.splitlines()[line_no - 1] or "clip_reward" in match


@pytest.mark.parametrize(
    "text, message",
    [
        ("", "the spec is empty"),
        ("# only a comment\n", "the spec is empty"),
        ("42\n", "expected a mapping of sections"),
        ("- a\n- b\n", "expected a mapping of sections"),
        ("model_configs: [\n", "invalid YAML"),
        ("a: 1\n  b: 2\n", "invalid YAML"),
        ("x: !!python/object/apply:os.system ['touch /tmp/rlhf-pwned']\n", "invalid YAML"),
        ("a: 1\na: 2\n", "duplicate key"),
    ],
)
def test_malformed_documents_are_reported_not_raised(tmp_path, text, message):
    lines = problems(tmp_path, text)
    assert any(message in line for line in lines), lines
    assert not Path("/tmp/rlhf-pwned").exists()


def test_yaml_syntax_error_names_the_line(tmp_path):
    (line,) = problems(tmp_path, "run:\n  name: x\n  seed: [1,\n")
    assert line.startswith("spec.yaml:") and "invalid YAML" in line


@pytest.mark.parametrize("target", ["missing.yaml", "."])
def test_unreadable_files(tmp_path, target):
    with pytest.raises(SpecError) as info:
        load_spec(tmp_path / target)
    assert "cannot read the spec" in str(info.value)


def test_binary_file(tmp_path):
    path = tmp_path / "bin.yaml"
    path.write_bytes(b"\xff\xfe\x00\x01garbage")
    with pytest.raises(SpecError) as info:
        load_spec(path)
    assert "cannot read the spec" in str(info.value) or "invalid YAML" in str(info.value)


def test_missing_sections_and_keys(tmp_path):
    lines = errors(tmp_path, {"run": {"name": "x"}})
    assert any("model_configs: missing; expected the four models" in line for line in lines)
    assert any("dataset_config: missing" in line for line in lines)
    data = edit()
    del data["model_configs"]["critic"]["model_path"]
    (line,) = errors(tmp_path, data)
    assert "model_configs.critic.model_path: missing; expected hugging face model id" in line.lower()


def test_floats_without_a_dot_are_numbers(tmp_path):
    text = (ROOT / "specs" / "internlm2_1_8b.yaml").read_text().replace("lr: 1.0e-06", "lr: 1e-6")
    spec = load_spec(write(tmp_path, text)).spec
    assert spec.model_configs.actor.trainer_config.train_kwargs.lr == pytest.approx(1e-6)


@pytest.mark.parametrize(
    "change, key, message",
    [
        (
            {"model_configs__actor__trainer_config__parallel__tensor": {"size": 2, "mode": "1d"}},
            "model_configs.actor.trainer_config.parallel.tensor.size",
            "not supported yet",
        ),
        (
            {"model_configs__critic__trainer_config__parallel__pipeline": {"size": 2}},
            "model_configs.critic.trainer_config.parallel.pipeline.size",
            "not supported yet",
        ),
        (
            {"model_configs__reward__trainer_config__parallel__sequence": True},
            "model_configs.reward.trainer_config.parallel.sequence",
            "not supported yet",
        ),
        ({"repeater_config__fine_grained_rm": True}, "repeater_config.fine_grained_rm", "not supported yet"),
        ({"repeater_config__value_ema": True}, "repeater_config.value_ema", "not supported yet"),
        ({"rollout_config__generate_kwargs__num_beams": 4}, "rollout_config.generate_kwargs.num_beams", "not supported yet"),
        (
            {"model_configs__actor__generator_config": {"shared_with_trainer": True, "generator_type": "vllm"}},
            "model_configs.actor.generator_config.generator_type",
            "needs its own GPUs",
        ),
        (
            {"model_configs__actor__generator_config": {"shared_with_trainer": False, "parallel": {"tensor": {"size": 2}}}},
            "model_configs.actor.generator_config.parallel.tensor.size",
            "only vLLM generators shard",
        ),
        (
            {"model_configs__actor__trainer_config__parallel__data": {"size": 1, "mode": "deepspeed"}},
            "model_configs.actor.trainer_config.deepspeed_config",
            "needs a deepspeed_config with zero_optimization.stage",
        ),
        (
            {"model_configs__critic__trainer_config__deepspeed_config": {"zero_optimization": {"stage": 3}}},
            "model_configs.critic.trainer_config.deepspeed_config",
            "set, but parallel.data.mode is 'ddp'",
        ),
        (
            {"model_configs__reference__trainer_config__parallel__data": {"size": 1, "mode": "deepspeed"}},
            "model_configs.reference.trainer_config.deepspeed_config",
            "needs a deepspeed_config with zero_optimization.stage",
        ),
        (
            {"model_configs__reward__trainer_config__train_kwargs": {"lr": 1.0}},
            "model_configs.reward.trainer_config.train_kwargs",
            "not trained",
        ),
        ({"model_configs__critic__model_type": "reward"}, "model_configs.critic.model_type", "expected 'critic'"),
        ({"rollout_config__clip_reward_min": 2.0}, "rollout_config.clip_reward_min", "expected less than clip_reward_max"),
        ({"repeater_config__gae_lambda": -0.1}, "repeater_config.gae_lambda", "expected a value >= 0"),
        (
            {"model_configs__actor__trainer_config__train_kwargs__lr": 0},
            "model_configs.actor.trainer_config.train_kwargs.lr",
            "expected a value > 0",
        ),
        ({"dataset_config__ppo_datas": ["a::0"]}, "dataset_config.ppo_datas.0", "expected a weight > 0"),
        ({"dataset_config__ppo_datas": ["a::heavy"]}, "dataset_config.ppo_datas.0", "expected a number after '::'"),
        ({"dataset_config__ppo_datas": []}, "dataset_config.ppo_datas", "expected at least 1"),
        (
            {"train_config__ppo_minibatch": 48},
            "train_config.ppo_minibatch",
            "expected a divisor of dataset_config.num_samples_each_epoch (64)",
        ),
        ({"train_config__actor_micro_bs": 3}, "train_config.ppo_minibatch", "expected a multiple of actor data size 1 x micro batch 3 = 3"),
        ({"slurm__partition": "gpu;touch /tmp/x"}, "slurm.partition", "which is not allowed here"),
        ({"slurm__extra_sbatch": ["--exclusive", "--comment=$(id)"]}, "slurm.extra_sbatch.1", "which is not allowed here"),
        ({"slurm__setup": ["module load cuda\nrm -rf /"]}, "slurm.setup.0", "which is not allowed here"),
        ({"run__name": "a b"}, "run.name", "which is not allowed here"),
        ({"model_configs__reward__model_path": None}, "model_configs.reward.model_path", "set reward_function instead"),
        (
            {"model_configs__reward__reward_function": "rlhf_launch.runtime.rewards:vowel_ratio"},
            "model_configs.reward.reward_function",
            "set together with model_path",
        ),
        ({"tokenizer_config__padding_side": "right"}, "tokenizer_config.padding_side", "expected one of 'left'"),
        ({"model_configs__critic__torch_dtype": "float16"}, "model_configs.critic.torch_dtype", "needs loss scaling"),
        ({"model_configs__actor__head_name": "v_head"}, "model_configs.actor.head_name", "causal LM without a value head"),
        ({"model_configs__critic__head_name": "v head"}, "model_configs.critic.head_name", "which is not allowed here"),
    ],
)
def test_semantic_and_schema_checks(tmp_path, change, key, message):
    lines = errors(tmp_path, edit(**change))
    hits = [line for line in lines if f" {key}:" in line]
    assert hits and message in hits[0], lines


def test_deepspeed_batch_keys_must_agree_with_train_config(tmp_path):
    ds = {
        "zero_optimization": {"stage": 3},
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 8,
        "bf16": {"enable": True},
    }
    data = edit(model_configs__actor__trainer_config__parallel__data={"size": 8, "mode": "deepspeed"},
                model_configs__actor__trainer_config__deepspeed_config=ds)
    lines = errors(tmp_path, data)
    assert any("deepspeed_config.gradient_accumulation_steps: found 8, expected 4" in line for line in lines), lines
    assert any("deepspeed_config.bf16.enable: unknown DeepSpeed key (did you mean 'enabled'?)" in line for line in lines)


def test_generator_tensor_size_must_fit_a_node(tmp_path):
    gen = {"shared_with_trainer": False, "generator_type": "vllm", "parallel": {"tensor": {"size": 16}}}
    lines = errors(tmp_path, edit(model_configs__actor__generator_config=gen))
    assert any("tensor.size: found 16, expected at most slurm.gpus_per_node (8)" in line for line in lines)


def vllm_actor(tmp_path, heads, kv_heads, head_dim, tensor, device="auto"):
    folder = tmp_path / "actor"
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_text(
        json.dumps({"num_attention_heads": heads, "num_key_value_heads": kv_heads, "head_dim": head_dim, "hidden_size": heads * head_dim})
    )
    gen = {"shared_with_trainer": False, "generator_type": "vllm", "parallel": {"tensor": {"size": tensor}}}
    return edit(model_configs__actor__model_path="./actor", model_configs__actor__generator_config=gen, run={"device": device})


@pytest.mark.parametrize(
    "heads, kv_heads, tensor, fits",
    [
        (32, 32, 4, True),
        (32, 8, 8, True),
        (32, 2, 4, True),
        (32, 32, 3, False),
        (12, 12, 8, False),
        (32, 4, 6, False),
    ],
)
def test_vllm_tensor_size_must_shard_the_heads(tmp_path, heads, kv_heads, tensor, fits):
    data = vllm_actor(tmp_path, heads, kv_heads, 128, tensor)
    if fits:
        load_spec(write(tmp_path, data))
        return
    (line,) = [x for x in errors(tmp_path, data) if "generator_config.parallel.tensor.size" in x]
    assert f"found {tensor}, but the actor has {heads} attention heads and {kv_heads} key/value heads" in line


def test_vllm_tensor_size_suggests_the_nearest_that_fit(tmp_path):
    (line,) = [x for x in errors(tmp_path, vllm_actor(tmp_path, 32, 32, 128, 3)) if "tensor.size" in x]
    assert line.endswith("try 2 or 4")


def test_vllm_on_cpu_needs_a_head_size_it_has_kernels_for(tmp_path):
    (line,) = errors(tmp_path, vllm_actor(tmp_path, 4, 4, 16, 1, device="cpu"))
    assert "model_configs.actor.model_path: head size 16: vLLM's CPU attention supports 32, 64" in line
    load_spec(write(tmp_path, vllm_actor(tmp_path, 4, 4, 16, 1, device="cuda")))  # GPU kernels take it


def test_warnings_do_not_fail(tmp_path):
    data = edit(tokenizer_config={"pad_token_id": 2, "eos_token_id": 2})
    loaded = load_spec(write(tmp_path, data))
    assert any("equals eos_token_id" in w.message for w in loaded.warnings)


def test_overrides_apply_before_validation(tmp_path):
    path = write(tmp_path, BASE)
    loaded = load_spec(path, ["train_config.max_train_step=7", "dataset_config.ppo_datas=[data.jsonl::2]"], {"slurm.partition": "gpu"})
    assert loaded.spec.train_config.max_train_step == 7
    assert loaded.spec.slurm.partition == "gpu"
    assert loaded.spec.dataset_config.ppo_datas == [f"{tmp_path / 'data.jsonl'}::2"]


@pytest.mark.parametrize(
    "override, message",
    [
        ("train_config.max_train_step", "expected KEY.PATH=VALUE"),
        ("=3", "expected KEY.PATH=VALUE"),
        ("train_config..x=3", "expected KEY.PATH=VALUE"),
        ("train_config.max_train_step=[1,", "invalid YAML value"),
        ("train_config.max_train_step=ten", "found 'ten', expected an integer (set on the command line)"),
        ("run.name.x=1", "run.name is not a section"),
        ("repeater_config.kl_coef=1", "did you mean 'kl_coeff'"),
    ],
)
def test_bad_overrides(tmp_path, override, message):
    lines = errors(tmp_path, BASE, overrides=[override])
    assert any(message in line for line in lines), lines


def test_relative_local_paths_resolve_against_the_spec_file(tmp_path):
    (tmp_path / "models" / "actor").mkdir(parents=True)
    data = edit(model_configs__actor__model_path="./models/actor")
    spec = load_spec(write(tmp_path, data)).spec
    assert spec.model_configs.actor.model_path == str(tmp_path / "models" / "actor")
    assert spec.model_configs.reference.model_path == "internlm/internlm2-chat-1_8b-sft"  # a hub id stays
    assert spec.tokenizer_config.tokenizer_path == spec.model_configs.actor.model_path


def test_resolution_fills_derived_defaults(tmp_path):
    data = edit()
    del data["train_config"]["actor_micro_bs"]
    del data["model_configs"]["critic"]["model_type"]
    spec = load_spec(write(tmp_path, data)).spec
    assert spec.train_config.actor_micro_bs == 1  # the actor's train_kwargs.micro_bsz
    assert spec.model_configs.critic.model_type == "critic"


def test_reward_scale_with_norm_rewards_is_warned_about_once():
    both = load({"repeater_config.reward_scale": True, "repeater_config.norm_rewards": True})
    assert [w.path for w in both.warnings if "norm_rewards" in w.message] == ["repeater_config.reward_scale"]
    alone = load({"repeater_config.norm_rewards": True})
    assert not [w for w in alone.warnings if "norm_rewards" in w.message]
