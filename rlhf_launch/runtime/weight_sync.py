"""New actor weights to a separate generator group, in memory: actor rank 0 broadcasts the
parameters, and each generator rank receives them, into its own Hugging Face model
(``receive_weights``) or as a stream of ``(name, tensor)`` that a vLLM engine loads while it
arrives (``receive_stream``).

The parameters travel in chunks: one per decoder layer (every parameter whose name starts with
the same prefix up to the first numeric component, ``model.layers.3``), and one per other
parameter (embeddings, final norm, head). Chunks are pipelined one deep: the next one is gathered
and its transfers started before the previous one is waited for, so the link does not idle
between chunks. Under ZeRO-3 every actor rank joins in gathering the chunks in turn and releases
each once it has been sent, so no rank ever holds more than two consecutive chunks (two layers)
beyond its own shard; a vLLM engine gets each layer whole and in order (it fuses q/k/v and
gate/up from parts that must arrive together).

Every sync starts with a manifest (names, full shapes, dtypes, chunks) so that a receiver needs
no model of its own to know what comes, and one that has a model finds out at once when it does
not match. Both sides plan the transfers from the manifest alone, chunk by chunk. Large tensors
travel alone, from the sender's storage straight into the receiver's: no copy on either side.
Small ones (norms, biases) are packed into buckets so that they do not pay a round trip each.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import Tensor

BUCKET_BYTES = 64 << 20
DIRECT_BYTES = 1 << 20  # tensors this large travel alone, straight from and into their own storage

# (name, full shape, dtype as it travels, chunk index) of each parameter, in the sender's order
Manifest = list[tuple[str, tuple[int, ...], str, int]]
Transfer = list[tuple[str, Tensor]]
T = TypeVar("T")
# Makes the given parameters whole on this rank for the duration (ZeRO-3's gather; a no-op otherwise).
Gather = Callable[[list[Tensor]], AbstractContextManager[None]]


class WeightSyncError(RuntimeError):
    """The actor's parameters and a generator's model differ (names, shapes, dtypes or count)."""


def plan_transfers(named: list[tuple[str, Tensor]], dtype: torch.dtype | None = None) -> Iterator[Transfer]:
    """Groups of parameters sent in one broadcast: a large contiguous tensor alone (no copy on
    either side), small ones together in buckets of one dtype (one round trip for many).
    ``dtype``: what the tensors travel as, when not their own (sender and receiver must plan alike)."""
    bucket: list[tuple[str, Tensor]] = []
    size = 0
    for name, tensor in named:
        travels_as = dtype or tensor.dtype
        nbytes = tensor.numel() * travels_as.itemsize
        if nbytes >= DIRECT_BYTES and tensor.is_contiguous():
            yield [(name, tensor)]
            continue
        if bucket and (size + nbytes > BUCKET_BYTES or travels_as != (dtype or bucket[0][1].dtype)):
            yield bucket
            bucket, size = [], 0
        bucket.append((name, tensor))
        size += nbytes
    if bucket:
        yield bucket


def chunk_key(name: str) -> str:
    """The chunk a parameter travels in: its name up to the first numeric component
    (``model.layers.3.mlp.up_proj.weight`` -> ``model.layers.3``), or the whole name when it has none."""
    parts = name.split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[: i + 1])
    return name


def chunk_indices(names: list[str]) -> list[int]:
    """Chunk index of each name: consecutive names with the same ``chunk_key`` share one."""
    indices: list[int] = []
    for i, name in enumerate(names):
        if i == 0:
            indices.append(0)
        else:
            indices.append(indices[-1] + (chunk_key(name) != chunk_key(names[i - 1])))
    return indices


def full_shape(tensor: Tensor) -> tuple[int, ...]:
    """The shape of the whole parameter: a ZeRO-3 partitioned one holds only its shard (``ds_shape`` is the whole)."""
    return tuple(getattr(tensor, "ds_shape", tensor.shape))


def manifest_of(named: list[tuple[str, Tensor]], dtype: torch.dtype | None = None) -> Manifest:
    """(name, full shape, dtype name, chunk index) of each parameter as it travels, in order."""
    chunks = chunk_indices([name for name, _ in named])
    return [(name, full_shape(t), str(dtype or t.dtype).removeprefix("torch."), chunk)
            for (name, t), chunk in zip(named, chunks, strict=True)]


def placeholders(manifest: Manifest) -> list[tuple[str, Tensor]]:
    """Shape-only tensors that plan the same transfers as the sender's parameters."""
    return [(name, torch.empty(shape, dtype=getattr(torch, dtype), device="meta")) for name, shape, dtype, _ in manifest]


def plan_chunks(manifest: Manifest) -> list[list[Transfer]]:
    """The transfers of each chunk, planned from the manifest alone (so sender and receivers plan
    alike, whatever their tensors): a bucket never spans two chunks."""
    chunks: list[Manifest] = []
    for entry in manifest:
        if not chunks or chunks[-1][0][3] != entry[3]:
            chunks.append([])
        chunks[-1].append(entry)
    return [list(plan_transfers(placeholders(chunk))) for chunk in chunks]


def _no_gather(params: list[Tensor]) -> AbstractContextManager[None]:
    return contextlib.nullcontext()


@torch.no_grad()
def send_weights(
    named: list[tuple[str, Tensor]], src: int, group, device: torch.device, dtype: torch.dtype | None = None,
    gather: Gather = _no_gather,
) -> int:
    """Broadcast parameters from ``src`` over ``group`` (a PeerGroup), chunk by chunk; returns the bytes sent.

    ``dtype``: send them as this (fp32 master weights go out in the model's bf16), converted a
    chunk at a time. ``gather``: makes a chunk's parameters whole for the duration; under ZeRO-3
    every rank of the actor calls this (the gather is a collective over them) and only ``src``
    passes its ``group``, the others None."""
    dtype = None if dtype is None or all(t.dtype == dtype for _, t in named) else dtype
    manifest = manifest_of(named, dtype)
    if group is not None:
        group.broadcast_object(manifest, src)
    tensors = dict(named)

    def start(transfers: list[Transfer]) -> tuple[contextlib.ExitStack, list]:
        held = outer.enter_context(contextlib.ExitStack())  # closed early, once the chunk has gone; by ``outer`` on an error
        held.enter_context(gather([tensors[name] for transfer in transfers for name, _ in transfer]))
        if group is None:
            return held, []
        # Each transfer is prepared while the previous travels.
        return held, [(flat, _start(group, flat, src)) for flat in (_flat_to_send(t, tensors, device) for t in transfers)]

    sent = 0
    with contextlib.ExitStack() as outer:
        for held, started in _one_ahead(plan_chunks(manifest), start):
            for flat, work in started:
                work.wait()  # before the chunk is released
                sent += flat.numel() * flat.element_size()
            held.close()
    return sent


def _flat_to_send(transfer: Transfer, tensors: dict[str, Tensor], device: torch.device) -> Tensor:
    travels_as = transfer[0][1].dtype  # the planned placeholders carry the travel dtype
    if len(transfer) == 1:
        tensor = tensors[transfer[0][0]].detach()
        if tensor.device == device and tensor.dtype == travels_as and tensor.is_contiguous():
            return tensor  # zero-copy: broadcast straight from the parameter's storage
        return tensor.to(device, travels_as).contiguous()
    return torch.cat([tensors[name].detach().reshape(-1).to(device, travels_as) for name, _ in transfer])


@torch.no_grad()
def receive_weights(named: list[tuple[str, Tensor]], src: int, group, device: torch.device) -> int:
    """Receive the broadcast into ``named`` (the same names, shapes and order as the sender's)."""
    manifest = group.broadcast_object(None, src)
    check_manifest(manifest, manifest_of(named))
    tensors = dict(named)

    def start(transfers: list[Transfer]) -> list:
        started = []
        for transfer in transfers:
            own = tensors[transfer[0][0]]
            direct = len(transfer) == 1 and own.device == device and own.is_contiguous()
            flat = own.data if direct else _empty_flat(transfer, device)  # direct: straight into the parameter
            started.append((transfer, flat, direct, _start(group, flat, src)))
        return started

    received = 0
    for started in _one_ahead(plan_chunks(manifest), start):
        for transfer, flat, direct, work in started:
            work.wait()
            if not direct:
                for (name, _), part in zip(transfer, _split(flat, transfer), strict=True):
                    tensors[name].copy_(part)
            received += flat.numel() * flat.element_size()
    return received


@torch.no_grad()
def receive_stream(src: int, group, device: torch.device) -> Iterator[tuple[str, Tensor]]:
    """The broadcast as ``(name, tensor)`` pairs in the sender's order, each yielded as soon as it
    has arrived, a chunk (decoder layer) complete before the next: a consumer that loads them one by
    one holds at most two chunks (the one it loads, the next arriving) beside its model, never the
    whole model twice."""
    def start(transfers: list[Transfer]) -> list:
        return [(transfer, _start(group, flat, src), flat) for transfer in transfers for flat in [_empty_flat(transfer, device)]]

    # The next chunk arrives while the consumer loads this one.
    for started in _one_ahead(plan_chunks(group.broadcast_object(None, src)), start):
        for transfer, work, flat in started:
            work.wait()
            yield from zip((name for name, _ in transfer), _split(flat, transfer), strict=True)


def _one_ahead(chunks: list[list[Transfer]], start: Callable[[list[Transfer]], T]) -> Iterator[T]:
    """``start(chunk)`` of each chunk, in order, each handed on only once the next chunk has been started:
    the caller waits for a chunk (and releases it) while the next already travels, so that the link never
    idles for a round trip of the host between chunks. At most two chunks are in flight (and, under
    ZeRO-3, gathered) at once."""
    previous: list[T] = []
    for chunk in chunks:
        current = start(chunk)
        if previous:
            yield previous.pop()
        previous.append(current)
    yield from previous


def check_manifest(sent: Manifest, expected: Manifest) -> None:
    """Raise WeightSyncError naming the first parameter where ``sent`` and ``expected`` differ, or their counts."""
    if sent == expected:
        return
    for i, (a, b) in enumerate(zip(sent, expected, strict=False)):
        if a != b:
            raise WeightSyncError(f"the actor sent parameter {i} as {a}, but this generator's model has {b} there: the two models differ")
    raise WeightSyncError(f"the actor sent {len(sent)} parameters, but this generator's model has {len(expected)}")


def _empty_flat(transfer: Transfer, device: torch.device) -> Tensor:
    return torch.empty(sum(t.numel() for _, t in transfer), dtype=transfer[0][1].dtype, device=device)


class _Done:
    @staticmethod
    def wait() -> None:
        pass


def _start(group, tensor: Tensor, src: int):
    """Begin broadcasting ``tensor`` from ``src`` over ``group``; returns the work, whose ``wait()``
    ends it. A chunk's transfers are all started before the first is waited for: each then follows
    the previous without a round trip of the host in between (which costs most on a busy machine)."""
    pg, ranks = getattr(group, "pg", None), getattr(group, "ranks", None)
    if pg is None or ranks is None:  # a group with only a blocking broadcast
        group.broadcast(tensor, src)
        return _Done
    opts = dist.BroadcastOptions()
    opts.rootRank, opts.rootTensor = ranks.index(src), 0
    return pg.broadcast([tensor], opts)


def _split(flat: Tensor, transfer: Transfer) -> list[Tensor]:
    parts, offset = [], 0
    for _, tensor in transfer:
        parts.append(flat[offset : offset + tensor.numel()].view(tensor.shape))
        offset += tensor.numel()
    return parts
