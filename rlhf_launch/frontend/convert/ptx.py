"""XTuner's PPO-ptx keys as the spec's ``pretrain_dataset_config`` and ``train_config.pretrain_loss_weight``.

XTuner spelled pretraining data three ways, and each version counted and used it differently (read from
its code on the branch of PR #736):

- gen-1 (``dataset_config.pt_datas``, ``pt_data_samples``; commit 0e1453a): ``num_samples_each_epoch``
  counts the pretraining samples too, so a step has ``num_samples_each_epoch - pt_data_samples`` prompts
  (``dataset/txt_loader.py``); its trainer never trains on them and swallows ``pretrain_loss_weight``.
- in-between (``dataset_config.pretrain_datasets``, ``pretrain_samples_each_epoch``, ``max_pretrain_len``;
  commit 14ea454): prompts and pretraining samples are counted apart; weight default 0.5.
- later (``pretrain_dataset_config``; 72ede3b to the PR head): counted apart; weight default 0.5; its
  rollout fills the pretraining batch with copies of the step's last prompt (``envs/txt_env.py``), a bug.

In the two formats that train on it, every policy update of a step trains on the step's whole pretraining
batch and sums the per-micro-batch mean losses of both terms. This project spreads the step's pretraining
batch over the updates and weighs the mean token NLL by the weight; the conversion keeps the pretraining
sequences per update equal to XTuner's and notes how the weight balanced differently.
"""

from __future__ import annotations

import math
from typing import Any

from rlhf_launch.core.problems import show
from rlhf_launch.frontend.convert.load import Call, ConvertError
from rlhf_launch.frontend.convert.map import _MISSING, _short, get, pop, put
from rlhf_launch.frontend.convert.tables import GEN1, WHOLE_BATCH, XTUNER_DEFAULTS

PTX = "PPO-ptx (a pretraining loss mixed into the policy update)"
XTUNER_WEIGHT = 0.5  # PPOTrainer's pretrain_loss_weight default (trainer/ppo.py, 14ea454 to 1a284ff)
XTUNER_MAX_LEN = 4096  # MessageIter's max_len and the in-between loader's max_pretrain_len default
XTUNER_SEED = 110  # MessageIter's random_seed default
CRITERIA = ("pretrain_criterion", "pt_criterion")
_NO_SMOOTHING = (None, 0, 0.0)

# Where each spelling keeps (datas, samples, max length, seed); a max length or seed of None is shared with
# the prompts' (dataset_config.max_seq_len, random_seed), as gen-1's single loader does.
_SPELLINGS = {
    "gen-1": ("dataset_config.pt_datas", "dataset_config.pt_data_samples", None, None),
    "in-between": ("dataset_config.pretrain_datasets", "dataset_config.pretrain_samples_each_epoch",
                   "dataset_config.max_pretrain_len", None),
    "later": ("pretrain_dataset_config.message_datasets", "pretrain_dataset_config.samples_each_epoch",
              "pretrain_dataset_config.max_len", "pretrain_dataset_config.random_seed"),
}


def map_pretraining(spec: dict, fmt: str, notes: list[str]) -> None:
    """Convert the pretraining keys of any spelling (after the renames, before XTuner's defaults are written):
    into the spec's PPO-ptx when XTuner had pretraining data and a weight above 0, else drop them, one note each."""
    spelling = _spelling(spec)
    section = spec.get("pretrain_dataset_config") if spelling == "later" else None
    if spelling == "later":
        if not isinstance(section, dict):
            raise ConvertError(f"pretrain_dataset_config: found {_short(section)}, expected a dict(samples_each_epoch=..., ...)")
        kind = section.pop("message_type", "pretrain")
        if kind != "pretrain":  # XTuner's rollout asserts it
            raise ConvertError(f"pretrain_dataset_config.message_type: found {show(kind)}, expected 'pretrain'")
    datas_key, samples_key, len_key, seed_key = _SPELLINGS.get(spelling, _SPELLINGS["gen-1"])
    datas, samples = get(spec, datas_key, None), get(spec, samples_key, None)
    if spelling == "gen-1" and samples:
        _gen1_prompts(spec, samples, notes)
    has_data = bool(datas) and bool(samples) and not (isinstance(samples, (int, float)) and samples < 0)
    weight = get(spec, "train_config.pretrain_loss_weight", _MISSING)
    written = weight is not _MISSING
    if not written:  # gen-1's trainer has no weight (and no pretraining loss); the later ones default to 0.5
        weight = None if spelling == "gen-1" else XTUNER_WEIGHT
    if not has_data or not weight:
        _drop_all(spec, spelling, _why_off(has_data, weight, spelling), notes)
        return
    leftover = {k: v for k, v in (section or {}).items() if k not in ("message_datasets", "samples_each_epoch", "max_len",
                                                                       "random_seed", "sample_strategy")}
    strategy = section.pop("sample_strategy", _MISSING) if section else _MISSING
    if strategy is not _MISSING:
        notes.append(f"pretrain_dataset_config.sample_strategy ({show(strategy)}) dropped: each step draws every pretraining "
                     "text's source at random by the normalised weights (no per-source quota)")
    max_len = get(spec, len_key, _MISSING) if len_key else get(spec, "dataset_config.max_seq_len", _MISSING)
    seed = get(spec, seed_key, _MISSING) if seed_key else get(spec, "dataset_config.random_seed", _MISSING)
    for key in (datas_key, samples_key, len_key, seed_key):
        if key:
            pop(spec, key)
    spec.pop("pretrain_dataset_config", None)
    per_update, updates = samples, _policy_updates(spec, fmt)
    spec["pretrain_dataset_config"] = {
        "pretrain_datas": [_source(entry, notes) for entry in datas] if isinstance(datas, list) else datas,
        "num_samples_each_epoch": per_update * max(updates, 1) if isinstance(per_update, int) else per_update,
        "max_seq_len": XTUNER_MAX_LEN if max_len is _MISSING else max_len,
        "random_seed": XTUNER_SEED if seed is _MISSING else seed,
        **leftover,  # unknown keys stay, so that validation names them
    }
    put(spec, "train_config.pretrain_loss_weight", weight)
    _criteria(spec, notes)
    _on_notes(spec, fmt, spelling, (weight, written), samples, updates, notes)


def _spelling(spec: dict) -> str:
    """Which of XTuner's spellings the config uses; more than one at once is refused."""
    found = []
    if "pretrain_dataset_config" in spec:
        found.append("later")
    dataset = spec.get("dataset_config") if isinstance(spec.get("dataset_config"), dict) else {}
    if {"pretrain_datasets", "pretrain_samples_each_epoch", "max_pretrain_len"} & set(dataset):
        found.append("in-between")
    if {"pt_datas", "pt_data_samples"} & set(dataset):
        found.append("gen-1")
    if len(found) > 1:
        raise ConvertError(f"the config gives pretraining data in {' and '.join(found)} spellings of XTuner at once; keep one")
    return found[0] if found else "none"


def _gen1_prompts(spec: dict, samples: Any, notes: list[str]) -> None:
    """Gen-1's num_samples_each_epoch counts the pretraining samples: the spec's counts the prompts only."""
    total = get(spec, "dataset_config.num_samples_each_epoch", 64)  # gen-1 loader's default
    if not isinstance(samples, int) or not isinstance(total, int) or not 0 < samples < total:
        raise ConvertError(f"dataset_config.pt_data_samples: found {show(samples)}, expected fewer than "
                           f"num_samples_each_epoch ({show(total)}), which counts the prompts and the pretraining samples")
    put(spec, "dataset_config.num_samples_each_epoch", total - samples)
    notes.append(f"dataset_config.num_samples_each_epoch ({total}): XTuner's gen-1 loader counts the {samples} pretraining "
                 f"samples in it, so its steps had {total - samples} prompts; written as {total - samples}")


def _why_off(has_data: bool, weight: Any, spelling: str) -> str:
    if not has_data:
        return f"there is no pretraining data (or 0 samples per step), so {PTX} is off, as in XTuner"
    if weight is None and spelling == "gen-1":
        return ("XTuner's gen-1 trainer never trains on pretraining samples (it has no pretraining loss); "
                "set train_config.pretrain_loss_weight > 0 for PPO-ptx")
    return f"train_config.pretrain_loss_weight is {show(weight)}, so {PTX} is off, as in XTuner"


def _drop_all(spec: dict, spelling: str, why: str, notes: list[str]) -> None:
    """Today's behaviour for a run without PPO-ptx: every pretraining key dropped, one note each."""
    paths = ["pretrain_dataset_config"] if spelling == "later" else [
        key for keys in _SPELLINGS.values() for key in keys if key and key.startswith("dataset_config.")]
    paths += ["train_config.pretrain_loss_weight"] + [f"train_config.{key}" for key in CRITERIA]
    for path in paths:
        value = pop(spec, path)
        if value is not _MISSING:
            notes.append(f"{path} ({_short(value)}) dropped: {why}")


def _policy_updates(spec: dict, fmt: str) -> int:
    """XTuner's policy updates per step: policy_learn_time x (prompts // policy minibatch), remainder dropped."""
    prompts, minibatch = get(spec, "dataset_config.num_samples_each_epoch", 64), _minibatch(spec, fmt)
    learn_time = get(spec, "train_config.policy_learn_time", 1)
    if not all(isinstance(v, int) and v > 0 for v in (prompts, minibatch, learn_time)):
        return 1  # validation reports the bad value itself
    return learn_time * (prompts // minibatch)


def _minibatch(spec: dict, fmt: str) -> Any:
    """The policy minibatch, XTuner's default where the config leaves it out (written later by write_defaults)."""
    minibatch = get(spec, "train_config.ppo_minibatch", _MISSING)
    if minibatch is _MISSING:
        default = XTUNER_DEFAULTS["train_config.ppo_minibatch"][fmt]
        minibatch = get(spec, "dataset_config.num_samples_each_epoch", 64) if default == WHOLE_BATCH else default
    return minibatch


def _source(entry: Any, notes: list[str]) -> Any:
    """'[HF]<id>::<prob>' (later) or '<path>::<prob>' as the spec writes it: '<id>::<prob>'. A system prompt
    named after it is dropped: XTuner's pretraining texts never get one."""
    if not isinstance(entry, str):
        return entry
    source, sep, extra = entry.replace("[HF]", "", 1).partition("::")
    weight, bracket, _ = extra.partition("[")
    if bracket:
        notes.append(f"pretrain_dataset_config: {entry!r}: the prompt names after the weight are dropped: XTuner puts no "
                     "system prompt before pretraining text")
    return f"{source}{sep}{weight}"


def _criteria(spec: dict, notes: list[str]) -> None:
    """``PretrainLoss(label_smoothing=0)`` is the spec's language-model loss; other arguments are refused by name."""
    for key in CRITERIA:
        where, call = f"train_config.{key}", pop(spec, f"train_config.{key}")
        if call is _MISSING:
            continue
        if call is None:  # gen-1's default: no loss object, the plain language-model loss
            notes.append(f"{where} (null) dropped: the converted run's pretraining loss is the mean token NLL")
            continue
        if not isinstance(call, Call) or call.args:
            raise ConvertError(f"{where}: found {_short(call)}, expected a loss object called with keywords, "
                               "e.g. PretrainLoss(label_smoothing=0)")
        for name, value in call.kwargs.items():
            if name != "label_smoothing" or value not in _NO_SMOOTHING:
                raise ConvertError(f"{where}: {call.name}({name}={value!r}) is not supported yet; remove {name}")
        notes.append(f"{where} ({call!r}) converted to the spec's pretraining loss, the mean token NLL")


def _on_notes(spec: dict, fmt: str, spelling: str, weight_written: tuple[Any, bool], per_update: Any, updates: int,
              notes: list[str]) -> None:
    """One note per way the converted PPO-ptx differs from XTuner's run (``weight_written``: the weight and whether
    the config set it)."""
    weight, written = weight_written
    if not written:
        notes.append(f"train_config.pretrain_loss_weight: not set; XTuner's default, {show(weight)}, is written")
    if spelling == "gen-1":
        notes.append("train_config.pretrain_loss_weight: XTuner's gen-1 trainer swallows it and never trains on the pretraining "
                     f"samples; the converted run does {PTX} as written")
    if spelling == "later":
        notes.append("pretrain_dataset_config: XTuner's later rollout fills the pretraining batch with copies of the step's last "
                     "prompt instead of the pretraining texts (a bug in envs/txt_env.py); the converted run trains on the texts")
    if updates > 1 and isinstance(per_update, int):
        notes.append(f"pretrain_dataset_config.num_samples_each_epoch: XTuner trains on the same {per_update} pretraining samples "
                     f"in each of its {updates} policy updates per step; written as {per_update * updates}, {per_update} new "
                     "ones per update")
    _balance_note(spec, weight, per_update, _minibatch(spec, fmt), notes)
    notes.append("pretrain_dataset_config.max_seq_len: XTuner skips pretraining texts longer than this (and those of 4 tokens "
                 "or fewer); the converted run keeps their first max_seq_len tokens")


def _balance_note(spec: dict, weight: Any, per_update: Any, minibatch: Any, notes: list[str]) -> None:
    """XTuner backpropagates each micro batch's mean loss and sums them, so the pretraining term's share grows with
    its micro-batch count; the spec's update weighs two means. Noted with XTuner's effective weight when they differ."""
    dp = get(spec, "model_configs.actor.trainer_config.parallel.data.size", 1)
    micro = get(spec, "train_config.actor_micro_bs", XTUNER_DEFAULTS["train_config.actor_micro_bs"][GEN1])
    values = (dp, micro, minibatch, per_update)
    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in values) or isinstance(weight, bool):
        return
    ppo_micro = math.ceil(math.ceil(minibatch / dp) / micro)
    pt_micro = math.ceil(math.ceil(per_update / dp) / micro)
    if ppo_micro == pt_micro:
        return
    effective = weight * pt_micro / ppo_micro
    notes.append(f"train_config.pretrain_loss_weight ({show(weight)}): XTuner sums per-micro-batch mean losses, so its "
                 f"pretraining term ({pt_micro} micro batches) weighed {show(weight)} x {pt_micro}/{ppo_micro} = {effective:g} "
                 f"against the PPO loss ({ppo_micro}); the converted run weighs the mean token NLL by {show(weight)} as written: "
                 f"set {effective:g} for XTuner's balance")
