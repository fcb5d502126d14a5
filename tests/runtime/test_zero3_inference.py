"""The reference and the reward under DeepSpeed ZeRO-3 (data.mode deepspeed): their weights loaded
partitioned over the role's ranks and gathered layer by layer in each forward. On two gloo ranks
they give the log-probs and scores of the whole models to 1e-5, the reward's value head is found
under another name (and a missing one still refused), a rank with fewer rows than the other still
joins every forward, and a whole --local run equals the run with DDP reference and reward.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from tests.factory import layout, make_spec, run_on_ranks, spec_dict

# Every parameter partitioned, however small: by default a tiny model's would all stay whole on every rank.
ZERO3 = {"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}
SHARDED = {**layout(reference=2, reward=2),
           **{f"model_configs.{role}.trainer_config.parallel.data.mode": "deepspeed" for role in ("reference", "reward")},
           **{f"model_configs.{role}.trainer_config.deepspeed_config": ZERO3 for role in ("reference", "reward")}}


def _errors(overrides: dict) -> dict[str, str]:
    """The spec's errors, key path -> message (empty when it is valid)."""
    from rlhf_launch.core.problems import SpecError

    try:
        make_spec(overrides)
    except SpecError as exc:
        return {p.path: p.message for p in exc.errors}
    return {}


def test_the_checks_accept_zero3_for_the_frozen_models():
    assert _errors(SHARDED) == {}
    given = {"model_configs.reference.trainer_config.deepspeed_config": {  # what is derived may be given as derived
        **ZERO3, "train_micro_batch_size_per_gpu": 32, "gradient_accumulation_steps": 1, "train_batch_size": 64}}
    assert _errors({**SHARDED, **given}) == {}


def test_an_auto_dtype_under_zero3_is_warned_about():
    from tests.factory import load

    warnings = {p.path: p.message for p in load({**SHARDED, "model_configs.reward.torch_dtype": "auto"}).warnings}
    assert "load the weights in float32" in warnings["model_configs.reward.trainer_config.deepspeed_config.bf16"]


@pytest.mark.parametrize(("config", "key", "words"), [
    ({"zero_optimization": {"stage": 2}}, "zero_optimization.stage", "found 2 for reference, which only runs inference"),
    ({"zero_optimization": {"stage": 0}}, "zero_optimization.stage", "expected 3"),
    ({**ZERO3, "optimizer": {"type": "AdamW"}}, "optimizer", "not trained; remove it"),
    ({**ZERO3, "train_batch_size": 32}, "train_batch_size", "expected 64 (derived from repeater_config.ref_micro_bs and data size 2)"),
    ({**ZERO3, "bf16": {"enabled": True}}, "bf16", "loads the weights in bfloat16, but the model's torch_dtype is 'float32'"),
    ({**ZERO3, "bf16": {"enable": True}}, "bf16.enable", "did you mean 'enabled'"),
])
def test_the_checks_refuse_what_zero3_inference_cannot_do(config, key, words):
    errors = _errors({**SHARDED, "model_configs.reference.trainer_config.deepspeed_config": config})
    path = f"model_configs.reference.trainer_config.deepspeed_config.{key}"
    assert words in errors.get(path, ""), errors


def _rollout(rows: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Left-padded prompts and right-padded responses of different lengths (ids of the tiny vocabulary)."""
    gen = torch.Generator().manual_seed(seed)
    prompt_ids = torch.randint(3, 500, (rows, 7), generator=gen)
    response_ids = torch.randint(3, 500, (rows, 9), generator=gen)
    prompt_mask = (torch.arange(7) >= torch.arange(rows).remainder(4).unsqueeze(1)).long()
    response_mask = (torch.arange(9) < 9 - torch.arange(rows).remainder(5).unsqueeze(1)).long()
    return {"prompt_ids": prompt_ids * prompt_mask, "prompt_mask": prompt_mask,
            "response_ids": response_ids * response_mask, "response_mask": response_mask}


def _join(rank: int, world_size: int, store) -> None:
    """Put this forked rank in a gloo group with DeepSpeed's environment, as rlhf_launch/runtime/worker.py does."""
    import torch.distributed as dist

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), DS_ACCELERATOR="cpu")
    dist.init_process_group("gloo", store=dist.PrefixStore("default", store), rank=rank, world_size=world_size)


def _whole(spec, rollout) -> dict[str, torch.Tensor]:
    """Reference log-probs and reward scores of the whole models, in this process (no group: no DeepSpeed)."""
    from rlhf_launch.runtime.data import load_tokenizer
    from rlhf_launch.runtime.roles.reference import ReferenceRole
    from rlhf_launch.runtime.roles.reward import RewardRole

    tokenizer = load_tokenizer(spec.tokenizer_config, spec.model_configs.actor.model_path)
    reference, reward = ReferenceRole(spec, torch.device("cpu"), 1.0), RewardRole(spec, torch.device("cpu"), tokenizer)
    assert reference.inference.engine is None and reward.inference.engine is None
    return {"logprobs": reference.logprobs(rollout), "scores": reward.scores(rollout)}


def _score_shards(rank: int, world_size: int, store, spec, rollout, cuts: list[int], reward_engine: bool = False) -> dict:
    """This rank's rows ``cuts[rank]:cuts[rank + 1]`` through the ZeRO-3 reference and reward; with
    ``reward_engine`` the reward model's micro batches go through its InferenceEngine directly."""
    import torch.distributed as dist

    from rlhf_launch.runtime.data import load_tokenizer
    from rlhf_launch.runtime.models import is_partitioned, sequence_scores
    from rlhf_launch.runtime.roles.reference import ReferenceRole
    from rlhf_launch.runtime.roles.reward import RewardRole
    from rlhf_launch.runtime.rollout import sequences

    _join(rank, world_size, store)
    mine = {k: v[cuts[rank] : cuts[rank + 1]] for k, v in rollout.items()}
    tokenizer = load_tokenizer(spec.tokenizer_config, spec.model_configs.actor.model_path)
    reference = ReferenceRole(spec, torch.device("cpu"), 1.0)
    logprobs = reference.logprobs(mine)
    reward = RewardRole(spec, torch.device("cpu"), tokenizer)
    if reward_engine:
        fn = lambda b: sequence_scores(reward.model, *sequences(b))  # noqa: E731
        scores = reward.inference.in_micro_batches(fn, mine, spec.inference_micro_batch("reward"))
    else:
        scores = reward.scores(mine)
    met = torch.ones(1)
    dist.all_reduce(met)  # both ranks got here: nobody is stuck in a forward the other skipped
    model = reference.policy.model
    return {
        "logprobs": logprobs, "scores": scores, "met": int(met.item()),
        "partitioned": is_partitioned(model) and is_partitioned(reward.model.base_model),
        "local_numel": sum(p.ds_tensor.numel() for p in model.parameters()),
        "numel": sum(p.ds_numel for p in model.parameters()),
        "head_is_whole_fp32": not hasattr(reward.model.score.weight, "ds_id") and reward.model.score.weight.dtype == torch.float32,
        "lockstep": reference.inference.lockstep and reward.inference.lockstep,
    }


@pytest.mark.slow
def test_sharded_reference_and_reward_equal_the_whole_models(tiny_models):
    """Equal shards of 4 rows: each rank holds about half of each model, and the results are the whole models'."""
    spec, rollout = make_spec(SHARDED), _rollout(8)
    results = run_on_ranks(_score_shards, 2, spec, rollout, [0, 4, 8], timeout_s=300)
    whole = _whole(spec, rollout)
    assert all(r["partitioned"] and r["lockstep"] and r["head_is_whole_fp32"] for r in results)
    assert [r["met"] for r in results] == [2, 2]
    for r in results:
        assert r["local_numel"] <= 0.55 * r["numel"], r  # this rank's half only, never the whole model
    torch.testing.assert_close(torch.cat([r["logprobs"] for r in results]), whole["logprobs"], atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.cat([r["scores"] for r in results]), whole["scores"], atol=1e-5, rtol=0)


@pytest.mark.slow
def test_a_rank_with_fewer_micro_batches_joins_every_forward(tiny_models):
    """Rows 5 and 1 (then 6 and none) at one row per forward: the smaller shard runs spare forwards
    until the larger is done, else ZeRO-3's gathers of the two ranks would not pair up."""
    overrides = {**SHARDED, "repeater_config.ref_micro_bs": 1, "rollout_config.reward_micro_bs": 1}
    spec, rollout = make_spec(overrides), _rollout(6, seed=1)
    uneven = run_on_ranks(_score_shards, 2, spec, rollout, [0, 5, 6], True, timeout_s=300)
    empty = run_on_ranks(_score_shards, 2, spec, rollout, [0, 6, 6], True, timeout_s=300)
    whole = _whole(spec, rollout)
    for results in (uneven, empty):
        assert [r["met"] for r in results] == [2, 2]
        torch.testing.assert_close(torch.cat([r["logprobs"] for r in results]), whole["logprobs"], atol=1e-5, rtol=0)
        torch.testing.assert_close(torch.cat([r["scores"] for r in results]), whole["scores"], atol=1e-5, rtol=0)
    assert empty[1]["logprobs"].shape == (0, 9) and empty[1]["scores"].shape == (0,)


def _forwards_then_meet(rank: int, world_size: int, store, spec, rollout, lockstep: bool) -> str:
    """Rank 0 scores 3 rows, rank 1 one, a row per forward, then both meet in a collective, as the
    rollout's gather follows scoring. In a thread given 20 s (a forward takes milliseconds): 'done',
    'stuck', or the error it raised."""
    import threading

    import torch.distributed as dist

    from rlhf_launch.runtime.roles.reference import ReferenceRole

    _join(rank, world_size, store)
    reference = ReferenceRole(spec, torch.device("cpu"), 1.0)
    reference.inference.lockstep = lockstep  # False: a plain micro-batch loop, no spare forwards
    dist.barrier()  # both loaded: from here on only the forwards can keep a rank waiting
    outcome = ["stuck"]

    def score() -> None:
        try:
            reference.logprobs({k: v[:3] if rank == 0 else v[3:4] for k, v in rollout.items()})
            dist.all_reduce(torch.ones(1))
            outcome[0] = "done"
        except Exception as exc:  # noqa: BLE001 - the outcome is what the test looks at
            outcome[0] = f"{type(exc).__name__}: {exc}"

    worker = threading.Thread(target=score, daemon=True)  # a stuck daemon thread does not keep the rank alive
    worker.start()
    worker.join(20)
    return outcome[0]


@pytest.mark.slow
def test_a_rank_that_skips_a_forward_hangs_the_others_unless_in_lockstep(tiny_models):
    """Without the spare forwards the rank with fewer rows leaves while the other waits in ZeRO-3's
    gather of its next layer; with them both come out."""
    spec = make_spec({**SHARDED, "repeater_config.ref_micro_bs": 1})
    assert run_on_ranks(_forwards_then_meet, 2, spec, _rollout(4), True, timeout_s=300) == ["done", "done"]
    skipped = run_on_ranks(_forwards_then_meet, 2, spec, _rollout(4), False, timeout_s=300)
    assert skipped != ["done", "done"], skipped


def _value_heads(rank: int, world_size: int, store, spec_of_reward) -> dict:
    """A reward checkpoint whose head is saved as v_head, and one without a head, loaded partitioned."""
    from rlhf_launch.runtime.models import load_frozen
    from rlhf_launch.runtime.value_head import ValueHeadError

    _join(rank, world_size, store)
    renamed, headless = spec_of_reward
    model, _ = load_frozen(renamed, "reward", torch.device("cpu"), pad_token_id=0)
    try:
        load_frozen(headless, "reward", torch.device("cpu"), pad_token_id=0)
        refused = None
    except ValueHeadError as exc:
        refused = str(exc)
    return {"head": model.score.weight.detach().clone(), "refused": refused}


@pytest.mark.slow
def test_a_partitioned_reward_finds_a_renamed_head_and_refuses_a_missing_one(tiny_models, tmp_path):
    from safetensors.torch import load_file, save_file

    def copy_with(name: str, head_key: str | None) -> str:
        folder = tmp_path / name
        folder.mkdir()
        for f in (tiny_models / "reward").iterdir():
            (folder / f.name).write_bytes(f.read_bytes())
        state = load_file(folder / "model.safetensors")
        head = state.pop("score.weight")
        if head_key is not None:
            state[head_key] = head
        save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
        return str(folder)

    expected = load_file(tiny_models / "reward" / "model.safetensors")["score.weight"]
    specs = tuple(make_spec({**SHARDED, "model_configs.reward.model_path": copy_with(name, key)})
                  for name, key in (("renamed", "v_head.weight"), ("headless", None)))
    results = run_on_ranks(_value_heads, 2, specs, timeout_s=300)
    for result in results:
        torch.testing.assert_close(result["head"], expected.float(), atol=0, rtol=0)
        assert result["refused"] is not None and "no value head" in result["refused"], result["refused"]


@pytest.mark.slow
def test_a_local_run_with_zero3_reference_and_reward_equals_the_ddp_run(tiny_models, tmp_path):
    """The whole job, reference and reward each on two ZeRO-3 ranks, against the same job with whole
    (DDP) models, one process: the same metrics to 1e-5 at every step."""
    from rlhf_launch.core import yaml_io
    from rlhf_launch.runtime.metrics import read_metrics
    from rlhf_launch.runtime.training_run import run_local

    run = {"train_config.max_train_step": 2, "train_config.save_interval": 0}
    ddp = {**layout(reference=2, reward=2), **run}
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(yaml_io.dump(spec_dict({**SHARDED, **run}, run_dir=tmp_path / "zero3")))
    proc = subprocess.run([sys.executable, "-m", "rlhf_launch", str(spec_file), "--local"],
                          capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_local(make_spec(ddp), tmp_path / "ddp", quiet=True)
    zero3, whole = read_metrics(tmp_path / "zero3"), read_metrics(tmp_path / "ddp")
    assert [m["step"] for m in zero3] == [1, 2]
    for a, b in zip(zero3, whole, strict=True):
        for key in ("reward_mean", "kl", "policy_loss", "value_loss", "advantage_mean", "return_mean"):
            assert a[key] == pytest.approx(b[key], abs=1e-5), (a["step"], key)
