"""Where Hugging Face inputs are looked for: this machine's hub and datasets caches (as the ranks will read them),
and whether a Slurm job gives its nodes a cache of their own (then what is missing here may be there).

The cache folders and a hub id's snapshot come from rlhf_launch/core/hub_cache.py, the lookup the ranks use too,
so what the pre-flight inspects is what the runs load."""

from __future__ import annotations

import os

from rlhf_launch.core.config import JobSpec
from rlhf_launch.core.hub_cache import cached_snapshot, hf_home, hub_cache, local_folder
from rlhf_launch.core.plan import planned_models

__all__ = ["HF_CACHE_VARIABLES", "cached_snapshot", "hf_home", "hub_cache", "local_folder", "nodes_hf_cache"]

HF_CACHE_VARIABLES = ("HF_HOME", "HF_HUB_CACHE", "HF_DATASETS_CACHE")  # where the ranks look for hub files and datasets


def nodes_hf_cache(spec: JobSpec) -> str | None:
    """Where a Slurm job's nodes are given a Hugging Face cache other than this machine's: the first role whose
    trainer_config.envs sets one of HF_CACHE_VARIABLES to another value, or slurm.setup line that names one; None
    when the job sets none (sbatch passes this environment on, so the nodes read the same cache)."""
    for role, model in planned_models(spec).items():
        for name in HF_CACHE_VARIABLES:
            value = model.trainer_config.envs.get(name)
            if value is not None and value != os.environ.get(name):
                return f"{name}={value} in model_configs.{role}.trainer_config.envs"
    for i, line in enumerate(spec.slurm.setup):
        if any(name in line for name in HF_CACHE_VARIABLES):
            return f"slurm.setup.{i}: {line}"
    return None
