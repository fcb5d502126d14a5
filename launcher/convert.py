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


def _move_trainer_dtype(models: dict) -> None:
    """Some XTuner configs put torch_dtype inside trainer_config; the spec has it on the model."""
    for model in models.values():
        if not isinstance(model, dict):
            continue
        trainer = model.get("trainer_config")
        if isinstance(trainer, dict) and "torch_dtype" in trainer and "torch_dtype" not in model:
            model["torch_dtype"] = trainer.pop("torch_dtype")


def run_name(path: Path) -> str:
    """``run.name`` for a config file: its stem, '_' for characters a run name cannot hold, at most 64 long."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", path.stem)[:64] or "rlhf"


def convert_file(path: str | Path) -> dict[str, Any]:
    """Execute an XTuner config and return the spec dict (not yet validated)."""
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
    _move_trainer_dtype(sections["model_configs"])
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
