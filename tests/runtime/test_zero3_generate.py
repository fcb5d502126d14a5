"""A shared ZeRO-3 actor generates on every rank inside ``trainer.gathered()``. If DeepSpeed's
parameter hooks still all-gathered in there, a rank whose responses all stop early would leave
``generate`` while the others wait in a collective, and the job would hang on a GPU cluster.

They did, with DeepSpeed 0.19 on CPU: one rank failed with "Cannot partition a param in flight"
as the other left. So generation with a ZeRO-3 model over several ranks runs in lockstep
(``synced_gpus``). Guard: two ZeRO-3 ranks generate responses of very different lengths (2
tokens on one rank, 40 on the other), then meet in a collective; both must come out.
"""

from __future__ import annotations

import os

import pytest

from tests.factory import run_on_ranks


def _generate(rank: int, world_size: int, store, model_dir: str) -> dict:
    import torch
    import torch.distributed as dist

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), DS_ACCELERATOR="cpu")
    dist.init_process_group("gloo", store=dist.PrefixStore("default", store), rank=rank, world_size=world_size)
    from rlhf_launch.core.config import TrainKwargs
    from rlhf_launch.runtime.engine import DeepSpeedTrainer
    from rlhf_launch.runtime.models import PolicyModule, load_causal_lm
    from rlhf_launch.runtime.rollout import SamplingSettings, hf_generate

    model = load_causal_lm(model_dir, "float32", torch.device("cpu"))
    config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "train_batch_size": world_size,
              "zero_optimization": {"stage": 3}, "steps_per_print": 10**9}
    trainer = DeepSpeedTrainer(PolicyModule(model), TrainKwargs(lr=1e-6, total_steps=10), config)
    inner = trainer.inner.model
    new_tokens = 2 if rank == 0 else 40
    settings = SamplingSettings(do_sample=False, temperature=1.0, top_k=0, top_p=1.0, min_new_tokens=new_tokens,
                                max_new_tokens=new_tokens, stop_ids=(2,), pad_id=0)
    prompt = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad(), trainer.gathered():  # what ActorRole.generate does
        full = inner.get_input_embeddings().weight.shape
        out = hf_generate(inner, prompt, torch.ones_like(prompt), settings, 1, lockstep=trainer.generates_in_lockstep)
    token = torch.ones(1)
    dist.all_reduce(token)  # both ranks got here: nobody is stuck inside generate
    return {"generated": out["response_ids"].shape[1], "embedding": list(full), "met": int(token.item()),
            "lockstep": trainer.generates_in_lockstep}


@pytest.mark.slow
def test_ranks_leave_generate_at_different_times_without_a_hang(tiny_models):
    results = run_on_ranks(_generate, 2, str(tiny_models / "actor"), timeout_s=240)
    assert [r["generated"] for r in results] == [2, 40]
    assert results[0]["embedding"] == results[1]["embedding"] and results[0]["embedding"][0] > 0
    assert [r["met"] for r in results] == [2, 2]
    assert all(r["lockstep"] for r in results)
