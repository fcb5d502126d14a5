"""New actor weights to a separate generator group, in memory: actor rank 0 broadcasts the
parameters (under ZeRO-3 every actor rank first joins in gathering them), and each generator
rank receives them into its own model.

Large tensors travel alone, from the sender's storage straight into the receiver's: no copy
on either side. Small ones (norms, biases) are packed into buckets so that they do not pay a
round trip each.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

BUCKET_BYTES = 64 << 20
DIRECT_BYTES = 1 << 20  # tensors this large travel alone, straight from and into their own storage


def plan_transfers(named: list[tuple[str, Tensor]]) -> Iterator[list[tuple[str, Tensor]]]:
    """Groups of parameters sent in one broadcast: a large contiguous tensor alone (no copy on
    either side), small ones together in buckets of one dtype (one round trip for many)."""
    bucket: list[tuple[str, Tensor]] = []
    size = 0
    for name, tensor in named:
        nbytes = tensor.numel() * tensor.element_size()
        if nbytes >= DIRECT_BYTES and tensor.is_contiguous():
            yield [(name, tensor)]
            continue
        if bucket and (size + nbytes > BUCKET_BYTES or tensor.dtype != bucket[0][1].dtype):
            yield bucket
            bucket, size = [], 0
        bucket.append((name, tensor))
        size += nbytes
    if bucket:
        yield bucket


@torch.no_grad()
def send_weights(named: list[tuple[str, Tensor]], src: int, group, device: torch.device) -> int:
    """Broadcast parameters from ``src`` (this rank) over ``group`` (a PeerGroup); returns the bytes sent."""
    sent = 0
    for transfer in plan_transfers(named):
        if len(transfer) == 1 and transfer[0][1].device == device:
            flat = transfer[0][1].detach()
        else:
            flat = torch.cat([t.detach().reshape(-1).to(device) for _, t in transfer])
        group.broadcast(flat, src)
        sent += flat.numel() * flat.element_size()
    return sent


@torch.no_grad()
def receive_weights(named: list[tuple[str, Tensor]], src: int, group, device: torch.device) -> int:
    """Receive the broadcast into ``named`` (the same names, shapes and order as the sender's)."""
    received = 0
    for transfer in plan_transfers(named):
        if len(transfer) == 1 and transfer[0][1].device == device:
            flat = group.broadcast(transfer[0][1].data, src)  # straight into the parameter
        else:
            flat = torch.empty(sum(t.numel() for _, t in transfer), dtype=transfer[0][1].dtype, device=device)
            group.broadcast(flat, src)
            offset = 0
            for _, tensor in transfer:
                n = tensor.numel()
                tensor.copy_(flat[offset : offset + n].view_as(tensor))
                offset += n
        received += flat.numel() * flat.element_size()
    return received
