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

from rlhf_launch.core import schema, yaml_io
from rlhf_launch.core.config import JobSpec
from rlhf_launch.core.plan import Plan, build_plan
from rlhf_launch.core.problems import Problem, SpecError, error
from rlhf_launch.core.resolved import resolve
from rlhf_launch.frontend import checks
from rlhf_launch.frontend.schema_errors import schema_problems


@dataclass
class LoadedSpec:
    """A valid, resolved spec with its resource plan, the file it came from and its warnings."""

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
    problems = [
        Problem(".".join(map(str, p)), "duplicate key; the later value would silently win", "error", line) for p, line in duplicates
    ]
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
    """Apply ``overrides`` and ``settings`` to parsed spec data, check everything and resolve the spec.

    Relative local paths are taken from ``base_dir``; ``lines`` (key path -> YAML line) locates the
    problems, and ``problems`` holds those already found (duplicate keys). Raises ``SpecError`` with
    every problem when any is an error.
    """
    problems = list(problems or [])
    lines = lines or {}
    if data is None:
        data = {}
        problems.append(error(
            "",
            "the spec is empty; expected a mapping with model_configs, dataset_config and other sections (see specs/ for examples)",
        ))
    elif not isinstance(data, dict):
        raise SpecError(source, [error(
            "",
            f"found {type(data).__name__} {str(data)[:40]!r}, expected a mapping of sections such as model_configs and dataset_config",
        )])
    data = copy.deepcopy(data)
    overridden: set[str] = set()
    for item in overrides:
        problems.extend(_apply_override(data, item, overridden))
    for key, value in (settings or {}).items():
        if value is not None:
            set_path(data, key.split("."), value)
            overridden.add(key)

    found = schema_problems(data)
    spec = schema.from_dict(JobSpec, data)
    found += checks.run_checks(spec, tolerate_type_errors=bool(found))
    plan = None
    if not any(p.severity == "error" for p in problems + found):
        resolve(spec, base_dir)
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
        set_path(data, key.split("."), value)
    except TypeError as exc:
        return [error(key, f"--set: {exc}")]
    overridden.add(key)
    return []


def set_path(data: dict, parts: list[str], value: Any) -> None:
    """Set the key at ``parts`` in nested dicts, creating sections on the way; TypeError when a
    part is not a section."""
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
