"""The metric catalogue (rlhf_launch/core/metric_catalogue.py) names every key the code logs."""

from __future__ import annotations

import pytest
import torch

from rlhf_launch.core import metric_catalogue as mc
from rlhf_launch.runtime.experience import ExperienceSettings, RewardMoments, make_experience
from tests.conftest import ROOT
from tests.factory import make_spec

TEXT = ROOT / "data" / "pretrain" / "tiny_text.jsonl"


def test_every_entry_is_described_and_names_a_module_that_exists():
    for metric in mc.CATALOGUE.values():
        assert len(metric.meaning) > 10 and (ROOT / metric.logged_by).is_file(), metric
        assert ("<" in metric.name) == bool(metric.values), metric  # a family has a placeholder and its values
    assert len(mc.all_keys()) == sum(len(m.keys()) for m in mc.CATALOGUE.values())  # no key twice


def test_families_make_and_read_their_keys():
    assert mc.BUSY_S.key("actor") == "busy_actor_s" and mc.UTIL.value_of("util_critic") == "critic"
    assert mc.KL_BY_ESTIMATOR.keys() == ("kl_k2", "kl_k3")
    assert mc.UTIL.value_of("utilization") is None and mc.SCORE_ROLE_TIME_S.value_of("score_time_s") is None
    assert mc.uncatalogued(["reward_mean", "util_reward", "reward_meen"]) == ["reward_meen"]
    assert all(key == f"{section}_time_s" for section, key in mc.SECTION_TIMES.items())


@pytest.mark.parametrize("settings", [
    ExperienceSettings(kl_estimator="k3", kl_coeff=0.1, tis_cap=2.0, norm_rewards=True),
    ExperienceSettings(advantage_estimator="grpo", kl_estimator="k2", kl_in="loss", group_size=2),
], ids=["gae", "grpo"])
def test_every_experience_metric_is_catalogued(settings):
    g = torch.Generator().manual_seed(0)
    B, R = 4, 5
    rollout = {"response_mask": torch.ones(B, R), "finished": torch.tensor([True, False, True, True]),
               "gen_logprobs": torch.randn(B, R, generator=g)}
    logp, ref, values = (torch.randn(B, R, generator=g) for _ in range(3))
    scores = torch.randn(B, generator=g)
    _, metrics = make_experience(settings, rollout, logp, ref, values, scores, RewardMoments())
    assert mc.uncatalogued(metrics) == []
    assert {mc.KL, mc.GEN_LOGPROB_GAP} <= set(metrics)


@pytest.mark.parametrize("overrides", [
    {"repeater_config.kl_estimator": "k2", "train_config.pretrain_loss_weight": 0.5,
     "pretrain_dataset_config": {"pretrain_datas": [f"{TEXT}::1.0"], "num_samples_each_epoch": 4, "max_seq_len": 20}},
    {"repeater_config.advantage_estimator": "grpo", "repeater_config.kl_in": "loss", "repeater_config.kl_estimator": "k3",
     "rollout_config.n_samples_per_prompt": 4, "rollout_config.dynamic_sampling": True},
], ids=["gae_ptx", "grpo_dynamic"])
def test_every_key_a_step_logs_is_catalogued(tiny_models, tmp_path, overrides):
    from rlhf_launch.runtime.metrics import read_metrics
    from rlhf_launch.runtime.training_run import run_local

    run_local(make_spec({**overrides, "train_config.max_train_step": 1}), tmp_path / "run", quiet=True)
    (record,) = read_metrics(tmp_path / "run")
    assert mc.uncatalogued(k for k in record if k != "step") == []
    assert mc.STEP_TIME_S in record and (mc.ACTOR_PTX_LOSS in record or mc.FILTERED_FRAC in record)
