"""Per-model tokenizers (model_configs.<role>.tokenizer_config) and what the reward model reads
(rlhf_launch/runtime/roles/reward.py): the policy's ids as they are, or the conversation re-rendered with its own
tokenizer and its [REWARD_META] system prompt."""

from __future__ import annotations

import importlib

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from rlhf_launch.core.config import TokenizerConfig
from rlhf_launch.core.model_tokenizers import policy_tokenizer_config, same_settings, tokenizer_config_of
from rlhf_launch.core.problems import SpecError
from rlhf_launch.frontend.preflight import preflight
from rlhf_launch.runtime.data import PromptDataError, PromptMix, load_tokenizer, render_prompts
from rlhf_launch.runtime.models import sequence_scores
from rlhf_launch.runtime.padding import pad_and_concat
from rlhf_launch.runtime.roles.reward import RewardRole
from rlhf_launch.runtime.rollout import response_mask, sequences
from tests.factory import TINY_MODELS, TINY_PROMPTS, load, make_spec, reward_function

RESPONSES = ["Aioli, eau and oui.", "Rhythm!", "The answer is a long one, with many words in it and more.", "Hmm"]
RECORDED: list[tuple[list[str], list[str]]] = []


def record_texts(prompts: list[str], responses: list[str]) -> list[float]:
    """A reward function that keeps what it receives and scores each response by its length."""
    RECORDED.append((list(prompts), list(responses)))
    return [float(len(r)) for r in responses]


def reward_spec(tmp_path, entries: list[str], **overrides):
    # Prompts long enough for the longest system prompt: nothing is cut off on either side.
    spec = make_spec(run_dir=tmp_path / "run", **{"dataset_config.max_seq_len": 256, **overrides})
    spec.dataset_config.ppo_datas = entries  # set after resolution: absolute paths already
    return spec


def rollout_of(spec, tokenizer, rows: int = 4) -> dict:
    """A rollout of the spec's first prompts with fixed responses, some ending with eos, laid out as the loop lays it out."""
    mix = PromptMix(spec.dataset_config)
    picks = mix.indices(0)[:rows]
    encoded = render_prompts(tokenizer, [mix.policy_prompt(s, i) for s, i in picks], spec.dataset_config.max_seq_len)
    chunks = [torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] * (n % 2)])
              for n, text in enumerate((RESPONSES * rows)[:rows])]
    responses = pad_and_concat(chunks, tokenizer.pad_token_id)
    mask = response_mask(responses, (tokenizer.eos_token_id,))
    return {"prompt_ids": encoded["input_ids"], "prompt_mask": encoded["attention_mask"], "response_ids": responses,
            "response_mask": mask, "finished": (responses == tokenizer.eos_token_id).any(1),
            "prompt_index": torch.tensor(picks, dtype=torch.long)}


def direct_text_scores(folder, spec, rollout, policy_tokenizer) -> torch.Tensor:
    """Each row scored as text, one at a time, by the reward model and its own tokenizer, loaded straight from the folder."""
    mix = PromptMix(spec.dataset_config)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=1).eval()
    scores = []
    for (source, index), ids, mask in zip(rollout["prompt_index"].tolist(), rollout["response_ids"], rollout["response_mask"], strict=True):
        answer = policy_tokenizer.decode(ids[mask.bool()], skip_special_tokens=True)
        text = tokenizer.apply_chat_template([*mix.reward_prompt(source, index), {"role": "assistant", "content": answer}], tokenize=False)
        input_ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            scores.append(model(input_ids=input_ids).logits[0, 0])
    return torch.stack(scores)


@pytest.fixture(scope="module")
def policy_tokenizer(tiny_models):
    return load_tokenizer(TokenizerConfig(), str(tiny_models / "actor"))


# ------------------------------------------------------------------------------------ which tokenizer
def test_models_without_settings_use_the_jobs_and_own_settings_default_to_their_model(tmp_path, other_reward_model):
    spec = make_spec(**{"model_configs.reward.model_path": str(other_reward_model),
                        "model_configs.reward.tokenizer_config": {"bos_token_id": 1}})
    assert tokenizer_config_of(spec, "critic") == policy_tokenizer_config(spec) == spec.tokenizer_config
    assert tokenizer_config_of(spec, "reward") == TokenizerConfig(tokenizer_path=str(other_reward_model), bos_token_id=1)
    assert not same_settings(tokenizer_config_of(spec, "reward"), policy_tokenizer_config(spec))
    assert same_settings(TokenizerConfig(tokenizer_path=str(TINY_MODELS / "actor")),
                         TokenizerConfig(tokenizer_path=str(TINY_MODELS / "actor" / ".." / "actor")))


def test_bos_override_and_from_pretrained_kwargs(tiny_models, monkeypatch):
    import transformers

    seen = {}
    real = transformers.AutoTokenizer.from_pretrained

    def spy(path, **kwargs):
        seen.update(kwargs)
        return real(path, **kwargs)

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", spy)
    config = TokenizerConfig(bos_token_id=2, from_pretrained_kwargs={"model_max_length": 77})
    tokenizer = load_tokenizer(config, str(tiny_models / "actor"))
    assert (tokenizer.bos_token, tokenizer.bos_token_id, tokenizer.model_max_length) == ("</s>", 2, 77)
    assert seen["model_max_length"] == 77 and seen["local_files_only"] is True
    with pytest.raises(PromptDataError, match=r"model_configs\.reward\.tokenizer_config\.bos_token_id is 9999, outside"):
        load_tokenizer(TokenizerConfig(bos_token_id=9999), str(tiny_models / "actor"), "model_configs.reward.tokenizer_config")


def test_reserved_from_pretrained_kwargs_are_spec_errors():
    with pytest.raises(SpecError) as info:
        load(**{"tokenizer_config.from_pretrained_kwargs": {"padding_side": "right", "use_fast": True},
                "model_configs.reward.tokenizer_config": {"from_pretrained_kwargs": {"local_files_only": False}}})
    assert sorted(p.path for p in info.value.errors) == [
        "model_configs.reward.tokenizer_config.from_pretrained_kwargs.local_files_only",
        "tokenizer_config.from_pretrained_kwargs.padding_side",
    ]


def test_reward_tokenizer_config_with_a_reward_function_is_warned_about():
    loaded = load(reward_function(), **{"model_configs.reward.tokenizer_config": {"tokenizer_path": str(TINY_MODELS / "actor")}})
    assert [p.path for p in loaded.warnings if "tokenizer_config" in p.path] == ["model_configs.reward.tokenizer_config"]


# ------------------------------------------------------------------------------------------ scoring
def test_reward_model_with_its_own_tokenizer_scores_the_text(tmp_path, other_reward_model, policy_tokenizer):
    spec = reward_spec(tmp_path, [f"{TINY_PROMPTS}::1[META]:helpful[REWARD_META]:hhh"],
                       **{"model_configs.reward.model_path": str(other_reward_model), "model_configs.reward.tokenizer_config": {}})
    role = RewardRole(spec, torch.device("cpu"), policy_tokenizer)
    assert role.inputs.re_encodes and role.inputs.tokenizer.pad_token == "[PAD]"
    rollout = rollout_of(spec, policy_tokenizer)
    scores = role.scores(rollout)
    expected = direct_text_scores(other_reward_model, spec, rollout, policy_tokenizer)
    torch.testing.assert_close(scores, expected, atol=1e-5, rtol=1e-5)
    assert scores.unique().numel() == len(scores)  # the rows are told apart: the scores say something


def test_a_long_reward_input_keeps_its_last_tokens(tmp_path, other_reward_model, policy_tokenizer):
    spec = reward_spec(tmp_path, [f"{TINY_PROMPTS}::1[REWARD_META]:hhh"], **{
        "model_configs.reward.model_path": str(other_reward_model), "model_configs.reward.tokenizer_config": {},
        "dataset_config.max_seq_len": 16, "rollout_config.max_new_tokens": 8})
    role = RewardRole(spec, torch.device("cpu"), policy_tokenizer)
    rollout = rollout_of(spec, policy_tokenizer)
    ids, mask = role.inputs.encode(rollout)
    assert ids.shape[1] == 24 and bool(mask[:, -1].all())
    eos = role.inputs.tokenizer.eos_token_id
    assert (ids[:, -1] == eos).all()  # the template's end of the answer survives; the system prompt's start does not


def test_reward_model_micro_batches_give_the_same_scores(tmp_path, other_reward_model, policy_tokenizer):
    overrides = {"model_configs.reward.model_path": str(other_reward_model), "model_configs.reward.tokenizer_config": {}}
    whole = RewardRole(reward_spec(tmp_path, [f"{TINY_PROMPTS}::1"], **overrides), torch.device("cpu"), policy_tokenizer)
    overrides["rollout_config.reward_micro_bs"] = 3
    split = RewardRole(reward_spec(tmp_path, [f"{TINY_PROMPTS}::1"], **overrides), torch.device("cpu"), policy_tokenizer)
    rollout = rollout_of(whole.spec, policy_tokenizer, rows=7)
    torch.testing.assert_close(whole.scores(rollout), split.scores(rollout), atol=1e-5, rtol=1e-5)


def test_same_tokenizer_scores_the_policys_ids_as_before(tmp_path, tiny_models, policy_tokenizer):
    # Own settings that load the same tokenizer count as the same: no data loaded, no re-encoding.
    spec = reward_spec(tmp_path, [f"{TINY_PROMPTS}::1[META]:helpful"], **{"model_configs.reward.tokenizer_config": {}})
    role = RewardRole(spec, torch.device("cpu"), policy_tokenizer)
    assert role.inputs.direct and role.inputs.prompts is None
    rollout = rollout_of(spec, policy_tokenizer)
    with torch.no_grad():
        expected = sequence_scores(role.model, *sequences(rollout))
    assert torch.equal(role.scores(rollout), expected)


def test_reward_system_prompt_with_the_policys_tokenizer(tmp_path, tiny_models, policy_tokenizer):
    spec = reward_spec(tmp_path, [f"{TINY_PROMPTS}::1[REWARD_META]:harmless"])
    role = RewardRole(spec, torch.device("cpu"), policy_tokenizer)
    assert not role.inputs.direct and not role.inputs.re_encodes
    rollout = rollout_of(spec, policy_tokenizer)
    expected = direct_text_scores(tiny_models / "reward", spec, rollout, policy_tokenizer)
    torch.testing.assert_close(role.scores(rollout), expected, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        policy_view = sequence_scores(role.model, *sequences(rollout))
    assert not torch.allclose(role.scores(rollout), policy_view, atol=1e-4)  # the system prompt reached the reward model


def test_reward_function_keeps_receiving_the_decoded_texts(tmp_path, other_reward_model, policy_tokenizer):
    spec = reward_spec(tmp_path, [f"{TINY_PROMPTS}::1[META]:latex"], **reward_function("tests.runtime.test_reward_tokenizer:record_texts"))
    rollout = rollout_of(spec, policy_tokenizer)
    recorded = importlib.import_module("tests.runtime.test_reward_tokenizer").RECORDED  # the module the spec names, as the role imports it
    recorded.clear()
    scores = RewardRole(spec, torch.device("cpu"), policy_tokenizer).scores(rollout)
    prompts, responses = recorded[-1]
    assert responses == [policy_tokenizer.decode(r[m.bool()], skip_special_tokens=True)
                         for r, m in zip(rollout["response_ids"], rollout["response_mask"], strict=True)]
    assert prompts == [policy_tokenizer.decode(p[m.bool()], skip_special_tokens=True)
                       for p, m in zip(rollout["prompt_ids"], rollout["prompt_mask"], strict=True)]
    assert all(p.startswith("You are a mathematics assistant") for p in prompts)  # the policy's [META] prompt, rendered
    assert scores.tolist() == [float(len(r)) for r in responses]


# ---------------------------------------------------------------------------------------- pre-flight
def test_preflight_checks_a_reward_model_against_its_own_tokenizer(tmp_path, other_reward_model):
    spec = make_spec(run_dir=tmp_path / "run", **{"model_configs.reward.model_path": str(other_reward_model),
                                                  "model_configs.reward.tokenizer_config": {}})
    spec.dataset_config.ppo_datas = [f"{TINY_PROMPTS}::1[REWARD_META]:hhh"]
    pf = preflight(spec, tmp_path / "run", None, local=True)
    assert [p for p in pf.problems if p.severity == "error"] == []
    assert any(n.startswith("reward tokenizer: 384 tokens") for n in pf.notes), pf.notes
    assert any("model_configs.reward.tokenizer_config [REWARD_META]:hhh: a sample conversation renders" in n for n in pf.notes)


def test_preflight_reward_model_with_the_jobs_tokenizer_of_another_vocabulary(tmp_path, other_reward_model):
    pf = preflight(make_spec(run_dir=tmp_path / "run", **{"model_configs.reward.model_path": str(other_reward_model)}),
                   tmp_path / "run", None, local=True)
    found = [p for p in pf.problems if p.path == "model_configs.reward.model_path"]
    assert len(found) == 1 and "vocab_size 384" in found[0].message


def test_preflight_bad_token_ids_of_a_model_tokenizer(tmp_path, other_reward_model):
    spec = make_spec(run_dir=tmp_path / "run", **{
        "model_configs.reward.model_path": str(other_reward_model),
        "model_configs.reward.tokenizer_config": {"pad_token_id": 384, "eos_token_id": 1000, "bos_token_id": 2},
        "model_configs.critic.tokenizer_config": {"tokenizer_path": str(other_reward_model)},
    })
    pf = preflight(spec, tmp_path / "run", None, local=True)
    errors = {p.path: p.message for p in pf.problems if p.severity == "error"}
    assert "found 384, outside this tokenizer's vocabulary (ids 0..383)" in errors["model_configs.reward.tokenizer_config.pad_token_id"]
    assert "found 1000" in errors["model_configs.reward.tokenizer_config.eos_token_id"]
    assert "model_configs.reward.tokenizer_config.bos_token_id" not in errors
    critic = [p for p in pf.problems if p.path == "model_configs.critic.tokenizer_config"]
    assert critic and "the critic reads the policy's token ids" in critic[0].message


def test_preflight_bad_bos_of_the_jobs_tokenizer(tmp_path):
    pf = preflight(make_spec(run_dir=tmp_path / "run", **{"tokenizer_config.bos_token_id": 4096}), tmp_path / "run", None, local=True)
    errors = {p.path: p.message for p in pf.problems if p.severity == "error"}
    assert "found 4096, outside the tokenizer's vocabulary" in errors["tokenizer_config.bos_token_id"]


# ------------------------------------------------------------------------------------------ whole runs
def run_spec(tmp_path, other_reward_model, steps: int, **overrides):
    spec = make_spec(**{
        "model_configs.reward.model_path": str(other_reward_model), "model_configs.reward.tokenizer_config": {},
        "train_config.max_train_step": steps, "train_config.save_interval": 2, "dataset_config.num_samples_each_epoch": 16,
        "train_config.ppo_minibatch": 8, "train_config.value_minibatch": 8, **overrides,
    })
    spec.dataset_config.ppo_datas = [f"{TINY_PROMPTS}::0.7[META]:helpful[REWARD_META]:hhh", f"{TINY_PROMPTS}::0.3[META]:latex"]
    return spec


@pytest.mark.slow
def test_run_with_system_prompts_and_a_reward_tokenizer_resumes_exactly(tiny_models, other_reward_model, tmp_path):
    from rlhf_launch.runtime.metrics import read_metrics
    from rlhf_launch.runtime.training_run import run_local

    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run_local(run_spec(tmp_path, other_reward_model, 3), straight, quiet=True)
    run_local(run_spec(tmp_path, other_reward_model, 2), resumed, quiet=True)
    run_local(run_spec(tmp_path, other_reward_model, 3), resumed, resume="auto", quiet=True)
    a, b = read_metrics(straight), read_metrics(resumed)
    assert [r["step"] for r in b] == [1, 2, 3]
    for row_a, row_b in zip(a, b, strict=True):
        assert row_a["reward_mean"] == row_b["reward_mean"] and row_a["policy_loss"] == row_b["policy_loss"]


@pytest.mark.slow
def test_reward_ranks_re_encode_their_shards_like_one_process(tiny_models, other_reward_model, tmp_path):
    import subprocess
    import sys

    from rlhf_launch.core import yaml_io
    from rlhf_launch.runtime.metrics import read_metrics
    from rlhf_launch.runtime.training_run import run_local
    from tests.factory import ROOT, spec_dict

    sets = {"model_configs.reward.model_path": str(other_reward_model), "model_configs.reward.tokenizer_config": {},
            "model_configs.reward.trainer_config.parallel.data.size": 2, "slurm.gpus_per_node": 4,
            "train_config.max_train_step": 2, "train_config.save_interval": 0}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml_io.dump(spec_dict(sets, run_dir=tmp_path / "ranks")))
    proc = subprocess.run([sys.executable, "-m", "rlhf_launch", str(path), "--local", "--processes", "--no-check"],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    single = run_local(make_spec(sets), tmp_path / "single", quiet=True)
    for a, b in zip(read_metrics(tmp_path / "ranks"), single, strict=True):
        for key in ("reward_mean", "policy_loss", "value_loss", "kl"):
            assert a[key] == pytest.approx(b[key], abs=1e-5), (a["step"], key)
