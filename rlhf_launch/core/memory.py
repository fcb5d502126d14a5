"""Peak GPU memory per rank of each role, estimated from the model's size and the spec.

An estimate to catch layouts that cannot fit before waiting in a queue, not a promise:
  weights     params x bytes, split over data ranks by ZeRO-3 (plus, for a frozen model, the one layer a
              forward gathers whole) and over tensor ranks;
  gradients   params x bytes, split over data ranks by ZeRO-2 and up;
  optimizer   AdamW moments (2 x param bytes), or with DeepSpeed bf16/fp16 12 bytes per
              parameter (fp32 master copy and moments), split over data ranks by ZeRO-1 and up;
              a bf16 model trained without DeepSpeed keeps fp32 weights, gradients and moments
              (4 + 4 + 8 bytes per parameter) and computes in bf16;
  activations per decoder layer seq x micro x hidden x (34 + 5 x heads x seq / hidden) bytes with
              16-bit activations (Korthikanti et al. 2022, "Reducing Activation Recomputation in
              Large Transformer Models", eq. 1; twice that for float32 models). The second term is
              the seq x seq attention scores and softmax of every head, which only the eager kernel
              materialises: sdpa and flash_attention_2 compute attention in tiles and keep none.
              Training without recomputation keeps every layer's; with gradient checkpointing it
              keeps each layer's input (2 x seq x micro x hidden bytes per layer) plus the
              activations of the one layer being recomputed (the paper's full recomputation, which
              stores 2sbhL); inference keeps one layer's at a time. Plus fp32 logits of the micro batch;
  kv cache    2 x layers x kv_dim x bytes per token, for the sequences generated at once.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from rlhf_launch.core.config import JobSpec, ModelConfig
from rlhf_launch.core.model_shape import ModelShape

GIB = 1024**3
_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "auto": 2}


@dataclass(frozen=True)
class MemoryEstimate:
    """Estimated peak memory of one rank of a role, in GiB, by kind."""

    weights_gib: float
    gradients_gib: float
    optimizer_gib: float
    activations_gib: float
    kv_cache_gib: float

    @property
    def total_gib(self) -> float:
        """All kinds together, in GiB."""
        return self.weights_gib + self.gradients_gib + self.optimizer_gib + self.activations_gib + self.kv_cache_gib

    def to_json(self) -> dict[str, float]:
        """Each kind and the total in GiB, rounded to 0.01."""
        return {k: round(v, 2) for k, v in {**asdict(self), "total_gib": self.total_gib}.items()}


def _seq_len(spec: JobSpec) -> int:
    return spec.dataset_config.max_seq_len + spec.rollout_config.max_new_tokens


def _activations(model: ModelConfig, shape: ModelShape, spec: JobSpec, micro: int, training: bool, logits: bool) -> float:
    """Activation bytes of one micro batch at its peak (the module docstring has the formula)."""
    seq = _seq_len(spec)
    scale = 2 if model.load_dtype() == "float32" else 1  # the paper's 34 and 5 count 16-bit values
    scores = 5 * shape.attention_heads * seq * seq * micro if model.attn_implementation == "eager" else 0
    layer = (34 * seq * micro * shape.hidden + scores) * scale
    if not training:
        act = layer
    elif model.trainer_config.gradient_checkpointing:
        act = 2 * seq * micro * shape.hidden * scale * shape.layers + layer
    else:
        act = layer * shape.layers
    return act + (seq * micro * shape.vocab * 4 if logits else 0)


def _kv_cache(shape: ModelShape, spec: JobSpec, sequences: int, dtype_bytes: int, tensor: int) -> float:
    per_token = 2 * shape.layers * shape.kv_dim * dtype_bytes
    return per_token * _seq_len(spec) * sequences / tensor


def _zero_stage(model: ModelConfig) -> int | None:
    tc = model.trainer_config
    if tc.parallel.data.mode != "deepspeed" or not tc.deepspeed_config:
        return None
    return tc.deepspeed_config.get("zero_optimization", {}).get("stage", 0)


def _mixed_precision(model: ModelConfig) -> bool:
    ds = model.trainer_config.deepspeed_config or {}
    return any(isinstance(ds.get(k), dict) and ds[k].get("enabled") for k in ("bf16", "fp16"))


def training(model: ModelConfig, shape: ModelShape, spec: JobSpec, micro: int, logits: bool) -> MemoryEstimate:
    """Actor or critic: weights, gradients, optimizer states by ZeRO stage; the actor, when it
    also generates, holds full weights (gathered under ZeRO-3) and a KV cache at its peak."""
    n = model.trainer_config.parallel.data.size
    stage = _zero_stage(model)
    b = _DTYPE_BYTES[model.load_dtype()]
    if stage is not None and _mixed_precision(model):
        weights, grads, optim = 2 * shape.params, 2 * shape.params, 12 * shape.params
    elif stage is None and b == 2:  # torch keeps bf16 models' master weights in fp32 (rlhf_launch/runtime/engine.py)
        weights, grads, optim = 4 * shape.params, 4 * shape.params, 8 * shape.params
    else:
        weights, grads, optim = b * shape.params, b * shape.params, 2 * b * shape.params
    if stage is not None:
        optim /= n if stage >= 1 else 1
        grads /= n if stage >= 2 else 1
        weights /= n if stage >= 3 else 1
    acts = _activations(model, shape, spec, micro, True, logits)
    train = MemoryEstimate(weights / GIB, grads / GIB, optim / GIB, acts / GIB, 0.0)
    gen_cfg = getattr(model, "generator_config", None)
    if gen_cfg is None or not gen_cfg.shared_with_trainer:
        return train
    kv = _kv_cache(shape, spec, spec.inference_micro_batch("generator"), b, 1)
    gathered = b * shape.params if stage == 3 else 0.0
    generating = MemoryEstimate((weights + gathered) / GIB, grads / GIB, optim / GIB, 0.0, kv / GIB)
    return max(train, generating, key=lambda m: m.total_gib)


def gathered_params(shape: ModelShape) -> float:
    """Parameters ZeRO-3 holds whole at once beyond a rank's shard in a forward: the largest module it
    gathers, a decoder layer or the embedding (or output head) matrix. A layer is counted as all
    parameters but one embedding matrix over the layers, which errs high when the head is untied."""
    embedding = shape.vocab * shape.hidden
    return max((shape.params - embedding) / shape.layers, embedding)


def inference(model: ModelConfig, shape: ModelShape, spec: JobSpec, micro: int, logits: bool) -> MemoryEstimate:
    """Reference or reward: weights and one forward pass of a micro batch (one layer's activations live).
    Under ZeRO-3 (data.mode deepspeed) each rank holds its 1/data share of the weights plus the module
    being computed, gathered whole (``gathered_params``)."""
    b = _DTYPE_BYTES[model.load_dtype()]
    weights = b * shape.params
    if _zero_stage(model) == 3:
        weights = weights / model.trainer_config.parallel.data.size + b * gathered_params(shape)
    acts = _activations(model, shape, spec, micro, False, logits)
    return MemoryEstimate(weights / GIB, 0.0, 0.0, acts / GIB, 0.0)


def generator(actor: ModelConfig, shape: ModelShape, spec: JobSpec) -> MemoryEstimate:
    """A separate generator: weights split over tensor ranks and the KV cache of its share of the
    rollout (vLLM schedules them at once when they fit; HF generate runs actor_micro_bs at a time)."""
    gen = actor.generator_config
    b = _DTYPE_BYTES[actor.load_dtype()]
    tp = gen.parallel.tensor.size
    if gen.generator_type == "vllm":
        sequences = spec.dataset_config.num_samples_each_epoch // gen.parallel.data.size
    else:
        sequences = spec.inference_micro_batch("generator")
    kv = _kv_cache(shape, spec, sequences, b, tp)
    return MemoryEstimate(b * shape.params / tp / GIB, 0.0, 0.0, 0.0, kv / GIB)
