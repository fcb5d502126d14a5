"""A reward model or critic named by hub id is loaded from its snapshot in the hub cache, value head included.

The hub cache here is laid out as huggingface_hub leaves it (refs/main, snapshots/<commit>/ linking to blobs/) and
holds the tiny reward model with its head saved as OpenRLHF saves it (``value_head``), as the Llama-2 specs' reward
model has it. Named by id, the reward model must score exactly as its local folder does, and a critic must start
from that head. Before the runtime read heads from the snapshot, the reward model was refused (no head found) and
the critic trained a random head, while the pre-flight, which did look in the cache, passed.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from rlhf_launch.core.hub_cache import local_folder
from rlhf_launch.frontend.preflight import preflight
from rlhf_launch.runtime.models import load_frozen, load_value_model, sequence_scores
from tests.factory import make_spec

CPU = torch.device("cpu")
REPO = "test-org/tiny-reward-value-head"
COMMIT = "a1b2c3d4e5f60718293a4b5c6d7e8f9012345678"


@pytest.fixture
def hub_reward(tiny_models, tmp_path, monkeypatch) -> Path:
    """The tiny reward model, its head renamed to ``value_head``, cached as hub model REPO in the hub cache that
    HF_HUB_CACHE names (offline); returns its snapshot folder."""
    cache = tmp_path / "hub"
    repo_dir = cache / f"models--{REPO.replace('/', '--')}"
    snapshot, blobs = repo_dir / "snapshots" / COMMIT, repo_dir / "blobs"
    snapshot.mkdir(parents=True)
    blobs.mkdir()
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(COMMIT)
    for i, source in enumerate(sorted((tiny_models / "reward").iterdir())):
        blob = blobs / f"{i:040x}"
        if source.name == "model.safetensors":
            state = load_file(source)
            state = {("value_head" + name.removeprefix("score") if name.startswith("score.") else name): t for name, t in state.items()}
            save_file(state, blob, metadata={"format": "pt"})
        else:
            shutil.copyfile(source, blob)
        (snapshot / source.name).symlink_to(os.path.relpath(blob, snapshot))
    assert "value_head.weight" in load_file(snapshot / "model.safetensors")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return snapshot


def _reward_scores(spec) -> torch.Tensor:
    """The reward model of ``spec``, loaded as the reward rank loads it, on three left-padded rows."""
    model, _ = load_frozen(spec, "reward", CPU, pad_token_id=0)
    ids = torch.arange(3, 33).reshape(3, 10)
    mask = (torch.arange(10) >= torch.tensor([[4], [0], [2]])).long()  # 4, 0 and 2 columns of left padding
    with torch.no_grad():
        return sequence_scores(model, ids, mask)


def test_a_reward_model_named_by_hub_id_scores_as_its_local_folder(hub_reward, tiny_models):
    by_id = _reward_scores(make_spec({"model_configs.reward.model_path": REPO}))
    local = _reward_scores(make_spec({"model_configs.reward.model_path": str(tiny_models / "reward")}))
    torch.testing.assert_close(by_id, local, rtol=0, atol=0)


def test_a_critic_named_by_hub_id_starts_from_its_head(hub_reward, tiny_models, capsys):
    critic = load_value_model(REPO, "float32", CPU, pad_token_id=0, role="critic")
    assert "starts from a new head" not in capsys.readouterr().out
    original = load_file(tiny_models / "reward" / "model.safetensors")["score.weight"]
    torch.testing.assert_close(critic.score.weight.detach(), original, rtol=0, atol=0)


def test_the_preflight_inspects_the_folder_the_ranks_load(hub_reward, tmp_path):
    spec = make_spec({"model_configs.reward.model_path": REPO, "model_configs.critic.model_path": REPO}, run_dir=tmp_path / "run")
    found = preflight(spec, tmp_path / "run", None, local=True)
    assert [p for p in found.problems if p.path.startswith(("model_configs.reward", "model_configs.critic"))] == []
    assert found.folders["reward"] == found.folders["critic"] == local_folder(REPO) == hub_reward
