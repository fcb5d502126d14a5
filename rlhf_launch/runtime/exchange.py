"""Moving rollout tensors between roles: every role computes its shard, and the shards are
broadcast so that each rank that needs the whole batch has it, in the original order.

Only tensors travel: a small int64 header (dtype, shape) is broadcast first, then the tensor
itself. On one process every call returns its input unchanged.
"""

from __future__ import annotations

import torch
from torch import Tensor

from rlhf_launch.core.plan import shard_bounds
from rlhf_launch.runtime.padding import pad_and_concat

__all__ = ["shard_bounds", "broadcast_tensor", "gather_from"]

_DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16, torch.int64, torch.int32, torch.bool, torch.uint8]
_MAX_DIMS = 4


def broadcast_tensor(tensor: Tensor | None, src: int, device: torch.device, group, rank: int) -> Tensor:
    """Broadcast over ``group`` (a PeerGroup) a tensor whose dtype and shape only ``src`` knows."""
    header = torch.zeros(2 + _MAX_DIMS, dtype=torch.int64, device=device)
    if rank == src:
        assert tensor is not None and tensor.dim() <= _MAX_DIMS
        header[0] = _DTYPES.index(tensor.dtype)
        header[1] = tensor.dim()
        header[2 : 2 + tensor.dim()] = torch.tensor(tensor.shape, dtype=torch.int64)
    group.broadcast(header, src)
    dtype, ndim = _DTYPES[int(header[0])], int(header[1])
    shape = [int(d) for d in header[2 : 2 + ndim]]
    if rank == src:
        buffer = tensor.to(device).contiguous()
    else:
        buffer = torch.empty(shape, dtype=dtype, device=device)
    group.broadcast(buffer, src)
    return buffer


def gather_from(
    ranks: list[int],
    local: dict[str, Tensor] | None,
    keys: list[str],
    device: torch.device,
    group,
    rank: int,
    pad: dict[str, int] | None = None,
) -> dict[str, Tensor]:
    """Concatenate, on every rank, the shards that ``ranks`` computed (in rank order).

    Shards may differ in their row counts (uneven shards, ``shard_bounds``): every header carries
    the sender's shape. They may differ in their second dimension (response lengths): they are
    right-padded to the widest with ``pad[key]`` (default 0) before concatenation.
    """
    pad = pad or {}
    pieces: dict[str, list[Tensor]] = {k: [] for k in keys}
    for src in ranks:
        for key in keys:
            pieces[key].append(broadcast_tensor(local[key] if rank == src else None, src, device, group, rank))
    return {key: pad_and_concat(parts, pad.get(key, 0)) for key, parts in pieces.items()}
