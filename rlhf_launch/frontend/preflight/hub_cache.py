"""Where Hugging Face inputs are looked for: this machine's hub and datasets caches (as the ranks will read them),
and whether a Slurm job gives its nodes a cache of their own (then what is missing here may be there)."""

from __future__ import annotations

import os
from pathlib import Path

from rlhf_launch.core.config import JobSpec
from rlhf_launch.core.plan import planned_models

HF_CACHE_VARIABLES = ("HF_HOME", "HF_HUB_CACHE", "HF_DATASETS_CACHE")  # where the ranks look for hub files and datasets


def hf_home() -> Path:
    """The Hugging Face home the runs will use (HF_HOME, else ~/.cache/huggingface)."""
    return Path(os.environ.get("HF_HOME") or Path.home() / ".cache" / "huggingface").expanduser()


def hub_cache() -> Path:
    """The hub file cache (HF_HUB_CACHE, else HF_HOME/hub), as the ranks will read it."""
    return Path(os.environ.get("HF_HUB_CACHE") or hf_home() / "hub").expanduser()


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


def cached_snapshot(repo: str, repo_type: str) -> Path | None:
    """The hub cache's snapshot folder of ``repo``'s main revision, or None when it is not cached."""
    folder = hub_cache() / f"{repo_type}s--{repo.replace('/', '--')}"
    ref = folder / "refs" / "main"
    if ref.is_file():
        snapshot = folder / "snapshots" / ref.read_text().strip()
        return snapshot if snapshot.is_dir() else None
    return None
