"""What the roles share: micro-batched inference and the minibatch / micro-batch training loop."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from rlhf.engine import TorchTrainer
from rlhf.rollout import Batch, select
from rlhf.timing import Timer

# loss_fn(micro batch, minibatch sequence count, minibatch response-token count) -> (loss, stats)
LossFn = Callable[[Batch, int, int], tuple[Tensor, dict[str, Tensor]]]


@torch.no_grad()
def in_micro_batches(fn: Callable[[Batch], Tensor], batch: Batch, micro_bs: int) -> Tensor:
    size = next(iter(batch.values())).shape[0]
    return torch.cat([fn(select(batch, slice(s, s + micro_bs))) for s in range(0, size, micro_bs)])


def minibatch_order(size: int, epochs: int, seed: int) -> list[Tensor]:
    """A fresh permutation of the rollout per epoch, from a seed (no state to checkpoint)."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randperm(size, generator=gen) for _ in range(epochs)]


def train_minibatches(
    trainer: TorchTrainer,
    experience: Batch,
    loss_fn: LossFn,
    minibatch: int,
    micro_bs: int,
    epochs: int,
    seed: int,
    timer: Timer,
) -> dict[str, float]:
    """PPO epochs over the experience: one optimizer step per minibatch, gradients accumulated
    over micro batches whose losses are normalised by the whole minibatch's sequence and token
    counts, so that the accumulated gradient is exactly that of the minibatch loss."""
    size = experience["response_mask"].shape[0]
    sums: dict[str, float] = {}
    steps = 0
    for order in minibatch_order(size, epochs, seed):
        for start in range(0, size, minibatch):
            mb = select(experience, order[start : start + minibatch])
            num_tokens = int(mb["response_mask"].sum())
            for micro_start in range(0, minibatch, micro_bs):
                micro = select(mb, slice(micro_start, micro_start + micro_bs))
                with timer("forward"):
                    loss, stats = loss_fn(micro, minibatch, max(num_tokens, 1))
                with timer("backward"):
                    trainer.backward(loss)
                for key, value in stats.items():
                    sums[key] = sums.get(key, 0.0) + float(value) * micro["response_mask"].shape[0] / minibatch
                sums["loss"] = sums.get("loss", 0.0) + float(loss.detach())
            with timer("optimizer"):
                sums["grad_norm"] = sums.get("grad_norm", 0.0) + trainer.step()
            steps += 1
    return {key: value / steps for key, value in sums.items()}
