"""What the roles share: building a trainer for the spec's mode, micro-batched inference, and
the minibatch / micro-batch training loop."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor

from rlhf_launch.core.config import JobSpec
from rlhf_launch.core.plan import micro_steps, ptx_micro_steps, shard_bounds
from rlhf_launch.runtime import ppo
from rlhf_launch.runtime.engine import DeepSpeedTrainer, TorchTrainer, deepspeed_config
from rlhf_launch.runtime.models import enable_gradient_checkpointing
from rlhf_launch.runtime.protocols import Cluster, Trainer
from rlhf_launch.runtime.rollout import Batch, select, sequences
from rlhf_launch.runtime.timing import Timer

# loss_fn(micro batch, minibatch sequence count, minibatch response-token count) -> (loss, stats)
LossFn = Callable[[Batch, int, int], tuple[Tensor, dict[str, Tensor]]]


def trainer_deepspeed_config(spec: JobSpec, role: str, cluster: Cluster) -> dict | None:
    """The DeepSpeed config ``make_trainer`` uses for ``role`` on this rank, or None when it runs plain torch or DDP."""
    cfg = spec.model_configs.roles()[role]
    if cluster.group(role) is None or cfg.trainer_config.parallel.data.mode == "ddp":
        return None
    extra = ptx_micro_steps(spec) if role == "actor" else 0  # PPO-ptx: the pretraining micro steps of each update
    return deepspeed_config(cfg, spec.train_micro_batch(role), spec.train_minibatch(role), extra)


def zero3_config(spec: JobSpec, role: str, cluster: Cluster) -> dict | None:
    """The DeepSpeed config of a ZeRO-3 ``role``, to load its model partitioned under it
    (``rlhf_launch.runtime.models.partitioned_loading``); None for any other trainer."""
    config = trainer_deepspeed_config(spec, role, cluster)
    return config if config is not None and config.get("zero_optimization", {}).get("stage", 0) == 3 else None


def make_trainer(spec: JobSpec, role: str, module: torch.nn.Module, cluster: Cluster, device: torch.device) -> Trainer:
    """Plain torch in one process; DDP or DeepSpeed over the role's ranks otherwise (a ZeRO-3
    model may arrive partitioned already, loaded with ``zero3_config``); ``module`` (a PolicyModule or
    ValueModule) gets gradient checkpointing when the role's trainer_config asks for it."""
    cfg = spec.model_configs.roles()[role]
    kwargs = cfg.trainer_config.train_kwargs
    if cfg.trainer_config.gradient_checkpointing:
        enable_gradient_checkpointing(module)  # before DDP or DeepSpeed wraps it: the same for every mode
    group = cluster.group(role)
    if group is None:
        return TorchTrainer(module, kwargs)
    config = trainer_deepspeed_config(spec, role, cluster)
    if config is None:
        return TorchTrainer(module, kwargs, group=group, device=device)
    return DeepSpeedTrainer(module, kwargs, config)


def policy_logprobs(policy: torch.nn.Module, batch: Batch, temperature: float) -> Tensor:
    """Log-probs [B, T] of the response tokens under ``policy`` (a PolicyModule) at ``temperature``."""
    input_ids, attention_mask = sequences(batch)
    logits = policy(input_ids, attention_mask, batch["response_ids"].shape[1], temperature)
    return ppo.logprobs_from_logits(logits, batch["response_ids"])


@torch.no_grad()
def in_micro_batches(fn: Callable[[Batch], Tensor], batch: Batch, micro_bs: int, calls: int | None = None) -> Tensor:
    """``fn`` over consecutive ``micro_bs``-row slices of ``batch``, without grad, concatenated along rows.

    ``calls``: call ``fn`` that many times in all, the ones beyond the batch's slices on its first
    slice with the result dropped; ZeRO-3 ranks with shares of different sizes need it (every forward
    gathers parameters over all of them, so every rank must run as many)."""
    size = next(iter(batch.values())).shape[0]
    out = torch.cat([fn(select(batch, slice(s, s + micro_bs))) for s in range(0, size, micro_bs)])
    for _ in range((calls or 0) - math.ceil(size / micro_bs)):
        fn(select(batch, slice(0, micro_bs)))
    return out


def lockstep_calls(spec: JobSpec, role: str, cluster: Cluster, trainer: Trainer, micro_bs: int) -> int | None:
    """Inference calls every rank of ``role`` makes over its share of a rollout when its ranks must
    run in lockstep (ZeRO-3: the micro batches of the largest share); None when they need not."""
    if not trainer.generates_in_lockstep:
        return None
    _, parts = cluster.shard_of(role)
    return micro_steps(spec.rollout_size(), parts, micro_bs)


def minibatch_order(size: int, epochs: int, seed: int) -> list[Tensor]:
    """A fresh permutation of the rollout per epoch, from a seed (no state to checkpoint)."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randperm(size, generator=gen) for _ in range(epochs)]


def train_minibatches(
    trainer,
    experience: Batch,
    loss_fn: LossFn,
    minibatch: int,
    micro_bs: int,
    epochs: int,
    seed: int,
    timer: Timer,
    shard: tuple[int, int] = (0, 1),
    group=None,
    before_update: Callable[[int], dict[str, float]] | None = None,
) -> dict[str, float]:
    """PPO epochs over the experience: one optimizer step per minibatch. Each of the role's
    ``shard[1]`` ranks takes its contiguous share of every minibatch (shares differ by at most one,
    ``shard_bounds``); gradients are accumulated over micro batches whose losses are normalised by the
    whole minibatch's sequence and token counts, so that the gradients summed over micro batches and
    ranks are exactly that of the minibatch loss, whatever each rank's share.

    Every rank runs the micro steps of the largest share: DDP all-reduces on every backward, ZeRO-3
    gathers on every forward and DeepSpeed counts micro steps to its update, so a rank that ran fewer
    would leave the others waiting. A smaller share's missing steps run on its first micro batch with
    the loss multiplied by 0: collectives without any gradient.

    ``before_update(u)``, when given, runs after the micro steps of optimizer step u (0-based over epochs and
    minibatches), before the update, to accumulate further gradients (the actor's PPO-ptx term); the statistics
    it returns, this rank's parts, are averaged over updates and summed over ranks like the loss."""
    index, parts = shard
    size = experience["response_mask"].shape[0]
    steps_per_update = micro_steps(minibatch, parts, micro_bs)
    sums: dict[str, float] = {}
    steps = 0
    for order in minibatch_order(size, epochs, seed):
        for start in range(0, size, minibatch):
            mb = select(experience, order[start : start + minibatch])
            rows = mb["response_mask"].shape[0]
            num_tokens = max(int(mb["response_mask"].sum()), 1)
            lo, hi = shard_bounds(rows, parts, index)
            mine = select(mb, slice(lo, hi))
            for micro_start in range(0, steps_per_update * micro_bs, micro_bs):
                padding = micro_start >= hi - lo
                micro = select(mine, slice(0, micro_bs) if padding else slice(micro_start, micro_start + micro_bs))
                with timer("forward"):
                    loss, stats = loss_fn(micro, minibatch, num_tokens)
                with timer("backward"):
                    trainer.backward(loss * 0 if padding else loss)
                if not padding:
                    _add_micro_stats(sums, loss, stats, micro["response_mask"].shape[0] / rows)
            if before_update is not None:
                for key, value in before_update(steps).items():
                    sums[key] = sums.get(key, 0.0) + value
            with timer("optimizer"):
                sums["grad_norm"] = sums.get("grad_norm", 0.0) + trainer.step()
            steps += 1
    stats = {key: value / steps for key, value in sums.items()}
    return _reduce_over_ranks(stats, group, parts)


def _add_micro_stats(sums: dict[str, float], loss: Tensor, stats: dict[str, Tensor], share: float) -> None:
    """Add a micro batch's loss (a part of the minibatch loss already) and its statistics weighted by
    its ``share`` of the minibatch's sequences: summed over micro batches and ranks, the minibatch's mean."""
    for key, value in stats.items():
        sums[key] = sums.get(key, 0.0) + float(value) * share
    sums["loss"] = sums.get("loss", 0.0) + float(loss.detach())


def _reduce_over_ranks(stats: dict[str, float], group, parts: int) -> dict[str, float]:
    """grad_norm: the same on every rank, so their mean; loss and the other statistics: each rank's
    part of the minibatch's value, so their sum."""
    if group is None or parts == 1:
        return stats
    keys = sorted(stats)
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" else torch.device("cpu")
    values = torch.tensor([stats[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(values, group=group)
    return {k: float(v) / parts if k == "grad_norm" else float(v) for k, v in zip(keys, values, strict=True)}


def export_pretrained(trainer: Trainer, model: torch.nn.Module, directory: Path, tokenizer, is_writer: bool) -> None:
    """A trained model as a Hugging Face folder with its tokenizer (a collective under ZeRO-3:
    every rank of the role calls it; ``is_writer`` writes)."""
    state = trainer.full_state_dict()
    if is_writer:
        prefix = "model."
        # fp32 master weights are exported in the dtype the model was given in (the spec's torch_dtype).
        state = {k[len(prefix):] if k.startswith(prefix) else k: v.to(trainer.weight_dtype) if v.is_floating_point() else v
                 for k, v in state.items()}
        model.save_pretrained(directory, state_dict=state)
        tokenizer.save_pretrained(directory)
