"""Where a model path leads (rlhf_launch/core/hub_cache.py): the folder itself, or a hub id's snapshot of its main
revision in the hub cache, found from the same environment variables and in the same layout as huggingface_hub's;
and a hub id's checkpoint files and tensor names are read there (rlhf_launch/core/checkpoint_index.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from rlhf_launch.core.checkpoint_index import checkpoint_files, find_value_head, tensor_shapes
from rlhf_launch.core.hub_cache import cached_snapshot, loadable_path, local_folder

COMMIT = "0123456789abcdef0123456789abcdef01234567"
CACHE_VARIABLES = ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME")


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """An empty hub cache that HF_HUB_CACHE names."""
    folder = tmp_path / "hub"
    folder.mkdir()
    for name in CACHE_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(folder))
    return folder


def write_safetensors(path: Path, shapes: dict[str, list[int]]) -> None:
    """A safetensors file of zeros with these tensors."""
    from safetensors.numpy import save_file

    save_file({name: np.zeros(shape, dtype=np.float32) for name, shape in shapes.items()}, str(path))


def cache_model(cache: Path, repo: str, files: dict[str, dict[str, list[int]] | str]) -> Path:
    """A model in the hub cache as huggingface_hub leaves it: the files as blobs, linked from the snapshot of the
    commit that refs/main names; a dict is a safetensors file of those tensors, a str a text file."""
    repo_dir = cache / f"models--{repo.replace('/', '--')}"
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(COMMIT)
    snapshot = repo_dir / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    (repo_dir / "blobs").mkdir()
    for i, (name, content) in enumerate(files.items()):
        blob = repo_dir / "blobs" / f"blob{i}"
        if isinstance(content, dict):
            write_safetensors(blob, content)
        else:
            blob.write_text(content)
        (snapshot / name).symlink_to(os.path.relpath(blob, snapshot))
    return snapshot


SHARDED = {
    "config.json": "{}",
    "model.safetensors.index.json": json.dumps({"weight_map": {
        "model.embed_tokens.weight": "model-00001-of-00002.safetensors", "value_head.weight": "model-00002-of-00002.safetensors",
    }}),
    "model-00001-of-00002.safetensors": {"model.embed_tokens.weight": [16, 4]},
    "model-00002-of-00002.safetensors": {"value_head.weight": [1, 4]},
}


def test_a_hub_id_leads_to_its_snapshot_and_its_checkpoint_files_are_read_there(cache):
    snapshot = cache_model(cache, "some-org/some-reward", SHARDED)
    assert local_folder("some-org/some-reward") == snapshot == cached_snapshot("some-org/some-reward")
    assert loadable_path("some-org/some-reward") == str(snapshot)
    assert checkpoint_files("some-org/some-reward") == [snapshot / "model-00001-of-00002.safetensors",
                                                        snapshot / "model-00002-of-00002.safetensors"]
    shapes = tensor_shapes("some-org/some-reward")
    assert shapes == {"model.embed_tokens.weight": [16, 4], "value_head.weight": [1, 4]}
    assert find_value_head(shapes, None) == "value_head"


def test_what_is_not_there_leads_nowhere(cache, tmp_path):
    assert local_folder("some-org/absent") is None
    assert checkpoint_files("some-org/absent") == [] and tensor_shapes("some-org/absent") is None
    assert loadable_path("some-org/absent") == "some-org/absent"  # transformers says what it cannot find
    assert local_folder("") is None and local_folder(str(tmp_path / "missing")) is None and local_folder("./missing") is None
    # refs/main naming a snapshot that is not there (an interrupted download)
    snapshot = cache_model(cache, "some-org/broken", {"config.json": "{}"})
    (snapshot / "config.json").unlink()
    snapshot.rmdir()
    assert local_folder("some-org/broken") is None


def test_a_folder_is_itself_even_without_a_dot_slash_as_transformers_reads_it(cache, tmp_path, monkeypatch):
    folder = tmp_path / "models" / "reward"
    folder.mkdir(parents=True)
    write_safetensors(folder / "model.safetensors", {"score.weight": [1, 4]})
    cache_model(cache, "models/reward", {"config.json": "{}"})  # a hub id of the same name loses, as in transformers
    monkeypatch.chdir(tmp_path)
    assert local_folder("models/reward") == Path("models/reward")
    assert checkpoint_files("models/reward") == [Path("models/reward/model.safetensors")]
    assert local_folder(str(folder)) == folder


@pytest.mark.parametrize("env", [
    {"HF_HUB_CACHE": "{tmp}/a", "HUGGINGFACE_HUB_CACHE": "{tmp}/b", "HF_HOME": "{tmp}/c"},
    {"HUGGINGFACE_HUB_CACHE": "{tmp}/b", "HF_HOME": "{tmp}/c"},
    {"HF_HOME": "{tmp}/c", "XDG_CACHE_HOME": "{tmp}/d"},
    {"XDG_CACHE_HOME": "{tmp}/d"},
    {"HF_HOME": "~/e"},
    {},
], ids=["hub-cache", "legacy", "home", "xdg", "tilde", "default"])
def test_the_cache_folder_is_huggingface_hubs_own(env, tmp_path):
    # huggingface_hub reads these variables once, at import: a fresh interpreter per setting.
    environ = {k: v for k, v in os.environ.items() if k not in CACHE_VARIABLES}
    environ.update({k: v.format(tmp=tmp_path) for k, v in env.items()})
    code = ("import huggingface_hub.constants as c; from rlhf_launch.core.hub_cache import hub_cache; "
            "print(c.HF_HUB_CACHE); print(hub_cache())")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=environ, timeout=120, check=True)
    theirs, ours = proc.stdout.splitlines()
    assert Path(theirs) == Path(ours)


def test_the_snapshot_is_the_one_huggingface_hub_resolves(cache):
    huggingface_hub = pytest.importorskip("huggingface_hub")
    snapshot = cache_model(cache, "some-org/some-reward", SHARDED)
    theirs = huggingface_hub.snapshot_download("some-org/some-reward", cache_dir=cache, local_files_only=True)
    assert Path(theirs) == local_folder("some-org/some-reward") == snapshot
    config = huggingface_hub.try_to_load_from_cache("some-org/some-reward", "config.json", cache_dir=cache)
    assert Path(config).parent == snapshot
