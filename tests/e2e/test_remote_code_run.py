"""A run whose four models are of their own code (the remote_code_models fixture: model_type tiny_remote): the
causal LM as actor, reference and critic (a value head on top), the reward model of its own class with its v_head.
It computes what the tiny spec computes, whose models hold the same weights, and exports models that carry their code.
"""

from __future__ import annotations

import pytest

from rlhf_launch.runtime.metrics import read_metrics
from rlhf_launch.runtime.training_run import run_local
from tests.factory import make_spec, remote_code

SMALL = {"train_config.max_train_step": 1, "dataset_config.num_samples_each_epoch": 16, "train_config.ppo_minibatch": 16,
         "train_config.value_minibatch": 16, "rollout_config.max_new_tokens": 8}


@pytest.mark.slow
def test_models_of_their_own_code_in_all_four_roles_run_as_the_tiny_models(remote_code_models, tmp_path):
    run_local(make_spec({**SMALL, **remote_code(remote_code_models)}), tmp_path / "remote", quiet=True)
    run_local(make_spec(SMALL), tmp_path / "plain", quiet=True)
    (remote,), (plain,) = read_metrics(tmp_path / "remote"), read_metrics(tmp_path / "plain")
    # The same actor and reward weights through their own classes: the same responses and scores. The critic differs
    # (the causal LM with a new head, not the tiny critic), and so does the training it drives.
    for key in ("reward_mean", "reward_std", "response_len_mean", "truncated_frac"):
        assert remote[key] == pytest.approx(plain[key], abs=1e-5), key
    assert remote["value_loss"] > 0 and remote["critic_grad_norm"] > 0
    for role in ("actor", "critic"):
        assert (tmp_path / "remote" / "final" / role / "modeling_tiny_remote.py").is_file(), role
