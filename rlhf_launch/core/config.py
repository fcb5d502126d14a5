"""The job spec: typed dataclasses, the single source of truth.

The YAML spec, the JSON Schema in ``schemas/``, the key reference in the README and the
validation messages are all derived from the classes below (the estimator names from the tables of
rlhf_launch/core/algorithms.py). Section names follow
XTuner-RLHF's PPO config (``rollout_config``, ``repeater_config``, ...) so its configs
convert one to one; ``run`` and ``slurm`` are what a launcher needs on top.

This module imports nothing heavy (no torch): the launcher runs on login nodes.
"""

from __future__ import annotations

import dataclasses
from dataclasses import MISSING, dataclass, field
from typing import Any, Literal

from rlhf_launch.core.algorithms import AdvantageEstimatorName, KlEstimatorName

ROLES = ("actor", "reference", "critic", "reward")
TRAINED = ("actor", "critic")  # the roles with an optimizer
Dtype = Literal["float32", "bfloat16", "float16", "auto"]
AttnImplementation = Literal["eager", "sdpa", "flash_attention_2"]


def option(default: Any = MISSING, doc: str = "", *, factory: Any = MISSING, **schema: Any):
    """A documented field. ``schema`` holds extra JSON Schema keywords (minimum, pattern, ...)."""
    metadata = {"doc": doc, "schema": schema}
    if factory is not MISSING:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


def section(cls: type, doc: str):
    """A nested section that defaults to all of its own defaults."""
    return option(doc=doc, factory=cls)


# --------------------------------------------------------------------------- rollout
@dataclass(kw_only=True)
class GenerateKwargs:
    """Sampling settings, named like Hugging Face ``generate`` keywords."""

    do_sample: bool = option(True, "Sample tokens (true) or decode greedily (false).")
    temperature: float = option(
        1.0,
        "Softmax temperature for sampling. PPO log-probs are recomputed at the same temperature.",
        exclusiveMinimum=0,
    )
    top_k: int = option(0, "Sample only among the k most likely tokens; 0 disables.", minimum=0)
    top_p: float = option(
        1.0, "Nucleus sampling: smallest token set with this probability mass; 1.0 disables.",
        exclusiveMinimum=0, maximum=1,
    )
    min_new_tokens: int = option(0, "Tokens generated before end-of-sequence may be sampled.", minimum=0)
    num_beams: int = option(
        1, "Beams per prompt. PPO needs sampled responses: only 1 is supported yet.", minimum=1
    )
    early_stopping: bool = option(
        True, "Hugging Face beam-search early stopping; has an effect only with num_beams > 1."
    )
    eos_token_id: int | None = option(
        None, "Token that ends a response. Default: tokenizer_config.eos_token_id, then the tokenizer's.",
        minimum=0,
    )
    pad_token_id: int | None = option(
        None, "Token that pads finished responses. Default: tokenizer_config.pad_token_id, then the tokenizer's.",
        minimum=0,
    )


@dataclass(kw_only=True)
class RolloutConfig:
    """Generating responses and scoring them."""

    actor_micro_bs: int = option(32, "Prompts per generate call on each generator rank.", minimum=1)
    reward_micro_bs: int = option(32, "Sequences per reward-model forward pass on each reward rank.", minimum=1)
    clip_reward_min: float = option(-1.5, "Reward scores are clipped to [clip_reward_min, clip_reward_max].")
    clip_reward_max: float = option(1.5, "Upper end of the reward clip range.")
    max_new_tokens: int = option(1024, "Most tokens generated per response.", minimum=1)
    n_samples_per_prompt: int = option(
        1,
        "Responses sampled for each prompt; the n responses of a prompt are contiguous rows, one group. The rollout "
        "batch is num_samples_each_epoch x n sequences, and every batch size counts sequences. The group estimators "
        "(repeater_config.advantage_estimator) need n >= 2.",
        minimum=1,
    )
    generate_kwargs: GenerateKwargs = section(GenerateKwargs, "Sampling settings.")
    dynamic_sampling: bool = option(
        False,
        "DAPO's dynamic sampling: drop the groups whose n rewards are all equal (they have zero advantage under every "
        "group estimator) and draw further prompts until the batch is full; needs n_samples_per_prompt >= 2. The "
        "draws are a pure function of (seed, step), so a resumed run stays exact. filtered_frac logs the share dropped.",
    )
    dynamic_sampling_max_draws: int = option(
        4,
        "With dynamic_sampling: most generate rounds per step; when they do not fill the batch, it is topped up with "
        "dropped groups (and the step says so in its metrics).",
        minimum=1,
    )
    max_staleness: int = option(
        0,
        "0: each step's responses come from the weights of the step before (synchronous). 1: a separate generator "
        "group samples step k+1's responses while the trainers train on step k's, with the weights after step k-1, "
        "so generation overlaps training (needs generator_config.shared_with_trainer false; not with dynamic_sampling). "
        "train_config.tis_cap corrects for the lag.",
        minimum=0, maximum=1,
    )
    write_to_file: bool = option(
        False,
        "Append one JSON line per sample to RUN_DIR/rollouts.jsonl (global rank 0, every step): step, row, prompt and "
        "response (decoded text), score (raw), reward (clipped and normalised score), response_len (tokens). A resumed "
        "run first drops the lines of steps after its checkpoint. rlhf-launch status shows the last few. "
        "XTuner's default is true.",
    )


# --------------------------------------------------------------------------- repeater
@dataclass(kw_only=True)
class RepeaterConfig:
    """Turning a rollout into PPO experience: log-probs, values, KL-shaped rewards, GAE."""

    actor_micro_bs: int = option(8, "Sequences per actor forward pass when computing rollout log-probs.", minimum=1)
    ref_micro_bs: int = option(8, "Sequences per reference forward pass.", minimum=1)
    critic_micro_bs: int = option(32, "Sequences per critic forward pass when computing rollout values.", minimum=1)
    reward_scale: bool = option(
        False,
        "Divide each clipped score by the running standard deviation of all scores seen so far "
        "(saved in checkpoints), before the KL penalty is added.",
    )
    norm_rewards: bool = option(
        False,
        "Normalise each clipped score by the running mean and variance of all clipped scores seen so far, this "
        "step's included (as XTuner: update, then normalise): (score - mean) / (sqrt(var) + 1e-8), var the population "
        "variance. The statistics are saved in checkpoints, so a resumed run stays exact. Applied before the KL penalty "
        "is added. Implies reward_scale (the same statistics; scores are divided by the std once). XTuner's default is true.",
    )
    fine_grained_rm: bool = option(False, "Per-token reward-model scores. Not supported yet: only false.")
    value_ema: bool = option(False, "Exponential moving average of value targets. Not supported yet: only false.")
    kl_coeff: float = option(
        0.02,
        "Weight of the KL term: with kl_in reward, reward_t -= kl_coeff * KL_t; with kl_in loss, the actor's loss gains "
        "kl_coeff * KL. 0 removes the reference model from the job.",
        minimum=0,
    )
    kl_estimator: KlEstimatorName = option(
        "k1",
        "Per-token KL estimate from x = logp_actor - logp_ref: k1 = x, k2 = x^2 / 2, k3 = exp(-x) - 1 + x "
        "(Schulman 2020, 'Approximating KL Divergence'; GRPO puts k3 in the loss).",
    )
    kl_in: Literal["reward", "loss"] = option(
        "reward", "Where the KL term acts: reward (a per-token penalty in the rewards, as in PPO-RLHF) or loss (added to "
        "the actor's loss, as in GRPO).",
    )
    advantage_estimator: AdvantageEstimatorName = option(
        "gae",
        "How advantages are estimated (README: Choosing an algorithm). Only gae trains a critic: with any other, the job "
        "has no critic. grpo, dr_grpo, rloo and reinforce_pp_baseline compare the n samples of each prompt "
        "(rollout_config.n_samples_per_prompt >= 2).",
    )
    gamma: float = option(1.0, "GAE discount factor, in [0, 1].", minimum=0, maximum=1)
    gae_lambda: float = option(0.95, "GAE lambda, in [0, 1].", minimum=0, maximum=1)
    answer_end_id: int | None = option(
        None, "A token besides end-of-sequence that ends an answer: generation stops there.", minimum=0
    )
    norm_adv: bool = option(True, "Whiten advantages over the rollout batch (masked mean 0, variance 1).")


# --------------------------------------------------------------------------- train
@dataclass(kw_only=True)
class TrainConfig:
    """The PPO update."""

    ppo_minibatch: int = option(
        64, "Sequences per actor optimizer step, over all actor data-parallel ranks.", minimum=1
    )
    value_minibatch: int = option(
        64, "Sequences per critic optimizer step, over all critic data-parallel ranks.", minimum=1
    )
    actor_micro_bs: int | None = option(
        None,
        "Sequences per actor forward/backward on each rank; gradients accumulate up to ppo_minibatch. "
        "Default: the actor's train_kwargs.micro_bsz.",
        minimum=1,
    )
    critic_micro_bs: int | None = option(
        None,
        "Sequences per critic forward/backward on each rank; gradients accumulate up to value_minibatch. "
        "Default: the critic's train_kwargs.micro_bsz.",
        minimum=1,
    )
    ppo_epochs: int = option(1, "Passes over each rollout batch per PPO step.", minimum=1)
    policy_clip: float = option(0.2, "PPO ratio clip: ratios outside [1-x, 1+x] get no gradient.", exclusiveMinimum=0)
    policy_clip_high: float | None = option(
        None, "Upper ratio clip, 1 + x (DAPO's clip-higher, e.g. 0.28). Default: policy_clip.", exclusiveMinimum=0
    )
    tis_cap: float | None = option(
        None,
        "Truncated importance sampling of the policy loss: each token's loss is weighted by min(pi_old / pi_gen, "
        "tis_cap), pi_gen the generator's probability of the token it sampled (its behaviour log-prob). Corrects for "
        "an asynchronous rollout (rollout_config.max_staleness 1) and for a generator whose numerics differ from the "
        "actor's (vLLM). 2.0 is the usual choice. Default: no weights.",
        exclusiveMinimum=0,
    )
    value_clip: float = option(0.2, "Value clip: new values stay within x of the rollout values.", exclusiveMinimum=0)
    pretrain_step: int = option(0, "Critic-only warm-up steps before the actor starts training.", minimum=0)
    pretrain_loss_weight: float = option(
        0.0,
        "PPO-ptx (Ouyang et al. 2022, InstructGPT): each actor update adds this weight x the language-model loss "
        "(mean token negative log-likelihood) of a batch of pretraining text from pretrain_dataset_config. 0 disables.",
        minimum=0,
    )
    save_interval: int = option(
        80, "Checkpoint every this many PPO steps; 0 saves only at the end.", minimum=0
    )
    save_interval_minutes: float | None = option(
        None, "Also checkpoint at the end of the first step that ends this many minutes after the last checkpoint (or the "
        "start): bounds the work a failure or preemption loses when steps are long. Global rank 0's clock decides for "
        "every rank. Default: off.", exclusiveMinimum=0,
    )
    max_train_step: int = option(1000, "PPO steps to run (warm-up steps included).", minimum=1)


# --------------------------------------------------------------------------- models
@dataclass(kw_only=True)
class PretrainDatasetConfig:
    """Pretraining text for PPO-ptx (train_config.pretrain_loss_weight)."""

    pretrain_datas: list[str] = option(
        doc="Text sources '<source>::<weight>' as in ppo_datas: local .jsonl/.json/.parquet files or folders, or cached "
        "Hugging Face datasets, whose records have a 'text' field (or a chat under 'messages', used whole).",
        minItems=1,
    )
    num_samples_each_epoch: int = option(16, "Pretraining sequences per PPO step, over all actor ranks.", minimum=1)
    max_seq_len: int = option(1024, "Most tokens per pretraining sequence; longer texts keep their first tokens.", minimum=1)
    random_seed: int = option(1024, "Seed of the pretraining text order and mix.")


@dataclass(kw_only=True)
class TokenizerConfig:
    """Tokenizer overrides: which tokenizer, its special tokens and chat template."""

    tokenizer_path: str | None = option(None, "Tokenizer to load. Default: the actor's model_path.")
    pad_token_id: int | None = option(None, "Override the tokenizer's padding token.", minimum=0)
    bos_token_id: int | None = option(
        None, "Override the tokenizer's beginning-of-sequence token (chat templates that write bos_token use it).", minimum=0
    )
    eos_token_id: int | None = option(None, "Override the tokenizer's end-of-sequence token.", minimum=0)
    padding_side: Literal["left"] = option(
        "left", "Prompts are left-padded so that generation continues right after them."
    )
    chat_template: str | None = option(None, "Jinja chat template replacing the tokenizer's.")
    from_pretrained_kwargs: dict[str, Any] = option(
        doc="Other keywords passed to AutoTokenizer.from_pretrained as they are (e.g. use_fast: false); padding_side, "
        "local_files_only, chat_template and trust_remote_code are set by their own keys and refused here.",
        factory=dict,
    )
    trust_remote_code: bool = option(
        False,
        "Run the tokenizer's own Python code (the tokenization_*.py files its tokenizer_config.json names in auto_map, "
        "e.g. InternLM2's), as transformers' trust_remote_code does. Only for tokenizers whose code you trust.",
    )


@dataclass(kw_only=True)
class TrainKwargs:
    """Optimizer settings of a trained model (actor, critic)."""

    micro_bsz: int | None = option(
        None,
        "Sequences per forward/backward on each rank, unless train_config sets this model's micro batch. Default: 1.",
        minimum=1,
    )
    lr: float = option(1.0e-6, "Peak learning rate of AdamW.", exclusiveMinimum=0)
    total_steps: int = option(
        1_000_000_000, "Optimizer steps over which the learning rate decays to lr * lr_decay_rate.", minimum=1
    )
    lr_decay_rate: float = option(
        1.0, "Learning rate reached after total_steps, as a fraction of lr (linear decay); 1 keeps it constant.",
        exclusiveMinimum=0, maximum=1,
    )
    max_grad_norm: float | None = option(
        1.0, "Clip the gradient norm of each optimizer step to this; null disables.", exclusiveMinimum=0
    )
    weight_decay: float = option(0.0, "AdamW weight decay.", minimum=0)
    loss_type: Literal["per_seq", "per_token", "per_seq_sum"] = option(
        "per_seq",
        "per_seq: mean over each sequence's tokens, then over sequences; per_token: mean over all tokens; per_seq_sum: "
        "each sequence's token sum divided by rollout_config.max_new_tokens, then mean over sequences (Dr. GRPO).",
    )


@dataclass(kw_only=True)
class DataParallel:
    """Data parallelism: replicas of the model, each on its share of every batch."""

    size: int = option(1, "Data-parallel ranks (one GPU each).", minimum=1)
    mode: Literal["ddp", "deepspeed"] = option(
        "ddp",
        "ddp: torch DistributedDataParallel (a frozen reference or reward: a whole copy on every rank); deepspeed: "
        "DeepSpeed with this model's deepspeed_config (reference and reward: ZeRO-3 inference, the weights sharded "
        "over the role's ranks, so that a model too large for one GPU fits).",
    )


@dataclass(kw_only=True)
class TensorParallel:
    """Tensor parallelism: each layer's weights split over the ranks of one replica."""

    size: int = option(1, "Tensor-parallel ranks per replica. Only the vLLM generator supports more than 1 yet.", minimum=1)
    mode: Literal["1d"] = option("1d", "Tensor-parallel layout.")


@dataclass(kw_only=True)
class PipelineParallel:
    """Pipeline parallelism: consecutive layers on consecutive ranks."""

    size: int = option(1, "Pipeline stages. Only 1 is supported yet.", minimum=1)
    interleaved_overlap: bool = option(False, "Interleaved pipeline schedule. Only false is supported yet.")


@dataclass(kw_only=True)
class Parallel:
    """How one model is spread over GPUs: data x tensor x pipeline ranks."""

    data: DataParallel = section(DataParallel, "Data parallelism.")
    tensor: TensorParallel = section(TensorParallel, "Tensor parallelism.")
    pipeline: PipelineParallel = section(PipelineParallel, "Pipeline parallelism.")
    sequence: bool = option(False, "Sequence parallelism. Only false is supported yet.")


@dataclass(kw_only=True)
class TrainerConfig:
    """How a model is run: implementation, optimizer settings, GPU layout, DeepSpeed config."""

    trainer_type: Literal["huggingface"] = option("huggingface", "Model implementation: Hugging Face transformers.")
    train_kwargs: TrainKwargs | None = option(
        None, "Optimizer settings; only for trained models (actor, critic). Default: all defaults."
    )
    parallel: Parallel = section(Parallel, "GPU layout of this model.")
    deepspeed_config: dict[str, Any] | None = option(
        None,
        "DeepSpeed config, passed verbatim, for data.mode deepspeed; needs zero_optimization.stage. "
        "Batch keys (train_batch_size, ...) are derived from train_config when left out. Reference and reward: "
        "stage 3 only (stages 0-2 shard nothing a frozen model holds) and no optimizer; batch keys derived from "
        "their inference micro batch (ref_micro_bs, reward_micro_bs) with one accumulation step, and bf16/fp16 "
        "from the model's torch_dtype when both are left out.",
    )
    torch_dtype: Dtype | None = option(
        None,
        "Weight dtype, where XTuner's configs put it (XTuner loads with this one and never reads the model-level "
        "torch_dtype); wins over the model-level key, and a different model-level value is warned about.",
    )
    envs: dict[str, str] = option(
        doc="Environment variables for this model's processes, set before Python starts: on Slurm with env in front "
        "of the worker on its component's srun line, in --local in each rank's environment. Ranks that run several "
        "roles (a hetjob component: actor and critic, reference and reward; a shared generator takes the actor's) "
        "get the union, and two values for one variable there are an error. A one-process --local run sets the "
        "union of all roles in its own environment before the models load (after torch is imported), or runs one "
        "process per rank when roles of different components disagree. Names are shell variable names, not the "
        "launcher's own (RLHF_*, SLURM_*, MASTER_ADDR, ...); values are strings, shell-quoted.",
        factory=dict,
        propertyNames={"pattern": r"^[A-Za-z_][A-Za-z0-9_]*$"},
        additionalProperties={"type": "string"},
    )
    gradient_checkpointing: bool = option(
        False,
        "Actor and critic: activation checkpointing (non-reentrant) of every decoder layer. Training keeps only each "
        "layer's input and recomputes the layer in the backward pass: far less activation memory, about a third more "
        "compute. No effect on the reference and reward, which are not trained.",
    )


@dataclass(kw_only=True)
class GeneratorConfig:
    """Where the actor's responses are generated."""

    shared_with_trainer: bool = option(
        True, "Generate with the actor's own training ranks (true) or a separate generator group (false)."
    )
    generator_type: Literal["hf", "vllm"] = option(
        "hf", "hf: Hugging Face generate; vllm: vLLM engines (only with shared_with_trainer false)."
    )
    parallel: Parallel = section(Parallel, "Layout of a separate generator: data = engines, tensor = GPUs per engine.")
    gpu_memory_utilization: float = option(
        0.9, "vLLM only: fraction of each GPU an engine may use for weights and KV cache "
        "(on CPU the KV cache is sized to the engine's share of the rollout batch instead).",
        exclusiveMinimum=0, maximum=1,
    )


@dataclass(kw_only=True)
class ModelConfig:
    """One model of the job: its weights, dtype, size and how it is run."""

    model_path: str = option(
        doc="Hugging Face model id, or a local folder (a path starting with /, ./, ../ or ~; "
        "relative paths are relative to the spec file)."
    )
    model_type: Literal["actor", "reference", "critic", "reward"] | None = option(
        None, "The role, as in XTuner configs; must match the key it is under. Default: that key."
    )
    torch_dtype: Dtype | None = option(
        None, "Weight dtype; auto takes the checkpoint's. Default: trainer_config.torch_dtype, else bfloat16."
    )
    attn_implementation: AttnImplementation = option(
        "sdpa",
        "Attention kernel, as Hugging Face names it: eager (materialises the seq x seq scores of every head), sdpa "
        "(torch's fused attention) or flash_attention_2 (needs a CUDA GPU and the flash-attn package; falls back to "
        "sdpa with a warning otherwise). XTuner's use_flash_attn: true converts to flash_attention_2.",
    )
    num_params_b: float | None = option(
        None,
        "Parameters in billions, for the resource plan's memory estimate. Default: counted from a local "
        "folder's config.json, else read from the name (e.g. '7b', '1_8b').",
        exclusiveMinimum=0,
    )
    head_name: str | None = option(
        None,
        "Critic and reward: the name of the value head in the checkpoint (XTuner's v_head, OpenRLHF's value_head). "
        "Default: score, v_head, value_head or v_head.summary, whichever the checkpoint has. A reward model without "
        "one is refused; a critic without one starts from a new head.",
        pattern=r"^[A-Za-z_][\w.]*$",
    )
    trust_remote_code: bool = option(
        False,
        "Run the model's own Python code (the configuration_*.py and modeling_*.py files its config.json names in "
        "auto_map), in transformers and in vLLM, as their trust_remote_code does: needed for a model_type transformers "
        "does not know (InternLM2's), and for a reward model that is its own class (loaded through its AutoModel entry, "
        "its value head found by head_name). Only for models whose code you trust. rlhf-launch convert sets it, as "
        "XTuner loads every model this way.",
    )
    tokenizer_config: TokenizerConfig | None = option(
        None,
        "This model's own tokenizer, when it differs from the job's (e.g. a reward model with another vocabulary or "
        "chat template: it then scores the conversation, prompt messages and decoded response, rendered with this "
        "tokenizer's chat template). tokenizer_path defaults to this model's model_path. Default: the top-level "
        "tokenizer_config. The actor's sets the policy's tokenizer; the reference and critic read the policy's token ids.",
    )
    trainer_config: TrainerConfig = section(TrainerConfig, "How this model is run.")

    def load_dtype(self) -> str:
        """The dtype the model is loaded in: ``trainer_config.torch_dtype`` (the one XTuner reads), else
        ``torch_dtype``, else bfloat16. Resolving a spec writes it into ``torch_dtype``, which the runtime reads."""
        return self.trainer_config.torch_dtype or self.torch_dtype or "bfloat16"


@dataclass(kw_only=True)
class ActorConfig(ModelConfig):
    """The policy being trained, and where its responses are generated."""

    generator_config: GeneratorConfig = section(GeneratorConfig, "Where responses are generated.")


@dataclass(kw_only=True)
class RewardConfig(ModelConfig):
    """The reward: a reward model, or a Python function of the prompt and response texts."""

    model_path: str | None = option(
        None, "Reward model: Hugging Face id or local folder. Give this or reward_function."
    )
    reward_function: str | None = option(
        None,
        "A Python reward 'module:function' called as function(prompts, responses) -> list of scores, "
        "instead of a reward model.",
        pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$",
    )


@dataclass(kw_only=True)
class ModelConfigs:
    """The four models of PPO: actor, reference, critic and reward."""

    actor: ActorConfig = option(doc="The policy being trained (causal LM).")
    reference: ModelConfig = option(doc="Frozen policy for the KL penalty (causal LM).")
    critic: ModelConfig = option(doc="Value model being trained (sequence classification, one output).")
    reward: RewardConfig = option(doc="Reward model (sequence classification, one output) or function.")

    def roles(self) -> dict[str, ModelConfig]:
        """The four model configs by role, in ROLES order."""
        return {role: getattr(self, role) for role in ROLES}


# --------------------------------------------------------------------------- data
@dataclass(kw_only=True)
class DatasetConfig:
    """Prompt datasets and how each rollout batch is drawn from them."""

    num_samples_each_epoch: int = option(
        64,
        "Prompts per PPO step (the rollout batch). Each role splits it over its data-parallel ranks in contiguous "
        "shares that differ by at most one (512 over 3 ranks: 171, 171, 170); at least one per rank.",
        minimum=1,
    )
    max_seq_len: int = option(
        1024, "Most prompt tokens; longer prompts keep their last max_seq_len tokens.", minimum=1
    )
    random_seed: int = option(1024, "Seed of the prompt order and the dataset mix.")
    ppo_datas: list[str] = option(
        doc="Prompt sources '<source>::<weight>[META]:<name>[REWARD_META]:<name>' (weight defaults to 1; both suffixes "
        "optional): a Hugging Face dataset from the local cache (e.g. 'Anthropic/hh-rlhf/helpful-base', repo then "
        "data_dir) or a local .jsonl/.json/.parquet file or folder. Weights (> 0) are normalised into a mix. [META] "
        "opens each prompt of the source with that system prompt for the policy, [REWARD_META] for the reward model "
        "(else it reads the prompt as the policy did); either replaces a system message the record opens with.",
        minItems=1,
    )
    system_prompts: dict[str, str] = option(
        doc="Named system prompts for the '[META]:<name>' (policy input) and '[REWARD_META]:<name>' (reward model "
        "input) suffixes of ppo_datas entries. Added to, and overriding, the built-in table, which has XTuner's "
        "names: default, helpful, harmless, hhh, summarization, reddit, latex, math_ci (with this project's texts). "
        "A name the table lacks is a spec error.",
        factory=dict,
        propertyNames={"pattern": r"^[A-Za-z0-9_.-]+$"},
        additionalProperties={"type": "string"},
    )


# --------------------------------------------------------------------------- launcher
@dataclass(kw_only=True)
class SlurmConfig:
    """What the sbatch script asks Slurm for. Command-line flags of the same name override these."""

    partition: str | None = option(None, "Slurm partition(s), comma separated.", pattern=r"^[A-Za-z0-9_.-]+(,[A-Za-z0-9_.-]+)*$")
    account: str | None = option(None, "Slurm account to charge.", pattern=r"^[A-Za-z0-9_.-]+$")
    qos: str | None = option(None, "Slurm quality of service.", pattern=r"^[A-Za-z0-9_.-]+$")
    time: str | None = option(
        None, "Time limit, in a Slurm format: MM, HH:MM:SS or D-HH:MM:SS.",
        pattern=r"^(\d+-)?\d+(:\d{1,2}){0,2}$",
    )
    gpus_per_node: int = option(
        8,
        "GPUs on each node; ranks are packed onto nodes of this size. A component (trainer, inference, generator) "
        "takes equal nodes when its GPUs split so (12 on 8-GPU nodes: 6 + 6), else full nodes and the rest on one "
        "more (20: 8 + 8 + 4, submitted as --nodes=3 --ntasks=20 with at most 8 per node).",
        minimum=1,
    )
    gpu_memory_gb: float = option(80, "Memory of one GPU in GiB, for the plan's memory check.", exclusiveMinimum=0)
    cpus_per_gpu: int = option(8, "CPU cores per rank (one rank per GPU).", minimum=1)
    mem: str | None = option(
        None, "Memory per node, as sbatch --mem (e.g. 500G); 0 asks for all of each node's. Default: per component, the "
        "plan's host memory of its fullest node with a quarter of headroom (--dry-run); 0 for run.device cpu.",
        pattern=r"^\d+[KMGT]?$",
    )
    constraint: str | None = option(
        None, "Node features, as sbatch --constraint (e.g. a100&ib).", pattern=r"^[A-Za-z0-9_.&|,:*\[\]()-]+$"
    )
    extra_sbatch: list[str] = option(
        doc="More sbatch options, one per item, each '--name' or '--name=value' (no spaces or quotes); "
        "added to every component.",
        factory=list,
        items={"type": "string", "pattern": r"^--[A-Za-z][A-Za-z0-9-]*(=[^\s'\"`$\\;]+)?$"},
    )
    setup: list[str] = option(
        doc="Shell lines run verbatim before the job starts (e.g. 'module load cuda'), one line per item. "
        "Default: the job activates the Python environment it was submitted from.",
        factory=list,
        items={"type": "string", "pattern": r"^[^\n\r]*$"},
    )
    signal_seconds: int | None = option(
        None, "Seconds before the time limit at which the job is signalled to checkpoint and requeue; the notice is "
        "honoured at the end of a step, so it must cover one step and a checkpoint write. Default: the plan's figure "
        "(--dry-run), one step's estimated time + the checkpoint at checkpoint_write_gb_per_s + 60 s; a shorter value "
        "is warned about.", minimum=10,
    )
    checkpoint_write_gb_per_s: float = option(
        1.0, "GB per second at which the run folder's file system takes a checkpoint, all ranks together; sizes the "
        "default signal_seconds. 1 suits a busy shared file system; a parallel one may take 5-20.", exclusiveMinimum=0,
    )


@dataclass(kw_only=True)
class RunConfig:
    """Name, output folder, seed and device of the run."""

    name: str = option(
        "rlhf", "Run name: Slurm job name and the run folder under output_dir.",
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$",
    )
    output_dir: str = option(
        "runs", "Folder of run folders (relative to the working directory); the run writes to output_dir/name.",
        pattern=r"^[^\s\"'`$\\;&|<>*?]+$",
    )
    seed: int = option(0, "Seed of weights initialisation and sampling.")
    device: Literal["auto", "cuda", "cpu"] = option("auto", "auto: CUDA when available, else CPU.")
    rendezvous_timeout_s: float = option(
        600, "Seconds every rank waits for the others to arrive before the job fails, naming the missing ones.",
        exclusiveMinimum=0,
    )
    warmup_timeout_s: float = option(
        300, "Seconds after the rendezvous by which every rank must have formed its process groups (each group's first "
        "collective, before any model loads; NCCL creates its communicators there); past it the job fails, naming the roles "
        "and ranks that have not. A stuck NCCL start-up would otherwise hang until the time limit.",
        exclusiveMinimum=0,
    )
    role_timeout_s: float = option(
        600, "Seconds one collective inside a role (DDP, ZeRO, a vLLM engine's tensor-parallel ranks) waits for the role's "
        "other ranks before it fails the job (NCCL aborts the rank). A role's ranks run in step: raise it only when one "
        "rank's part of a checkpoint write can take longer.",
        exclusiveMinimum=0,
    )
    exchange_timeout_s: float = option(
        1800, "Seconds one exchange between roles (gathering scores, weight sync, barriers) waits for its other ranks "
        "before it fails the job. Ranks wait here while another role generates or the slowest writes its part of a "
        "checkpoint: keep it above the longest of those.",
        exclusiveMinimum=0,
    )
    heartbeat_timeout_s: float = option(
        120, "Seconds without a heartbeat after which a rank is taken for dead and the job fails, naming it. The heartbeat "
        "is a Python thread: a call that holds the interpreter lock that long (loading a multi-GB optimizer shard from a "
        "slow file system) stops it too, so keep this above the longest such call.",
        minimum=5,
    )


@dataclass(kw_only=True)
class JobSpec:
    """A whole RLHF-PPO job."""

    run: RunConfig = section(RunConfig, "Name, output folder and seed of the run.")
    slurm: SlurmConfig = section(SlurmConfig, "Cluster resources for the Slurm job.")
    rollout_config: RolloutConfig = section(RolloutConfig, "Generation and scoring.")
    repeater_config: RepeaterConfig = section(RepeaterConfig, "Experience: KL penalty and advantages.")
    train_config: TrainConfig = section(TrainConfig, "The PPO update.")
    model_configs: ModelConfigs = option(doc="The four models.")
    dataset_config: DatasetConfig = option(doc="Prompt datasets and how each rollout batch is drawn.")
    pretrain_dataset_config: PretrainDatasetConfig | None = option(
        None, "Pretraining text for PPO-ptx; needed when train_config.pretrain_loss_weight > 0."
    )
    tokenizer_config: TokenizerConfig = section(TokenizerConfig, "Tokenizer overrides.")

    def to_dict(self) -> dict[str, Any]:
        """The spec as plain data, the shape YAML and JSON Schema describe."""
        return dataclasses.asdict(self)

    # Three keys are named ``actor_micro_bs`` and mean three things; these methods say which
    # one a role uses, so that no other module works it out again.
    def train_micro_batch(self, role: str) -> int:
        """Sequences per forward/backward on each rank of a trained role (actor or critic):
        ``train_config.<role>_micro_bs``, else the role's ``train_kwargs.micro_bsz``, else 1."""
        explicit = getattr(self.train_config, f"{role}_micro_bs")
        if explicit is not None:
            return explicit
        kwargs = self.model_configs.roles()[role].trainer_config.train_kwargs
        return kwargs.micro_bsz if kwargs is not None and kwargs.micro_bsz is not None else 1

    def train_minibatch(self, role: str) -> int:
        """Sequences per optimizer step of a trained role, over all of its data-parallel ranks."""
        return self.train_config.ppo_minibatch if role == "actor" else self.train_config.value_minibatch

    def rollout_size(self) -> int:
        """Sequences in each step's rollout: num_samples_each_epoch prompts x n_samples_per_prompt responses each."""
        return self.dataset_config.num_samples_each_epoch * self.rollout_config.n_samples_per_prompt

    def inference_micro_batch(self, role: str) -> int:
        """Sequences per forward pass when a role scores a rollout; for the generator, prompts
        per generate call."""
        return {
            "generator": self.rollout_config.actor_micro_bs,
            "actor": self.repeater_config.actor_micro_bs,
            "reference": self.repeater_config.ref_micro_bs,
            "critic": self.repeater_config.critic_micro_bs,
            "reward": self.rollout_config.reward_micro_bs,
        }[role]


def field_doc(f: dataclasses.Field) -> str:
    """A field's documentation, as given to ``option``; '' when it has none."""
    return f.metadata.get("doc", "")
