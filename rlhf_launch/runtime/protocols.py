"""The three interfaces the PPO loop and the roles are written against.

``Cluster``   where the roles run: one process (rlhf_launch/runtime/cluster.py ``SingleProcess``) or many
              (``Distributed``); it shards a batch for a role and gathers the role's results.
``Trainer``   the optimizer side of a trained model: plain torch, DDP or DeepSpeed
              (rlhf_launch/runtime/engine.py).
``Generator`` what samples responses: the actor itself when shared, or a separate Hugging
              Face copy or vLLM engine that receives the actor's weights (rlhf_launch/runtime/roles/).

Roles exchange only tensors through these; none reaches into another role's objects.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor

from rlhf_launch.runtime.rollout import Batch


class Cluster(Protocol):
    """Where the roles of a job run, behind the few operations the loop needs."""

    rank: int
    world_size: int
    is_leader: bool

    def runs(self, role: str) -> bool:
        """Whether this process runs ``role``."""

    def ranks_of(self, role: str) -> list[int]:
        """Global ranks that run ``role``."""

    def shard_of(self, role: str) -> tuple[int, int]:
        """(index, count) of this process's replica among the role's data-parallel replicas."""

    def shard(self, role: str, batch: Batch) -> Batch:
        """This replica's contiguous rows of ``batch``."""

    def gather(self, role: str, local: Batch | None, keys: list[str], pad: dict[str, int] | None = None) -> Batch:
        """Every replica leader's ``local`` rows, concatenated in order, on every process."""

    def share(self, obj: Any, role: str) -> Any:
        """A small Python object from the role's first rank to every process."""

    def group(self, role: str) -> Any:
        """The data-parallel process group of a role this process runs (None in one process)."""

    def sync_group(self) -> Any:
        """The group over actor rank 0 and the generator ranks (None in one process)."""

    def is_role_leader(self, role: str) -> bool:
        """Whether this process is the role's first rank."""

    def is_replica_leader(self, role: str) -> bool:
        """Whether this process reports its replica's results (first rank of a tensor-parallel replica)."""

    def barrier(self) -> None:
        """Return only when every process has reached it (the host blocks)."""

    def any(self, flag: bool) -> bool:
        """True on every process when ``flag`` is true on any."""

    def max_over_ranks(self, values: list[float]) -> list[float]:
        """The element-wise maximum of every process's ``values``, on every process."""


class Trainer(Protocol):
    """A trained model's optimizer side: forward through ``module``, ``backward`` per micro
    batch, ``step`` per minibatch."""

    module: torch.nn.Module
    weight_dtype: torch.dtype  # the dtype weights are published in: to a generator, in exports
    generates_in_lockstep: bool  # ranks must generate in step (ZeRO-3 hooks communicate on every forward)

    def backward(self, loss: Tensor) -> None:
        """Accumulate the gradient of a loss normalised by the whole minibatch."""

    def step(self) -> float:
        """Apply the accumulated gradients; return the gradient norm before clipping."""

    @property
    def lr(self) -> float:
        """The learning rate of the next step."""

    def gathered(self, params: list[Tensor] | None = None) -> AbstractContextManager[None]:
        """``params`` (default: every parameter) whole on this rank for the duration (ZeRO-3), e.g. to
        generate or to send one layer to the generators."""

    def save(self, directory: Path, name: str, is_writer: bool) -> None:
        """Write the model and optimizer state into a checkpoint folder."""

    def load(self, directory: Path, name: str) -> None:
        """Restore what ``save`` wrote."""

    def full_state_dict(self) -> dict[str, Tensor]:
        """The whole model's weights (a collective under ZeRO-3)."""


SeedOfRow = Callable[[int], int]


class Generator(Protocol):
    """Samples one response per prompt."""

    def generate(self, prompts: Batch, first_row: int, seed_of: SeedOfRow) -> Batch:
        """Responses to this rank's prompts; ``first_row`` is the global row of the first prompt,
        and ``seed_of(row)`` the sampling seed of a row, so that sharding changes nothing."""


class SeparateGenerator(Generator, Protocol):
    """A generator with its own copy of the policy, refreshed after every actor update."""

    def load(self, named: Iterable[tuple[str, Tensor]]) -> None:
        """New weights from the actor in this same process."""

    def receive(self, src: int, group: Any) -> None:
        """New weights broadcast by global rank ``src`` over ``group`` (rlhf_launch/runtime/weight_sync.py)."""
