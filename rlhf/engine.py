"""The optimizer side of a trained model: AdamW, a linear learning-rate decay, gradient
accumulation over micro batches and gradient clipping. One interface, so that the roles do
not care whether the model is plain torch, DDP or DeepSpeed."""

from __future__ import annotations

import torch
from torch import Tensor

from rlhf.config import TrainKwargs


def lr_factor(step: int, kwargs: TrainKwargs) -> float:
    """lr multiplier after ``step`` optimizer steps: linear from 1 to lr_decay_rate over total_steps."""
    progress = min(step, kwargs.total_steps) / kwargs.total_steps
    return 1.0 - (1.0 - kwargs.lr_decay_rate) * progress


class TorchTrainer:
    """A model trained in this process."""

    def __init__(self, model: torch.nn.Module, kwargs: TrainKwargs):
        self.model = model
        self.kwargs = kwargs
        params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=kwargs.lr, weight_decay=kwargs.weight_decay, foreach=True)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: lr_factor(s, kwargs))

    def backward(self, loss: Tensor) -> None:
        loss.backward()

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

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
