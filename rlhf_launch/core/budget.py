"""What a run needs besides GPU memory, estimated from the plan: each trained role's checkpoint, the run folder's
disk, one PPO step's time, the preemption notice (slurm.signal_seconds) that covers a step and a checkpoint write,
and the host memory of each node (sbatch --mem).

Estimates to size a notice and a request, on stated assumptions (the constants below), not measurements:
  checkpoint   a trained role's whole training state (rlhf_launch/runtime/engine.py): under DeepSpeed with
               bf16/fp16, its 16-bit weights and the optimizer's fp32 master weights and Adam moments (2 + 12
               bytes per parameter); the torch trainer's weights in their training dtype (fp32 masters for a
               bf16 model) and the moments (4 + 8 for fp32 weights); the reference and reward save nothing;
  disk         three checkpoints at once (the two kept and the one being written in its temporary folder,
               rlhf_launch/runtime/checkpoint.py) and the exported final models in their load dtype;
  step time    generation: one decode step per new token and generate call, each reading the rank's weights
               once from GPU memory (HBM_BYTES_PER_S) and taking at least a floor for the engine's own work
               (HF_TOKEN_S, VLLM_TOKEN_S); scoring 2 and training 6 FLOPs per parameter and token (8 with
               gradient checkpointing, per PPO epoch) at EFFECTIVE_FLOPS per GPU; every stage after the other;
  notice       one step (a notice is honoured at the end of a step) + the checkpoint written at
               slurm.checkpoint_write_gb_per_s + SIGNAL_MARGIN_S for the requeue, rounded up to 10 s;
  host memory  per rank HOST_BASE_GIB (Python, torch, CUDA, NCCL and the libraries) plus the most that loading
               or checkpointing holds in host memory: a frozen or DDP model's weights (loaded on the host first;
               under ZeRO-3 one safetensors file of at most SHARD_GIB and the rank's share), a DeepSpeed rank's
               part of a checkpoint, a torch trainer's whole checkpoint (loaded on the host), a vLLM engine's
               weight share and VLLM_SWAP_GIB; per node the sum over its ranks x HOST_HEADROOM.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from rlhf_launch.core.config import JobSpec, ModelConfig
from rlhf_launch.core.memory import DTYPE_BYTES, GIB, mixed_precision, zero_stage
from rlhf_launch.core.model_shape import ModelShape

GB = 1e9
CHECKPOINT_COPIES = 3  # keep-last-2 and the temporary folder of the one being written
EFFECTIVE_FLOPS = 100e12  # bf16 per GPU, about a third of an A100's or a tenth of an H100's dense peak: errs slow
HBM_BYTES_PER_S = 1e12  # a decode step reads the rank's weights once: about half of an A100's bandwidth
HF_TOKEN_S = 0.04  # the least one Hugging Face generate step of a 7B-class model takes, Python and kernel launches
VLLM_TOKEN_S = 0.02
SIGNAL_MARGIN_S = 60
HOST_BASE_GIB = 8.0
HOST_HEADROOM = 1.25
SHARD_GIB = 5.0  # the largest safetensors file of a sharded checkpoint, as Hugging Face writes them
VLLM_SWAP_GIB = 4.0


def checkpoint_bytes(model: ModelConfig, shape: ModelShape) -> float:
    """Bytes one checkpoint holds for a trained role (all its ranks together)."""
    p = shape.params
    if zero_stage(model) is not None and mixed_precision(model):
        return 14 * p
    return 12 * p  # fp32 weights (a bf16 model's masters) and two fp32 moments; DeepSpeed fp32 keeps no extra copy


def export_bytes(model: ModelConfig, shape: ModelShape) -> float:
    """Bytes of a trained role's exported Hugging Face folder (final/<role>), in its load dtype."""
    return DTYPE_BYTES[model.load_dtype()] * shape.params


@dataclass(frozen=True)
class RunBudget:
    """A run's checkpoint, disk and time figures (module docstring). ``checkpoint_gib``: per trained role."""

    checkpoint_gib: dict[str, float]
    export_gib: float
    step_seconds: float
    write_gb_per_s: float

    @property
    def total_checkpoint_gib(self) -> float:
        """One checkpoint of every trained role."""
        return sum(self.checkpoint_gib.values())

    @property
    def disk_gib(self) -> float:
        """What the run folder needs at most: three checkpoints at once and the exported models."""
        return CHECKPOINT_COPIES * self.total_checkpoint_gib + self.export_gib

    @property
    def write_seconds(self) -> float:
        """Seconds to write one checkpoint at ``write_gb_per_s``."""
        return self.total_checkpoint_gib * GIB / (self.write_gb_per_s * GB)

    @property
    def signal_seconds(self) -> int:
        """The preemption notice that covers one step, a checkpoint write and the requeue, rounded up to 10 s."""
        return int(math.ceil((self.step_seconds + self.write_seconds + SIGNAL_MARGIN_S) / 10) * 10)

    def to_json(self) -> dict:
        """The figures as plain data, GiB and seconds rounded."""
        return {
            "checkpoint_gib": {role: round(v, 1) for role, v in self.checkpoint_gib.items()},
            "checkpoint_total_gib": round(self.total_checkpoint_gib, 1),
            "disk_gib": round(self.disk_gib, 1),
            "step_seconds_estimate": round(self.step_seconds, 1),
            "checkpoint_write_seconds": round(self.write_seconds, 1),
            "signal_seconds_needed": self.signal_seconds,
        }


def _decode_seconds(spec: JobSpec, actor: ModelConfig, shape: ModelShape) -> float:
    """Generation of one step's rollout: decode steps x the time of one (module docstring)."""
    gen = actor.generator_config
    b = DTYPE_BYTES[actor.load_dtype()]
    tokens = spec.rollout_config.max_new_tokens
    if gen.shared_with_trainer:
        replicas, tensor, floor = actor.trainer_config.parallel.data.size, 1, HF_TOKEN_S
    else:
        replicas, tensor = gen.parallel.data.size, gen.parallel.tensor.size
        floor = VLLM_TOKEN_S if gen.generator_type == "vllm" else HF_TOKEN_S
    per_step = max(floor, b * shape.params / tensor / HBM_BYTES_PER_S)
    if gen.generator_type == "vllm" and not gen.shared_with_trainer:
        calls = 1  # vLLM schedules its share at once
    else:
        calls = math.ceil(math.ceil(spec.rollout_size() / replicas) / spec.inference_micro_batch("generator"))
    return calls * tokens * per_step


def step_seconds(spec: JobSpec, gpus: dict[str, int], shapes: dict[str, ModelShape]) -> float:
    """One PPO step's estimated time: generation, every role's scoring pass and the actor's and critic's training
    (module docstring). ``gpus``: GPUs of each role with a model of its own; ``shapes``: each such role's model."""
    models = spec.model_configs.roles()
    tokens = spec.rollout_size() * (spec.dataset_config.max_seq_len + spec.rollout_config.max_new_tokens)
    total = _decode_seconds(spec, models["actor"], shapes["actor"]) if "actor" in shapes else 0.0
    for role, shape in shapes.items():
        if not gpus.get(role):
            continue
        flops = 2 * shape.params * tokens
        if role in ("actor", "critic"):
            per_token = 8 if models[role].trainer_config.gradient_checkpointing else 6
            flops += per_token * shape.params * tokens * spec.train_config.ppo_epochs
        total += flops / (gpus[role] * EFFECTIVE_FLOPS)
    return total


def run_budget(spec: JobSpec, gpus: dict[str, int], shapes: dict[str, ModelShape]) -> RunBudget | None:
    """The run's budget, or None when a trained role's model size is unknown."""
    models = spec.model_configs.roles()
    trained = [role for role in ("actor", "critic") if role in gpus]
    if any(role not in shapes for role in trained):
        return None
    checkpoint = {role: checkpoint_bytes(models[role], shapes[role]) / GIB for role in trained}
    export = sum(export_bytes(models[role], shapes[role]) for role in trained) / GIB
    return RunBudget(checkpoint, export, step_seconds(spec, gpus, shapes), spec.slurm.checkpoint_write_gb_per_s)


def host_bytes_per_rank(role: str, model: ModelConfig, shape: ModelShape) -> float:
    """Host memory one rank of ``role`` may hold at once (module docstring)."""
    b = DTYPE_BYTES[model.load_dtype()]
    n = model.trainer_config.parallel.data.size
    whole = b * shape.params
    stage = zero_stage(model)
    if role == "generator":
        tensor = model.generator_config.parallel.tensor.size
        return HOST_BASE_GIB * GIB + whole / tensor + VLLM_SWAP_GIB * GIB
    loading = whole / n + min(whole, SHARD_GIB * GIB) if stage == 3 else whole
    if role not in ("actor", "critic"):
        return HOST_BASE_GIB * GIB + loading
    if stage is None:
        saving = checkpoint_bytes(model, shape)  # torch.load puts the whole state on the host
    else:
        saving = checkpoint_bytes(model, shape) / n + (whole if stage < 3 else 0.0)  # rank 0 writes the 16-bit model below ZeRO-3
    return HOST_BASE_GIB * GIB + max(loading, saving)


def node_mem_request(per_node_bytes: list[float]) -> str:
    """sbatch --mem for a component's nodes: the largest node's need with headroom, in whole GiB ('G')."""
    return f"{math.ceil(max(per_node_bytes) * HOST_HEADROOM / GIB)}G"
