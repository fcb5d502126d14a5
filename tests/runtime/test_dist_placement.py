"""What a rank binds to: the GPU its process groups are created on (``device_id``), and the node-local compile
cache of its vLLM engine."""

from __future__ import annotations

import pytest
import torch

from rlhf_launch.runtime.device import pick_device
from rlhf_launch.runtime.dist import Topology, device_id_for
from rlhf_launch.runtime.worker import vllm_cache_env
from tests.factory import layout, load, reward_function, vllm_generator


def test_process_groups_get_no_device_on_the_cpu():
    assert device_id_for(torch.device("cpu")) is None
    assert device_id_for(pick_device("cpu")) is None


@pytest.mark.parametrize(("visible", "env", "index"), [
    (8, {"LOCAL_RANK": "5"}, 5),  # the task sees its node's every GPU: its local rank picks one
    (8, {"SLURM_LOCALID": "3"}, 3),
    (1, {"LOCAL_RANK": "5"}, 0),  # --gpus-per-task / --gpu-bind: its own GPU is device 0 whatever its local rank
])
def test_process_groups_are_bound_to_the_gpu_the_local_rank_picked(monkeypatch, visible, env, index):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # pretend: no CUDA call is made
    monkeypatch.setattr(torch.cuda, "device_count", lambda: visible)
    assert device_id_for(pick_device("cuda", env)) == torch.device("cuda", index)


VLLM_JOB = {**layout(actor=2), **reward_function(), **vllm_generator(data=2, tensor=2), "slurm.gpus_per_node": 4}


def _topo(plan, rank: int) -> Topology:
    return Topology(rank, plan.world_size, *plan.role_of_rank(rank), 0, plan)


def test_each_vllm_engine_compiles_into_a_node_local_folder_of_its_own():
    plan = load(VLLM_JOB).plan  # actor 0-1, critic 2, reference (and reward function) 3, two engines of two ranks: 4-5, 6-7
    env = {"SLURM_JOB_ID": "4242", "TMPDIR": "/local/scratch"}
    roots = {rank: vllm_cache_env(_topo(plan, rank), "vllm", env).get("VLLM_CACHE_ROOT") for rank in range(plan.world_size)}
    assert roots == {0: None, 1: None, 2: None, 3: None,
                     4: "/local/scratch/rlhf-vllm-cache-4242-0", 5: "/local/scratch/rlhf-vllm-cache-4242-0",
                     6: "/local/scratch/rlhf-vllm-cache-4242-1", 7: "/local/scratch/rlhf-vllm-cache-4242-1"}


def test_the_vllm_cache_defaults_to_tmp_and_yields_to_the_users_choice():
    topo = _topo(load(VLLM_JOB).plan, 6)
    assert vllm_cache_env(topo, "vllm", {"SLURM_JOB_ID": "7"}) == {"VLLM_CACHE_ROOT": "/tmp/rlhf-vllm-cache-7-1"}
    assert vllm_cache_env(topo, "vllm", {"SLURM_JOB_ID": "7", "VLLM_CACHE_ROOT": "/mine"}) == {}
    assert vllm_cache_env(topo, "hf", {"SLURM_JOB_ID": "7"}) == {}  # no vLLM on this rank: nothing to set
    assert vllm_cache_env(topo, "vllm", {})["VLLM_CACHE_ROOT"].startswith("/tmp/rlhf-vllm-cache-local")  # --local: per launcher
