"""Loading a spec: read YAML, apply overrides, validate everything at once, resolve defaults.

``load_spec`` either returns a fully resolved ``LoadedSpec`` or raises ``SpecError`` with
every problem found, each with its key path and line.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from launcher import checks
from launcher.schema_errors import schema_problems
from rlhf.core import schema, yaml_io
from rlhf.core.config import JobSpec, TrainKwargs
from rlhf.core.data_sources import looks_local, parse_source
from rlhf.core.plan import Plan, build_plan
from rlhf.core.problems import Problem, SpecError, error


@dataclass
class LoadedSpec:
    spec: JobSpec
    plan: Plan
    source: str
    warnings: list[Problem]


def load_spec(path: str | Path, overrides: Iterable[str] = (), settings: dict[str, Any] | None = None) -> LoadedSpec:
    """Read, override, validate and resolve a spec file.

    ``overrides`` are 'key.path=value' strings (YAML-typed values); ``settings`` maps key paths
    to already-typed values (from command-line flags). Both apply before validation.
    """
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise SpecError(source, [error("", f"cannot read the spec: {getattr(exc, 'strerror', None) or exc}")]) from None
    try:
        data, lines, duplicates = yaml_io.load(text)
    except yaml_io.YamlProblem as exc:
        raise SpecError(source, [Problem("", str(exc), "error", exc.line)]) from None
    problems = [Problem(".".join(map(str, p)), "duplicate key; the later value would silently win", "error", line) for p, line in duplicates]
    return validate(data, source, Path(path).resolve().parent, lines, overrides, settings, problems)


def validate(
    data: Any,
    source: str,
    base_dir: Path,
    lines: dict | None = None,
    overrides: Iterable[str] = (),
    settings: dict[str, Any] | None = None,
    problems: list[Problem] | None = None,
) -> LoadedSpec:
    problems = list(problems or [])
    lines = lines or {}
    if data is None:
        data = {}
        problems.append(error("", "the spec is empty; expected a mapping with model_configs, dataset_config and other sections (see specs/ for examples)"))
    elif not isinstance(data, dict):
        raise SpecError(source, [error("", f"found {type(data).__name__} {str(data)[:40]!r}, expected a mapping of sections such as model_configs and dataset_config")])
    data = copy.deepcopy(data)
    overridden: set[str] = set()
    for item in overrides:
        problems.extend(_apply_override(data, item, overridden))
    for key, value in (settings or {}).items():
        if value is not None:
            _set_path(data, key.split("."), value)
            overridden.add(key)

    found = schema_problems(data)
    spec = schema.from_dict(JobSpec, data)
    found += checks.run_checks(spec, tolerate_type_errors=bool(found))
    plan = None
    if not any(p.severity == "error" for p in problems + found):
        _resolve(spec, base_dir)
        found += list(checks.local_path_problems(spec))
        found += list(checks.vllm_model_problems(spec))
        plan = build_plan(spec)
        found += plan.problems
    problems += [_locate(p, lines, overridden) for p in found]
    problems.sort(key=lambda p: (p.line or 0, p.path))
    errors = [p for p in problems if p.severity == "error"]
    if errors:
        raise SpecError(source, problems)
    assert plan is not None
    return LoadedSpec(spec, plan, source, [p for p in problems if p.severity == "warning"])


def _apply_override(data: dict, item: str, overridden: set[str]) -> list[Problem]:
    key, sep, value_text = item.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        return [error("", f"--set {item!r}: expected KEY.PATH=VALUE, e.g. --set train_config.max_train_step=10")]
    try:
        value = yaml_io.parse_value(value_text)
    except yaml_io.YamlProblem as exc:
        return [error(key, f"--set: {exc}")]
    try:
        _set_path(data, key.split("."), value)
    except TypeError as exc:
        return [error(key, f"--set: {exc}")]
    overridden.add(key)
    return []


def _set_path(data: dict, parts: list[str], value: Any) -> None:
    node = data
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise TypeError(f"{'.'.join(parts[: i + 1])} is not a section, cannot set a key inside it")
        node = child
    node[parts[-1]] = value


def _locate(problem: Problem, lines: dict, overridden: set[str]) -> Problem:
    if any(problem.path == k or problem.path.startswith(k + ".") for k in overridden):
        return dataclasses.replace(problem, message=problem.message + " (set on the command line)")
    if problem.line is not None or not problem.path:
        return problem
    parts: list[Any] = [int(p) if p.isdigit() else p for p in problem.path.split(".")]
    while parts:
        if tuple(parts) in lines:
            return dataclasses.replace(problem, line=lines[tuple(parts)])
        parts.pop()
    return problem


# --------------------------------------------------------------------------- resolving
def _resolve_path(value: str, base_dir: Path) -> str:
    """Local paths become absolute (relative ones are relative to the spec file); ids stay."""
    if value.startswith("~"):
        return str(Path(value).expanduser())
    if looks_local(value) or (base_dir / value).exists():
        return str((base_dir / value).resolve()) if not Path(value).is_absolute() else value
    return value


def _resolve(spec: JobSpec, base_dir: Path) -> None:
    """Fill every default that depends on other keys, so workers read one explicit spec."""
    models = spec.model_configs.roles()
    for role, model in models.items():
        model.model_type = role
        if model.model_path:
            model.model_path = _resolve_path(model.model_path, base_dir)
        if role in checks.TRAINED and model.trainer_config.train_kwargs is None:
            model.trainer_config.train_kwargs = TrainKwargs()
    for role in checks.TRAINED:
        setattr(spec.train_config, f"{role}_micro_bs", spec.train_micro_batch(role))
    tok = spec.tokenizer_config
    tok.tokenizer_path = _resolve_path(tok.tokenizer_path, base_dir) if tok.tokenizer_path else spec.model_configs.actor.model_path
    resolved = []
    for entry in spec.dataset_config.ppo_datas:
        src = parse_source(entry)
        resolved.append(f"{_resolve_path(src.source, base_dir)}::{src.weight:g}")
    spec.dataset_config.ppo_datas = resolved
