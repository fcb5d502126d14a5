"""DeepSpeed configs in converted XTuner specs: the precision spelling and the batch keys.

XTuner passes ``deepspeed_config`` to DeepSpeed as it is. Its documented ``bf16: {enable: ...}`` was
therefore ignored (DeepSpeed reads ``enabled``); and its batch keys were written by hand next to
train_config. A converted spec spells ``enabled`` and leaves out batch keys that disagree with
train_config: the engine derives them when left out (``rlhf_launch/runtime/engine.py``, checked by
``rlhf_launch/frontend/checks.py``).
"""

from __future__ import annotations

from typing import Any

from rlhf_launch.core.config import TRAINED
from rlhf_launch.core.problems import show
from rlhf_launch.frontend.convert.map import get

_INFERENCE_MICRO = {"reference": ("repeater_config.ref_micro_bs", 8), "reward": ("rollout_config.reward_micro_bs", 32)}
BATCH_KEYS = ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size")


def fix_deepspeed(spec: dict, notes: list[str]) -> None:
    """Rewrite ``enable`` to ``enabled`` and drop disagreeing batch keys in every model's deepspeed_config."""
    models = spec.get("model_configs")
    if not isinstance(models, dict):
        return
    for role, model in models.items():
        ds = get(model, "trainer_config.deepspeed_config", None) if isinstance(model, dict) else None
        if not isinstance(ds, dict):
            continue
        where = f"model_configs.{role}.trainer_config.deepspeed_config"
        _precision(ds, where, notes)
        _batch_keys(spec, role, ds, where, notes)


def _precision(ds: dict, where: str, notes: list[str]) -> None:
    for section in ("bf16", "fp16"):
        block = ds.get(section)
        if not isinstance(block, dict) or "enable" not in block:
            continue
        value = block.pop("enable")
        if "enabled" in block:
            notes.append(f"{where}.{section}.enable ({show(value)}) dropped: DeepSpeed reads only {section}.enabled "
                         f"({show(block['enabled'])}), as does the converted run")
            continue
        block["enabled"] = value
        notes.append(f"{where}.{section}.enable ({show(value)}) rewritten as {section}.enabled: DeepSpeed reads only 'enabled', "
                     "so XTuner's own run had ignored this setting")


def expected_batch_keys(spec: dict, role: str) -> dict[str, Any]:
    """The batch keys DeepSpeed gets for ``role`` (``None`` where they do not divide): from train_config for a
    trained model, from its inference micro batch (one per rank) for the reference and reward."""
    model = spec["model_configs"][role]
    dp = get(model, "trainer_config.parallel.data.size", 1)
    if role in TRAINED:
        micro = get(spec, f"train_config.{role}_micro_bs", None) or get(model, "trainer_config.train_kwargs.micro_bsz", None) or 1
        total = get(spec, "train_config.ppo_minibatch" if role == "actor" else "train_config.value_minibatch", 64)
    else:
        path, default = _INFERENCE_MICRO[role] if role in _INFERENCE_MICRO else (None, 1)
        micro = get(spec, path, default) if path else default
        total = micro * dp if isinstance(micro, int) and isinstance(dp, int) else None
    if not all(isinstance(v, int) and v > 0 for v in (dp, micro, total)):
        return {}
    steps = total // (dp * micro) if total % (dp * micro) == 0 else None
    return {"train_micro_batch_size_per_gpu": micro, "gradient_accumulation_steps": steps, "train_batch_size": total}


def _batch_keys(spec: dict, role: str, ds: dict, where: str, notes: list[str]) -> None:
    expected = expected_batch_keys(spec, role)
    dropped = {key: ds[key] for key in BATCH_KEYS if key in ds and key in expected and ds[key] != expected[key]}
    if not dropped:
        return
    for key in dropped:
        del ds[key]
    found = ", ".join(f"{key} {show(value)}" for key, value in dropped.items())
    derived = ", ".join(f"{key} {expected[key]}" for key in dropped if expected[key] is not None)
    notes.append(f"{where}: {found} dropped: they disagree with the batch sizes, from which they are derived"
                 + (f" ({derived})" if derived else ""))
