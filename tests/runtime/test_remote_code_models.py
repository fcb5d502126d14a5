"""Models of their own code (model_type ``tiny_remote``, which transformers does not know; rlhf_launch/demo/
remote_code_models.py): they load only with ``trust_remote_code``, through their config.json's ``auto_map``. The causal
LM computes what the tiny actor computes, as policy and as a critic with a value head on top; the reward model of its
own class scores with its own ``v_head`` at the last attended token, as a sequence classifier does, also under ZeRO-3;
its tokenizer of its own class needs ``tokenizer_config.trust_remote_code``; and vLLM gets the key too.
"""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
import torch

from rlhf_launch.core.config import TokenizerConfig
from rlhf_launch.core.problems import SpecError
from rlhf_launch.runtime.data import PromptDataError, load_tokenizer
from rlhf_launch.runtime.models import (
    PolicyModule,
    RemoteCodeError,
    ValueModule,
    load_causal_lm,
    load_value_model,
    sequence_scores,
)
from rlhf_launch.runtime.value_head import ValueHeadError, value_head, value_head_name
from tests.factory import ROOT, layout, load, make_spec, remote_code, run_on_ranks

CPU = torch.device("cpu")
ZERO3 = {"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}  # every parameter partitioned


def _rows() -> tuple[list[list[int]], torch.Tensor, torch.Tensor]:
    """Rows of different lengths, each a left-padded prompt and a right-padded response, as a rollout hands them to
    the reward model: (each row's own tokens, input_ids, attention_mask)."""
    rows = [[1, 5, 9, 14, 40, 41, 42], [1, 7, 50, 51, 52, 53, 2], [1, 30, 31, 32, 33, 34, 60], [1, 8, 9]]
    starts, width = [2, 0, 1, 3], 10
    ids, mask = torch.zeros(len(rows), width, dtype=torch.long), torch.zeros(len(rows), width, dtype=torch.long)
    for i, (row, start) in enumerate(zip(rows, starts, strict=True)):
        ids[i, start : start + len(row)] = torch.tensor(row)
        mask[i, start : start + len(row)] = 1
    return rows, ids, mask


def test_a_causal_lm_of_its_own_code_loads_only_with_the_key(remote_code_models, tiny_models):
    folder = remote_code_models / "tiny_remote_causal"
    with pytest.raises(RemoteCodeError) as refused:
        load_causal_lm(str(folder), "float32", CPU, role="actor")
    message = str(refused.value)
    assert "\n" not in message and message.startswith("model_configs.actor.trust_remote_code: ")
    assert "model_type 'tiny_remote'" in message and "modeling_tiny_remote.TinyRemoteForCausalLM" in message
    model = load_causal_lm(str(folder), "float32", CPU, trust_remote_code=True, role="actor")
    assert type(model).__name__ == "TinyRemoteForCausalLM" and "tiny_remote" in type(model).__module__
    _, ids, mask = _rows()
    with torch.no_grad():
        ours = PolicyModule(model)(ids, mask, 4)
        tiny = PolicyModule(load_causal_lm(str(tiny_models / "actor"), "float32", CPU))(ids, mask, 4)
    torch.testing.assert_close(ours, tiny, rtol=0, atol=0)  # the same weights through its own classes
    older = PolicyModule(model)
    older.keeps_logits = False  # a model whose forward predates logits_to_keep: every position's logits, then cut
    with torch.no_grad():
        torch.testing.assert_close(older(ids, mask, 4), tiny, rtol=0, atol=1e-6)


def test_a_model_without_the_attention_kernel_asked_for_loads_with_its_own(remote_code_models, tmp_path, capsys):
    folder = tmp_path / "no_sdpa"
    shutil.copytree(remote_code_models / "tiny_remote_causal", folder)
    with (folder / "modeling_tiny_remote.py").open("a") as code:
        code.write("\n\nTinyRemoteForCausalLM._supports_sdpa = False\n")
    for _ in range(2):
        model = load_causal_lm(str(folder), "float32", CPU, attn_implementation="sdpa", trust_remote_code=True)
    assert model.config._attn_implementation == "eager"
    warnings = [line for line in capsys.readouterr().out.splitlines() if line.startswith("rlhf: warning:")]
    assert warnings == [f"rlhf: warning: {folder} does not support attn_implementation sdpa; loading it with its default attention"]


def test_its_tokenizer_of_its_own_class_needs_the_tokenizer_key(remote_code_models, tiny_models):
    folder = str(remote_code_models / "tiny_remote_causal")
    with pytest.raises(PromptDataError, match=r"set tokenizer_config\.trust_remote_code: true") as refused:
        load_tokenizer(TokenizerConfig(), folder)
    assert "\n" not in str(refused.value)
    tokenizer = load_tokenizer(TokenizerConfig(trust_remote_code=True), folder)
    plain = load_tokenizer(TokenizerConfig(), str(tiny_models / "actor"))
    assert type(tokenizer).__name__ == "TinyRemoteTokenizer"
    text = "<|user|>Hello, how are you?\n<|assistant|>"
    assert tokenizer(text)["input_ids"] == plain(text)["input_ids"] and tokenizer.pad_token_id == plain.pad_token_id
    with pytest.raises(SpecError) as spec_error:  # its own key, not a from_pretrained keyword
        load(**{"tokenizer_config.from_pretrained_kwargs": {"trust_remote_code": True}})
    assert [p.path for p in spec_error.value.errors] == ["tokenizer_config.from_pretrained_kwargs.trust_remote_code"]


def test_the_reward_class_scores_with_its_own_head_at_the_last_token(remote_code_models, tiny_models):
    folder = str(remote_code_models / "tiny_remote_reward")
    with pytest.raises(RemoteCodeError, match=r"^model_configs\.reward\.trust_remote_code: "):
        load_value_model(folder, "float32", CPU, pad_token_id=0, role="reward")
    model = load_value_model(folder, "float32", CPU, pad_token_id=0, role="reward", trust_remote_code=True)
    assert type(model).__name__ == "TinyRemoteForRewardModel" and value_head_name(model) == "v_head"
    assert value_head(model) is model.v_head and model.v_head.weight.dtype == torch.float32
    rows, ids, mask = _rows()
    with torch.no_grad():
        scores = sequence_scores(model, ids, mask)
        # By hand: each row alone, without padding; the v_head on the hidden state of its last token.
        expected = torch.stack([model.v_head(model.model(input_ids=torch.tensor([row])).last_hidden_state[0, -1])[0] for row in rows])
        classifier = sequence_scores(load_value_model(str(tiny_models / "reward"), "float32", CPU, pad_token_id=0), ids, mask)
    torch.testing.assert_close(scores, expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(scores, classifier, rtol=0, atol=1e-6)  # the tiny classifier, whose score is this v_head


def test_head_name_finds_the_reward_class_head_and_refuses_an_absent_one(remote_code_models):
    folder = str(remote_code_models / "tiny_remote_reward")
    named = load_value_model(folder, "float32", CPU, pad_token_id=0, role="reward", head_name="v_head", trust_remote_code=True)
    assert value_head_name(named) == "v_head"
    with pytest.raises(ValueHeadError, match="named 'reward_head'"):
        load_value_model(folder, "float32", CPU, pad_token_id=0, role="reward", head_name="reward_head", trust_remote_code=True)


def test_a_critic_on_the_causal_lm_gets_a_value_head_on_top(remote_code_models, tmp_path, capsys):
    folder = remote_code_models / "tiny_remote_causal"
    critic = load_value_model(str(folder), "float32", CPU, pad_token_id=0, role="critic", trust_remote_code=True)
    assert "the critic starts from a new head" in capsys.readouterr().out
    assert value_head_name(critic) == "score" and critic.score.weight.shape == (1, 64)
    assert not any(name.startswith("lm_head.") for name, _ in critic.named_parameters())  # it would get no gradient
    _, ids, mask = _rows()
    values = ValueModule(critic)(ids, mask, 3)
    values.sum().backward()
    assert values.shape == (4, 3) and all(p.grad is not None for p in critic.parameters())
    # Exported as a trained critic is: its code comes along, and it loads again with the same head.
    critic.save_pretrained(tmp_path / "critic")
    assert (tmp_path / "critic" / "modeling_tiny_remote.py").is_file()
    again = load_value_model(str(tmp_path / "critic"), "float32", CPU, pad_token_id=0, role="critic", trust_remote_code=True)
    assert torch.equal(again.score.weight, critic.score.weight)


def test_the_reward_class_as_critic_keeps_its_v_head(remote_code_models):
    critic = load_value_model(str(remote_code_models / "tiny_remote_reward"), "float32", CPU, pad_token_id=0, role="critic",
                              trust_remote_code=True)
    assert value_head_name(critic) == "v_head"
    row = torch.tensor([[1, 5, 9, 14, 40, 41, 42]])
    with torch.no_grad():
        values = ValueModule(critic)(row, torch.ones_like(row), 3)
        hidden = critic.model(input_ids=row).last_hidden_state[0]
    torch.testing.assert_close(values[0], critic.v_head(hidden[3:6]).squeeze(-1), rtol=0, atol=1e-6)  # V_t from the prefix before token t


def _sharded_reward_and_critic(rank: int, world_size: int, store, spec, rollout, cuts: list[int]) -> dict:
    """This rank's rows through the reward model of its own class under ZeRO-3 (load_frozen), and the on-top critic's
    new head loaded partitioned, gathered whole."""
    import os

    import deepspeed
    import torch.distributed as dist

    from rlhf_launch.runtime.engine import inference_deepspeed_config
    from rlhf_launch.runtime.models import is_partitioned, load_frozen
    from rlhf_launch.runtime.rollout import sequences

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), DS_ACCELERATOR="cpu")
    dist.init_process_group("gloo", store=dist.PrefixStore("default", store), rank=rank, world_size=world_size)
    mine = {k: v[cuts[rank] : cuts[rank + 1]] for k, v in rollout.items()}
    model, inference = load_frozen(spec, "reward", CPU, 0)
    scores = inference.in_micro_batches(lambda b: sequence_scores(model, *sequences(b)), mine, spec.inference_micro_batch("reward"))
    head = value_head(model)
    critic = load_value_model(spec.model_configs.critic.model_path, "float32", CPU, 0, "critic",
                              zero3_config=inference_deepspeed_config(spec, "reward"), trust_remote_code=True)
    with deepspeed.zero.GatheredParameters([critic.score.weight]):
        critic_head = critic.score.weight.detach().clone()
    return {"scores": scores, "partitioned": is_partitioned(model.base_model), "head_whole_fp32": not hasattr(head.weight, "ds_id")
            and head.weight.dtype == torch.float32 and head is model.v_head, "critic_head": critic_head}


@pytest.mark.slow
def test_the_reward_class_under_zero3_scores_as_the_whole_model(remote_code_models):
    """Two gloo ranks, the reward of its own class partitioned over them: its v_head gathered whole in fp32, the
    scores those of the whole model; the critic's new head is the same on both ranks."""
    spec = make_spec({**remote_code(remote_code_models), **layout(reward=2),
                      "model_configs.reward.trainer_config.parallel.data.mode": "deepspeed",
                      "model_configs.reward.trainer_config.deepspeed_config": ZERO3})
    rows, ids, mask = _rows()
    rollout = {"prompt_ids": ids[:, :5], "prompt_mask": mask[:, :5], "response_ids": ids[:, 5:], "response_mask": mask[:, 5:]}
    results = run_on_ranks(_sharded_reward_and_critic, 2, spec, rollout, [0, 2, 4], timeout_s=300)
    whole = load_value_model(spec.model_configs.reward.model_path, "float32", CPU, 0, "reward", trust_remote_code=True)
    with torch.no_grad():
        expected = sequence_scores(whole, ids, mask)
    assert all(r["partitioned"] and r["head_whole_fp32"] for r in results)
    torch.testing.assert_close(torch.cat([r["scores"] for r in results]), expected, rtol=0, atol=1e-5)
    assert torch.equal(results[0]["critic_head"], results[1]["critic_head"]) and results[0]["critic_head"].shape == (1, 64)
    assert 0.005 < results[0]["critic_head"].std().item() < 0.05  # initialised as Hugging Face initialises a classifier


VLLM_CONFIG = """
import sys, torch
sys.path.insert(0, {root!r})
from vllm.engine.arg_utils import EngineArgs
from tests.factory import make_spec, remote_code, vllm_generator
from rlhf_launch.runtime.roles.vllm_generator import engine_arguments
from rlhf_launch.runtime.rollout import SamplingSettings
for trust in (False, True):
    spec = make_spec({{**vllm_generator(), **remote_code({folder!r}, ("actor",)), "model_configs.actor.trust_remote_code": trust}})
    args = engine_arguments(spec, torch.device("cpu"), SamplingSettings.from_spec(spec, 2, 0), False)
    try:
        config = EngineArgs(**args).create_model_config()
        print("RESULT", trust, args["trust_remote_code"], type(config.hf_config).__name__)
    except Exception as exc:
        print("RESULT", trust, args["trust_remote_code"], "refused" if "trust_remote_code" in str(exc) else repr(exc))
"""


@pytest.mark.slow
def test_the_vllm_engine_gets_the_key(remote_code_models):
    """The actor's vLLM engine arguments carry trust_remote_code: vLLM refuses the model without it and reads its
    config class with it (engine arguments only, no engine: in a process of its own, as vLLM changes its process)."""
    code = VLLM_CONFIG.format(root=str(ROOT), folder=str(remote_code_models))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    results = [line.split()[1:] for line in proc.stdout.splitlines() if line.startswith("RESULT")]
    assert results == [["False", "False", "refused"], ["True", "True", "TinyRemoteConfig"]], proc.stderr[-3000:]
