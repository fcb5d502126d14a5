"""Reading the resolved spec a run folder holds (``RUN_DIR/spec.yaml``).

The launcher validates a user's spec, fills every default that depends on other keys, and
writes the result into the run folder; worker ranks read only that file, through here. It is
checked against the JSON Schema once more (a hand-edited run spec must not train on a
silently dropped key) but the launcher's checks and messages are not needed again.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import jsonschema
import yaml

from rlhf.core import schema
from rlhf.core.config import JobSpec
from rlhf.core.plan import Plan, build_plan
from rlhf.core.yaml_io import SpecLoader


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
        return self.path.parent


def load_resolved(path: str | Path) -> ResolvedSpec:
    """Read a resolved spec; raise ``ResolvedSpecError`` naming the file and the first bad key."""
    path = Path(path).resolve()
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=SpecLoader)
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise ResolvedSpecError(f"{path}: cannot read the run's spec: {getattr(exc, 'strerror', None) or exc}") from None
    try:
        jsonschema.validate(data, schema.job_schema())
    except jsonschema.ValidationError as exc:
        where = ".".join(str(p) for p in exc.absolute_path) or "(top level)"
        raise ResolvedSpecError(f"{path}: {where}: {exc.message} (the run folder's spec is written by rlhf-launch; start the run from your own spec)") from None
    spec = schema.from_dict(JobSpec, data)
    return ResolvedSpec(spec, build_plan(spec), path)
