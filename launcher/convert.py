"""XTuner-RLHF Python configs -> YAML specs.

The config file is EXECUTED (it is Python), with a small stand-in for ``torch`` that
provides dtypes such as ``torch.bfloat16``, so that converting needs no torch install.
Its module-level dicts become the spec's sections; everything is then validated.
"""

from __future__ import annotations

import re
import runpy
import sys
import types
from pathlib import Path
from typing import Any

from rlhf.core import yaml_io
from rlhf.core.config import JobSpec
from rlhf.core.problems import show

SECTION_ORDER = [f.name for f in JobSpec.__dataclass_fields__.values()]
_DTYPES = ("float32", "float16", "bfloat16", "float64", "half", "float", "bfloat")
_DTYPE_ALIASES = {"half": "float16", "float": "float32"}


class ConvertError(Exception):
    """An XTuner config that cannot be converted into a spec; the message says why."""


class _Dtype:
    def __init__(self, name: str):
        self.name = _DTYPE_ALIASES.get(name, name)

    def __repr__(self) -> str:
        return f"torch.{self.name}"


def _torch_stand_in() -> types.ModuleType:
    module = types.ModuleType("torch")
    for name in _DTYPES:
        setattr(module, name, _Dtype(name))

    def missing(attr: str) -> Any:
        raise ConvertError(f"the config uses torch.{attr}; converting provides only torch dtypes")

    module.__getattr__ = missing  # type: ignore[attr-defined]
    return module


def _plain(value: Any, where: str) -> Any:
    """Config values as YAML can hold them."""
    if isinstance(value, _Dtype):
        return value.name
    if isinstance(value, dict):
        return {str(k): _plain(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v, f"{where}.{i}") for i, v in enumerate(value)]
    if isinstance(value, float) and value.is_integer() and abs(value) >= 1e6:
        return int(value)  # 1e9 step counts are integers written as floats
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise ConvertError(f"{where}: found {type(value).__name__} {value!r}, which a YAML spec cannot hold")


def _map_model_keys(models: dict, notes: list[str]) -> None:
    """XTuner's spellings of model keys as the spec has them. ``use_flash_attn`` (read by XTuner in
    trainer_config, ignored at model level; the trainer_config one wins) becomes ``attn_implementation``
    (true: flash_attention_2, false: sdpa); ``trainer_config.head_name`` moves to the model's ``head_name``.
    ``trainer_config.torch_dtype`` and ``gradient_checkpointing`` are spec keys as they are."""
    for role, model in models.items():
        if not isinstance(model, dict):
            continue
        where = f"model_configs.{role}"
        trainer = model.get("trainer_config") if isinstance(model.get("trainer_config"), dict) else {}
        outer, inner = model.pop("use_flash_attn", None), trainer.pop("use_flash_attn", None)
        if outer is not None and inner is not None and bool(outer) != bool(inner):
            notes.append(
                f"{where}.use_flash_attn ({show(outer)}) is ignored, as XTuner ignores it; "
                f"trainer_config.use_flash_attn ({show(inner)}) is used"
            )
        flash = inner if inner is not None else outer
        if flash is not None and "attn_implementation" not in model:
            model["attn_implementation"] = "flash_attention_2" if flash else "sdpa"
        if "head_name" in trainer:
            head = trainer.pop("head_name")
            if model.setdefault("head_name", head) != head:
                raise ConvertError(
                    f"{where}: head_name {model['head_name']!r} and trainer_config.head_name {head!r} differ; "
                    "keep the value head's real name"
                )


def run_name(path: Path) -> str:
    """``run.name`` for a config file: its stem, '_' for characters a run name cannot hold, at most 64 long."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", path.stem)[:64] or "rlhf"


def convert_file(path: str | Path, notes: list[str] | None = None) -> dict[str, Any]:
    """Execute an XTuner config and return the spec dict (not yet validated); what a user should know about
    the conversion (a key XTuner ignored, ...) is appended to ``notes``, one line each."""
    path = Path(path)
    if not path.is_file():
        raise ConvertError(f"{path}: no such file")
    saved = sys.modules.get("torch")
    sys.modules["torch"] = _torch_stand_in()
    try:
        namespace = runpy.run_path(str(path), run_name="__xtuner_config__")
    except ConvertError:
        raise
    except SystemExit as exc:
        raise ConvertError(f"{path}: the config exited ({exc.code})") from None
    except Exception as exc:  # the file is the user's code: any error is reported, not raised
        raise ConvertError(f"{path}: executing the config failed: {type(exc).__name__}: {exc}") from None
    finally:
        if saved is not None:
            sys.modules["torch"] = saved
        else:
            sys.modules.pop("torch", None)
    sections = {
        name: _plain(value, name)
        for name, value in namespace.items()
        if isinstance(value, dict) and not name.startswith("_") and not name.isupper() and name != "__builtins__"
    }
    if "model_configs" not in sections:
        raise ConvertError(f"{path}: no module-level model_configs dict; is this an XTuner-RLHF config?")
    if isinstance(sections["model_configs"], dict):
        _map_model_keys(sections["model_configs"], notes if notes is not None else [])
    run = sections.pop("run", {})
    spec: dict[str, Any] = {"run": {"name": run_name(path), **(run if isinstance(run, dict) else {})}}
    for name in SECTION_ORDER:
        if name in sections:
            spec[name] = sections.pop(name)
    spec.update(sections)  # unknown sections stay, so that validation names them
    return spec


def to_yaml(spec: dict[str, Any]) -> str:
    """A spec dict as YAML text, keys in their given order."""
    return yaml_io.dump(spec)
