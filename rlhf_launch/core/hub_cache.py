"""Where a model named by path or by hub id lives on this machine: the one lookup that the launcher's pre-flight
and every rank use for weights, value heads, configs and tokenizers, so both read the same folder.

A hub id resolves to its snapshot in Hugging Face's hub cache, laid out as huggingface_hub writes it:
``<cache>/models--<org>--<name>/refs/main`` holds the commit of the main revision and
``<cache>/models--<org>--<name>/snapshots/<commit>/`` its files. The cache folder is found from the same
environment variables huggingface_hub reads (HF_HUB_CACHE, the older HUGGINGFACE_HUB_CACHE, HF_HOME,
XDG_CACHE_HOME), read at each call, so a rank started with a job's environment sees that job's cache.
Pure Python: huggingface_hub itself is not imported here.
"""

from __future__ import annotations

import os
from pathlib import Path

from rlhf_launch.core.data_sources import looks_local

_SEPARATOR = "--"  # huggingface_hub's separator of the parts of a repository folder's name


def _expanded(value: str) -> Path:
    return Path(os.path.expandvars(os.path.expanduser(value)))


def hf_home() -> Path:
    """The Hugging Face home (HF_HOME, else XDG_CACHE_HOME/huggingface, else ~/.cache/huggingface)."""
    default = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "huggingface")
    return _expanded(os.environ.get("HF_HOME") or default)


def hub_cache() -> Path:
    """The hub file cache (HF_HUB_CACHE, else HUGGINGFACE_HUB_CACHE, else HF_HOME/hub)."""
    return _expanded(os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE") or str(hf_home() / "hub"))


def cached_snapshot(repo: str, repo_type: str = "model") -> Path | None:
    """The hub cache's snapshot folder of ``repo``'s main revision (``repo_type``: model or dataset), or None
    when it is not cached."""
    folder = hub_cache() / f"{repo_type}s{_SEPARATOR}{repo.replace('/', _SEPARATOR)}"
    ref = folder / "refs" / "main"
    if not ref.is_file():
        return None
    snapshot = folder / "snapshots" / ref.read_text().strip()
    return snapshot if snapshot.is_dir() else None


def local_folder(model_path: str | Path) -> Path | None:
    """The folder on this machine that a model path names: an existing folder as it is (transformers too prefers a
    folder to a hub id of the same name), a hub id ('org/name') its cached snapshot of the main revision; None
    when it names neither (a local path that does not exist, or a hub id not in the cache)."""
    text = str(model_path)
    if not text:
        return None
    path = Path(text).expanduser()
    if path.is_dir():
        return path
    if path.is_absolute() or looks_local(text):
        return None
    return cached_snapshot(text, "model")


def loadable_path(model_path: str) -> str:
    """What to hand ``from_pretrained`` for a model path: its folder (``local_folder``) when it has one, else the
    path as given, so that transformers reports what it cannot find in its own words."""
    folder = local_folder(model_path)
    return str(folder) if folder is not None else model_path
