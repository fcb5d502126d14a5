"""Checks a JSON Schema cannot express: relations between keys, and what the runtime does
not support yet. Each check yields problems; every check runs, so all are reported at once."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

from rlhf_launch.core.algorithms import ESTIMATORS
from rlhf_launch.core.config import TRAINED, JobSpec, ModelConfig, Parallel
from rlhf_launch.core.data_sources import parse_source
from rlhf_launch.core.model_shape import local_config
from rlhf_launch.core.model_tokenizers import RESERVED_KWARGS
from rlhf_launch.core.plan import planned_models, ptx_micro_steps, unplanned_roles
from rlhf_launch.core.problems import Problem, did_you_mean, error, warning
from rlhf_launch.core.system_prompts import describe_names, system_prompt_table

Check = Callable[[JobSpec], Iterator[Problem]]
CHECKS: list[Check] = []


def check(fn: Check) -> Check:
    """Register ``fn`` to run in ``run_checks``; returns it unchanged (a decorator)."""
    CHECKS.append(fn)
    return fn


def _model(role: str) -> str:
    return f"model_configs.{role}"


def _trained(spec: JobSpec) -> list[str]:
    """The trained roles the plan has: the actor, and the critic only for gae. The sections of the roles the
    algorithm does not use are ignored (``unused_sections_ignored`` says so once) and not checked here."""
    return [role for role in TRAINED if role in planned_models(spec)]


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
    for role, model in planned_models(spec).items():
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
    """A deepspeed_config that names a ZeRO stage and whose batch and precision keys agree with the spec;
    for the reference and reward (inference only) ZeRO-3 without an optimizer; no deepspeed_config
    without data.mode deepspeed."""
    for role, model in planned_models(spec).items():
        tc = model.trainer_config
        prefix = f"{_model(role)}.trainer_config"
        mode = tc.parallel.data.mode
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
            elif role in TRAINED:
                micro, total = spec.train_micro_batch(role), spec.train_minibatch(role)
                extra = ptx_micro_steps(spec) if role == "actor" else 0
                yield from _deepspeed_batch_keys(spec, role, prefix + ".deepspeed_config", micro, total, "train_config", extra)
                yield from _deepspeed_precision_keys(tc.deepspeed_config, prefix + ".deepspeed_config")
                yield from _deepspeed_master_weights(tc.deepspeed_config, model, prefix + ".deepspeed_config")
            else:
                yield from _deepspeed_inference(spec, role, model, prefix + ".deepspeed_config")
        elif tc.deepspeed_config is not None:
            yield error(
                f"{prefix}.deepspeed_config", f"set, but parallel.data.mode is {mode!r}; set mode: deepspeed or remove deepspeed_config"
            )


_INFERENCE_MICRO_KEY = {"reference": "repeater_config.ref_micro_bs", "reward": "rollout_config.reward_micro_bs"}


def _deepspeed_inference(spec: JobSpec, role: str, model: ModelConfig, prefix: str) -> Iterator[Problem]:
    """A frozen model under DeepSpeed: ZeRO-3 (its weights sharded over the role's ranks), nothing of
    training, batch keys of one inference micro batch per rank, precision that keeps the model's dtype."""
    ds = model.trainer_config.deepspeed_config
    stage = ds.get("zero_optimization", {}).get("stage")
    if stage != 3:
        yield error(
            f"{prefix}.zero_optimization.stage",
            f"found {stage} for {role}, which only runs inference: ZeRO stages 0-2 shard gradients and optimizer states, "
            "which a frozen model has none of; expected 3 (weights sharded over the role's ranks), or parallel.data.mode 'ddp'",
        )
        return
    for key in ("optimizer", "scheduler"):
        if key in ds:
            yield error(f"{prefix}.{key}", f"set, but the {role} model is not trained; remove it")
    micro = spec.inference_micro_batch(role)
    dp = model.trainer_config.parallel.data.size
    yield from _deepspeed_batch_keys(spec, role, prefix, micro, micro * dp, _INFERENCE_MICRO_KEY[role])
    yield from _deepspeed_precision_keys(ds, prefix)
    yield from _deepspeed_inference_dtype(ds, model, prefix)


def _deepspeed_inference_dtype(ds: dict, model: ModelConfig, prefix: str) -> Iterator[Problem]:
    """zero.Init casts the weights to the config's precision: one that differs from the model's dtype
    would silently change the numbers (or, fp32 for a bf16 model, double the memory)."""
    dtype = model.load_dtype()
    enabled = [s for s in ("bf16", "fp16") if isinstance(ds.get(s), dict) and ds[s].get("enabled")]
    config_dtype = {"bf16": "bfloat16", "fp16": "float16"}[enabled[0]] if enabled else "float32"
    given = any(s in ds for s in ("bf16", "fp16"))
    if dtype == "auto" and not given:
        yield warning(
            f"{prefix}.bf16",
            "missing, and the model's torch_dtype is 'auto': ZeRO-3 would load the weights in float32; "
            "set the model's torch_dtype (e.g. bfloat16) or bf16: {enabled: true}",
        )
    if given and dtype != "auto" and config_dtype != dtype:
        yield error(
            f"{prefix}.{enabled[0] if enabled else 'bf16'}",
            f"ZeRO-3 loads the weights in {config_dtype}, but the model's torch_dtype is {dtype!r}; "
            "remove bf16/fp16 from the deepspeed_config to have the precision follow torch_dtype",
        )


def _deepspeed_master_weights(ds: dict, model: ModelConfig, prefix: str) -> Iterator[Problem]:
    """A trained bf16 or fp16 model keeps fp32 master weights only with bf16 or fp16 enabled; the runtime enables
    the model's when the config names neither (rlhf_launch.runtime.engine.deepspeed_config), so only a config that
    disables it is refused."""
    half = {"bfloat16": "bf16", "float16": "fp16"}.get(model.load_dtype())
    named = [s for s in ("bf16", "fp16") if s in ds]
    enabled = any(isinstance(ds[s], dict) and ds[s].get("enabled") for s in named)
    if half is not None and named and not enabled:
        yield error(
            f"{prefix}.{named[0]}",
            f"disables half precision for a trained {model.load_dtype()} model: DeepSpeed would keep no fp32 master weights "
            f"and updates of ~lr would round away; set {half}: {{enabled: true}}, or remove {named[0]} to have it follow torch_dtype",
        )


def _deepspeed_batch_keys(spec: JobSpec, role: str, prefix: str, micro: int, total: int, source: str,
                          extra_steps: int = 0) -> Iterator[Problem]:
    """Given batch keys must be the derived ones; ``extra_steps``: the actor's PPO-ptx micro steps per update, which
    DeepSpeed counts to its accumulation boundary too (rlhf_launch.runtime.engine.deepspeed_config)."""
    ds = spec.model_configs.roles()[role].trainer_config.deepspeed_config
    dp = spec.model_configs.roles()[role].trainer_config.parallel.data.size
    steps = total // (dp * micro) + extra_steps if total % (dp * micro) == 0 else None
    expected = {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": steps,
        "train_batch_size": micro * steps * dp if extra_steps and steps is not None else total,
    }
    if extra_steps:
        source += f" with {extra_steps} PPO-ptx micro step(s) per update"
    for key, value in expected.items():
        if key in ds and value is not None and ds[key] != value:
            yield error(
                f"{prefix}.{key}",
                f"found {ds[key]!r}, expected {value} (derived from {source} and data size {dp}); remove it to have it derived",
            )


def _deepspeed_precision_keys(ds: dict, prefix: str) -> Iterator[Problem]:
    for section in ("bf16", "fp16"):
        block = ds.get(section)
        if isinstance(block, dict) and "enable" in block and "enabled" not in block:
            yield error(f"{prefix}.{section}.enable", "unknown DeepSpeed key (did you mean 'enabled'?)")


@check
def only_trained_models_have_optimizers(spec: JobSpec) -> Iterator[Problem]:
    """The reference and reward models are frozen: no train_kwargs on them."""
    for role in [r for r in ("reference", "reward") if r in planned_models(spec)]:
        if spec.model_configs.roles()[role].trainer_config.train_kwargs is not None:
            yield error(f"{_model(role)}.trainer_config.train_kwargs", f"set, but the {role} model is not trained; remove it")


@check
def fp16_training_needs_deepspeed(spec: JobSpec) -> Iterator[Problem]:
    """float16 training needs loss scaling, which only DeepSpeed's fp16 mode does (bf16 gets
    fp32 master weights in either mode)."""
    for role in _trained(spec):
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
    for role, model in planned_models(spec).items():
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
    for role in [r for r in ("reference", "reward") if r in planned_models(spec)]:
        if spec.model_configs.roles()[role].trainer_config.gradient_checkpointing:
            yield warning(
                f"{_model(role)}.trainer_config.gradient_checkpointing",
                f"has no effect: the {role} is not trained, and inference keeps no activations to checkpoint",
            )


@check
def micro_batch_sources_agree(spec: JobSpec) -> Iterator[Problem]:
    """Warns when ``train_config.<role>_micro_bs`` overrides a different ``train_kwargs.micro_bsz``."""
    for role in _trained(spec):
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
    """Batches split as the runtime needs: each minibatch divides the rollout batch; every rank of a
    role gets at least one sequence of the rollout and of each minibatch; and the largest share of a
    minibatch (the first rank's, shares differ by at most one) is a whole number of micro batches.

    Shares need not be equal (32 prompts over 3 ranks: 11, 11, 10). Every rank of a trained role
    runs as many micro batches as the largest share has, so that their collectives pair up; with
    whole micro batches in the largest share, a smaller one only has a shorter last micro batch."""
    tc = spec.train_config
    rollout = spec.rollout_size()  # sequences: prompts x n_samples_per_prompt
    n = spec.rollout_config.n_samples_per_prompt
    what = f"the rollout batch ({rollout} = dataset_config.num_samples_each_epoch x rollout_config.n_samples_per_prompt {n})" \
        if n > 1 else f"dataset_config.num_samples_each_epoch ({rollout})"
    for key in [{"actor": "ppo_minibatch", "critic": "value_minibatch"}[role] for role in _trained(spec)]:
        size = getattr(tc, key)
        if rollout % size:
            yield error(
                f"train_config.{key}",
                f"found {size}, expected a divisor of {what} so that every optimizer step sees the same number of sequences",
            )
    for role in _trained(spec):
        yield from _minibatch_shares(spec, role)
    for role, dp in _data_sizes(spec).items():
        if rollout < dp:
            yield error(
                "dataset_config.num_samples_each_epoch",
                f"found {rollout} sequences per rollout, expected at least the {role} data size {dp} so that every {role} "
                "rank gets a sequence",
            )


def _minibatch_shares(spec: JobSpec, role: str) -> Iterator[Problem]:
    dp = spec.model_configs.roles()[role].trainer_config.parallel.data.size
    micro = spec.train_micro_batch(role)
    size = spec.train_minibatch(role)
    key = f"train_config.{'ppo_minibatch' if role == 'actor' else 'value_minibatch'}"
    largest = -(-size // dp)
    if size < dp:
        yield error(key, f"found {size}, expected at least the {role} data size {dp} so that every {role} rank trains on a sequence")
    elif size % dp == 0 and size % (dp * micro):
        yield error(
            key,
            f"found {size}, expected a multiple of {role} data size {dp} x micro batch {micro} = {dp * micro} "
            f"(gradient accumulation needs a whole number of micro steps); try {_nearby_multiples(size, dp * micro)}",
        )
    elif largest % micro:
        yield error(
            key,
            f"found {size}: over {role} data size {dp} its largest share is {largest} sequences, expected a whole number "
            f"of micro batches ({micro}; every rank runs the micro steps of the largest share, the others end with a "
            f"shorter one); try a minibatch whose share over {dp} ranks is a multiple of {micro}, "
            f"e.g. {_nearby_multiples(size, dp * micro)}",
        )


# What the launcher and the sbatch script set for every rank: a role's envs must not change them.
_LAUNCHER_VARIABLES = ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK")
_LAUNCHER_PREFIXES = ("RLHF_", "SLURM_")


@check
def envs_leave_launcher_variables_alone(spec: JobSpec) -> Iterator[Problem]:
    """trainer_config.envs may not set the variables that place a rank in the job (the rendezvous
    address, RLHF_* and SLURM_* variables): a rank given other values would not find its peers."""
    for role, model in planned_models(spec).items():
        for name in model.trainer_config.envs:
            if name in _LAUNCHER_VARIABLES or name.startswith(_LAUNCHER_PREFIXES):
                yield error(
                    f"{_model(role)}.trainer_config.envs.{name}",
                    "set, but the launcher sets it for every rank (rendezvous and rank placement); remove it",
                )


def _data_sizes(spec: JobSpec) -> dict[str, int]:
    sizes = {role: m.trainer_config.parallel.data.size for role, m in planned_models(spec).items()}
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
    if rc.reward_scale and rc.norm_rewards:
        yield warning(
            "repeater_config.reward_scale",
            "true together with norm_rewards, which already divides by the running std: scores are normalised once; "
            "set reward_scale: false to say so",
        )


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
def system_prompt_names(spec: JobSpec) -> Iterator[Problem]:
    """Every ``[META]`` / ``[REWARD_META]`` name of a ``ppo_datas`` entry is in the system prompt table
    (built-in names and ``dataset_config.system_prompts``); warns when ``[REWARD_META]`` meets a
    reward_function, which receives the decoded texts without it."""
    table = system_prompt_table(spec.dataset_config.system_prompts)
    for i, entry in enumerate(spec.dataset_config.ppo_datas):
        try:
            source = parse_source(entry)
        except ValueError:
            continue  # prompt_sources reports it
        for tag, name in (("META", source.meta), ("REWARD_META", source.reward_meta)):
            if name is not None and name not in table:
                yield error(
                    f"dataset_config.ppo_datas.{i}",
                    f"found '[{tag}]:{name}', but there is no system prompt named {name!r}{did_you_mean(name, table)}; "
                    f"expected one of {describe_names(table)}, or add it under dataset_config.system_prompts",
                )
        if source.reward_meta is not None and spec.model_configs.reward.reward_function:
            yield warning(
                f"dataset_config.ppo_datas.{i}",
                f"'[REWARD_META]:{source.reward_meta}' has no effect: model_configs.reward.reward_function receives the "
                "decoded prompts and responses, without a reward system prompt; remove it or use a reward model",
            )


@check
def model_tokenizer_settings(spec: JobSpec) -> Iterator[Problem]:
    """No ``from_pretrained_kwargs`` that the runtime sets itself, and no reward tokenizer_config that
    nothing reads (a reward_function receives texts)."""
    settings = {"tokenizer_config": spec.tokenizer_config}
    settings.update({f"{_model(role)}.tokenizer_config": m.tokenizer_config for role, m in planned_models(spec).items()
                     if m.tokenizer_config is not None})
    for prefix, config in settings.items():
        for key in sorted(set(config.from_pretrained_kwargs) & set(RESERVED_KWARGS)):
            yield error(f"{prefix}.from_pretrained_kwargs.{key}", f"set, but {RESERVED_KWARGS[key]}; remove it")
    reward = spec.model_configs.reward
    if reward.reward_function and reward.tokenizer_config is not None:
        yield warning(
            f"{_model('reward')}.tokenizer_config",
            "has no effect: reward_function receives texts decoded with the policy's tokenizer; remove it",
        )


_NO_GROUPS = [name for name, e in ESTIMATORS.items() if not e.needs_groups]  # the estimators that work with n = 1


@check
def group_estimators_have_groups(spec: JobSpec) -> Iterator[Problem]:
    """An estimator that compares the samples of one prompt (grpo, dr_grpo, rloo, reinforce_pp_baseline) needs at
    least two of them: with one, every advantage would be 0 (or undefined), and nothing would be learned."""
    name = spec.repeater_config.advantage_estimator
    n = spec.rollout_config.n_samples_per_prompt
    if ESTIMATORS[name].needs_groups and n < 2:
        yield error(
            "rollout_config.n_samples_per_prompt",
            f"found {n}, expected at least 2 with repeater_config.advantage_estimator {name} (it compares the responses "
            f"of one prompt); set n_samples_per_prompt to 4-16, or use advantage_estimator {' or '.join(_NO_GROUPS)}",
        )


@check
def dynamic_sampling_needs_groups(spec: JobSpec) -> Iterator[Problem]:
    """DAPO's dynamic sampling drops the groups whose n rewards are all equal: it needs groups (n >= 2) and an
    estimator that compares them (for the others a constant group still carries a gradient)."""
    ro = spec.rollout_config
    if not ro.dynamic_sampling:
        return
    name = spec.repeater_config.advantage_estimator
    if not ESTIMATORS[name].needs_groups:
        groups = ", ".join(e for e in ESTIMATORS if ESTIMATORS[e].needs_groups)
        yield error(
            "rollout_config.dynamic_sampling",
            f"found true with repeater_config.advantage_estimator {name}, expected a group estimator ({groups}): only they "
            "give a group of equal rewards zero advantage; set advantage_estimator: grpo, or dynamic_sampling: false",
        )
    # With a group estimator, group_estimators_have_groups reports n < 2 already.
    if ro.n_samples_per_prompt < 2 and not ESTIMATORS[name].needs_groups:
        yield error(
            "rollout_config.n_samples_per_prompt",
            f"found {ro.n_samples_per_prompt}, expected at least 2 with rollout_config.dynamic_sampling (it drops the groups "
            "whose n rewards are all equal); set n_samples_per_prompt to 4-16",
        )


@check
def staleness_needs_a_separate_generator(spec: JobSpec) -> Iterator[Problem]:
    """An asynchronous rollout (max_staleness 1) is sampled by a generator group while the actor trains: the
    generator must have weights of its own, and a step's responses must not depend on its own scores (as dynamic
    sampling's rounds do)."""
    ro = spec.rollout_config
    if ro.max_staleness == 0:
        return
    if spec.model_configs.actor.generator_config.shared_with_trainer:
        yield error(
            "rollout_config.max_staleness",
            "found 1 with a generator shared with the actor, expected a separate generator group: the shared one is the "
            "actor itself, which cannot sample while it trains; set model_configs.actor.generator_config.shared_with_trainer: "
            "false, or max_staleness: 0",
        )
    if ro.dynamic_sampling:
        yield error(
            "rollout_config.max_staleness",
            "found 1 with rollout_config.dynamic_sampling, expected one of them: dynamic sampling scores each round "
            "before it draws the next, so its rounds cannot run ahead of training; set max_staleness: 0 or dynamic_sampling: false",
        )


@check
def ptx_has_pretraining_text(spec: JobSpec) -> Iterator[Problem]:
    """PPO-ptx: train_config.pretrain_loss_weight > 0 needs pretrain_dataset_config, and a pretrain_dataset_config
    without a weight is unused (a warning)."""
    weight = spec.train_config.pretrain_loss_weight
    if weight > 0 and spec.pretrain_dataset_config is None:
        yield error(
            "train_config.pretrain_loss_weight",
            f"found {weight} but no pretrain_dataset_config, expected one with the pretraining text; add "
            "pretrain_dataset_config: {pretrain_datas: ['data/pretrain/tiny_text.jsonl::1.0']}, or set the weight to 0",
        )
    if weight == 0 and spec.pretrain_dataset_config is not None:
        yield warning(
            "pretrain_dataset_config",
            "set, but train_config.pretrain_loss_weight is 0: the text is never used; set a weight > 0 or remove it",
        )


_TO_USE = {"critic": "set advantage_estimator: gae to train one", "reference": "set kl_coeff > 0 for a KL term"}


@check
def unused_sections_ignored(spec: JobSpec) -> Iterator[Problem]:
    """Warns that a model section the algorithm does not use is ignored: the critic with an estimator other than
    gae, the reference with kl_coeff 0. The plan has no such role (rlhf_launch/core/plan.py ``unplanned_roles``); the section
    stays required by the schema, but nothing of it is checked, loaded, saved or exported."""
    for role, reason in unplanned_roles(spec).items():
        yield warning(
            _model(role),
            f"ignored: {reason}; the plan has no {role} (no GPUs, no ranks) and nothing of this section is checked or "
            f"loaded (its model_path need not exist), though the schema still requires it; {_TO_USE[role]}",
        )


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
    models: dict[str, ModelConfig] = planned_models(spec)  # an ignored section's folder is never read
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

