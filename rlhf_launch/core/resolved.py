"""Resolving a spec (every default that depends on other keys, paths made absolute) and
reading the resolved spec a run folder holds (``RUN_DIR/spec.yaml``).

The launcher validates a user's spec, fills every default that depends on other keys, and
writes the result into the run folder; worker ranks read only that file, through here. It is
checked against the JSON Schema once more (a hand-edited run spec must not train on a
silently dropped key) but the launcher's checks and messages are not needed again.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import yaml

from rlhf_launch.core import schema
from rlhf_launch.core.config import TRAINED, JobSpec, TrainKwargs
from rlhf_launch.core.data_sources import looks_local, parse_source
from rlhf_launch.core.plan import Plan, build_plan
from rlhf_launch.core.yaml_io import SpecLoader


class ResolvedSpecError(ValueError):
    """A run folder's spec that cannot be read, with the file and key named."""


@dataclass(frozen=True)
class ResolvedSpec:
    """A run's spec and the resource plan every rank derives from it."""

    spec: JobSpec
    plan: Plan
    path: Path

    @property
    def run_dir(self) -> Path:
        """The run folder: the one holding the spec file."""
        return self.path.parent


def load_resolved(path: str | Path) -> ResolvedSpec:
    """Read a resolved spec; raise ``ResolvedSpecError`` naming the file and the first bad key."""
    path = Path(path).resolve()
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=SpecLoader)
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise ResolvedSpecError(f"{path}: cannot read the run's spec: {getattr(exc, 'strerror', None) or exc}") from None
    import jsonschema  # here, not above: resolve() also serves machines without it

    try:
        jsonschema.validate(data, schema.job_schema())
    except jsonschema.ValidationError as exc:
        where = ".".join(str(p) for p in exc.absolute_path) or "(top level)"
        raise ResolvedSpecError(
            f"{path}: {where}: {exc.message} "
            "(the run folder's spec is written by rlhf-launch; start the run from your own spec)"
        ) from None
    spec = schema.from_dict(JobSpec, data)
    return ResolvedSpec(spec, build_plan(spec), path)


def _resolve_path(value: str, base_dir: Path) -> str:
    """Local paths become absolute (relative ones are relative to the spec file); ids stay."""
    if value.startswith("~"):
        return str(Path(value).expanduser())
    if looks_local(value) or (base_dir / value).exists():
        return str((base_dir / value).resolve()) if not Path(value).is_absolute() else value
    return value


def resolve(spec: JobSpec, base_dir: Path) -> None:
    """Fill every default that depends on other keys, so workers read one explicit spec."""
    models = spec.model_configs.roles()
    for role, model in models.items():
        model.model_type = role
        # One dtype for the runtime to read, wherever the spec gave it (XTuner's configs: in trainer_config).
        model.torch_dtype = model.load_dtype()
        if model.model_path:
            model.model_path = _resolve_path(model.model_path, base_dir)
        if role in TRAINED and model.trainer_config.train_kwargs is None:
            model.trainer_config.train_kwargs = TrainKwargs()
    for role in TRAINED:
        setattr(spec.train_config, f"{role}_micro_bs", spec.train_micro_batch(role))
    for model in models.values():
        own = model.tokenizer_config
        if own is not None:
            own.tokenizer_path = _resolve_path(own.tokenizer_path, base_dir) if own.tokenizer_path else model.model_path
    tok = spec.tokenizer_config
    tok.tokenizer_path = _resolve_path(tok.tokenizer_path, base_dir) if tok.tokenizer_path else spec.model_configs.actor.model_path
    resolved = []
    for entry in spec.dataset_config.ppo_datas:
        src = parse_source(entry)
        resolved.append(replace(src, source=_resolve_path(src.source, base_dir)).entry())
    spec.dataset_config.ppo_datas = resolved
