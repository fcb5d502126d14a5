"""Which GPU a rank takes, whether its task sees every GPU of the node or only its own."""

from __future__ import annotations

import pytest
import torch

from rlhf_launch.runtime.device import pick_device


@pytest.fixture
def gpus(monkeypatch):
    """Pretend this machine's tasks see ``n`` GPUs (no CUDA call is made)."""

    def see(n: int) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: n > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: n)

    return see


def test_a_task_that_sees_the_whole_node_takes_its_local_rank(gpus):
    gpus(8)
    assert pick_device("auto", {"LOCAL_RANK": "5"}) == torch.device("cuda", 5)
    assert pick_device("cuda", {"SLURM_LOCALID": "3"}) == torch.device("cuda", 3)


def test_a_task_bound_to_its_own_gpu_takes_device_zero(gpus):
    gpus(1)  # --gpus-per-task=1 / --gpu-bind: CUDA_VISIBLE_DEVICES holds just this task's GPU
    assert pick_device("auto", {"LOCAL_RANK": "5"}) == torch.device("cuda", 0)


def test_more_ranks_than_gpus_is_refused_with_the_reason(gpus):
    gpus(2)
    with pytest.raises(RuntimeError, match="local rank 3 but this task sees 2 GPU"):
        pick_device("auto", {"LOCAL_RANK": "3", "CUDA_VISIBLE_DEVICES": "0,1"})


def test_cpu_when_asked_or_when_there_is_no_gpu(gpus):
    gpus(0)
    assert pick_device("auto", {}) == torch.device("cpu")
    gpus(4)
    assert pick_device("cpu", {"LOCAL_RANK": "2"}) == torch.device("cpu")


def test_a_task_bound_to_its_own_gpu_tells_deepspeed_device_zero(gpus):
    # Slurm --gpu-bind / --gpus-per-task: the task of local id 3 sees only its own GPU. DeepSpeed and
    # zero.Init take their device from LOCAL_RANK: left at 3 they would ask for a GPU that does not exist.
    from rlhf_launch.runtime.worker import device_env

    gpus(1)
    env = {"SLURM_LOCALID": "3", "LOCAL_RANK": "3"}
    env.update(device_env(pick_device("auto", env)))
    assert env["LOCAL_RANK"] == "0"


def test_the_local_rank_is_left_alone_on_the_cpu_and_kept_when_it_names_the_gpu(gpus):
    from rlhf_launch.runtime.worker import device_env

    gpus(8)
    assert device_env(pick_device("auto", {"LOCAL_RANK": "5"})) == {"LOCAL_RANK": "5"}
    assert device_env(torch.device("cpu")) == {}
