"""XTuner-RLHF Python configs -> YAML specs (``rlhf-launch convert``).

The config file is EXECUTED (it is Python; see ``load``), and its module-level dicts become the
spec's sections. Both of XTuner's formats convert: gen-1 (``actor``, ``dataset_config``) and the later
one (``policy``, ``prompt_dataset_config``). What happens to each XTuner key is data, in ``tables``;
``map``, ``ptx`` (the pretraining keys), ``deepspeed`` and ``notes`` apply it, in the order
``convert_file`` below fixes. Everything the user should know about the conversion becomes one note
line; the result is then validated.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from rlhf_launch.core import yaml_io
from rlhf_launch.core.config import JobSpec
from rlhf_launch.core.problems import show
from rlhf_launch.frontend.convert.deepspeed import fix_deepspeed
from rlhf_launch.frontend.convert.load import Call, ConvertError, Dtype, Stub, execute
from rlhf_launch.frontend.convert.map import (
    apply_renames,
    detect_format,
    drop_ignored,
    drop_unread_micro_batch,
    from_later_format,
    map_criteria,
    refuse_unsupported,
    sequence_parallel,
    write_defaults,
)
from rlhf_launch.frontend.convert.notes import behaviour_notes, remote_code, tokenizer_keywords
from rlhf_launch.frontend.convert.ptx import map_pretraining
from rlhf_launch.frontend.convert.tables import LATER

__all__ = ["ConvertError", "convert_file", "run_name", "to_yaml"]

SECTION_ORDER = [f.name for f in JobSpec.__dataclass_fields__.values()]


def _plain(value: Any, where: str, *, foreign_ok: bool) -> Any:
    """Config values as YAML can hold them; stubbed names and loss objects pass while ``foreign_ok``."""
    if isinstance(value, Dtype):
        return value.name
    if isinstance(value, dict):
        return {str(k): _plain(v, f"{where}.{k}", foreign_ok=foreign_ok) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v, f"{where}.{i}", foreign_ok=foreign_ok) for i, v in enumerate(value)]
    if isinstance(value, float) and value.is_integer() and abs(value) >= 1e6:
        return int(value)  # 1e9 step counts are integers written as floats
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if foreign_ok and isinstance(value, (Stub, Call)):
        return value
    if isinstance(value, (Stub, Call)):
        raise ConvertError(f"{where}: found {value!r} from a stubbed import, which a YAML spec cannot hold; write the value itself")
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
    the conversion (a key XTuner ignored, a default written out, ...) is appended to ``notes``, one line each."""
    path = Path(path)
    notes = notes if notes is not None else []
    if not path.is_file():
        raise ConvertError(f"{path}: no such file")
    sections = _sections(execute(path, notes))
    if "model_configs" not in sections:
        raise ConvertError(f"{path}: no module-level model_configs dict; is this an XTuner-RLHF config?")
    _convert_sections(sections, notes)
    run = sections.pop("run", {})
    spec: dict[str, Any] = {"run": {"name": run_name(path), **(run if isinstance(run, dict) else {})}}
    for name in SECTION_ORDER:
        if name in sections:
            spec[name] = sections.pop(name)
    spec.update(sections)  # unknown sections stay, so that validation names them
    return _plain(spec, "", foreign_ok=False)


def _sections(namespace: dict[str, Any]) -> dict[str, Any]:
    """The config's module-level dicts (upper-case constants and ``_helpers`` excepted), as plain data."""
    return {
        name: _plain(value, name, foreign_ok=True)
        for name, value in namespace.items()
        if isinstance(value, dict) and not name.startswith("_") and not name.isupper()
    }


def _convert_sections(spec: dict[str, Any], notes: list[str]) -> None:
    """Every step of the conversion, in order: later spellings, PPO-ptx, refused and dropped keys, XTuner's
    defaults, then notes on what behaves differently, remote code allowed as XTuner allows it, and the DeepSpeed
    fixes (which need the batch sizes)."""
    fmt = detect_format(spec)
    if fmt == LATER:
        from_later_format(spec, notes)
    written = {name: set(section) for name, section in spec.items() if isinstance(section, dict)}
    apply_renames(spec)
    map_pretraining(spec, fmt, notes)  # before the minibatch defaults: it derives gen-1's prompt count
    refuse_unsupported(spec, notes)
    map_criteria(spec, notes)
    drop_ignored(spec, notes)
    sequence_parallel(spec)
    if isinstance(spec["model_configs"], dict):
        _map_model_keys(spec["model_configs"], notes)
    write_defaults(spec, fmt, notes)
    drop_unread_micro_batch(spec)
    behaviour_notes(spec, fmt, written, notes)
    tokenizer_keywords(spec)
    remote_code(spec, notes)
    fix_deepspeed(spec, notes)


def to_yaml(spec: dict[str, Any]) -> str:
    """A spec dict as YAML text, keys in their given order."""
    return yaml_io.dump(spec)
