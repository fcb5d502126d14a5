"""Converting XTuner-RLHF Python configs."""

from __future__ import annotations

import sys

import pytest
import yaml

from rlhf_launch.core.problems import SpecError
from rlhf_launch.frontend.cli import main
from rlhf_launch.frontend.convert import ConvertError, convert_file, to_yaml
from rlhf_launch.frontend.spec import validate
from tests.conftest import ROOT
from tests.factory import validated

SEED = ROOT / "tests" / "fixtures" / "xtuner" / "internlm2_1_8b.py"


def strip_comments(text: str) -> str:
    return "".join(line for line in text.splitlines(keepends=True) if not line.startswith("#"))


def test_seed_converts_to_the_shipped_spec():
    assert to_yaml(convert_file(SEED)) == strip_comments((ROOT / "specs" / "internlm2_1_8b.yaml").read_text())


def test_converted_seed_validates():
    data = convert_file(SEED)
    loaded = validate(data, "seed", SEED.parent)
    assert loaded.spec.model_configs.actor.torch_dtype == "bfloat16"
    assert loaded.spec.model_configs.actor.trainer_config.train_kwargs.total_steps == 10**9


def test_conversion_does_not_import_torch(tmp_path):
    sys.modules.pop("torch", None) if "torch" not in sys.modules else None
    had_torch = "torch" in sys.modules
    convert_file(SEED)
    assert ("torch" in sys.modules) == had_torch


def test_cli_prints_yaml_and_exits_zero(capsys):
    assert main(["convert", str(SEED)]) == 0
    out = capsys.readouterr().out
    assert yaml.safe_load(out)["model_configs"]["actor"]["model_type"] == "actor"


def write(tmp_path, text):
    path = tmp_path / "cfg.py"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    "text, message",
    [
        ("import torch\nx = torch.cuda.device_count()\n", "provides only torch dtypes"),
        ("model_configs = dict(\n", "executing the config failed: SyntaxError"),
        ("raise SystemExit(3)\n", "the config exited"),
        ("rollout_config = dict(a=1)\n", "no module-level model_configs"),
        ("model_configs = dict(actor=dict(f=object()))\n", "model_configs.actor.f: found object"),
    ],
)
def test_bad_configs_are_reported(tmp_path, text, message):
    with pytest.raises(ConvertError) as info:
        convert_file(write(tmp_path, text))
    assert message in str(info.value)


def test_cli_reports_errors_with_status_2(tmp_path, capsys):
    assert main(["convert", str(tmp_path / "nope.py")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_invalid_converted_config_shows_every_problem(tmp_path, capsys):
    text = SEED.read_text().replace("kl_coeff=0.02", "kl_coef=0.02") + "\nrollout_cfg = dict(x=1)\n"
    assert main(["convert", str(write(tmp_path, text))]) == 2
    err = capsys.readouterr().err
    assert "repeater_config.kl_coef: unknown key (did you mean 'kl_coeff'?)" in err
    assert "rollout_cfg: unknown key" in err


def test_trainer_level_dtype_stays_and_wins(tmp_path):
    """XTuner loads with trainer_config.torch_dtype only; the spec keeps it there and resolves to it."""
    text = SEED.read_text().replace(
        'trainer_config=dict(trainer_type="huggingface", parallel=dict(_parallel)),\n    ),\n    critic',
        'trainer_config=dict(torch_dtype="auto", trainer_type="huggingface", parallel=dict(_parallel)),\n    ),\n    critic',
    )
    data = convert_file(write(tmp_path, text))
    assert data["model_configs"]["reference"]["trainer_config"]["torch_dtype"] == "auto"
    loaded = validate(data, "cfg", tmp_path)
    assert loaded.spec.model_configs.reference.torch_dtype == "auto"  # over the model-level bfloat16
    assert [w.path for w in loaded.warnings if "torch_dtype" in w.path] == ["model_configs.reference.torch_dtype"]


MEMORY = ROOT / "tests" / "fixtures" / "xtuner" / "memory_and_precision.py"


def test_memory_and_precision_keys_convert_validate_and_plan():
    notes: list[str] = []
    data = convert_file(MEMORY, notes)
    models = data["model_configs"]
    assert {role: m.get("attn_implementation") for role, m in models.items()} == {
        "actor": "flash_attention_2", "reference": "flash_attention_2", "critic": "flash_attention_2", "reward": "sdpa"}
    assert not any("use_flash_attn" in m or "use_flash_attn" in m["trainer_config"] for m in models.values())
    assert models["critic"]["head_name"] == "v_head" and "head_name" not in models["critic"]["trainer_config"]
    # XTuner reads use_flash_attn in trainer_config only: the model-level one is dropped with a note.
    assert notes[0] == ("model_configs.actor.use_flash_attn (false) is ignored, as XTuner ignores it; "
                        "trainer_config.use_flash_attn (true) is used")
    assert [note.split(":")[0] for note in notes[1:]] == [
        "repeater_config.norm_adv", "dataset_config.max_seq_len", "train_config.max_train_step", _REMOTE.split(":")[0]]

    loaded = validate(data, "memory", MEMORY.parent)
    spec = loaded.spec.model_configs
    assert [spec.actor.torch_dtype, spec.reference.torch_dtype, spec.critic.torch_dtype] == ["bfloat16", "auto", "bfloat16"]
    assert spec.actor.trainer_config.gradient_checkpointing and spec.critic.trainer_config.gradient_checkpointing
    assert spec.critic.head_name == spec.reward.head_name == "v_head"
    assert "model_configs.reference.torch_dtype" in [w.path for w in loaded.warnings]
    # The plan counts the checkpointed critic's activations: far less than the same spec without checkpointing.
    without = convert_file(MEMORY)
    without["model_configs"]["critic"]["trainer_config"]["gradient_checkpointing"] = False
    plain = validate(without, "memory", MEMORY.parent).plan.role("critic").phases["training"].activations_gib
    assert loaded.plan.role("critic").phases["training"].activations_gib < plain / 5


def test_convert_prints_notes_after_the_spec(capsys):
    assert main(["convert", str(MEMORY)]) == 0
    captured = capsys.readouterr()
    assert yaml.safe_load(captured.out)["model_configs"]["actor"]["attn_implementation"] == "flash_attention_2"
    assert "rlhf-launch convert: note: model_configs.actor.use_flash_attn (false) is ignored" in captured.err


def test_two_different_head_names_are_refused(tmp_path):
    reward = 'model_type="reward",\n        head_name='
    text = MEMORY.read_text().replace(f'{reward}"v_head",', f'{reward}"value_head",')
    flash = 'use_flash_attn=False,\n            '
    text = text.replace(f"{flash}parallel", f'{flash}head_name="v_head",\n            parallel')
    with pytest.raises(ConvertError, match="model_configs.reward: head_name 'value_head' and trainer_config.head_name 'v_head' differ"):
        convert_file(write(tmp_path, text))


def test_help_warns_that_converting_executes(capsys):
    with pytest.raises(SystemExit):
        main(["convert", "--help"])
    assert "EXECUTES" in capsys.readouterr().out


# --------------------------------------------------------------------------- both formats, every key
GEN1 = ROOT / "tests" / "fixtures" / "xtuner" / "gen1_every_key.py"
LATER = ROOT / "tests" / "fixtures" / "xtuner" / "later_every_key.py"
_OFF = "which is not supported yet"
_PTX = "PPO-ptx (a pretraining loss mixed into the policy update)"
_DS = "model_configs.critic.trainer_config.deepspeed_config"
_REMOTE = ("model_configs.*.trust_remote_code and tokenizer_config.trust_remote_code written as true: XTuner loads every model "
           "and tokenizer with trust_remote_code=True, which InternLM2's need (set false for models that run on transformers' "
           "own code)")
_PT_LEN = ("pretrain_dataset_config.max_seq_len: XTuner skips pretraining texts longer than this (and those of 4 tokens or fewer); "
           "the converted run keeps their first max_seq_len tokens")

GEN1_NOTES = [
    "the config imports internlm_rlhf_models, which is not installed here: it is stubbed, so its names can only be passed on "
    "(as model_class, which XTuner ignores, or as a loss object convert understands)",
    "dataset_config.num_samples_each_epoch (80): XTuner's gen-1 loader counts the 16 pretraining samples in it, so its steps had "
    "64 prompts; written as 64",
    "train_config.pt_criterion (null) dropped: the converted run's pretraining loss is the mean token NLL",
    "train_config.pretrain_loss_weight: XTuner's gen-1 trainer swallows it and never trains on the pretraining samples; the "
    f"converted run does {_PTX} as written",
    "train_config.pretrain_loss_weight (0.5): XTuner sums per-micro-batch mean losses, so its pretraining term (4 micro batches) "
    "weighed 0.5 x 4/16 = 0.125 against the PPO loss (16); the converted run weighs the mean token NLL by 0.5 as written: set 0.125 "
    "for XTuner's balance",
    _PT_LEN,
    "train_config.step_interval (1) dropped: XTuner accepts it and never uses it",
    "train_config.pt_minibatch (null) dropped: XTuner accepts it and never uses it",
    "model_configs.actor.model_class (internlm_rlhf_models.modeling.InternLM2ForCausalLM) dropped: XTuner replaces it by its own "
    "model class",
    "model_configs.critic.model_class (internlm_rlhf_models.modeling.InternLM2ForRewardModel) dropped: XTuner replaces it by its own "
    "model class",
    "model_configs.actor.generator_config.generate_kwargs (a mapping) dropped: XTuner never reads it: sampling comes only from "
    "rollout_config.generate_kwargs",
    "rollout_config.async_reward (true) dropped: the reference, critic and reward passes always run at the same time, each on "
    "its own ranks (the scores are the same); rollout_config.max_staleness: 1 overlaps generation with training",
    "dataset_config.sample_strategy ('in_batch') dropped: each step draws every prompt's source at random by the normalised weights "
    "(no per-source quota)",
    "repeater_config.reward_scale: XTuner stores it and never reads it (its run did not scale the rewards); the converted run divides "
    "them by their running standard deviation, as the spec's key does",
    "repeater_config.fine_grained_rm (true) dropped: XTuner stores it and never reads it",
    "repeater_config.norm_adv: XTuner's gen-1 code discards it and never whitens advantages; the converted run whitens them as "
    "written (set false for XTuner's behaviour)",
    "repeater_config.kl_coeff (-0.01) written as 0: XTuner clamps a negative coefficient to 0",
    "repeater_config.answer_end_id (92543): XTuner never acts on it; the converted run stops a response at this token",
    "dataset_config.max_seq_len: XTuner skips prompts longer than this (and those of 4 tokens or fewer); the converted run keeps "
    "the last max_seq_len tokens of a longer prompt",
    "dataset_config.ppo_datas: 'Anthropic/hh-rlhf/harmless-base::0' dropped: XTuner drops a source of probability 0 or less",
    "model_configs.actor.trainer_config.train_kwargs.lr_decay_rate (0.5): XTuner never reads it (its learning rate stays constant); "
    "the converted run decays the learning rate linearly over total_steps",
    "model_configs.actor.trainer_config.train_kwargs.loss_type (per_token): XTuner never reads it (its loss is per_seq); the "
    "converted run averages over all tokens",
    "train_config.max_train_step: XTuner runs until it is stopped; the converted run stops after 1000 steps (the spec's default): "
    "set max_train_step",
    _REMOTE,
    f"{_DS}.bf16.enable (true) rewritten as bf16.enabled: DeepSpeed reads only 'enabled', so XTuner's own run had ignored this setting",
    f"{_DS}: gradient_accumulation_steps 8, train_batch_size 128 dropped: they disagree with the batch sizes, from which they are "
    "derived (gradient_accumulation_steps 16, train_batch_size 64)",
]


def test_gen1_config_converts_every_key_with_one_note_each():
    notes: list[str] = []
    data = convert_file(GEN1, notes)
    assert notes == GEN1_NOTES
    # XTuner's defaults, written out where the spec's differ
    assert data["rollout_config"]["write_to_file"] is True and data["repeater_config"]["norm_rewards"] is True
    assert (data["rollout_config"]["clip_reward_min"], data["rollout_config"]["clip_reward_max"]) == (-5, 5)
    assert data["train_config"]["critic_micro_bs"] == 2 and data["train_config"]["value_clip"] == 0.5
    assert (data["dataset_config"]["max_seq_len"], data["dataset_config"]["random_seed"]) == (4096, 110)
    assert data["model_configs"]["critic"]["trainer_config"]["train_kwargs"] == {"lr": 5e-6}
    # what the user wrote stays
    assert data["repeater_config"]["norm_adv"] is True and data["repeater_config"]["reward_scale"] is True
    assert "fine_grained_rm" not in data["repeater_config"] and "model_class" not in data["model_configs"]["actor"]
    ds = data["model_configs"]["critic"]["trainer_config"]["deepspeed_config"]
    assert ds == {"zero_optimization": {"stage": 2}, "bf16": {"enabled": True}, "train_micro_batch_size_per_gpu": 2}
    assert data["tokenizer_config"]["from_pretrained_kwargs"] == {"use_fast": False}
    assert data["tokenizer_config"]["trust_remote_code"] is True
    assert all(data["model_configs"][role]["trust_remote_code"] is True for role in ("actor", "reference", "critic", "reward"))
    assert data["dataset_config"]["ppo_datas"] == ["Anthropic/hh-rlhf/helpful-base::1.0[META]:helpful"]
    # gen-1's num_samples_each_epoch (80) counted the 16 pretraining samples: 64 prompts, 16 texts per step
    assert data["dataset_config"]["num_samples_each_epoch"] == 64
    assert data["pretrain_dataset_config"] == {
        "pretrain_datas": ["Salesforce/wikitext::1.0"], "num_samples_each_epoch": 16, "max_seq_len": 4096, "random_seed": 110}
    assert data["train_config"]["pretrain_loss_weight"] == 0.5 and "pt_criterion" not in data["train_config"]


def test_gen1_config_validates_and_plans():
    loaded = validated(convert_file(GEN1), GEN1.parent)
    assert loaded.spec.repeater_config.norm_rewards and loaded.spec.rollout_config.write_to_file
    assert loaded.spec.model_configs.critic.trainer_config.deepspeed_config["bf16"] == {"enabled": True}
    assert loaded.spec.train_config.pretrain_loss_weight == 0.5 and loaded.spec.pretrain_dataset_config.num_samples_each_epoch == 16
    assert loaded.spec.dataset_config.num_samples_each_epoch == 64
    assert loaded.plan.role("actor").memory is not None


LATER_NOTES = [
    "the config imports xtuner, which is not installed here: it is stubbed, so its names can only be passed on "
    "(as model_class, which XTuner ignores, or as a loss object convert understands)",
    "train_config.max_train_step: XTuner counts steps from 0 and runs while step <= 9, which is 10 steps; written as 10",
    "pretrain_dataset_config.sample_strategy ('in_batch') dropped: each step draws every pretraining text's source at random by "
    "the normalised weights (no per-source quota)",
    "train_config.pretrain_criterion (PretrainLoss(label_smoothing=0)) converted to the spec's pretraining loss, the mean token NLL",
    "pretrain_dataset_config: XTuner's later rollout fills the pretraining batch with copies of the step's last prompt instead of "
    "the pretraining texts (a bug in envs/txt_env.py); the converted run trains on the texts",
    "train_config.pretrain_loss_weight (0.5): XTuner sums per-micro-batch mean losses, so its pretraining term (8 micro batches) "
    "weighed 0.5 x 8/16 = 0.25 against the PPO loss (16); the converted run weighs the mean token NLL by 0.5 as written: set 0.25 "
    "for XTuner's balance",
    _PT_LEN,
    f"repeater_config.grpo_k (1) dropped: this value turns off group-relative advantages (several samples per prompt), {_OFF}",
    f"repeater_config.use_loo (false) dropped: this value turns off leave-one-out (RLOO) advantages, {_OFF}",
    f"rollout_config.repeat_prompt (1) dropped: this value turns off several responses per prompt, {_OFF}",
    f"train_config.ppo_loss_weight (1.0) dropped: this value turns off a PPO loss weight other than 1, {_OFF}",
    "train_config.resume_step (-1) dropped: this value turns off restarting at a step number (rlhf-launch resumes a run from its "
    f"own checkpoints: --resume), {_OFF}",
    "rollout_config.resume_step (-1) dropped: this value turns off restarting at a step number (rlhf-launch resumes a run from its "
    f"own checkpoints: --resume), {_OFF}",
    "train_config.policy_criterion (PPOPolicyLoss(cliprange=0.25)) converted to train_config.policy_clip",
    "train_config.critic_criterion (CriticLoss(cliprange_value=0.5)) converted to train_config.value_clip",
    "train_config.async_learn (true) dropped: it only lets XTuner train the critic while the policy trains; the losses are the same",
    "rollout_config.async_reward (false) dropped: the reference, critic and reward passes always run at the same time, each on "
    "its own ranks (the scores are the same); rollout_config.max_staleness: 1 overlaps generation with training",
    "model_configs.actor.model_config.use_cache (false) dropped: the KV cache is always used for generation and never in training",
    "model_configs.actor.trainer_config.exclude_keys (a list) dropped: rlhf-launch saves and syncs every parameter; it has no such setting",
    "dataset_config.sample_strategy ('in_batch') dropped: each step draws every prompt's source at random by the normalised weights "
    "(no per-source quota)",
    "repeater_config.norm_rewards: false crashes XTuner (a NameError); the converted run does what it means: no normalisation "
    "of the rewards",
    "dataset_config.max_seq_len: XTuner skips prompts longer than this (and those of 4 tokens or fewer); the converted run keeps "
    "the last max_seq_len tokens of a longer prompt",
    _REMOTE,
    f"{_DS}.bf16.enable (false) rewritten as bf16.enabled: DeepSpeed reads only 'enabled', so XTuner's own run had ignored this setting",
]


def test_later_config_converts_to_the_spec_keys_with_one_note_each():
    notes: list[str] = []
    data = convert_file(LATER, notes)
    assert notes == LATER_NOTES
    assert list(data["model_configs"]) == ["actor", "reference", "critic", "reward"]
    actor = data["model_configs"]["actor"]
    assert actor["model_type"] == "actor" and actor["attn_implementation"] == "eager" and "model_config" not in actor
    assert actor["trainer_config"]["parallel"]["sequence"] is False and "exclude_keys" not in actor["trainer_config"]
    assert data["rollout_config"]["actor_micro_bs"] == 16 and data["repeater_config"]["actor_micro_bs"] == 8
    assert (data["rollout_config"]["clip_reward_min"], data["rollout_config"]["clip_reward_max"]) == (-3, 3)
    assert "clip_reward_min" not in data["repeater_config"]
    train = data["train_config"]
    assert (train["actor_micro_bs"], train["pretrain_step"], train["max_train_step"]) == (2, 3, 10)
    assert (train["ppo_minibatch"], train["value_minibatch"]) == (64, 32)  # policy_minibatch defaults to the whole batch
    assert (train["policy_clip"], train["value_clip"]) == (0.25, 0.5)
    assert data["repeater_config"]["norm_rewards"] is False and data["rollout_config"]["write_to_file"] is False
    assert (data["repeater_config"]["kl_coeff"], data["repeater_config"]["gae_lambda"]) == (0.01, 0.99)
    assert data["dataset_config"] == {
        "num_samples_each_epoch": 64,
        "max_seq_len": 1024,
        "random_seed": 1024,
        "ppo_datas": [
            "Anthropic/hh-rlhf/helpful-base::0.5[META]:helpful[REWARD_META]:helpful",
            "Anthropic/hh-rlhf/harmless-base::0.5[REWARD_META]:harmless",
            "Anthropic/hh-rlhf/red-team-attempts::0.25[META]:hhh[REWARD_META]:hhh",  # XTuner's reward falls back to SYS_PROMPT
        ],
    }
    assert "prompt_dataset_config" not in data
    assert data["pretrain_dataset_config"] == {
        "pretrain_datas": ["Salesforce/wikitext::0.5", "./pretrain_text.json::0.5"],  # '[HF]' stripped, as for prompts
        "num_samples_each_epoch": 32,
        "max_seq_len": 8192,
        "random_seed": 7,
    }
    assert train["pretrain_loss_weight"] == 0.5 and "pretrain_criterion" not in train


def test_later_config_validates_and_plans():
    loaded = validated(convert_file(LATER), LATER.parent)
    spec = loaded.spec
    assert spec.train_config.max_train_step == 10 and spec.train_config.policy_clip == 0.25
    assert spec.model_configs.actor.attn_implementation == "eager"
    assert spec.model_configs.actor.trainer_config.envs == {"TOKENIZERS_PARALLELISM": "false"}
    assert spec.train_config.pretrain_loss_weight == 0.5 and spec.pretrain_dataset_config.num_samples_each_epoch == 32
    assert loaded.plan.role("critic").memory is not None


def test_cli_converts_the_later_format_and_prints_its_notes(capsys):
    assert main(["convert", str(LATER)]) == 0
    captured = capsys.readouterr()
    assert yaml.safe_load(captured.out)["train_config"]["max_train_step"] == 10
    assert "rlhf-launch convert: note: train_config.max_train_step: XTuner counts steps from 0" in captured.err


@pytest.mark.parametrize(
    "old, new, message",
    [
        ("PretrainLoss(label_smoothing=0)", "PretrainLoss(label_smoothing=0.1)",
         "train_config.pretrain_criterion: PretrainLoss(label_smoothing=0.1) is not supported yet; remove label_smoothing"),
        ('message_type="pretrain",', 'message_type="prompt",',
         "pretrain_dataset_config.message_type: found 'prompt', expected 'pretrain'"),
        ("grpo_k=1,", "grpo_k=4,", "repeater_config.grpo_k: group-relative advantages (several samples per prompt) is not supported yet"),
        ("use_loo=False,", "use_loo=True,", "repeater_config.use_loo: leave-one-out (RLOO) advantages is not supported yet"),
        ("use_loo=False,", "sum_kl=True,", "repeater_config.sum_kl: a KL penalty summed over the response is not supported yet"),
        ("use_loo=False,", "kl_reward_penalty=0.1,", "repeater_config.kl_reward_penalty: a KL penalty on the sequence reward"),
        ("use_loo=False,", "non_eos_penalty=-1,", "repeater_config.non_eos_penalty: a penalty for responses without end-of-sequence"),
        ("RESUME_STEP = -1", "RESUME_STEP = 40", "train_config.resume_step: restarting at a step number (rlhf-launch resumes a run "
         "from its own checkpoints: --resume) is not supported yet (found 40); remove it"),
        ("sequence=dict(size=1),\n", "sequence=dict(size=2),\n",
         "model_configs.actor.trainer_config.parallel.sequence.size: sequence parallelism is not supported yet (found 2); use size 1"),
        ("CriticLoss(cliprange_value=0.5)", "CriticLoss(cliprange_value=0.5, loss_type='per_token')",
         "train_config.critic_criterion: CriticLoss(loss_type='per_token') is not supported yet; remove loss_type"),
        ("critic_minibatch=PROMPT_BATCH_SIZE // 2,", "critic_minibatch=8, value_minibatch=16,",
         "train_config.critic_minibatch (8) and train_config.value_minibatch (16) are the same setting; keep one"),
    ],
)
def test_later_features_not_built_yet_are_refused_by_name(tmp_path, old, new, message):
    text = LATER.read_text()
    assert old in text
    with pytest.raises(ConvertError) as info:
        convert_file(write(tmp_path, text.replace(old, new, 1)))
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_stubbing_leaves_sys_modules_as_it_was():
    before = set(sys.modules)
    convert_file(LATER)
    convert_file(GEN1)
    stubbed = [name for name in set(sys.modules) - before if name.startswith(("xtuner", "internlm_rlhf_models"))]
    assert stubbed == [] and "xtuner.rlhf.loss" not in sys.modules


def test_a_failing_assert_in_the_config_is_reported(tmp_path):
    text = LATER.read_text().replace("PROMPT_BATCH_SIZE = 64", "PROMPT_BATCH_SIZE = 63")
    with pytest.raises(ConvertError, match="an assert in the config failed"):
        convert_file(write(tmp_path, text))


def test_a_stubbed_value_where_the_spec_needs_data_is_refused(tmp_path):
    text = LATER.read_text().replace('max_len=1024,', 'max_len=CriticLoss.max_len,')
    with pytest.raises(ConvertError, match="dataset_config.max_seq_len: found xtuner.rlhf.loss.CriticLoss.max_len from a stubbed import"):
        convert_file(write(tmp_path, text))


def test_hand_written_spec_keeps_the_deepspeed_enable_error():
    data = convert_file(GEN1)
    data["model_configs"]["critic"]["trainer_config"]["deepspeed_config"]["bf16"] = {"enable": True}
    with pytest.raises(SpecError, match="bf16.enable"):
        validated(data, GEN1.parent)


def test_agreeing_deepspeed_batch_keys_stay(tmp_path):
    text = GEN1.read_text().replace('"gradient_accumulation_steps": 8,', '"gradient_accumulation_steps": 16,')
    text = text.replace('"train_batch_size": 128,', '"train_batch_size": 64,')
    notes: list[str] = []
    ds = convert_file(write(tmp_path, text), notes)["model_configs"]["critic"]["trainer_config"]["deepspeed_config"]
    assert (ds["gradient_accumulation_steps"], ds["train_batch_size"]) == (16, 64)
    assert not any("dropped: they disagree" in note for note in notes)


def test_gen1_minibatch_default_above_the_batch_is_noted(tmp_path):
    text = GEN1.read_text().replace("    ppo_minibatch=BATCH,\n", "")
    notes: list[str] = []
    assert convert_file(write(tmp_path, text), notes)["train_config"]["ppo_minibatch"] == 512
    assert "train_config.ppo_minibatch: not set; XTuner's default, 512, is written (with a rollout batch of 64, XTuner's run made " \
           "no update of that model at all): set it" in notes


def test_xtuner_norm_rewards_false_is_kept_and_true_by_default():
    assert convert_file(LATER)["repeater_config"]["norm_rewards"] is False
    assert convert_file(SEED)["repeater_config"]["norm_rewards"] is True


# --------------------------------------------------------------------------- PPO-ptx in each of XTuner's spellings
def _ptx_notes(notes: list[str]) -> list[str]:
    """The notes on pretraining keys and on the prompt count, in order."""
    keys = ("pretrain", ".pt_", "num_samples")
    return [note for note in notes if any(key in note.split(" ")[0] for key in keys) and "never uses it" not in note]


def test_gen1_pretraining_without_a_weight_is_dropped_but_still_counts_against_the_prompts(tmp_path):
    """XTuner's gen-1 trainer never trained on pt_datas: no weight, no PPO-ptx; its prompts were still 80 - 16."""
    text = GEN1.read_text().replace("    pretrain_loss_weight=0.5,\n", "")
    notes: list[str] = []
    data = convert_file(write(tmp_path, text), notes)
    why = ("XTuner's gen-1 trainer never trains on pretraining samples (it has no pretraining loss); set "
           "train_config.pretrain_loss_weight > 0 for PPO-ptx")
    assert _ptx_notes(notes) == [
        "dataset_config.num_samples_each_epoch (80): XTuner's gen-1 loader counts the 16 pretraining samples in it, so its steps "
        "had 64 prompts; written as 64",
        f"dataset_config.pt_datas (a list) dropped: {why}",
        f"dataset_config.pt_data_samples (16) dropped: {why}",
        f"train_config.pt_criterion (null) dropped: {why}",
    ]
    assert data["dataset_config"]["num_samples_each_epoch"] == 64 and "pretrain_dataset_config" not in data
    assert "pretrain_loss_weight" not in data["train_config"]
    validated(data, GEN1.parent)


def test_gen1_zero_pretraining_samples_keep_every_prompt(tmp_path):
    text = GEN1.read_text().replace('"pt_data_samples": PRETRAIN,', '"pt_data_samples": 0,')
    notes: list[str] = []
    data = convert_file(write(tmp_path, text), notes)
    off = f"there is no pretraining data (or 0 samples per step), so {_PTX} is off, as in XTuner"
    assert _ptx_notes(notes) == [
        f"dataset_config.pt_datas (a list) dropped: {off}",
        f"dataset_config.pt_data_samples (0) dropped: {off}",
        f"train_config.pretrain_loss_weight (0.5) dropped: {off}",
        f"train_config.pt_criterion (null) dropped: {off}",
    ]
    assert data["dataset_config"]["num_samples_each_epoch"] == 80 and "pretrain_dataset_config" not in data


def test_in_between_spelling_counts_prompts_apart_and_defaults_the_weight(tmp_path):
    """XTuner's commit 14ea454: prompt_/pretrain_samples_each_epoch apart, max_pretrain_len, PPOTrainer's weight 0.5."""
    text = GEN1.read_text().replace('"num_samples_each_epoch": BATCH + PRETRAIN,', '"prompt_samples_each_epoch": BATCH,')
    text = text.replace('"pt_datas":', '"pretrain_datasets":').replace('"pt_data_samples":', '"max_pretrain_len": 2048,\n    '
                                                                      '"pretrain_samples_each_epoch":')
    text = text.replace("    pretrain_loss_weight=0.5,\n    pt_criterion=None,\n", "")
    notes: list[str] = []
    data = convert_file(write(tmp_path, text), notes)
    assert data["dataset_config"]["num_samples_each_epoch"] == 64
    assert data["pretrain_dataset_config"] == {
        "pretrain_datas": ["Salesforce/wikitext::1.0"], "num_samples_each_epoch": 16, "max_seq_len": 2048, "random_seed": 110}
    assert data["train_config"]["pretrain_loss_weight"] == 0.5
    assert "train_config.pretrain_loss_weight: not set; XTuner's default, 0.5, is written" in notes
    assert not any("gen-1 loader counts" in note or "gen-1 trainer" in note for note in notes)
    validated(data, GEN1.parent)


def test_later_ptx_off_keeps_dropping_its_keys(tmp_path):
    text = LATER.read_text().replace("PRETRAIN_BATCH_SIZE = 32", "PRETRAIN_BATCH_SIZE = 0")
    notes: list[str] = []
    data = convert_file(write(tmp_path, text), notes)
    off = f"there is no pretraining data (or 0 samples per step), so {_PTX} is off, as in XTuner"
    assert _ptx_notes(notes) == [
        f"pretrain_dataset_config (a mapping) dropped: {off}",
        f"train_config.pretrain_loss_weight (0) dropped: {off}",
        f"train_config.pretrain_criterion (PretrainLoss(label_smoothing=0)) dropped: {off}",
    ]
    assert "pretrain_dataset_config" not in data and "pretrain_loss_weight" not in data["train_config"]
    validated(data, LATER.parent)


def test_later_weight_zero_with_data_is_dropped(tmp_path):
    text = LATER.read_text().replace("pretrain_loss_weight=0.5 if", "pretrain_loss_weight=0.0 if")
    notes: list[str] = []
    data = convert_file(write(tmp_path, text), notes)
    assert f"train_config.pretrain_loss_weight (0.0) dropped: train_config.pretrain_loss_weight is 0.0, so {_PTX} is off, " \
           "as in XTuner" in notes
    assert "pretrain_dataset_config" not in data


def test_later_pretraining_batch_is_repeated_per_policy_update_in_xtuner(tmp_path):
    """Two policy updates a step: XTuner trains on the same 32 texts in each; the spec draws 64, 32 per update."""
    text = LATER.read_text().replace("    critic_minibatch=PROMPT_BATCH_SIZE // 2,\n",
                                     "    critic_minibatch=PROMPT_BATCH_SIZE // 2,\n    policy_minibatch=PROMPT_BATCH_SIZE // 2,\n")
    notes: list[str] = []
    data = convert_file(write(tmp_path, text), notes)
    assert data["pretrain_dataset_config"]["num_samples_each_epoch"] == 64 and data["train_config"]["ppo_minibatch"] == 32
    assert "pretrain_dataset_config.num_samples_each_epoch: XTuner trains on the same 32 pretraining samples in each of its 2 " \
           "policy updates per step; written as 64, 32 new ones per update" in notes
    assert not any("XTuner sums per-micro-batch" in note for note in notes)  # 8 micro batches of each: the same balance
    loaded = validated(data, LATER.parent)
    assert loaded.spec.pretrain_dataset_config.num_samples_each_epoch == 64


@pytest.mark.parametrize(
    "fixture, old, new, message",
    [
        (GEN1, '"pt_data_samples": PRETRAIN,', '"pt_data_samples": 80,',
         "dataset_config.pt_data_samples: found 80, expected fewer than num_samples_each_epoch (80)"),
        (GEN1, '"pt_datas":', '"pretrain_samples_each_epoch": 8,\n    "pt_datas":',
         "the config gives pretraining data in in-between and gen-1 spellings of XTuner at once; keep one"),
        (LATER, "pretrain_criterion=PretrainLoss(label_smoothing=0)", "pretrain_criterion=PretrainLoss(0.1)",
         "train_config.pretrain_criterion: found PretrainLoss(0.1), expected a loss object called with keywords"),
    ],
)
def test_pretraining_keys_that_cannot_convert_are_refused_by_name(tmp_path, fixture, old, new, message):
    text = fixture.read_text()
    assert old in text
    with pytest.raises(ConvertError) as info:
        convert_file(write(tmp_path, text.replace(old, new, 1)))
    assert message in str(info.value) and "\n" not in str(info.value)
