"""Actor -> generator weight sync over a real gloo group of two processes."""

from __future__ import annotations

import datetime
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from rlhf_launch.runtime.dist import PeerGroup
from rlhf_launch.runtime.weight_sync import DIRECT_BYTES, plan_transfers, receive_weights, send_weights


def model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    # a large weight (sent alone), small ones (bucketed), and a bf16 tensor (its own bucket)
    m = torch.nn.Sequential(torch.nn.Linear(600, 600), torch.nn.LayerNorm(600), torch.nn.Linear(600, 3))
    m.extra = torch.nn.Parameter(torch.randn(7, dtype=torch.bfloat16))
    return m


def test_transfer_plan():
    named = list(model(0).named_parameters())
    transfers = list(plan_transfers(named))
    assert sorted(n for t in transfers for n, _ in t) == sorted(n for n, _ in named)
    assert transfers == list(plan_transfers(named))  # both sides derive the same order
    for t in transfers:
        assert len({x.dtype for _, x in t}) == 1
        if any(x.numel() * x.element_size() >= DIRECT_BYTES for _, x in t):
            assert len(t) == 1


def _run(rank: int, port: int, out: str, master_weights: bool = False) -> None:
    store = dist.TCPStore("127.0.0.1", port, 2, is_master=rank == 0, timeout=datetime.timedelta(seconds=30))
    group = PeerGroup(store, "sync", [0, 1], rank, torch.device("cpu"))
    m = model(seed=rank)  # different weights on the two sides
    if master_weights:  # the sender trains fp32 masters of a bf16 model; the receiver holds bf16
        m = m.float() if rank == 0 else m.to(torch.bfloat16)
    named = list(m.named_parameters())
    if rank == 0:
        sent = send_weights(named, 0, group, torch.device("cpu"), torch.bfloat16 if master_weights else None)
        torch.save({"state": m.state_dict(), "bytes": sent}, out + ".sender")
    else:
        received = receive_weights(named, 0, group, torch.device("cpu"))
        torch.save({"state": m.state_dict(), "bytes": received}, out + ".receiver")
    group.barrier()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_fp32_master_weights_arrive_as_bf16(tmp_path):
    out = str(tmp_path / "w")
    mp.spawn(_run, args=(_free_port(), out, True), nprocs=2, join=True)
    sender, receiver = torch.load(out + ".sender"), torch.load(out + ".receiver")
    assert sender["bytes"] == receiver["bytes"] == sum(v.numel() * 2 for v in receiver["state"].values())
    for key, value in sender["state"].items():
        assert receiver["state"][key].dtype == torch.bfloat16
        assert torch.equal(value.to(torch.bfloat16), receiver["state"][key]), key


def test_generator_receives_exactly_the_actor_weights(tmp_path):
    port = _free_port()
    out = str(tmp_path / "w")
    mp.spawn(_run, args=(port, out), nprocs=2, join=True)
    sender, receiver = torch.load(out + ".sender"), torch.load(out + ".receiver")
    assert sender["bytes"] == receiver["bytes"] > 0
    for key, value in sender["state"].items():
        assert torch.equal(value, receiver["state"][key]), key
    assert not torch.equal(model(0).state_dict()["0.weight"], model(1).state_dict()["0.weight"])
