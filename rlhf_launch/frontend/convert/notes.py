"""Notes on converted keys whose XTuner behaviour differs from what the spec's key does.

What the user wrote is kept (the spec's meaning is the one they want) unless XTuner's value would be
refused and means nothing (a negative kl_coeff, a never-read flag that is on, a source of weight 0).
"""

from __future__ import annotations

from typing import Any

from rlhf_launch.core.config import TrainConfig, TrainKwargs
from rlhf_launch.core.problems import show
from rlhf_launch.frontend.convert.map import GEN1, get

_DEFAULT_STEPS = TrainConfig.__dataclass_fields__["max_train_step"].default
_NEVER_READ = ("fine_grained_rm", "value_ema")


def behaviour_notes(spec: dict, fmt: str, user: dict, notes: list[str]) -> None:
    """Add a note (and the few fixes above) where a converted run would behave unlike XTuner's.
    ``user`` maps each section to the keys the config itself wrote (defaults written by convert excluded)."""
    repeater = spec.get("repeater_config") if isinstance(spec.get("repeater_config"), dict) else {}
    _repeater_notes(repeater, fmt, user.get("repeater_config", set()), notes)
    _answer_end(spec, notes)
    _dataset_notes(spec, notes)
    _train_kwargs_notes(spec, notes)
    if "max_train_step" not in user.get("train_config", set()):
        notes.append(f"train_config.max_train_step: XTuner runs until it is stopped; the converted run stops after "
                     f"{_DEFAULT_STEPS} steps (the spec's default): set max_train_step")


def _repeater_notes(repeater: dict, fmt: str, written: set, notes: list[str]) -> None:
    if repeater.get("norm_rewards") is False:
        notes.append("repeater_config.norm_rewards: false crashes XTuner (a NameError); the converted run does what it means: "
                     "no normalisation of the rewards")
    if repeater.get("reward_scale") is True:
        notes.append("repeater_config.reward_scale: XTuner stores it and never reads it (its run did not scale the rewards); "
                     "the converted run divides them by their running standard deviation, as the spec's key does")
    for key in _NEVER_READ:
        if repeater.get(key) is True:
            del repeater[key]
            notes.append(f"repeater_config.{key} (true) dropped: XTuner stores it and never reads it")
    if fmt == GEN1 and repeater.get("norm_adv") is True and "norm_adv" in written:
        notes.append("repeater_config.norm_adv: XTuner's gen-1 code discards it and never whitens advantages; the converted run "
                     "whitens them as written (set false for XTuner's behaviour)")
    kl = repeater.get("kl_coeff")
    if isinstance(kl, (int, float)) and not isinstance(kl, bool) and kl < 0:
        repeater["kl_coeff"] = 0
        notes.append(f"repeater_config.kl_coeff ({show(kl)}) written as 0: XTuner clamps a negative coefficient to 0")


def _answer_end(spec: dict, notes: list[str]) -> None:
    end = get(spec, "repeater_config.answer_end_id", None)
    eos = get(spec, "rollout_config.generate_kwargs.eos_token_id", None)
    if end is not None and end != eos:
        notes.append(f"repeater_config.answer_end_id ({show(end)}): XTuner never acts on it; the converted run stops a "
                     "response at this token")


def _dataset_notes(spec: dict, notes: list[str]) -> None:
    dataset = spec.get("dataset_config")
    if not isinstance(dataset, dict):
        return
    notes.append("dataset_config.max_seq_len: XTuner skips prompts longer than this (and those of 4 tokens or fewer); the "
                 "converted run keeps the last max_seq_len tokens of a longer prompt")
    datas = dataset.get("ppo_datas")
    if isinstance(datas, list):
        kept = [entry for entry in datas if not _weightless(entry)]
        for entry in datas:
            if _weightless(entry):
                notes.append(f"dataset_config.ppo_datas: {entry!r} dropped: XTuner drops a source of probability 0 or less")
        dataset["ppo_datas"] = kept


def _weightless(entry: Any) -> bool:
    if not isinstance(entry, str) or "::" not in entry:
        return False
    weight = entry.partition("::")[2].split("[", 1)[0]
    try:
        return float(weight) <= 0
    except ValueError:
        return False


def _train_kwargs_notes(spec: dict, notes: list[str]) -> None:
    models = spec.get("model_configs")
    for role, model in (models or {}).items() if isinstance(models, dict) else ():
        kwargs = get(model, "trainer_config.train_kwargs", None) if isinstance(model, dict) else None
        if not isinstance(kwargs, dict):
            continue
        where = f"model_configs.{role}.trainer_config.train_kwargs"
        decay = kwargs.get("lr_decay_rate", TrainKwargs.__dataclass_fields__["lr_decay_rate"].default)
        if decay != 1:
            notes.append(f"{where}.lr_decay_rate ({show(decay)}): XTuner never reads it (its learning rate stays constant); "
                         "the converted run decays the learning rate linearly over total_steps")
        if kwargs.get("loss_type") == "per_token":
            notes.append(f"{where}.loss_type (per_token): XTuner never reads it (its loss is per_seq); the converted run "
                         "averages over all tokens")


def tokenizer_keywords(spec: dict) -> None:
    """XTuner passes every tokenizer_config key to AutoTokenizer.from_pretrained: those the spec has no key
    for go to ``from_pretrained_kwargs``."""
    from rlhf_launch.core.config import TokenizerConfig

    known = set(TokenizerConfig.__dataclass_fields__)
    holders = [("tokenizer_config", spec)] + [
        ("tokenizer_config", model) for model in (spec.get("model_configs") or {}).values() if isinstance(model, dict)
    ]
    for key, holder in holders:
        config = holder.get(key)
        if not isinstance(config, dict):
            continue
        extra = {name: config.pop(name) for name in list(config) if name not in known}
        if extra:
            config.setdefault("from_pretrained_kwargs", {}).update(extra)



def remote_code(spec: dict, notes: list[str]) -> None:
    """XTuner loads every model and tokenizer with their own code allowed to run (trust_remote_code=True): so does
    the converted run, with ``trust_remote_code: true`` on each model (after its model_path), on the job's
    tokenizer_config and on each model's own; a value the config wrote itself is kept."""
    models = spec.get("model_configs") if isinstance(spec.get("model_configs"), dict) else {}
    for model in models.values():
        if isinstance(model, dict) and "trust_remote_code" not in model:
            at = list(model).index("model_path") + 1 if "model_path" in model else len(model)
            items = list(model.items())
            model.clear()
            model.update(items[:at] + [("trust_remote_code", True)] + items[at:])
        if isinstance(model, dict) and isinstance(model.get("tokenizer_config"), dict):
            model["tokenizer_config"].setdefault("trust_remote_code", True)
    tokenizer = spec.get("tokenizer_config")
    if tokenizer is None:
        spec["tokenizer_config"] = {"trust_remote_code": True}
    elif isinstance(tokenizer, dict):
        tokenizer.setdefault("trust_remote_code", True)
    notes.append("model_configs.*.trust_remote_code and tokenizer_config.trust_remote_code written as true: XTuner loads every "
                 "model and tokenizer with trust_remote_code=True, which InternLM2's need (set false for models that run on "
                 "transformers' own code)")
