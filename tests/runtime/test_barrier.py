"""Barriers block the host until every rank has arrived, so a checkpoint is completed only
when every rank's files are in it, even when one rank writes slowly.

On gloo a collective's wait() blocks anyway; under NCCL it only orders the device stream, which
is why PeerGroup.barrier reads its result back to the host. These tests guard the behaviour
the checkpoint protocol relies on, with one rank made slow on purpose.
"""

from __future__ import annotations

import datetime
import json
import socket
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from rlhf_launch.runtime.checkpoint import MARKER, latest_checkpoint, save_checkpoint
from rlhf_launch.runtime.dist import PeerGroup

SLOW_S = 2.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, port: int, run_dir: str) -> None:
    store = dist.TCPStore("127.0.0.1", port, 3, is_master=rank == 0, timeout=datetime.timedelta(seconds=30))
    group = PeerGroup(store, "global", [0, 1, 2], rank, torch.device("cpu"))

    def write(tmp: Path | None) -> None:  # the shape of PPOLoop._write_checkpoint
        folder = Path(group.broadcast_object(str(tmp) if tmp is not None else None, 0))
        if rank == 2:
            time.sleep(SLOW_S)  # a critic rank still writing its shards
        (folder / f"rank{rank}.pt").write_bytes(b"x" * 1000)
        group.barrier()

    started = time.monotonic()
    if rank == 0:
        save_checkpoint(run_dir, 1, write)
    else:
        write(None)
    waited = time.monotonic() - started
    flag = group.any(rank == 2)
    Path(run_dir, f"rank{rank}.json").write_text(json.dumps({"waited": waited, "any": flag}))
    group.barrier()


def test_a_checkpoint_is_complete_only_with_every_ranks_files(tmp_path):
    mp.spawn(_rank, args=(_free_port(), str(tmp_path)), nprocs=3, join=True)
    checkpoint = latest_checkpoint(tmp_path)
    assert checkpoint is not None
    assert {"rank0.pt", "rank1.pt", "rank2.pt"} <= set(json.loads((checkpoint / MARKER).read_text())["files"])
    results = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(3)]
    assert min(results[0]["waited"], results[1]["waited"]) >= SLOW_S  # the barrier held the fast ranks
    assert all(r["any"] for r in results)  # one rank's flag reached every rank
