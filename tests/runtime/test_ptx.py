"""PPO-ptx (InstructGPT): the LM loss, the pretraining batches, the actor's extra gradient, spec checks, and
exact distributed and resumed runs."""

from __future__ import annotations

import math

import pytest
import torch

from tests.factory import ROOT, make_spec

TEXT = ROOT / "data" / "pretrain" / "tiny_text.jsonl"


def _ptx(**extra):
    return {"train_config.pretrain_loss_weight": 0.5,
            "pretrain_dataset_config": {"pretrain_datas": [f"{TEXT}::1.0"], "num_samples_each_epoch": 7, "max_seq_len": 20},
            **extra}


def test_lm_loss_matches_a_plain_loop():
    from rlhf_launch.runtime import ppo

    g = torch.Generator().manual_seed(0)
    B, T, V = 3, 6, 11
    logits = torch.randn(B, T - 1, V, generator=g)
    ids = torch.randint(0, V, (B, T), generator=g)
    mask = (torch.arange(T)[None, :] < torch.tensor([6, 4, 2])[:, None]).long()
    total, count = 0.0, 0
    for i in range(B):
        for t in range(1, T):
            if mask[i, t]:
                row = logits[i, t - 1]
                total -= float(row[ids[i, t]] - torch.logsumexp(row, 0))
                count += 1
    assert ppo.predicted_tokens(mask) == count == 5 + 3 + 1
    assert float(ppo.lm_loss(logits, ids, mask, count)) == pytest.approx(total / count, rel=1e-6)
    # As a part of a larger batch: divided by that batch's token count.
    assert float(ppo.lm_loss(logits, ids, mask, 4 * count)) == pytest.approx(total / count / 4, rel=1e-6)


def test_pretrain_mix_is_deterministic_and_truncates(tiny_models, tmp_path):
    import json

    from rlhf_launch.runtime.data import PretrainMix, PromptDataError, load_tokenizer

    spec = make_spec(_ptx())
    tokenizer = load_tokenizer(spec.tokenizer_config, spec.model_configs.actor.model_path)
    mix = PretrainMix(spec.pretrain_dataset_config, tokenizer)
    batch = mix.batch(3)
    assert batch["input_ids"].shape[0] == 7 and batch["input_ids"].shape[1] <= 20
    assert torch.equal(PretrainMix(spec.pretrain_dataset_config, tokenizer).batch(3)["input_ids"], batch["input_ids"])
    for (source, index), row in zip(mix.indices(3), mix.token_ids(3), strict=True):
        assert row == tokenizer(mix.texts[source][index])["input_ids"][:20]  # right truncation: the first tokens
    mask = batch["attention_mask"]
    assert bool((mask[:, :-1] >= mask[:, 1:]).all())  # right padding
    # Over an epoch of the 64 texts every one is drawn once before any twice.
    drawn = [index for step in range(10) for _, index in mix.indices(step)][:64]
    assert sorted(drawn) == list(range(64))

    chat = tmp_path / "chat.jsonl"
    chat.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}) + "\n")
    cfg = make_spec(_ptx(**{"pretrain_dataset_config.pretrain_datas": [f"{chat}::1.0"]})).pretrain_dataset_config
    assert PretrainMix(cfg, tokenizer).texts[0][0][-1]["content"] == "hello"  # the answer is kept
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "no text"}) + "\n")
    with pytest.raises(PromptDataError, match="expected a pretraining record"):
        PretrainMix(make_spec(_ptx(**{"pretrain_dataset_config.pretrain_datas": [f"{bad}::1.0"]})).pretrain_dataset_config, tokenizer)


def test_actor_adds_weight_times_the_lm_loss_gradient(tiny_models):
    """_ptx_update's gradient is exactly weight x the gradient of the mean token NLL (written as a plain loop over
    the sequences) of its part of the batch, and it reports that unweighted loss."""
    from rlhf_launch.runtime.cluster import SingleProcess
    from rlhf_launch.runtime.data import PretrainMix, load_tokenizer
    from rlhf_launch.runtime.roles.actor import ActorRole
    from rlhf_launch.runtime.rollout import SamplingSettings
    from rlhf_launch.runtime.timing import Timer

    spec = make_spec(_ptx(**{"train_config.actor_micro_bs": 2}))
    tokenizer = load_tokenizer(spec.tokenizer_config, spec.model_configs.actor.model_path)
    batch = PretrainMix(spec.pretrain_dataset_config, tokenizer).batch(0)
    actor = ActorRole(spec, torch.device("cpu"), SamplingSettings.from_spec(spec, 2, 0), Timer(), SingleProcess())
    params = {n: p for n, p in actor.model.named_parameters() if p.requires_grad}

    actor.model.zero_grad()
    stats = actor._ptx_update(batch, 2, 1)  # the second of two updates: rows 4..6 in micro batches of 2 and 1
    got = {n: p.grad.clone() for n, p in params.items()}

    actor.model.zero_grad()
    rows = [batch["input_ids"][i][batch["attention_mask"][i].bool()] for i in range(4, 7)]
    tokens = sum(len(r) - 1 for r in rows)
    nll = 0.0
    for row in rows:  # each sequence alone, unpadded
        logits = actor.model(input_ids=row[None]).logits[0, :-1].float()
        nll = nll - torch.log_softmax(logits, -1).gather(1, row[1:, None]).sum()
    loss = nll / tokens
    (0.5 * loss).backward()
    assert stats["ptx_loss"] == pytest.approx(float(loss.detach()), rel=1e-5)
    assert float(loss.detach()) > 1.0  # a tiny random model: far from 0, so the gradient check means something
    for name, param in params.items():
        torch.testing.assert_close(got[name], param.grad, rtol=1e-4, atol=1e-7)
    actor.model.zero_grad()
    # 7 sequences over 8 updates: the last gets none, but runs the micro step of the others (loss x 0).
    assert actor._ptx_update(batch, 8, 7) == {"ptx_loss": 0.0}
    assert all(p.grad is None or not p.grad.any() for p in params.values())


def test_ptx_spec_checks():
    from rlhf_launch.core.problems import SpecError
    from tests.factory import load, zero

    with pytest.raises(SpecError) as info:
        load({"train_config.pretrain_loss_weight": 0.5})
    (problem,) = [p for p in info.value.problems if p.path == "train_config.pretrain_loss_weight"]
    assert "no pretrain_dataset_config" in problem.message and "found 0.5" in problem.message
    loaded = load(_ptx(**{"train_config.pretrain_loss_weight": 0.0}))
    assert [p.path for p in loaded.warnings if "never used" in p.message] == ["pretrain_dataset_config"]
    assert not [p for p in load(_ptx()).warnings if p.path == "pretrain_dataset_config"]
    load({**_ptx(), **zero(2, "actor")})  # a DeepSpeed actor trains with PPO-ptx too


def test_preflight_checks_pretraining_records(tiny_models, tmp_path):
    from rlhf_launch.frontend.preflight.data import check_pretrain_data
    from rlhf_launch.frontend.preflight.findings import Preflight

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x"}\nnot json\n')
    pf = Preflight(make_spec(_ptx(**{"pretrain_dataset_config.pretrain_datas": [f"{bad}::1.0", f"{TEXT}::1.0"]})),
                   tmp_path / "run", None, True)
    check_pretrain_data(pf)
    assert [p.path for p in pf.problems] == ["pretrain_dataset_config.pretrain_datas.0"] * 2
    assert any("64 pretraining texts" in note for note in pf.notes)


@pytest.mark.slow
def test_ptx_distributed_and_resumed_runs_equal_one_uninterrupted_process(tiny_models, tmp_path):
    """7 pretraining sequences over 2 optimizer steps x 2 actor ranks (shares 2, 2, 2, 1): the ranks' run matches
    one process to 1e-5, and a run resumed after step 2 equals the uninterrupted one exactly."""
    from tests.factory import check_resume_and_ranks

    single = _ptx(**{"train_config.save_interval": 1, "train_config.ppo_epochs": 1,
                     "rollout_config.max_new_tokens": 8, "rollout_config.actor_micro_bs": 16})  # 16: each rank's one generate call
    straight = check_resume_and_ranks(
        tmp_path, single, ("reward_mean", "kl", "policy_loss", "actor_ptx_loss", "value_loss", "response_len_mean"))
    assert all(math.isfinite(row["actor_ptx_loss"]) and row["actor_ptx_loss"] > 0 for row in straight)


def test_every_update_runs_the_micro_steps_of_the_largest_ptx_part_and_deepspeed_counts_them():
    """7 sequences over 2 updates x 2 ranks, micro batches of 1: parts of 4 and 3 rows, the largest share 2 rows, so
    2 ptx micro steps per update, on top of the PPO minibatch's; DeepSpeed's accumulation boundary counts both."""
    from rlhf_launch.core.plan import micro_steps, optimizer_steps, ptx_micro_steps
    from rlhf_launch.runtime.engine import deepspeed_config
    from tests.factory import layout

    ds = {"model_configs.actor.trainer_config.parallel.data.mode": "deepspeed",
          "model_configs.actor.trainer_config.deepspeed_config": {"zero_optimization": {"stage": 3}}}
    spec = make_spec(_ptx(**{**layout(actor=2), **ds, "train_config.ppo_epochs": 1, "train_config.actor_micro_bs": 1,
                             "train_config.ppo_minibatch": 16, "dataset_config.num_samples_each_epoch": 32}))
    assert optimizer_steps(spec, "actor") == 2
    assert ptx_micro_steps(spec) == 2
    assert ptx_micro_steps(make_spec(layout(actor=2))) == 0
    ppo_steps = micro_steps(16, 2, 1)
    config = deepspeed_config(spec.model_configs.actor, 1, 16, ptx_micro_steps(spec))
    assert config["gradient_accumulation_steps"] == ppo_steps + 2 == 10
    assert config["train_batch_size"] == 1 * 10 * 2


def test_given_deepspeed_batch_keys_must_count_the_ptx_micro_steps():
    from rlhf_launch.core.problems import SpecError
    from tests.factory import layout, load

    ds = {"model_configs.actor.trainer_config.parallel.data.mode": "deepspeed",
          "model_configs.actor.trainer_config.deepspeed_config": {"zero_optimization": {"stage": 3}, "gradient_accumulation_steps": 8}}
    common = {**layout(actor=2), **ds, "train_config.ppo_epochs": 1, "train_config.actor_micro_bs": 1,
              "train_config.ppo_minibatch": 16, "dataset_config.num_samples_each_epoch": 32}
    load(common)  # without ptx, 16 / (2 x 1) = 8 micro steps: as given
    with pytest.raises(SpecError) as info:
        load(_ptx(**common))
    (problem,) = [p for p in info.value.problems if p.path.endswith("gradient_accumulation_steps")]
    assert "expected 10" in problem.message and "PPO-ptx" in problem.message


@pytest.mark.slow
def test_ptx_with_a_zero3_actor_on_two_ranks_equals_one_process(tiny_models, tmp_path):
    """The same 7 sequences with the actor under DeepSpeed ZeRO-3 (fp32) on 2 ranks, each in a process of its own:
    DeepSpeed updates after the ptx micro steps of every minibatch, and the run matches one process to 1e-5."""
    from rlhf_launch.runtime.training_run import run_local
    from tests.factory import layout, run_processes

    single = _ptx(**{"train_config.ppo_epochs": 1, "train_config.ppo_minibatch": 16, "train_config.max_train_step": 2,
                     "train_config.save_interval": 0, "rollout_config.max_new_tokens": 8, "rollout_config.actor_micro_bs": 16})
    straight = run_local(make_spec(single), tmp_path / "single", quiet=True)
    ranks = {**single, **layout(actor=2), "model_configs.actor.trainer_config.parallel.data.mode": "deepspeed",
             "model_configs.actor.trainer_config.deepspeed_config": {"zero_optimization": {"stage": 3}}}
    got = run_processes(tmp_path, ranks, "zero3")
    assert len(got) == len(straight) == 2
    for a, b in zip(got, straight, strict=True):
        for key in ("reward_mean", "policy_loss", "actor_ptx_loss", "actor_grad_norm", "kl"):
            assert a[key] == pytest.approx(b[key], abs=1e-5), (a["step"], key)
    assert got[-1]["kl"] != 0  # the actor moved: DeepSpeed applied its updates
