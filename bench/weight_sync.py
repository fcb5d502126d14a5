"""Speed of the actor -> generator weight sync against a raw broadcast of the same bytes.

Two processes (actor rank 0 and one generator rank) on this machine, gloo on CPU or NCCL
on two GPUs, the same PeerGroup the training job uses. Prints, from one run:
  raw        one broadcast of a flat buffer holding every parameter's bytes (the ceiling)
  rlhf sync  rlhf_launch.runtime.weight_sync: chunk by chunk (one per decoder layer, as a ZeRO-3 actor gathers and
             sends them), large tensors straight from and into parameters, small ones in buckets
  per-tensor one broadcast per parameter (what bucketing avoids)
Target: rlhf sync >= 90 % of raw throughput.

With --vllm the receiver is a vLLM engine (CPU build, in-process) and the sync is the
generator group's: the stream of received tensors goes straight into the engine's
load_weights (fusing q/k/v and gate/up on the way). It also prints the transfer alone
(stream received, nothing loaded) and the load alone (tensors already in memory), to
separate the network from vLLM's loading.

    python bench/weight_sync.py [--hidden 1024 --layers 8] [--repeats 5] [--vllm]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rlhf_launch.runtime.dist import PeerGroup  # noqa: E402
from rlhf_launch.runtime.weight_sync import receive_stream, receive_weights, send_weights  # noqa: E402


def build_model(hidden: int, layers: int) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=32000, hidden_size=hidden, intermediate_size=hidden * 4, num_hidden_layers=layers,
                      num_attention_heads=max(1, hidden // 64), tie_word_embeddings=False, max_position_embeddings=256)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg)


def start_engine(model_dir: str):
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    from vllm import LLM

    return LLM(model=model_dir, skip_tokenizer_init=True, dtype="float32", distributed_executor_backend="uni",
               enforce_eager=True, max_model_len=128, kv_cache_memory_bytes=64 << 20)


def timed(runs, group: PeerGroup, repeats: int) -> dict[str, list[float]]:
    """Seconds of each of ``runs`` ((name, fn) pairs), ``repeats`` times each, taken in turns: on a
    shared machine, load that comes and goes then weighs on every variant alike."""
    times: dict[str, list[float]] = {name: [] for name, _ in runs}
    for _ in range(repeats):
        for name, fn in runs:
            group.barrier()
            start = time.perf_counter()
            fn()
            group.barrier()
            times[name].append(time.perf_counter() - start)
    return times


def worker(rank: int, port: int, args, results_file: str) -> None:
    torch.set_num_threads(1)
    device = torch.device("cuda", rank) if args.cuda else torch.device("cpu")
    store = dist.TCPStore("127.0.0.1", port, 2, is_master=rank == 0, timeout=datetime.timedelta(seconds=60))
    group = PeerGroup(store, "bench", [0, 1], rank, device)
    model = build_model(args.hidden, args.layers).to(device)
    named = list(model.named_parameters())
    total = sum(t.numel() for _, t in named)
    flat = torch.zeros(total, dtype=named[0][1].dtype, device=device)

    def raw():
        group.broadcast(flat, 0)

    if args.vllm:
        from rlhf_launch.runtime.roles.vllm_generator import load_into_engine

        engine = start_engine(args.model_dir) if rank == 1 else None
        group.barrier()

        def into_engine():
            with torch.no_grad():
                if rank == 0:
                    send_weights(named, 0, group, device)
                else:
                    load_into_engine(engine, receive_stream(0, group, device))

        def transfer_only():
            with torch.no_grad():
                if rank == 0:
                    send_weights(named, 0, group, device)
                else:
                    for _ in receive_stream(0, group, device):
                        pass

        def load_only():
            if rank == 1:
                with torch.no_grad():
                    load_into_engine(engine, named)

        for fn in (raw, into_engine, transfer_only, load_only):  # warm-up
            fn()
        runs = (("raw", raw), ("rlhf sync", into_engine), ("transfer", transfer_only), ("load only", load_only))
        measured = timed(runs, group, args.repeats)
        if rank == 0:
            Path(results_file).write_text(json.dumps({"measured": measured, "bytes": total * flat.element_size(), "params": len(named)}))
        group.barrier()
        return

    def bucketed():
        with torch.no_grad():
            (send_weights if rank == 0 else receive_weights)(named, 0, group, device)

    def per_tensor():
        with torch.no_grad():
            for _, tensor in named:
                buffer = tensor.data if rank == 0 else torch.empty_like(tensor)
                group.broadcast(buffer, 0)
                if rank == 1:
                    tensor.copy_(buffer)

    for fn in (raw, bucketed, per_tensor):  # warm-up: connections, allocations
        fn()
    measured = timed((("raw", raw), ("rlhf sync", bucketed), ("per-tensor", per_tensor)), group, args.repeats)
    if rank == 0:
        Path(results_file).write_text(json.dumps({"measured": measured, "bytes": total * flat.element_size(), "params": len(named)}))
    group.barrier()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--cuda", action="store_true", help="two GPUs and NCCL instead of gloo on CPU")
    p.add_argument("--vllm", action="store_true", help="receive into a vLLM engine (CPU build) instead of a Hugging Face model")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        results_file = os.path.join(tmp, "results.json")
        args.model_dir = os.path.join(tmp, "model")
        if args.vllm:
            build_model(args.hidden, args.layers).save_pretrained(args.model_dir)
        port = 29000 + os.getpid() % 1000
        mp.spawn(worker, args=(port, args, results_file), nprocs=2, join=True)
        results = json.loads(Path(results_file).read_text())
    measured, nbytes = results["measured"], results["bytes"]
    backend = ("NCCL" if args.cuda else "gloo (CPU)") + (", into a vLLM engine" if args.vllm else "")
    print(f"weight sync, {backend}: {results['params']} tensors, {nbytes / 2**20:.1f} MiB, median of {args.repeats}")
    raw = statistics.median(measured["raw"])
    for name, times in measured.items():
        median = statistics.median(times)
        print(f"  {name:<10} {median * 1e3:8.1f} ms  {nbytes / median / 2**30:6.2f} GiB/s  {raw / median * 100:5.1f} % of raw")
    ratio = raw / statistics.median(measured["rlhf sync"])
    if args.vllm:
        transfer = raw / statistics.median(measured["transfer"])
        print(f"transfer / raw throughput: {transfer * 100:.1f} % (target >= 90 %); with vLLM's loading: {ratio * 100:.1f} %")
    else:
        print(f"rlhf sync / raw throughput: {ratio * 100:.1f} % (target >= 90 %)")


if __name__ == "__main__":
    main()
