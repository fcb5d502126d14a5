"""Rewriting an executed XTuner-RLHF config into spec keys, driven by the tables of ``tables``.

Every function takes the spec dict being built (sections as plain dicts) and the list of notes, and
changes the dict in place. The order is fixed by the package's ``convert_file``: later spellings first,
then what is refused or dropped, then XTuner's defaults, then the notes on what behaves differently.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

from rlhf_launch.core.problems import show
from rlhf_launch.frontend.convert.load import Call, ConvertError
from rlhf_launch.frontend.convert.tables import (
    CRITERIA,
    CRITERION_NO_OP,
    DROPPED,
    GEN1,
    LATER,
    RENAMED,
    RENAMED_LATER,
    UNSUPPORTED,
    WHOLE_BATCH,
    XTUNER_DEFAULTS,
)

_MISSING = object()


# --------------------------------------------------------------------------- key paths
def expand(path: str, spec: dict) -> list[str]:
    """``path`` with ``<role>`` replaced by each model under model_configs."""
    if "<role>" not in path:
        return [path]
    models = spec.get("model_configs")
    return [path.replace("<role>", role) for role in models] if isinstance(models, dict) else []


def get(spec: dict, path: str, default: Any = _MISSING) -> Any:
    """The value at a dotted path, or ``default`` when any part is missing."""
    node: Any = spec
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            return default
        node = node[part]
    return node


def pop(spec: dict, path: str) -> Any:
    """Remove and return the value at a dotted path (``_MISSING`` when absent); an emptied section stays."""
    parent, _, key = path.rpartition(".")
    node = get(spec, parent) if parent else spec
    return node.pop(key) if isinstance(node, dict) and key in node else _MISSING


def put(spec: dict, path: str, value: Any, *, create: bool = True) -> bool:
    """Set a dotted path; missing dicts on the way are created when ``create``. Returns whether it was set."""
    *parents, key = path.split(".")
    node = spec
    for part in parents:
        if not isinstance(node.get(part), dict):
            if not create or part in node:
                return False
            node[part] = {}
        node = node[part]
    node[key] = value
    return True


def present(spec: dict, path: str) -> Iterator[tuple[str, Any]]:
    """(concrete path, value) for each expansion of ``path`` that is in the spec."""
    for concrete in expand(path, spec):
        value = get(spec, concrete)
        if value is not _MISSING:
            yield concrete, value


def rename(spec: dict, old: str, new: str) -> None:
    """Move the value at ``old`` to ``new``; refuse when both are set to different values."""
    value = pop(spec, old)
    if value is _MISSING:
        return
    existing = get(spec, new)
    if existing is not _MISSING and existing != value:
        raise ConvertError(f"{old} ({show(value)}) and {new} ({show(existing)}) are the same setting; keep one")
    put(spec, new, value)


# --------------------------------------------------------------------------- later format
def detect_format(spec: dict) -> str:
    """``later`` for XTuner's later format (policy, prompt_dataset_config), else ``gen-1``."""
    models = spec.get("model_configs")
    later = "prompt_dataset_config" in spec or (isinstance(models, dict) and "policy" in models)
    return LATER if later else GEN1


def from_later_format(spec: dict, notes: list[str]) -> None:
    """Rename the later format's keys to gen-1's, which are the spec's."""
    models = spec.get("model_configs")
    if isinstance(models, dict) and "policy" in models:
        if "actor" in models:
            raise ConvertError("model_configs: both policy and actor are set; they are the same model, keep one")
        models["actor"] = models.pop("policy")
        if isinstance(models["actor"], dict) and models["actor"].get("model_type") == "policy":
            models["actor"]["model_type"] = "actor"
        spec["model_configs"] = {role: models[role] for role in ("actor", "reference", "critic", "reward") if role in models} | models
    prompts = spec.get("prompt_dataset_config")
    if isinstance(prompts, dict):
        kind = prompts.pop("message_type", "prompt")
        if kind != "prompt":
            raise ConvertError(f"prompt_dataset_config.message_type: found {show(kind)}, expected 'prompt'")
    for old, new in RENAMED_LATER.items():
        rename(spec, old, new)
    if isinstance(prompts, dict):
        leftover = spec.pop("prompt_dataset_config")
        spec.setdefault("dataset_config", {}).update(leftover)
        datas = get(spec, "dataset_config.ppo_datas")
        if isinstance(datas, list):
            spec["dataset_config"]["ppo_datas"] = [later_source(entry) for entry in datas]
    _inclusive_max_step(spec, notes)


_SUFFIX = re.compile(r"\[(SYS_PROMPT|RM_PROMPT)\]:([^\[]*)")


def later_source(entry: Any) -> Any:
    """'[HF]<id>::<prob>[SYS_PROMPT]:<a>[RM_PROMPT]:<b>' as the spec writes it: '<id>::<prob>[META]:<a>[REWARD_META]:<b>'.
    XTuner's later code gives the reward model the system prompt too when no RM_PROMPT is named."""
    if not isinstance(entry, str):
        return entry
    source, sep, extra = entry.partition("::")
    source = source.replace("[HF]", "", 1)
    names = dict(_SUFFIX.findall(extra))
    weight = _SUFFIX.sub("", extra)
    system, reward = names.get("SYS_PROMPT", "default"), names.get("RM_PROMPT", "default")
    if reward == "default":
        reward = system
    suffix = (f"[META]:{system}" if system != "default" else "") + (f"[REWARD_META]:{reward}" if reward != "default" else "")
    return f"{source}{sep}{weight}{suffix}"


def _inclusive_max_step(spec: dict, notes: list[str]) -> None:
    steps = get(spec, "train_config.max_train_step")
    if isinstance(steps, int) and not isinstance(steps, bool):
        spec["train_config"]["max_train_step"] = steps + 1
        notes.append(
            f"train_config.max_train_step: XTuner counts steps from 0 and runs while step <= {steps}, "
            f"which is {steps + 1} steps; written as {steps + 1}"
        )


# --------------------------------------------------------------------------- refused and dropped keys
def refuse_unsupported(spec: dict, notes: list[str]) -> None:
    """Refuse a key of a feature not built yet, by name; drop it with a note when its value changes nothing."""
    for path, rule in UNSUPPORTED.items():
        for concrete, value in list(present(spec, path)):
            if not rule.no_op(value, spec):
                raise ConvertError(f"{concrete}: {rule.feature} is not supported yet (found {_short(value)}); remove it")
            pop(spec, concrete)
            notes.append(f"{concrete} ({_short(value)}) dropped: this value turns off {rule.feature}, which is not supported yet")


def drop_ignored(spec: dict, notes: list[str]) -> None:
    """Drop the keys XTuner ignores (or that change nothing here), one note each."""
    for path, reason in DROPPED.items():
        for concrete, value in list(present(spec, path)):
            pop(spec, concrete)
            notes.append(f"{concrete} ({_short(value)}) dropped: {reason}")
    for _, model in _models(spec):
        if model.get("model_config") == {}:
            del model["model_config"]  # what is left after its keys moved or were dropped


def apply_renames(spec: dict) -> None:
    """Both formats' keys that the spec spells otherwise."""
    for old, new in RENAMED.items():
        for concrete_old, concrete_new in zip(expand(old, spec), expand(new, spec), strict=True):
            rename(spec, concrete_old, concrete_new)


def map_criteria(spec: dict, notes: list[str]) -> None:
    """Loss objects (``policy_criterion=PPOPolicyLoss(cliprange=0.2)``) become the spec's settings."""
    train = spec.get("train_config")
    if not isinstance(train, dict):
        return
    for key, keywords in CRITERIA.items():
        if key not in train:
            continue
        call, where = train.pop(key), f"train_config.{key}"
        if not isinstance(call, Call) or call.args:
            raise ConvertError(
                f"{where}: found {_short(call)}, expected a loss object called with keywords, e.g. PPOPolicyLoss(cliprange=0.2)"
            )
        for name, value in call.kwargs.items():
            if name in keywords:
                rename_value(spec, f"{where}.{name}", keywords[name], value)
            elif value not in CRITERION_NO_OP.get(name, ()):
                raise ConvertError(f"{where}: {call.name}({name}={value!r}) is not supported yet; remove {name}")
        notes.append(f"{where} ({call!r}) converted to {', '.join(keywords[k] for k in call.kwargs if k in keywords) or 'the defaults'}")


def rename_value(spec: dict, where: str, target: str, value: Any) -> None:
    """Write ``value`` from ``where`` to ``target``, refusing a different value already there."""
    existing = get(spec, target)
    if existing is not _MISSING and existing != value:
        raise ConvertError(f"{where} ({show(value)}) and {target} ({show(existing)}) are the same setting; keep one")
    put(spec, target, value)


def sequence_parallel(spec: dict) -> None:
    """``parallel.sequence=dict(size=N)``: size 1 is the spec's false; more is refused by name."""
    for role, model in _models(spec):
        for prefix, holder in (("trainer_config", model.get("trainer_config")), ("generator_config", model.get("generator_config"))):
            parallel = holder.get("parallel") if isinstance(holder, dict) else None
            sequence = parallel.get("sequence") if isinstance(parallel, dict) else None
            if isinstance(sequence, dict):
                size = sequence.get("size", 1)
                if size != 1:
                    raise ConvertError(
                        f"model_configs.{role}.{prefix}.parallel.sequence.size: sequence parallelism is not supported yet "
                        f"(found {show(size)}); use size 1"
                    )
                parallel["sequence"] = False


# --------------------------------------------------------------------------- XTuner's defaults
def write_defaults(spec: dict, fmt: str, notes: list[str]) -> None:
    """Write XTuner's default where the key is absent and the spec's default differs."""
    batch = get(spec, "dataset_config.num_samples_each_epoch", 64)
    for path, by_format in XTUNER_DEFAULTS.items():
        value = batch if by_format[fmt] == WHOLE_BATCH else by_format[fmt]
        for concrete in expand(path, spec):
            if get(spec, concrete) is _MISSING:
                put(spec, concrete, value, create=not concrete.startswith("model_configs."))
                if concrete.endswith("minibatch") and value > batch:
                    notes.append(f"{concrete}: not set; XTuner's default, {value}, is written (with a rollout batch of {batch}, "
                                 "XTuner's run made no update of that model at all): set it")


def drop_unread_micro_batch(spec: dict) -> None:
    """``train_kwargs.micro_bsz`` where train_config names the micro batch: XTuner never reads it, and
    the spec would only warn that train_config overrides it."""
    for role, model in _models(spec):
        kwargs = get(model, "trainer_config.train_kwargs", None)
        if isinstance(kwargs, dict) and get(spec, f"train_config.{role}_micro_bs", None) is not None:
            kwargs.pop("micro_bsz", None)


def _models(spec: dict) -> Iterator[tuple[str, dict]]:
    models = spec.get("model_configs")
    if isinstance(models, dict):
        yield from ((role, model) for role, model in models.items() if isinstance(model, dict))


def _short(value: Any) -> str:
    text = repr(value) if isinstance(value, Call) else show(value)
    return text if len(text) <= 80 else text[:77] + "..."
