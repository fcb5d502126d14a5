"""Weight sync from a two-rank actor to a generator rank, three processes over gloo: under
ZeRO-3 (the actor loaded partitioned under zero.Init, each layer gathered in turn and the next
while it is sent, so a rank never holds more than two layers beyond its shard) and under DDP
(nothing gathered)."""

from __future__ import annotations

import datetime
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from rlhf_launch.core.config import TrainKwargs
from rlhf_launch.runtime.dist import PeerGroup
from rlhf_launch.runtime.weight_sync import (
    chunk_indices,
    chunk_key,
    manifest_of,
    plan_chunks,
    receive_stream,
    receive_weights,
    send_weights,
)
from tests.factory import leave_rank, served_store

ACTOR, GENERATOR = [0, 1], 2
CPU = torch.device("cpu")
ZERO3 = {
    "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "train_batch_size": 2, "steps_per_print": 10**9,
    # Every parameter partitioned, however small: otherwise the tiny model's would all stay whole on every rank.
    "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
}


def tiny_llama(seed: int):
    """Four decoder layers, each larger than the embeddings or the head: a layer is the largest chunk."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=256, num_hidden_layers=4, num_attention_heads=2,
                      tie_word_embeddings=False, max_position_embeddings=64)
    return LlamaForCausalLM(cfg)


def test_chunks_keep_each_decoder_layer_whole_and_in_order():
    named = list(tiny_llama(0).named_parameters())
    assert chunk_key("model.layers.3.self_attn.q_proj.weight") == "model.layers.3"
    assert chunk_key("model.embed_tokens.weight") == "model.embed_tokens.weight"
    chunks = plan_chunks(manifest_of(named))
    names = [[n for transfer in chunk for n, _ in transfer] for chunk in chunks]
    keys = [{chunk_key(n) for n in chunk} for chunk in names]
    assert all(len(k) == 1 for k in keys)  # no chunk (and so no bucket) mixes two layers
    assert [k.pop() for k in keys] == ["model.embed_tokens.weight", *(f"model.layers.{i}" for i in range(4)), "model.norm.weight",
                                       "lm_head.weight"]
    assert sorted(n for chunk in names for n in chunk) == sorted(n for n, _ in named)
    assert chunk_indices(["a.0.x", "a.0.y", "b", "a.1.x"]) == [0, 0, 1, 2]


def _connect(port: int) -> dist.TCPStore:
    return dist.TCPStore("127.0.0.1", port, is_master=False, timeout=datetime.timedelta(seconds=120))


def _run(rank: int, port: int, mode: str, model_dir: str, out: str) -> None:
    torch.set_num_threads(1)
    store = _connect(port)
    sync = PeerGroup(store, "sync", [ACTOR[0], GENERATOR], rank, CPU) if rank in (ACTOR[0], GENERATOR) else None
    if rank == GENERATOR:
        model = tiny_llama(seed=1)  # different weights until the sync
        results = []
        for _ in range(2):
            receive_weights(list(model.named_parameters()), ACTOR[0], sync, CPU)
            results.append({k: v.clone() for k, v in model.state_dict().items()})
        streamed = dict(receive_stream(ACTOR[0], sync, CPU))  # a vLLM-style receiver: the same tensors
        torch.save({"received": results, "streamed": streamed}, f"{out}.generator")
        sync.barrier()
        leave_rank()
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", store=dist.PrefixStore("actor", store), rank=rank, world_size=2)
    from transformers.integrations import is_deepspeed_zero3_enabled

    from rlhf_launch.runtime.engine import DeepSpeedTrainer, TorchTrainer
    from rlhf_launch.runtime.models import PolicyModule, is_partitioned, load_causal_lm

    kwargs = TrainKwargs(lr=1e-2)
    model = load_causal_lm(model_dir, "float32", CPU, ZERO3 if mode == "zero3" else None)
    report = {"partitioned": is_partitioned(model), "zero3_left_enabled": is_deepspeed_zero3_enabled()}
    if mode == "zero3":
        report["shard_numel"] = sum(p.ds_tensor.numel() for p in model.parameters())  # held here before DeepSpeed sees it
        trainer = DeepSpeedTrainer(PolicyModule(model), kwargs, ZERO3)
    else:
        trainer = TorchTrainer(PolicyModule(model), kwargs, group=dist.group.WORLD, device=CPU)

    def sync_now() -> int:
        group = sync if rank == ACTOR[0] else None
        return send_weights(list(model.named_parameters()), ACTOR[0], group, CPU, trainer.weight_dtype, gather=trainer.gathered)

    sync_now()  # the weights as loaded
    torch.manual_seed(rank)
    ids = torch.randint(0, 128, (1, 12))
    trainer.backward(trainer.module(ids, torch.ones_like(ids), 4).logsumexp(-1).mean())
    trainer.step()  # DeepSpeed updated at the boundary; plain torch here
    meter = getattr(trainer, "gather_meter", None)
    if meter is not None:
        meter.reset()
    report["sent"] = sync_now()
    sync_now()  # once more for the streaming receiver
    if meter is not None:
        report["peak"], report["current"] = meter.peak, meter.current
    # Whole-model copies for the comparison only, after the syncs measured above.
    state = trainer.full_state_dict()
    if rank == ACTOR[0]:
        report["state"] = {k.removeprefix("model."): v.clone() for k, v in state.items()}
        torch.save(report, f"{out}.actor")
        sync.barrier()
    dist.barrier()  # neither actor rank leaves while the other still uses the group
    dist.destroy_process_group()
    leave_rank()


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["zero3", "ddp"])
def test_generator_gets_the_actor_weights_at_most_two_layers_gathered_at_once(tmp_path, mode):
    tiny_llama(seed=0).save_pretrained(tmp_path / "model")
    out = str(tmp_path / "result")
    with served_store() as port:
        mp.spawn(_run, args=(port, mode, str(tmp_path / "model"), out), nprocs=3, join=True)
    actor, generator = torch.load(f"{out}.actor"), torch.load(f"{out}.generator")
    on_disk = tiny_llama(seed=0).state_dict()
    loaded, updated = generator["received"]
    assert set(loaded) == set(on_disk) == set(actor["state"])
    for key, value in on_disk.items():
        assert torch.equal(loaded[key], value), key  # the checkpoint's weights, loaded partitioned or not
        assert torch.equal(updated[key], actor["state"][key]), key  # exactly the actor's weights after its update
        assert torch.equal(generator["streamed"][key], actor["state"][key]), key
    assert any(not torch.equal(updated[k], on_disk[k]) for k in on_disk)  # the update moved the weights
    assert actor["sent"] == sum(v.numel() * v.element_size() for v in on_disk.values())
    assert not actor["zero3_left_enabled"]  # generate() must not see ZeRO-3 after loading
    if mode == "ddp":
        assert not actor["partitioned"]
        return
    assert actor["partitioned"]
    whole = sum(v.numel() * v.element_size() for v in on_disk.values())
    chunk_bytes: dict[str, int] = {}
    for key, value in on_disk.items():
        chunk_bytes[chunk_key(key)] = chunk_bytes.get(chunk_key(key), 0) + value.numel() * value.element_size()
    largest = max(chunk_bytes.values())
    assert largest == chunk_bytes["model.layers.0"] and largest * 4 < whole
    assert actor["shard_numel"] < 0.55 * sum(v.numel() for v in on_disk.values())  # loaded as this rank's half only
    # Every parameter partitioned: chunks are pipelined one deep (the next gathered and sent while the previous
    # is waited for), so a sync holds exactly the two largest consecutive chunks at its peak, two layers, no more
    # than a layer beyond the one being sent; then nothing stays whole.
    sizes = list(chunk_bytes.values())
    assert actor["peak"] == max(a + b for a, b in zip(sizes, sizes[1:], strict=False)) == 2 * largest, (actor["peak"], chunk_bytes)
    assert actor["current"] == 0


def _load_critic(rank: int, port: int, path: str, out: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", store=dist.PrefixStore("critic", _connect(port)), rank=rank, world_size=2)
    import deepspeed

    from rlhf_launch.runtime.models import is_partitioned, load_value_model

    model = load_value_model(path, "float32", CPU, pad_token_id=0, role="critic", zero3_config=ZERO3)
    with deepspeed.zero.GatheredParameters(list(model.score.parameters())):
        head = model.score.weight.detach().clone()
    torch.save({"partitioned": is_partitioned(model), "head": head, "local": model.score.weight.numel()}, f"{out}.{rank}")
    dist.barrier()  # neither rank leaves while the other still uses the group
    dist.destroy_process_group()
    leave_rank()


@pytest.mark.slow
def test_a_partitioned_critic_gets_its_value_head_from_another_name(tiny_models, tmp_path):
    """The head is copied into ``score`` while ``score`` is whole on every rank, and kept."""
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "critic"
    folder.mkdir()
    for f in (tiny_models / "critic").iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    state = load_file(folder / "model.safetensors")
    state["v_head.weight"] = expected = state.pop("score.weight")
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    out = str(tmp_path / "critic")
    with served_store() as port:
        mp.spawn(_load_critic, args=(port, str(folder), out), nprocs=2, join=True)
    for rank in (0, 1):
        result = torch.load(f"{out}.{rank}")
        assert result["partitioned"] and result["local"] == 0
        assert torch.equal(result["head"], expected), rank
