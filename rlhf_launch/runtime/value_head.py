"""Finding a value head in a checkpoint, whatever it is called.

Hugging Face sequence-classification models keep their one-output head as ``score``, but
reward and value checkpoints of other trainers name it otherwise: ``v_head`` (InternLM2 reward
models, XTuner), ``value_head`` (OpenLLMAI / OpenRLHF reward models), ``v_head.summary`` (TRL's
value-head wrapper). Loaded through ``AutoModelForSequenceClassification`` such a checkpoint
gets a fresh random ``score`` and no warning that matters, so its rewards are noise. Here the
head is looked up by name (``model_configs.<role>.head_name``, else the known names) and
copied into ``score``; a reward model whose head cannot be found is refused, naming the
tensors outside the base model that the checkpoint does have.

A reward model that is its own class (InternLM2's: a decoder and a ``v_head``, loaded through its
``auto_map``'s AutoModel entry, rlhf_launch/runtime/models.py) keeps its head where it is: the model
records the head's name (``value_head`` reads it, ``set_value_head`` replaces the module there), and
the runtime reads every value and score through that name.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import PreTrainedModel

from rlhf_launch.core.checkpoint_index import KNOWN_HEADS, checkpoint_files, head_keys
from rlhf_launch.core.problems import InputError


class ValueHeadError(InputError, ValueError):
    """A reward or critic checkpoint whose value head cannot be found."""


HEAD_ATTRIBUTE = "_rlhf_value_head"  # where a value model records the name of its head module


def value_head_name(model: torch.nn.Module) -> str:
    """The name of ``model``'s value head module: ``score`` unless the model records another (its own class's head)."""
    return getattr(model, HEAD_ATTRIBUTE, "score")


def value_head(model: torch.nn.Module) -> torch.nn.Module:
    """The one-output value head of a value model (``score``, or its own class's head by name)."""
    return model.get_submodule(value_head_name(model))


def set_value_head(model: torch.nn.Module, head: torch.nn.Module, name: str | None = None) -> None:
    """Make ``head`` the value head of ``model``, under ``name`` (recorded) or where the current head is."""
    if name is not None:
        object.__setattr__(model, HEAD_ATTRIBUTE, name)  # a plain attribute: not a parameter, buffer or module
    parent, _, leaf = value_head_name(model).rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, head)


def _read(files: list[Path], names: set[str] | None) -> dict[str, torch.Tensor]:
    """Tensors of the checkpoint (all, or only ``names``); safetensors reads just those."""
    from safetensors import safe_open

    found: dict[str, torch.Tensor] = {}
    for file in files:
        if file.suffix == ".safetensors":
            with safe_open(str(file), framework="pt") as f:
                for key in f.keys():
                    if names is None or key in names:
                        found[key] = f.get_slice(key) if names is None else f.get_tensor(key)
        else:
            state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
            found.update({k: v for k, v in state.items() if names is None or k in names})
    return found


def _shape(value) -> list[int]:
    return list(value.get_shape()) if hasattr(value, "get_shape") else list(value.shape)


def install_value_head(
    model: PreTrainedModel, path: str, missing_keys: list[str], head_name: str | None, role: str
) -> str:
    """Make the model's value head (``value_head``) the checkpoint's; returns where it came from.

    ``missing_keys`` are those ``from_pretrained`` initialised at random. A critic may start
    from a model without a value head (a fresh head is trained); a reward model may not."""
    current = value_head_name(model)
    head_missing = any(k.startswith(f"{current}.") for k in missing_keys)
    if not head_missing and head_name in (None, current):
        return current
    files = checkpoint_files(path)
    tensors = _read(files, None) if files else {}
    names = set(tensors)
    for head in [head_name] if head_name else KNOWN_HEADS:
        weight_key, bias_key = head_keys(names, head)
        if weight_key is not None:
            _copy_into_score(model, _read(files, {weight_key, *([bias_key] if bias_key else [])}), weight_key, bias_key, path)
            return head
    where = f"model_configs.{role}"
    base = set(model.state_dict())
    # Layer tensors of a differently named base model would crowd out the head-like ones.
    outside = sorted((k for k in names if k not in base), key=lambda k: (".layers." in k, k))
    described = ", ".join(f"{k!r} {_shape(tensors[k])}" for k in outside[:8]) or "none"
    wanted = repr(head_name) if head_name else f"any of {', '.join(repr(h) for h in KNOWN_HEADS)}"
    if role == "critic" and head_name is None:
        print(f"rlhf: {where}: {path} has no value head ({wanted}); the critic starts from a new head", flush=True)
        return "new"
    raise ValueHeadError(
        f"{where}.model_path: {path} has no value head named {wanted}, so it would score at random; "
        f"tensors outside the base model: {described}. Set {where}.head_name to the head's name"
    )


def _copy_into_score(model: PreTrainedModel, tensors: dict, weight_key: str, bias_key: str | None, path: str) -> None:
    weight = tensors[weight_key]
    score = value_head(model)
    if weight.dim() == 1:
        weight = weight.unsqueeze(0)
    if tuple(weight.shape) != tuple(score.weight.shape):
        raise ValueHeadError(f"{path}: {weight_key} has shape {list(weight.shape)}, expected {list(score.weight.shape)} (one output)")
    if bias_key is not None and score.bias is None:
        # Llama-style score layers have no bias; a head trained with one needs it kept.
        score = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=True, device=score.weight.device, dtype=score.weight.dtype)
        set_value_head(model, score)
    with torch.no_grad():
        score.weight.copy_(weight)
        if bias_key is not None:
            score.bias.copy_(tensors[bias_key].reshape(score.bias.shape))
