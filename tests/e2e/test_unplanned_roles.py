"""The plan has only the roles the algorithm uses: no critic for an estimator other than gae, no reference with
kl_coeff 0 (rlhf_launch/core/plan.py ``unplanned_roles``). Their sections stay required but are ignored: the plan, the
dry run, the sbatch script, the checks, the pre-flight and the runtime (loop, checkpoints, export) leave them out,
and a reward function without a reference runs on the actor's ranks."""

from __future__ import annotations

import json
import os

import pytest

from rlhf_launch.core import yaml_io
from rlhf_launch.core.plan import planned_models
from rlhf_launch.frontend.backends import local
from rlhf_launch.frontend.backends.local import one_process_blocker, rank_environments
from rlhf_launch.frontend.backends.slurm_script import JobFiles, render_sbatch
from rlhf_launch.frontend.cli import main
from tests.conftest import ROOT
from tests.factory import layout, load, load_sized, reward_function, spec_dict, zero

GOLDEN = ROOT / "tests" / "golden"
GRPO = {"repeater_config.advantage_estimator": "grpo", "rollout_config.n_samples_per_prompt": 4}
NO_REF = {"repeater_config.kl_coeff": 0}
# 7B-sized layouts on 8-GPU nodes: actor 8, critic 8, reference 2, reward 2 (the reward model on GPUs of its own).
SIZED = layout(actor=8, critic=8, reference=2, reward=2)


def gpus(plan) -> dict[str, int]:
    return {r.name: r.gpus for r in plan.roles}


def components(plan) -> list[tuple[str, list[str], int]]:
    return [(c.name, c.roles, c.gpus) for c in plan.components]


# --------------------------------------------------------------------------- the plan
def test_a_critic_free_estimator_plans_no_critic():
    gae, grpo = load_sized(SIZED).plan, load_sized({**SIZED, **GRPO}).plan
    assert gpus(gae) == {"actor": 8, "critic": 8, "reference": 2, "reward": 2, "generator": 0}
    assert gpus(grpo) == {"actor": 8, "reference": 2, "reward": 2, "generator": 0}
    assert (gae.total_gpus, grpo.total_gpus, grpo.world_size) == (20, 12, 12)
    assert components(grpo) == [("trainer", ["actor"], 8), ("inference", ["reference", "reward"], 4)]
    assert grpo.role("reference").ranks == range(8, 10)  # right after the actor: no gap where the critic was
    assert not grpo.has("critic") and grpo.has("actor")
    with pytest.raises(KeyError, match="the plan has no critic role"):
        grpo.role("critic")
    assert grpo.unplanned == {"critic": "repeater_config.advantage_estimator grpo uses no critic"}
    assert [grpo.role_of_rank(r)[0] for r in range(grpo.world_size)] == ["actor"] * 8 + ["reference"] * 2 + ["reward"] * 2


def test_kl_coeff_0_plans_no_reference():
    plan = load_sized({**SIZED, **NO_REF}).plan
    assert gpus(plan) == {"actor": 8, "critic": 8, "reward": 2, "generator": 0}
    assert components(plan) == [("trainer", ["actor", "critic"], 16), ("inference", ["reward"], 2)]
    assert list(plan.unplanned) == ["reference"] and "kl_coeff is 0" in plan.unplanned["reference"]


def test_without_reference_a_reward_function_runs_on_the_actor_ranks_and_the_inference_component_goes():
    plan = load_sized({**SIZED, **NO_REF, **reward_function()}).plan
    reward = plan.role("reward")
    assert (reward.gpus, reward.shared_with, reward.component, reward.nodes) == (0, "actor", 0, plan.role("actor").nodes)
    assert (reward.data, reward.tensor) == (8, 1)  # the host's layout: each actor replica scores its own shard
    assert components(plan) == [("trainer", ["actor", "critic"], 16)]
    # With a reference the function keeps running on the reference's ranks, in the reference's layout.
    with_ref = load_sized({**SIZED, **reward_function()}).plan
    assert (with_ref.role("reward").shared_with, with_ref.role("reward").data) == ("reference", 2)


def test_grpo_without_kl_is_the_actor_alone():
    plan = load_sized({**SIZED, **GRPO, **NO_REF, **reward_function()}).plan
    assert gpus(plan) == {"actor": 8, "reward": 0, "generator": 0}
    assert components(plan) == [("trainer", ["actor"], 8)] and plan.total_nodes == 1
    assert set(plan.unplanned) == {"critic", "reference"}
    # The one-process mode and the rank environments follow the plan.
    small = load({**GRPO, **NO_REF, **reward_function()})
    assert small.plan.world_size == 1 and one_process_blocker(small.spec, small.plan, lambda: False) is None
    envs = rank_environments(load({**GRPO, **NO_REF, **reward_function(), **layout(actor=2)}).plan, 1234, 1)
    assert [(e["RLHF_HET_GROUP"], e["SLURM_PROCID"]) for e in envs] == [("0", "0"), ("0", "1")]


def test_memory_is_estimated_for_planned_roles_only():
    plan = load_sized({**SIZED, **GRPO}).plan
    assert all(r.memory is not None for r in plan.roles if r.gpus)
    assert "critic" not in {r.name for r in plan.roles}


def test_topology_of_a_plan_without_critic_and_reference():
    from rlhf_launch.runtime.dist import Topology

    plan = load({**GRPO, **NO_REF, **reward_function(), **layout(actor=2)}).plan
    topo = Topology(1, plan.world_size, "actor", 1, 1, plan)
    assert topo.ranks_of("critic") == [] and topo.ranks_of("reference") == []
    assert not topo.runs("critic") and not topo.runs("reference")
    assert topo.ranks_of("reward") == [0, 1] and topo.runs("reward") and topo.default_group_ranks() == [0, 1]


# --------------------------------------------------------------------------- checks and warnings
def test_an_ignored_section_is_a_warning_and_is_not_checked():
    loaded = load({**GRPO, **NO_REF, **reward_function(),
                   # Each would be an error for a planned role: a minibatch that does not divide the rollout, a ZeRO-3
                   # reference without bf16 settings, and missing model folders.
                   "train_config.value_minibatch": 7, **zero(3, "reference"),
                   "model_configs.reference.torch_dtype": "float16",
                   "model_configs.critic.model_path": "/nonexistent/critic",
                   "model_configs.reference.model_path": "/nonexistent/reference"})
    warned = {p.path: p.message for p in loaded.warnings}
    critic = warned["model_configs.critic"]
    assert critic.startswith("ignored: repeater_config.advantage_estimator grpo uses no critic; the plan has no critic")
    assert "set advantage_estimator: gae to train one" in warned["model_configs.critic"]
    assert warned["model_configs.reference"].startswith("ignored: repeater_config.kl_coeff is 0")
    assert "its model_path need not exist" in warned["model_configs.reference"]
    assert not [p for p in loaded.warnings if "nonexistent" in p.message]
    assert list(planned_models(loaded.spec)) == ["actor", "reward"]
    # The same settings with gae and a KL term are errors.
    from rlhf_launch.core.problems import SpecError

    with pytest.raises(SpecError) as info:
        load({"train_config.value_minibatch": 7})
    assert "train_config.value_minibatch" in {p.path for p in info.value.problems}
    assert not [p for p in load().warnings if p.message.startswith("ignored:")]


def test_an_ignored_critic_does_not_block_the_one_process_mode():
    loaded = load({**GRPO, **zero(2, "critic")})
    assert one_process_blocker(loaded.spec, loaded.plan, lambda: False) is None
    gae = load({**zero(2, "critic"), "model_configs.critic.trainer_config.deepspeed_config.train_micro_batch_size_per_gpu": 8})
    assert one_process_blocker(gae.spec, gae.plan, lambda: False) == "critic uses DeepSpeed"


# --------------------------------------------------------------------------- dry run and sbatch
def test_dry_run_table_and_json_leave_the_critic_out(tmp_path, capsys):
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml_io.dump(spec_dict({**GRPO, **NO_REF, **reward_function()}, run_dir=tmp_path / "run")))
    assert main([str(spec), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "1 GPUs on 1 nodes, 1 ranks" in out and "no critic: repeater_config.advantage_estimator grpo" in out
    assert "no reference: repeater_config.kl_coeff is 0" in out and "│ critic" not in out and "│ reference" not in out
    assert "#SBATCH hetjob" not in out  # one component
    assert main([str(spec), "--dry-run", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    plan = data["plan"] if "plan" in data else data
    assert [r["name"] for r in plan["roles"]] == ["actor", "reward", "generator"]
    assert plan["world_size"] == 1 and set(plan["unplanned"]) == {"critic", "reference"}


GRPO_SIZED = {**SIZED, **GRPO, "model_configs.critic.trainer_config.envs": {"CRITIC_ONLY": "1"}}


def test_golden_script_of_a_grpo_job_without_critic():
    """Set RLHF_UPDATE_GOLDEN=1 to rewrite the golden file after a deliberate change."""
    loaded = load_sized(GRPO_SIZED)
    text = render_sbatch(loaded.spec, loaded.plan, JobFiles(run_dir="/scratch/runs/job", python="/opt/env/bin/python"))
    golden = GOLDEN / "grpo_no_critic.sbatch"
    if os.environ.get("RLHF_UPDATE_GOLDEN"):
        golden.write_text(text)
    assert text == golden.read_text()
    assert text.count("#SBATCH hetjob") == 1 and "CRITIC_ONLY" not in text  # an ignored section's envs reach no rank
    assert "component 0: trainer (actor), global ranks 0-7" in text


# --------------------------------------------------------------------------- pre-flight
def test_preflight_ignores_an_unused_critic_whose_model_does_not_exist(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setattr(local, "run_in_process", lambda *a, **k: 0)
    missing = {"model_configs.critic.model_path": str(tmp_path / "no-critic"),
               "model_configs.reference.model_path": str(tmp_path / "no-ref")}
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml_io.dump(spec_dict({**GRPO, **NO_REF, **missing}, run_dir=tmp_path / "runs" / "test")))
    assert main([str(spec), "--check"]) == 0, capsys.readouterr().err
    captured = capsys.readouterr()
    assert "no-critic" not in captured.out + captured.err and "no-ref" not in captured.out + captured.err
    # With gae and a KL term the same folders are looked for, and missing.
    spec.write_text(yaml_io.dump(spec_dict(missing, run_dir=tmp_path / "runs" / "test")))
    assert main([str(spec), "--check", "--local"]) == 2
    err = capsys.readouterr().err
    assert "no-critic" in err and "no-ref" in err


# --------------------------------------------------------------------------- runs
@pytest.mark.slow
def test_grpo_without_kl_runs_without_critic_and_reference_exactly(tiny_models, tmp_path):
    """GRPO with kl_coeff 0 and a reward function: the job is the actor alone (the reward function on its ranks).
    One process resumed after step 2 equals the uninterrupted run, and two actor ranks in processes of their own
    match it to 1e-5; nothing of a critic is saved or exported, and no KL is reported."""
    from rlhf_launch.runtime.checkpoint import latest_checkpoint, read_marker
    from tests.factory import check_resume_and_ranks

    single = {**GRPO, **NO_REF, **reward_function("rlhf_launch.runtime.rewards:vowel_ratio"), "repeater_config.kl_in": "loss",
              "dataset_config.num_samples_each_epoch": 8, "rollout_config.actor_micro_bs": 16, "train_config.save_interval": 1,
              "model_configs.critic.model_path": str(tmp_path / "no-critic"),
              "model_configs.reference.model_path": str(tmp_path / "no-reference")}
    straight = check_resume_and_ranks(tmp_path, single, ("reward_mean", "policy_loss", "advantage_mean", "response_len_mean"))
    assert not {"kl", "actor_kl_loss", "value_loss", "value_mean"} & set(straight[0])
    for run in ("straight", "resumed", "ranks"):
        files = read_marker(latest_checkpoint(tmp_path / run))["files"]
        assert "loop.pt" in files and not [f for f in files if f.startswith("critic")], (run, files)
        assert (tmp_path / run / "final" / "actor").is_dir() and not (tmp_path / run / "final" / "critic").exists()


# --------------------------------------------------------------------------- experience without a reference
def test_experience_without_reference_has_no_kl_term():
    import torch

    from rlhf_launch.runtime.experience import ExperienceSettings, RewardMoments, make_experience

    torch.manual_seed(0)
    rollout = {"response_mask": torch.ones(8, 5), "finished": torch.ones(8, dtype=torch.bool)}
    old, scores = torch.randn(8, 5), torch.randn(8)
    settings = ExperienceSettings(advantage_estimator="grpo", kl_in="loss", kl_coeff=0.0, group_size=4)
    experience, metrics = make_experience(settings, rollout, old, None, None, scores, RewardMoments())
    assert "ref_logprobs" not in experience and not {"kl", "kl_k3"} & set(metrics)
    # The same advantages as a reference that equals the policy (a KL term of 0).
    same, _ = make_experience(settings, rollout, old, old.clone(), None, scores, RewardMoments())
    assert torch.equal(experience["advantages"], same["advantages"]) and "ref_logprobs" in same
    in_reward = ExperienceSettings(advantage_estimator="reinforce_pp", kl_in="reward", kl_coeff=0.0, kl_estimator="k3")
    _, metrics = make_experience(in_reward, rollout, old, None, None, scores, RewardMoments())
    assert not {"kl", "kl_k3"} & set(metrics) and "reward_mean" in metrics
