"""New actor weights to a separate generator group, in memory: actor rank 0 broadcasts the
parameters (under ZeRO-3 every actor rank first joins in gathering them), and each generator
rank receives them, into its own Hugging Face model (``receive_weights``) or as a stream of
``(name, tensor)`` that a vLLM engine loads while it arrives (``receive_stream``).

Every sync starts with a manifest (names, shapes, dtypes) so that a receiver needs no model of
its own to know what comes, and one that has a model finds out at once when it does not match.
Large tensors travel alone, from the sender's storage straight into the receiver's: no copy on
either side. Small ones (norms, biases) are packed into buckets so that they do not pay a
round trip each.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

BUCKET_BYTES = 64 << 20
DIRECT_BYTES = 1 << 20  # tensors this large travel alone, straight from and into their own storage

Manifest = list[tuple[str, tuple[int, ...], str]]


class WeightSyncError(RuntimeError):
    pass


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


def manifest_of(named: list[tuple[str, Tensor]]) -> Manifest:
    return [(name, tuple(t.shape), str(t.dtype).removeprefix("torch.")) for name, t in named]


def placeholders(manifest: Manifest) -> list[tuple[str, Tensor]]:
    """Shape-only tensors that plan the same transfers as the sender's parameters."""
    return [(name, torch.empty(shape, dtype=getattr(torch, dtype), device="meta")) for name, shape, dtype in manifest]


@torch.no_grad()
def send_weights(named: list[tuple[str, Tensor]], src: int, group, device: torch.device) -> int:
    """Broadcast parameters from ``src`` (this rank) over ``group`` (a PeerGroup); returns the bytes sent."""
    group.broadcast_object(manifest_of(named), src)
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
    check_manifest(group.broadcast_object(None, src), manifest_of(named))
    received = 0
    for transfer in plan_transfers(named):
        if len(transfer) == 1 and transfer[0][1].device == device:
            flat = group.broadcast(transfer[0][1].data, src)  # straight into the parameter
        else:
            flat = _receive_flat(transfer, src, group, device)
            for (_, tensor), part in zip(transfer, _split(flat, transfer), strict=True):
                tensor.copy_(part)
        received += flat.numel() * flat.element_size()
    return received


@torch.no_grad()
def receive_stream(src: int, group, device: torch.device) -> Iterator[tuple[str, Tensor]]:
    """The broadcast as ``(name, tensor)`` pairs in the sender's order, each yielded as soon as it
    has arrived: a consumer that loads them one by one never holds the whole model twice."""
    named = placeholders(group.broadcast_object(None, src))
    for transfer in plan_transfers(named):
        flat = _receive_flat(transfer, src, group, device)
        yield from zip((name for name, _ in transfer), _split(flat, transfer), strict=True)


def check_manifest(sent: Manifest, expected: Manifest) -> None:
    if sent == expected:
        return
    for i, (a, b) in enumerate(zip(sent, expected, strict=False)):
        if a != b:
            raise WeightSyncError(f"the actor sent parameter {i} as {a}, but this generator's model has {b} there: the two models differ")
    raise WeightSyncError(f"the actor sent {len(sent)} parameters, but this generator's model has {len(expected)}")


def _receive_flat(transfer: list[tuple[str, Tensor]], src: int, group, device: torch.device) -> Tensor:
    flat = torch.empty(sum(t.numel() for _, t in transfer), dtype=transfer[0][1].dtype, device=device)
    return group.broadcast(flat, src)


def _split(flat: Tensor, transfer: list[tuple[str, Tensor]]) -> list[Tensor]:
    parts, offset = [], 0
    for _, tensor in transfer:
        parts.append(flat[offset : offset + tensor.numel()].view(tensor.shape))
        offset += tensor.numel()
    return parts
