"""The device a rank computes on, chosen from ``run.device`` and what its task sees."""

from __future__ import annotations

import os

import torch


def pick_device(name: str, env: dict[str, str] | None = None) -> torch.device:
    """The device of this process: ``run.device``, with ``auto`` meaning CUDA when there is one.

    A task may see every GPU of its node (then its local rank picks one) or only its own (Slurm's
    --gpus-per-task or --gpu-bind set CUDA_VISIBLE_DEVICES per task: then it is device 0)."""
    if not (name == "cuda" or (name == "auto" and torch.cuda.is_available())):
        return torch.device("cpu")
    env = os.environ if env is None else env
    local = int(env.get("LOCAL_RANK", env.get("SLURM_LOCALID", 0)))
    visible = torch.cuda.device_count()
    if visible == 1:
        return torch.device("cuda", 0)
    if local >= visible:
        raise RuntimeError(
            f"local rank {local} but this task sees {visible} GPU(s) (CUDA_VISIBLE_DEVICES="
            f"{env.get('CUDA_VISIBLE_DEVICES', 'unset')}): more ranks on this node than GPUs"
        )
    return torch.device("cuda", local)
