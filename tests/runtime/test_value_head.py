"""Value heads saved under other trainers' names load into ``score``; a missing one is refused.

The tiny reward model is re-saved with its head renamed as InternLM2 (``v_head``), OpenRLHF
(``value_head``) and TRL (``v_head.summary``, with a bias) save theirs: each must score
exactly as the original. Before this loader, each got a random ``score`` silently.
"""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from rlhf_launch.runtime.models import load_value_model, sequence_scores
from rlhf_launch.runtime.value_head import ValueHeadError

CPU = torch.device("cpu")


def _batch():
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 200, (4, 12), generator=gen)
    mask = torch.ones_like(ids)
    mask[0, :5] = 0  # left padding, as rollouts have
    return ids, mask


def _resave(tiny_models, tmp_path, rename: dict[str, str], extra: dict[str, torch.Tensor] | None = None):
    """The tiny reward model with its tensors renamed (old -> new) and extra ones added."""
    folder = tmp_path / "reward"
    shutil.copytree(tiny_models / "reward", folder)
    state = load_file(folder / "model.safetensors")
    for old, new in rename.items():
        state[new] = state.pop(old)
    state.update(extra or {})
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def _scores(path, head_name=None, role="reward"):
    model = load_value_model(str(path), "float32", CPU, pad_token_id=0, role=role, head_name=head_name)
    with torch.no_grad():
        return sequence_scores(model, *_batch())


@pytest.mark.parametrize("head", ["v_head", "value_head", "v_head.summary"])
def test_a_head_saved_under_a_known_name_scores_as_the_original(tiny_models, tmp_path, head):
    original = _scores(tiny_models / "reward")
    renamed = _resave(tiny_models, tmp_path, {"score.weight": f"{head}.weight"})
    torch.testing.assert_close(_scores(renamed), original, rtol=0, atol=0)


def test_a_head_with_a_bias_keeps_it(tiny_models, tmp_path):
    original = _scores(tiny_models / "reward")
    bias = torch.tensor([0.75])
    renamed = _resave(tiny_models, tmp_path, {"score.weight": "v_head.summary.weight"}, {"v_head.summary.bias": bias})
    torch.testing.assert_close(_scores(renamed), original + 0.75)


def test_head_name_finds_a_head_of_any_name(tiny_models, tmp_path):
    original = _scores(tiny_models / "reward")
    renamed = _resave(tiny_models, tmp_path, {"score.weight": "reward_head.weight"})
    torch.testing.assert_close(_scores(renamed, head_name="reward_head"), original, rtol=0, atol=0)


def test_a_reward_model_without_a_head_is_refused_naming_what_it_has(tiny_models, tmp_path):
    renamed = _resave(tiny_models, tmp_path, {"score.weight": "reward_head.weight"})
    with pytest.raises(ValueHeadError) as info:
        _scores(renamed)
    message = str(info.value)
    assert "model_configs.reward" in message and "'reward_head.weight' [1, " in message and "head_name" in message


def test_a_named_head_that_is_absent_is_refused(tiny_models):
    with pytest.raises(ValueHeadError, match="named 'v_head'"):
        _scores(tiny_models / "reward", head_name="v_head")


def test_a_critic_from_a_causal_lm_starts_from_a_new_head(tiny_models, capsys):
    # The actor's checkpoint has lm_head but no value head: a critic may train one from scratch.
    model = load_value_model(str(tiny_models / "actor"), "float32", CPU, pad_token_id=0, role="critic")
    assert model.score.weight.shape[0] == 1
    assert "the critic starts from a new head" in capsys.readouterr().out
    with pytest.raises(ValueHeadError, match="'lm_head.weight'"):
        load_value_model(str(tiny_models / "actor"), "float32", CPU, pad_token_id=0, role="reward")
