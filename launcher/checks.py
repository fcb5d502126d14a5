"""Checks a JSON Schema cannot express: relations between keys, and what the runtime does
not support yet. Each check yields problems; every check runs, so all are reported at once."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

from rlhf.core.config import TRAINED, JobSpec, ModelConfig, Parallel
from rlhf.core.data_sources import parse_source
from rlhf.core.model_shape import local_config
from rlhf.core.problems import Problem, error, warning

Check = Callable[[JobSpec], Iterator[Problem]]
CHECKS: list[Check] = []


def check(fn: Check) -> Check:
    """Register ``fn`` to run in ``run_checks``; returns it unchanged (a decorator)."""
    CHECKS.append(fn)
    return fn


def _model(role: str) -> str:
    return f"model_configs.{role}"


@check
def model_types_match_roles(spec: JobSpec) -> Iterator[Problem]:
    """An explicit ``model_type`` must name the role key it is under."""
    for role, model in spec.model_configs.roles().items():
        if model.model_type is not None and model.model_type != role:
            yield error(f"{_model(role)}.model_type", f"found {model.model_type!r} under {role!r}, expected {role!r}")


@check
def value_heads_only_where_they_exist(spec: JobSpec) -> Iterator[Problem]:
    """head_name names a value head: only the critic and a reward model have one."""
    for role in ("actor", "reference"):
        head = spec.model_configs.roles()[role].head_name
        if head is not None:
            yield error(f"{_model(role)}.head_name", f"found {head!r}, but the {role} is a causal LM without a value head; remove it")
    reward = spec.model_configs.reward
    if reward.reward_function and reward.head_name is not None:
        yield error(f"{_model('reward')}.head_name", "set, but the reward comes from reward_function; remove it")


def _unsupported_parallel(prefix: str, parallel: Parallel, tensor_ok: bool = False) -> Iterator[Problem]:
    if parallel.tensor.size > 1 and not tensor_ok:
        yield error(f"{prefix}.tensor.size", f"found {parallel.tensor.size}: tensor parallelism here is not supported yet; expected 1")
    if parallel.pipeline.size > 1:
        yield error(f"{prefix}.pipeline.size", f"found {parallel.pipeline.size}: pipeline parallelism is not supported yet; expected 1")
    if parallel.pipeline.interleaved_overlap:
        yield error(f"{prefix}.pipeline.interleaved_overlap", "found true: interleaved pipelines are not supported yet; expected false")
    if parallel.sequence:
        yield error(f"{prefix}.sequence", "found true: sequence parallelism is not supported yet; expected false")


@check
def parallel_layouts_supported(spec: JobSpec) -> Iterator[Problem]:
    """No pipeline or sequence parallelism anywhere, tensor parallelism only in a separate vLLM
    generator, and ddp as a generator's data mode."""
    for role, model in spec.model_configs.roles().items():
        yield from _unsupported_parallel(f"{_model(role)}.trainer_config.parallel", model.trainer_config.parallel, False)
    gen = spec.model_configs.actor.generator_config
    if not gen.shared_with_trainer:
        prefix = f"{_model('actor')}.generator_config.parallel"
        yield from _unsupported_parallel(prefix, gen.parallel, tensor_ok=True)  # checked below, with the reason
        if gen.parallel.tensor.size > 1 and gen.generator_type != "vllm":
            yield error(
                f"{prefix}.tensor.size",
                f"found {gen.parallel.tensor.size} with generator_type 'hf': only vLLM generators shard a model; "
                "use generator_type: vllm or size 1",
            )
        if gen.parallel.data.mode != "ddp":
            yield error(f"{prefix}.data.mode", f"found {gen.parallel.data.mode!r}: a generator only runs inference; expected 'ddp'")


@check
def generator_sharing(spec: JobSpec) -> Iterator[Problem]:
    """A generator shared with the actor is a Hugging Face one on the actor's layout: no vLLM, no layout of its own."""
    gen = spec.model_configs.actor.generator_config
    prefix = f"{_model('actor')}.generator_config"
    if gen.shared_with_trainer and gen.generator_type == "vllm":
        yield error(
            f"{prefix}.generator_type",
            "found 'vllm' with shared_with_trainer true: a vLLM generator needs its own GPUs; "
            "set shared_with_trainer: false or generator_type: hf",
        )
    if gen.shared_with_trainer and gen.parallel != Parallel():
        yield error(
            f"{prefix}.parallel",
            "set, but a generator shared with the trainer uses the actor's layout; remove it or set shared_with_trainer: false",
        )


@check
def deepspeed_configs(spec: JobSpec) -> Iterator[Problem]:
    """DeepSpeed only for trained models, with a deepspeed_config that names a ZeRO stage and whose batch
    and precision keys agree with the spec; no deepspeed_config without data.mode deepspeed."""
    for role, model in spec.model_configs.roles().items():
        tc = model.trainer_config
        prefix = f"{_model(role)}.trainer_config"
        mode = tc.parallel.data.mode
        if mode == "deepspeed" and role not in TRAINED:
            yield error(
                f"{prefix}.parallel.data.mode",
                f"found 'deepspeed' for {role}, which only runs inference: DeepSpeed inference is not supported yet; "
                "expected 'ddp'",
            )
            continue
        if mode == "deepspeed":
            stage = (tc.deepspeed_config or {}).get("zero_optimization", {}).get("stage")
            if tc.deepspeed_config is None:
                yield error(
                    f"{prefix}.deepspeed_config",
                    "missing; data.mode 'deepspeed' needs a deepspeed_config with zero_optimization.stage "
                    "(e.g. {zero_optimization: {stage: 3}})",
                )
            elif stage not in (0, 1, 2, 3):
                yield error(
                    f"{prefix}.deepspeed_config.zero_optimization.stage", f"found {stage!r}, expected a ZeRO stage 0, 1, 2 or 3"
                )
            else:
                yield from _deepspeed_batch_keys(spec, role, prefix + ".deepspeed_config")
                yield from _deepspeed_precision_keys(tc.deepspeed_config, prefix + ".deepspeed_config")
        elif tc.deepspeed_config is not None:
            yield error(
                f"{prefix}.deepspeed_config", f"set, but parallel.data.mode is {mode!r}; set mode: deepspeed or remove deepspeed_config"
            )


def _deepspeed_batch_keys(spec: JobSpec, role: str, prefix: str) -> Iterator[Problem]:
    ds = spec.model_configs.roles()[role].trainer_config.deepspeed_config
    dp = spec.model_configs.roles()[role].trainer_config.parallel.data.size
    micro = spec.train_micro_batch(role)
    total = spec.train_minibatch(role)
    expected = {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": total // (dp * micro) if total % (dp * micro) == 0 else None,
        "train_batch_size": total,
    }
    for key, value in expected.items():
        if key in ds and value is not None and ds[key] != value:
            yield error(
                f"{prefix}.{key}",
                f"found {ds[key]!r}, expected {value} (derived from train_config and data size {dp}); remove it to have it derived",
            )


def _deepspeed_precision_keys(ds: dict, prefix: str) -> Iterator[Problem]:
    for section in ("bf16", "fp16"):
        block = ds.get(section)
        if isinstance(block, dict) and "enable" in block and "enabled" not in block:
            yield error(f"{prefix}.{section}.enable", "unknown DeepSpeed key (did you mean 'enabled'?)")


@check
def only_trained_models_have_optimizers(spec: JobSpec) -> Iterator[Problem]:
    """The reference and reward models are frozen: no train_kwargs on them."""
    for role in ("reference", "reward"):
        if spec.model_configs.roles()[role].trainer_config.train_kwargs is not None:
            yield error(f"{_model(role)}.trainer_config.train_kwargs", f"set, but the {role} model is not trained; remove it")


@check
def fp16_training_needs_deepspeed(spec: JobSpec) -> Iterator[Problem]:
    """float16 training needs loss scaling, which only DeepSpeed's fp16 mode does (bf16 gets
    fp32 master weights in either mode)."""
    for role in TRAINED:
        model = spec.model_configs.roles()[role]
        if model.load_dtype() == "float16" and model.trainer_config.parallel.data.mode != "deepspeed":
            key = "trainer_config.torch_dtype" if model.trainer_config.torch_dtype else "torch_dtype"
            yield error(
                f"{_model(role)}.{key}",
                "found 'float16' with parallel.data.mode 'ddp': float16 training needs loss scaling, which only the "
                "deepspeed mode has; use bfloat16, or mode deepspeed with fp16.enabled",
            )


@check
def dtype_given_once(spec: JobSpec) -> Iterator[Problem]:
    """Warns when a model's torch_dtype and its trainer_config.torch_dtype differ: the trainer_config one is
    used, as XTuner does (it never reads the model-level key)."""
    for role, model in spec.model_configs.roles().items():
        outer, inner = model.torch_dtype, model.trainer_config.torch_dtype
        if outer is not None and inner is not None and outer != inner:
            yield warning(
                f"{_model(role)}.torch_dtype",
                f"{outer!r} is overridden by trainer_config.torch_dtype ({inner!r}), which the model is loaded in; "
                "remove one of them",
            )


@check
def checkpointing_only_where_trained(spec: JobSpec) -> Iterator[Problem]:
    """Warns when gradient_checkpointing is set on a model that is never trained (reference, reward): it saves
    activation memory of the backward pass only."""
    for role in ("reference", "reward"):
        if spec.model_configs.roles()[role].trainer_config.gradient_checkpointing:
            yield warning(
                f"{_model(role)}.trainer_config.gradient_checkpointing",
                f"has no effect: the {role} is not trained, and inference keeps no activations to checkpoint",
            )


@check
def micro_batch_sources_agree(spec: JobSpec) -> Iterator[Problem]:
    """Warns when ``train_config.<role>_micro_bs`` overrides a different ``train_kwargs.micro_bsz``."""
    for role in TRAINED:
        explicit = getattr(spec.train_config, f"{role}_micro_bs")
        kwargs = spec.model_configs.roles()[role].trainer_config.train_kwargs
        if explicit is not None and kwargs is not None and kwargs.micro_bsz is not None and kwargs.micro_bsz != explicit:
            yield warning(
                f"{_model(role)}.trainer_config.train_kwargs.micro_bsz",
                f"{kwargs.micro_bsz} is overridden by train_config.{role}_micro_bs ({explicit})",
            )


def _nearby_multiples(value: int, unit: int) -> str:
    low = max(unit, value // unit * unit)
    options = sorted({low, low + unit} - {value})
    return " or ".join(str(o) for o in options)


@check
def batch_sizes_divide(spec: JobSpec) -> Iterator[Problem]:
    """Batches split evenly: each minibatch divides the rollout batch and is a whole number of micro
    batches on every data-parallel rank, and every role's data size divides the rollout batch."""
    tc = spec.train_config
    rollout = spec.dataset_config.num_samples_each_epoch
    for key in ("ppo_minibatch", "value_minibatch"):
        size = getattr(tc, key)
        if rollout % size:
            yield error(
                f"train_config.{key}",
                f"found {size}, expected a divisor of dataset_config.num_samples_each_epoch ({rollout}) "
                "so that every optimizer step sees the same number of sequences",
            )
    for role in TRAINED:
        dp = spec.model_configs.roles()[role].trainer_config.parallel.data.size
        micro = spec.train_micro_batch(role)
        size = spec.train_minibatch(role)
        key = "ppo_minibatch" if role == "actor" else "value_minibatch"
        if size % (dp * micro):
            yield error(
                f"train_config.{key}",
                f"found {size}, expected a multiple of {role} data size {dp} x micro batch {micro} = {dp * micro} "
                f"(gradient accumulation needs a whole number of micro steps); try {_nearby_multiples(size, dp * micro)}",
            )
    for role, dp in _data_sizes(spec).items():
        if rollout % dp:
            yield error(
                "dataset_config.num_samples_each_epoch",
                f"found {rollout}, expected a multiple of the {role} data size {dp} so that every rank gets an equal shard; "
                f"try {_nearby_multiples(rollout, dp)}",
            )


def _data_sizes(spec: JobSpec) -> dict[str, int]:
    sizes = {role: m.trainer_config.parallel.data.size for role, m in spec.model_configs.roles().items()}
    gen = spec.model_configs.actor.generator_config
    if not gen.shared_with_trainer:
        sizes["generator"] = gen.parallel.data.size
    return sizes


@check
def generator_fits_on_a_node(spec: JobSpec) -> Iterator[Problem]:
    """A separate generator's tensor-parallel engine fits on one node (tensor size <= slurm.gpus_per_node)."""
    gen = spec.model_configs.actor.generator_config
    tp = gen.parallel.tensor.size
    if not gen.shared_with_trainer and tp > spec.slurm.gpus_per_node:
        yield error(
            f"{_model('actor')}.generator_config.parallel.tensor.size",
            f"found {tp}, expected at most slurm.gpus_per_node ({spec.slurm.gpus_per_node}): "
            "a tensor-parallel engine must not span nodes",
        )


@check
def reward_source(spec: JobSpec) -> Iterator[Problem]:
    """The reward comes from exactly one of model_path and reward_function."""
    reward = spec.model_configs.reward
    prefix = _model("reward")
    if reward.model_path is None and reward.reward_function is None:
        yield error(f"{prefix}.model_path", "missing; expected a reward model path, or set reward_function instead")
    if reward.model_path is not None and reward.reward_function is not None:
        yield error(f"{prefix}.reward_function", "set together with model_path; expected one of the two")


@check
def rewards_and_sampling(spec: JobSpec) -> Iterator[Problem]:
    """A non-empty reward clip range, sampling PPO supports (one beam, min_new_tokens <= max_new_tokens),
    and no repeater feature that is not implemented."""
    ro = spec.rollout_config
    if ro.clip_reward_min >= ro.clip_reward_max:
        yield error(
            "rollout_config.clip_reward_min", f"found {ro.clip_reward_min}, expected less than clip_reward_max ({ro.clip_reward_max})"
        )
    gk = ro.generate_kwargs
    if gk.num_beams > 1:
        yield error(
            "rollout_config.generate_kwargs.num_beams",
            f"found {gk.num_beams}: beam search is not supported yet (PPO samples responses); expected 1",
        )
    if gk.min_new_tokens > ro.max_new_tokens:
        yield error(
            "rollout_config.generate_kwargs.min_new_tokens",
            f"found {gk.min_new_tokens}, expected at most max_new_tokens ({ro.max_new_tokens})",
        )
    rc = spec.repeater_config
    for key in ("fine_grained_rm", "value_ema"):
        if getattr(rc, key):
            yield error(f"repeater_config.{key}", "found true: not supported yet; expected false")


@check
def special_tokens(spec: JobSpec) -> Iterator[Problem]:
    """Warns when a padding token equals end-of-sequence, and when tokenizer_config and generate_kwargs
    name different special tokens."""
    pairs = [
        ("tokenizer_config", spec.tokenizer_config.pad_token_id, spec.tokenizer_config.eos_token_id),
        (
            "rollout_config.generate_kwargs",
            spec.rollout_config.generate_kwargs.pad_token_id,
            spec.rollout_config.generate_kwargs.eos_token_id,
        ),
    ]
    for prefix, pad, eos in pairs:
        if pad is not None and pad == eos:
            yield warning(
                f"{prefix}.pad_token_id",
                f"equals eos_token_id ({eos}): responses are masked by position, "
                "but a distinct padding token is safer if the tokenizer has one",
            )
    for key in ("pad_token_id", "eos_token_id"):
        a = getattr(spec.tokenizer_config, key)
        b = getattr(spec.rollout_config.generate_kwargs, key)
        if a is not None and b is not None and a != b:
            yield warning(f"rollout_config.generate_kwargs.{key}", f"{b} differs from tokenizer_config.{key} ({a}); generation uses {b}")


@check
def prompt_sources(spec: JobSpec) -> Iterator[Problem]:
    """Every ``ppo_datas`` entry parses as '<source>::<weight>' with a weight > 0."""
    for i, entry in enumerate(spec.dataset_config.ppo_datas):
        try:
            parse_source(entry)
        except ValueError as exc:
            yield error(f"dataset_config.ppo_datas.{i}", str(exc))


@check
def warm_up_leaves_ppo_steps(spec: JobSpec) -> Iterator[Problem]:
    """Warns when the critic-only warm-up (pretrain_step) takes every step, so the actor never trains."""
    tc = spec.train_config
    if tc.pretrain_step >= tc.max_train_step:
        yield warning(
            "train_config.pretrain_step", f"{tc.pretrain_step} >= max_train_step ({tc.max_train_step}): the actor is never trained"
        )


def missing_local_models(spec: JobSpec) -> list[tuple[str, str]]:
    """(key path, folder) of each local model folder that does not exist. Runs on a resolved
    spec, where every local path is absolute."""
    models: dict[str, ModelConfig] = spec.model_configs.roles()
    return [(f"{_model(role)}.model_path", m.model_path) for role, m in models.items()
            if m.model_path and Path(m.model_path).is_absolute() and not Path(m.model_path).exists()]


def local_path_problems(spec: JobSpec) -> Iterator[Problem]:
    """Missing local model folders are warnings: the spec may be written before they are."""
    for key, folder in missing_local_models(spec):
        yield warning(key, f"local folder {folder} does not exist (yet)")


# Head sizes that vLLM's CPU attention kernels exist for (vLLM 0.32).
VLLM_CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)


def vllm_model_problems(spec: JobSpec) -> Iterator[Problem]:
    """What a vLLM engine would refuse at start-up, found from the actor's local config.json.
    Runs on a resolved spec; says nothing when the model is not a local folder."""
    gen = spec.model_configs.actor.generator_config
    if gen.shared_with_trainer or gen.generator_type != "vllm":
        return
    cfg = local_config(spec.model_configs.actor.model_path)
    if cfg is None or not isinstance(cfg.get("num_attention_heads"), int):
        return
    heads = cfg["num_attention_heads"]
    kv_heads = cfg.get("num_key_value_heads") or heads
    tensor = gen.parallel.tensor.size
    if heads % tensor or (kv_heads % tensor and tensor % kv_heads):
        fits = [t for t in range(1, heads + 1) if heads % t == 0 and (kv_heads % t == 0 or t % kv_heads == 0)]
        yield error(
            f"{_model('actor')}.generator_config.parallel.tensor.size",
            f"found {tensor}, but the actor has {heads} attention heads and {kv_heads} key/value heads, which vLLM "
            f"shards over an engine's ranks; try {_nearest(fits, tensor)}",
        )
    head_dim = cfg.get("head_dim") or cfg.get("hidden_size", 0) // heads
    if spec.run.device == "cpu" and head_dim not in VLLM_CPU_HEAD_SIZES:
        yield error(
            f"{_model('actor')}.model_path",
            f"head size {head_dim}: vLLM's CPU attention supports {', '.join(map(str, VLLM_CPU_HEAD_SIZES))}; "
            "use generator_type: hf on CPU for this model",
        )


def _nearest(options: list[int], value: int) -> str:
    ranked = sorted(options, key=lambda o: (abs(o - value), o))[:2]
    return " or ".join(map(str, sorted(ranked)))


def run_checks(spec: JobSpec, tolerate_type_errors: bool) -> list[Problem]:
    """All checks. After schema errors a check may meet a wrong type: it is then skipped,
    since its key was already reported."""
    problems: list[Problem] = []
    for fn in CHECKS:
        try:
            problems.extend(fn(spec))
        except (TypeError, AttributeError, ValueError, KeyError, ZeroDivisionError):
            if not tolerate_type_errors:
                raise
    return problems

