"""The optimizer side of a trained model behind one interface, whether it runs in this process
alone, under torch DDP or under DeepSpeed (ZeRO 0-3): forward through ``module``,
``backward(loss)`` per micro batch, ``step()`` per minibatch.

Losses arrive normalised by the whole minibatch (over every rank and micro batch), so the
sum of all ranks' gradients is the minibatch gradient; DDP and DeepSpeed average over ranks,
hence the loss is multiplied by the data-parallel size before backward.
"""

from __future__ import annotations

import contextlib
import copy
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from rlhf.core.config import JobSpec, ModelConfig, TrainKwargs


def lr_factor(step: int, kwargs: TrainKwargs) -> float:
    """lr multiplier after ``step`` optimizer steps: linear from 1 to lr_decay_rate over total_steps."""
    progress = min(step, kwargs.total_steps) / kwargs.total_steps
    return 1.0 - (1.0 - kwargs.lr_decay_rate) * progress


def _optimizer(params, kwargs: TrainKwargs):
    # fused: one kernel for all parameters, and no per-parameter host syncs for the step count.
    optimizer = torch.optim.AdamW(params, lr=kwargs.lr, weight_decay=kwargs.weight_decay, fused=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, kwargs))
    return optimizer, scheduler


class TorchTrainer:
    """A model trained by this process alone (or, with ``group``, under DDP)."""

    def __init__(self, module: torch.nn.Module, kwargs: TrainKwargs, group=None, device: torch.device | None = None):
        self.kwargs = kwargs
        self.inner = module
        self.dp_size = dist.get_world_size(group) if group is not None else 1
        if self.dp_size > 1:
            ids = [device.index] if device is not None and device.type == "cuda" else None
            self.module = torch.nn.parallel.DistributedDataParallel(module, device_ids=ids, process_group=group)
        else:
            self.module = module
        self.optimizer, self.scheduler = _optimizer([p for p in module.parameters() if p.requires_grad], kwargs)

    def backward(self, loss: Tensor) -> None:
        (loss * self.dp_size).backward()

    def step(self) -> float:
        """Apply the accumulated gradients; returns the gradient norm before clipping."""
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        limit = self.kwargs.max_grad_norm if self.kwargs.max_grad_norm is not None else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(params, limit, foreach=True)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm)

    @property
    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def gathered(self):
        return contextlib.nullcontext()

    def state_dict(self) -> dict:
        return {"model": self.inner.state_dict(), "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.inner.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])

    def save(self, directory: Path, name: str, is_writer: bool) -> None:
        if is_writer:
            torch.save(self.state_dict(), directory / f"{name}.pt")

    def load(self, directory: Path, name: str) -> None:
        self.load_state_dict(torch.load(directory / f"{name}.pt", map_location="cpu", weights_only=False))

    def full_state_dict(self) -> dict[str, Tensor]:
        return self.inner.state_dict()


def deepspeed_config(spec: JobSpec, role: str, model: ModelConfig, micro_bs: int, minibatch: int) -> dict[str, Any]:
    """The spec's deepspeed_config with the batch keys derived from train_config (the launcher
    checks that given ones agree) and gradient clipping from train_kwargs when not set."""
    config = copy.deepcopy(model.trainer_config.deepspeed_config or {})
    dp = model.trainer_config.parallel.data.size
    config.setdefault("train_micro_batch_size_per_gpu", micro_bs)
    config.setdefault("gradient_accumulation_steps", minibatch // (dp * micro_bs))
    config.setdefault("train_batch_size", minibatch)
    kwargs = model.trainer_config.train_kwargs
    if kwargs.max_grad_norm is not None:
        config.setdefault("gradient_clipping", kwargs.max_grad_norm)
    config.setdefault("steps_per_print", 10**9)
    config.setdefault("wall_clock_breakdown", False)
    return config


class DeepSpeedTrainer:
    """A model trained under DeepSpeed by the role's ranks (ZeRO stage from the spec)."""

    def __init__(self, module: torch.nn.Module, kwargs: TrainKwargs, config: dict[str, Any]):
        import deepspeed

        self.kwargs = kwargs
        self.dp_size = dist.get_world_size()  # the default group is the role's ranks (rlhf/dist.py)
        self.zero_stage = config.get("zero_optimization", {}).get("stage", 0)
        optimizer, scheduler = _optimizer([p for p in module.parameters() if p.requires_grad], kwargs)
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=module, optimizer=optimizer, lr_scheduler=scheduler, config=config, dist_init_required=False
        )
        self.module = self.engine
        self.inner = self.engine.module

    def backward(self, loss: Tensor) -> None:
        # DeepSpeed would divide by the accumulation steps; our loss is already normalised.
        self.engine.backward(loss * self.dp_size, scale_wrt_gas=False)
        self.engine.step()  # a no-op until the accumulation boundary, where it updates

    def step(self) -> float:
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else 0.0

    @property
    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def gathered(self):
        """All parameters materialised on every rank (ZeRO-3), e.g. to generate or export."""
        if self.zero_stage != 3:
            return contextlib.nullcontext()
        import deepspeed

        return deepspeed.zero.GatheredParameters(list(self.inner.parameters()), modifier_rank=None)

    def save(self, directory: Path, name: str, is_writer: bool) -> None:
        self.engine.save_checkpoint(str(directory / name), tag="state")

    def load(self, directory: Path, name: str) -> None:
        self.engine.load_checkpoint(str(directory / name), tag="state")

    def full_state_dict(self) -> dict[str, Tensor]:
        """The whole model's weights (collective under ZeRO-3; meaningful on the role's rank 0)."""
        if self.zero_stage == 3:
            return self.engine._zero3_consolidated_16bit_state_dict()
        return self.inner.state_dict()
