"""Peak GPU memory per rank of each role, estimated from the model's size and the spec.

An estimate to catch layouts that cannot fit before waiting in a queue. It errs high, not low: where a
figure depends on what a kernel or a library happens to do, the larger case is counted.
  weights     params x bytes, split over data ranks by ZeRO-3 (plus the largest module a forward gathers
              whole, ``gathered_params``) and over tensor ranks; a bf16 model trained without DeepSpeed
              keeps fp32 weights (4 bytes) and autocast's bf16 copies of them (2 bytes), which the forward
              makes and the backward keeps;
  gradients   with DeepSpeed bf16/fp16, the 16-bit gradients backward makes (2 bytes; under ZeRO-3 only
              those of the gathered module) and DeepSpeed's fp32 gradient partition (4 bytes, split over
              data ranks by ZeRO-1 and up): 4 P / n + 2 x gathered under ZeRO-3, which is DeepSpeed's own
              estimator (estimate_zero3_model_states_mem_needs: 18 P / n + 4 x largest layer, with the
              optimizer's 12); without DeepSpeed, one gradient per weight in the weight's dtype;
  optimizer   AdamW moments (2 x param bytes), or with DeepSpeed bf16/fp16 12 bytes per parameter (fp32
              master copy and moments), split over data ranks by ZeRO-1 and up;
  buffers     DeepSpeed's communication buckets: the reduce bucket (zero_optimization.reduce_bucket_size,
              default 5e8 elements, 16-bit) and under ZeRO-3 the prefetch bucket (stage3_prefetch_bucket_size,
              default 5e7); ZeRO-1/2 add the all-gather bucket (allgather_bucket_size, default 5e8). A
              generator also holds two weight-sync chunks in flight and one layer being reloaded;
  activations per decoder layer and token, with h hidden, kv the key/value width and i the MLP width:
              gated-MLP (Llama-type: SwiGLU, Hugging Face's RMSNorm, which keeps its input in fp32):
                16-bit weights and compute   16 h (two RMSNorms: fp32 input, normed copy, output)
                                             + 2 (2 h + 2 kv) (rotated q and k, v, attention output) + 8 i
                                             (gate, SiLU, up, product): 45.5 h for LLaMA-2 7B, measured
                                             on CPU (tests/core/test_memory_measured.py);
                fp32 weights, bf16 autocast  26 h (the norms' fp32 outputs and a bf16 copy per consumer)
                                             + 2 (2 h + 2 kv) + 8 i;
                float32                      24 h + 4 (2 h + 2 kv) + 16 i;
              other models (GPT-type): 34 h bytes with 16-bit activations (Korthikanti et al. 2022,
              "Reducing Activation Recomputation in Large Transformer Models", eq. 1), twice that in fp32.
              Eager attention adds the seq x seq scores and softmax of every head (5 x heads x seq bytes per
              token and layer, 16-bit), which sdpa and flash_attention_2 compute in tiles and keep none of.
              Training without recomputation keeps every layer's and one more layer's worth while the
              backward works; with gradient checkpointing each layer's input (2 h, 4 h under autocast or
              fp32) plus two layers (the one recomputed and the backward's). An inference forward keeps
              nothing for a backward: its peak is inside one layer's MLP, 9 h + 6 i with 16-bit compute (the
              residual, the embedding output, the normed input, SiLU, up and their product: 24.6 h measured
              at LLaMA-2's ratio), 15 h + 6 i under autocast, twice the 16-bit count in fp32, GPT's 34 h;
  logits      per response token and vocabulary entry: training the actor keeps 29 bytes at its peak
              (the fp32 logits 4, the log-softmax the backward needs 4, and the entropy's no-grad pass,
              rlhf_launch/runtime/ppo.py entropy_from_logits: log-softmax, exp, mask, product, zeros and
              where, 4 + 4 + 1 + 4 + 4 + 4); an inference forward 10 (bf16 logits, their fp32 copy and
              the log-softmax or the temperature's quotient); PPO-ptx's language-model loss 12 per
              pretraining token (fp32 logits, log-softmax, its gradient). An inference forward's layers and
              its logits are never alive together: only the larger of the two is counted;
  kv cache    2 x layers x kv_dim x bytes per token, for the sequences generated at once;
  overhead    a stated allowance, not measured here: the CUDA context with its libraries' workspaces
              (CUDA_CONTEXT_GIB) and every NCCL communicator the rank warms up (NCCL_COMMUNICATOR_GIB each).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from rlhf_launch.core.config import JobSpec, ModelConfig
from rlhf_launch.core.model_shape import ModelShape

GIB = 1024**3
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "auto": 2}
CUDA_CONTEXT_GIB = 1.0  # the context, cuBLAS/cuDNN workspaces and loaded kernels; about 0.5-0.8 GiB on H100 with CUDA 12
NCCL_COMMUNICATOR_GIB = 0.5  # one warmed-up communicator's buffers and channels; NVLS on NVSwitch systems can take more
# DeepSpeed's defaults (deepspeed/runtime/zero/config.py), in elements
DS_REDUCE_BUCKET = 5e8
DS_ALLGATHER_BUCKET = 5e8
DS_PREFETCH_BUCKET = 5e7
LOGITS_TRAIN_BYTES = 29  # per response token and vocabulary entry: see the module docstring
LOGITS_INFERENCE_BYTES = 10
LOGITS_PTX_BYTES = 12


@dataclass(frozen=True)
class MemoryEstimate:
    """Estimated peak memory of one rank of a role, in GiB, by kind; ``phase``: when the peak comes (training,
    scoring, generating), where a role has several."""

    weights_gib: float
    gradients_gib: float
    optimizer_gib: float
    activations_gib: float
    kv_cache_gib: float
    logits_gib: float = 0.0
    buffers_gib: float = 0.0
    overhead_gib: float = 0.0
    phase: str = ""

    @property
    def total_gib(self) -> float:
        """All kinds together, in GiB."""
        return sum(v for v in asdict(self).values() if isinstance(v, float | int))

    @property
    def model_states_gib(self) -> float:
        """Weights, gradients and optimizer states: what DeepSpeed's estimators count."""
        return self.weights_gib + self.gradients_gib + self.optimizer_gib

    def to_json(self) -> dict[str, float | str]:
        """Each kind and the total in GiB, rounded to 0.01, and the phase when there is one."""
        kinds = {k: round(v, 2) for k, v in {**asdict(self), "total_gib": self.total_gib}.items() if k != "phase"}
        return {**kinds, "phase": self.phase} if self.phase else kinds


def overhead_gib(communicators: int) -> float:
    """The stated allowance for the CUDA context and ``communicators`` warmed-up NCCL communicators, in GiB."""
    return CUDA_CONTEXT_GIB + communicators * NCCL_COMMUNICATOR_GIB


def _seq_len(spec: JobSpec) -> int:
    return spec.dataset_config.max_seq_len + spec.rollout_config.max_new_tokens


def compute_mode(model: ModelConfig, trained: bool) -> str:
    """How a role's forward computes: '16bit' (16-bit weights and compute: DeepSpeed's mixed precision, a frozen
    bf16 model), 'autocast' (fp32 weights computing in bf16: a bf16 model trained without DeepSpeed) or 'fp32'."""
    if model.load_dtype() == "float32":
        return "fp32"
    if trained and zero_stage(model) is None:
        return "autocast"
    return "16bit"


def layer_bytes_per_token(shape: ModelShape, mode: str) -> float:
    """Activation bytes one decoder layer keeps for the backward per token (the module docstring has the formulas;
    the eager kernel's attention scores come on top)."""
    h, kv, i = shape.hidden, shape.kv_dim, shape.mlp_width
    if not shape.gated_mlp:
        return 34 * h * (2 if mode == "fp32" else 1)
    width = 4 if mode == "fp32" else 2
    norms = {"16bit": 16, "autocast": 26, "fp32": 24}[mode] * h
    return norms + width * (2 * h + 2 * kv) + width * 4 * i


def inference_layer_bytes_per_token(shape: ModelShape, mode: str) -> float:
    """Peak activation bytes per token of a no-grad forward, inside one decoder layer (module docstring)."""
    h, i = shape.hidden, shape.mlp_width
    if not shape.gated_mlp:
        return 34 * h * (2 if mode == "fp32" else 1)
    return {"16bit": 9 * h + 6 * i, "autocast": 15 * h + 6 * i, "fp32": 18 * h + 12 * i}[mode]


def _layer_input_bytes(mode: str) -> int:
    """Bytes per hidden unit of a decoder layer's input, which gradient checkpointing keeps."""
    return 2 if mode == "16bit" else 4


def _activations(model: ModelConfig, shape: ModelShape, spec: JobSpec, micro: int, training: bool, tokens: int | None = None,
                 trained: bool | None = None) -> float:
    """Activation bytes of one micro batch at its peak, logits aside (the module docstring has the formula); ``trained``:
    the model is trained (its forwards compute as training does), by default when ``training``."""
    seq = tokens or _seq_len(spec)
    mode = compute_mode(model, training if trained is None else trained)
    scale = 2 if mode == "fp32" else 1  # the paper's 5 counts 16-bit values
    scores = 5 * shape.attention_heads * seq * seq * micro * scale if model.attn_implementation == "eager" else 0
    if not training:
        return inference_layer_bytes_per_token(shape, mode) * seq * micro + scores
    layer = layer_bytes_per_token(shape, mode) * seq * micro + scores
    if model.trainer_config.gradient_checkpointing:
        return _layer_input_bytes(mode) * shape.hidden * seq * micro * shape.layers + 2 * layer
    return layer * (shape.layers + 1)


def _logits(shape: ModelShape, spec: JobSpec, micro: int, per_entry: int, tokens: int | None = None) -> float:
    """Bytes of the logits and what is computed from them, over ``tokens`` (default: the response's) per sequence."""
    return per_entry * shape.vocab * (tokens or spec.rollout_config.max_new_tokens + 1) * micro


def _larger(activations: float, logits: float) -> tuple[float, float]:
    """(activations, logits) of a forward without grad, whose decoder layers are gone when its logits are made: the
    larger one, the other 0."""
    return (activations, 0.0) if activations >= logits else (0.0, logits)


def _kv_cache(shape: ModelShape, spec: JobSpec, sequences: int, dtype_bytes: int, tensor: int) -> float:
    per_token = 2 * shape.layers * shape.kv_dim * dtype_bytes
    return per_token * _seq_len(spec) * sequences / tensor


def zero_stage(model: ModelConfig) -> int | None:
    """The model's DeepSpeed ZeRO stage; None when it does not run under DeepSpeed."""
    tc = model.trainer_config
    if tc.parallel.data.mode != "deepspeed" or not tc.deepspeed_config:
        return None
    return tc.deepspeed_config.get("zero_optimization", {}).get("stage", 0)


def mixed_precision(model: ModelConfig) -> bool:
    """Whether the model's deepspeed_config enables bf16 or fp16 (16-bit weights, fp32 masters in the optimizer)."""
    ds = model.trainer_config.deepspeed_config or {}
    return any(isinstance(ds.get(k), dict) and ds[k].get("enabled") for k in ("bf16", "fp16"))


def _zero_setting(model: ModelConfig, key: str, default: float) -> float:
    """A zero_optimization size from the model's deepspeed_config; DeepSpeed's default when absent or not a number ('auto')."""
    value = (model.trainer_config.deepspeed_config or {}).get("zero_optimization", {}).get(key)
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else default


def zero_buffers(model: ModelConfig, trained: bool) -> float:
    """Bytes of DeepSpeed's 16-bit communication buckets on each rank: the reduce bucket of a trained model, the
    prefetch bucket under ZeRO-3 and the all-gather bucket under ZeRO-1/2; 0 without DeepSpeed."""
    stage = zero_stage(model)
    if stage is None:
        return 0.0
    elements = _zero_setting(model, "reduce_bucket_size", DS_REDUCE_BUCKET) if trained else 0.0
    if stage == 3:
        elements += _zero_setting(model, "stage3_prefetch_bucket_size", DS_PREFETCH_BUCKET)
    elif trained and stage >= 1:
        elements += _zero_setting(model, "allgather_bucket_size", DS_ALLGATHER_BUCKET)
    return 2 * elements


def model_states(model: ModelConfig, shape: ModelShape) -> tuple[float, float, float]:
    """Bytes of (weights, gradients, optimizer states) on one rank of a trained model (the module docstring)."""
    n = model.trainer_config.parallel.data.size
    stage = zero_stage(model)
    p = shape.params
    b = DTYPE_BYTES[model.load_dtype()]
    if stage is not None and mixed_precision(model):
        gathered = 2 * gathered_params(shape)
        if stage == 3:
            return 2 * p / n + gathered, 4 * p / n + gathered, 12 * p / n
        fp32_grads = 4 * p / (n if stage >= 1 else 1)
        return 2 * p, 2 * p + fp32_grads, 12 * p / (n if stage >= 1 else 1)
    if stage is None and b == 2:  # fp32 masters, bf16 compute (rlhf_launch/runtime/engine.py); autocast's copies live to the backward
        return 6 * p, 4 * p, 8 * p
    weights, grads, optim = b * p, b * p, 2 * b * p
    if stage is not None:
        optim /= n if stage >= 1 else 1
        grads /= n if stage >= 2 else 1
        weights /= n if stage >= 3 else 1
    return weights, grads, optim


def training(model: ModelConfig, shape: ModelShape, spec: JobSpec, micro: int, logits: bool, communicators: int = 2) -> MemoryEstimate:
    """Actor or critic: the largest of ``training_phases``."""
    return max(training_phases(model, shape, spec, micro, logits, communicators), key=lambda m: m.total_gib)


def training_phases(model: ModelConfig, shape: ModelShape, spec: JobSpec, micro: int, logits: bool,
                    communicators: int = 2) -> list[MemoryEstimate]:
    """Actor or critic: training a micro batch, scoring the rollout (the actor's old log-probs, the critic's values,
    at the repeater's micro batch) and, for an actor that also generates, generating (full weights, gathered under
    ZeRO-3, and a KV cache). ``logits``: the model ends in the vocabulary (the actor)."""
    weights, grads, optim = model_states(model, shape)
    overhead = overhead_gib(communicators)
    buffers = zero_buffers(model, trained=True) / GIB
    states = (weights / GIB, grads / GIB, optim / GIB)
    tokens = _seq_len(spec)
    ptx = spec.pretrain_dataset_config if logits and spec.train_config.pretrain_loss_weight > 0 else None
    if ptx is not None:
        tokens = max(tokens, ptx.max_seq_len)
    acts = _activations(model, shape, spec, micro, True, tokens)
    logit_bytes = _logits(shape, spec, micro, LOGITS_TRAIN_BYTES) if logits else 0.0
    if ptx is not None:
        logit_bytes = max(logit_bytes, _logits(shape, spec, micro, LOGITS_PTX_BYTES, ptx.max_seq_len))
    candidates = [MemoryEstimate(*states, acts / GIB, 0.0, logit_bytes / GIB, buffers, overhead, "training")]
    role = "actor" if logits else "critic"
    scoring = spec.inference_micro_batch(role)
    score_logits = _logits(shape, spec, scoring, LOGITS_INFERENCE_BYTES) if logits else 0.0
    score_acts, score_logits = _larger(_activations(model, shape, spec, scoring, False, trained=True), score_logits)
    candidates.append(MemoryEstimate(*states, score_acts / GIB, 0.0, score_logits / GIB, buffers, overhead, "scoring"))
    gen_cfg = getattr(model, "generator_config", None)
    if logits and gen_cfg is not None and gen_cfg.shared_with_trainer:
        b = DTYPE_BYTES[model.load_dtype()]
        kv = _kv_cache(shape, spec, spec.inference_micro_batch("generator"), b, 1)
        gathered = b * shape.params if zero_stage(model) == 3 else 0.0
        candidates.append(MemoryEstimate((weights + gathered) / GIB, grads / GIB, optim / GIB, 0.0, kv / GIB, 0.0, buffers, overhead,
                                         "generating"))
    return candidates


def gathered_params(shape: ModelShape) -> float:
    """Parameters ZeRO-3 holds whole at once beyond a rank's shard in a forward: the largest module it
    gathers, a decoder layer or the embedding (or output head) matrix. A layer is counted as all
    parameters but one embedding matrix over the layers, which errs high when the head is untied."""
    embedding = shape.vocab * shape.hidden
    return max((shape.params - embedding) / shape.layers, embedding)


def inference(model: ModelConfig, shape: ModelShape, spec: JobSpec, micro: int, logits: bool, communicators: int = 2) -> MemoryEstimate:
    """Reference or reward: weights and one forward pass of a micro batch (one layer's activations live).
    Under ZeRO-3 (data.mode deepspeed) each rank holds its 1/data share of the weights plus the module
    being computed, gathered whole (``gathered_params``), and the prefetch bucket."""
    b = DTYPE_BYTES[model.load_dtype()]
    weights = b * shape.params
    if zero_stage(model) == 3:
        weights = weights / model.trainer_config.parallel.data.size + b * gathered_params(shape)
    acts, logit_bytes = _larger(_activations(model, shape, spec, micro, False),
                                _logits(shape, spec, micro, LOGITS_INFERENCE_BYTES) if logits else 0.0)
    return MemoryEstimate(weights / GIB, 0.0, 0.0, acts / GIB, 0.0, logit_bytes / GIB, zero_buffers(model, trained=False) / GIB,
                          overhead_gib(communicators))


def sync_chunk_bytes(shape: ModelShape, dtype_bytes: int) -> float:
    """Bytes of the largest weight-sync chunk (rlhf_launch/runtime/weight_sync.py: a decoder layer, or the embedding)."""
    return dtype_bytes * gathered_params(shape)


def generator(actor: ModelConfig, shape: ModelShape, spec: JobSpec, communicators: int = 4) -> MemoryEstimate:
    """A separate generator: weights split over tensor ranks and the KV cache of its share of the
    rollout (vLLM schedules them at once when they fit; HF generate runs actor_micro_bs at a time);
    buffers: two weight-sync chunks in flight and one layer being reloaded (its tensor-parallel share)."""
    gen = actor.generator_config
    b = DTYPE_BYTES[actor.load_dtype()]
    tp = gen.parallel.tensor.size
    if gen.generator_type == "vllm":
        sequences = spec.dataset_config.num_samples_each_epoch // gen.parallel.data.size
    else:
        sequences = spec.inference_micro_batch("generator")
    kv = _kv_cache(shape, spec, sequences, b, tp)
    chunk = sync_chunk_bytes(shape, b)
    return MemoryEstimate(b * shape.params / tp / GIB, 0.0, 0.0, 0.0, kv / GIB, 0.0, (2 * chunk + chunk / tp) / GIB,
                          overhead_gib(communicators))


def vllm_headroom_gib(estimate: MemoryEstimate) -> float:
    """What a vLLM rank needs outside the util x memory that vLLM takes whole: the CUDA context, the warmed-up
    communicators, two in-flight weight-sync chunks and one layer being reloaded."""
    return estimate.overhead_gib + estimate.buffers_gib
