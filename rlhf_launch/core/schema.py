"""Everything derived from the config dataclasses by reflection: the JSON Schema, the key
reference, and building typed objects from plain dicts. No torch import."""

from __future__ import annotations

import dataclasses
import functools
import json
import types
import typing
from collections.abc import Iterator
from typing import Any, Literal, Union

from rlhf_launch.core import config

SCHEMA_ID = "https://rlhf-launch.dev/schemas/rlhf_job.schema.json"
_JSON_TYPES = {bool: "boolean", int: "integer", float: "number", str: "string"}


@functools.cache
def hints(cls: type) -> dict[str, Any]:
    """The resolved type hints of a dataclass's fields (the config module's annotations are strings)."""
    return typing.get_type_hints(cls)


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    if typing.get_origin(tp) in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0], True
    return tp, False


def _type_schema(tp: Any, defs: dict[str, Any]) -> dict[str, Any]:
    inner, nullable = _unwrap_optional(tp)
    origin = typing.get_origin(inner)
    if dataclasses.is_dataclass(inner):
        _add_def(inner, defs)
        schema: dict[str, Any] = {"$ref": f"#/$defs/{inner.__name__}"}
        return {"anyOf": [schema, {"type": "null"}]} if nullable else schema
    if origin is Literal:
        values = list(typing.get_args(inner))
        schema = {"type": _JSON_TYPES[type(values[0])], "enum": values}
    elif origin is list:
        (item,) = typing.get_args(inner)
        schema = {"type": "array", "items": _type_schema(item, defs)}
    elif origin is dict or inner is dict:
        schema = {"type": "object"}
    elif inner in _JSON_TYPES:
        schema = {"type": _JSON_TYPES[inner]}
    else:  # pragma: no cover - a new field type must be taught here
        raise TypeError(f"no JSON Schema for {inner!r}")
    if nullable:
        schema["type"] = [schema["type"], "null"]
        if "enum" in schema:
            schema["enum"] = [*schema["enum"], None]
    return schema


def _field_schema(f: dataclasses.Field, tp: Any, defs: dict[str, Any]) -> dict[str, Any]:
    schema = _type_schema(tp, defs)
    extra = dict(f.metadata.get("schema", {}))
    if "items" in extra and schema.get("type") == "array":
        schema["items"] = extra.pop("items")
    if "$ref" in schema:  # keywords beside $ref are fine in 2020-12, but keep refs plain
        schema = {"allOf": [schema]}
    schema.update(extra)
    schema["description"] = config.field_doc(f)
    default = field_default(f)
    if default is not dataclasses.MISSING and not dataclasses.is_dataclass(default):
        schema["default"] = default
    return schema


def field_default(f: dataclasses.Field) -> Any:
    """A field's default, a fresh one from its factory, or ``dataclasses.MISSING`` when the key is required."""
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def _object_schema(cls: type, defs: dict[str, Any]) -> dict[str, Any]:
    props = {}
    required = []
    for f in dataclasses.fields(cls):
        props[f.name] = _field_schema(f, hints(cls)[f.name], defs)
        if field_default(f) is dataclasses.MISSING:
            required.append(f.name)
    schema: dict[str, Any] = {"type": "object", "additionalProperties": False, "properties": props}
    if cls.__doc__ and not cls.__doc__.startswith(cls.__name__ + "("):
        schema["description"] = cls.__doc__.strip()
    if required:
        schema["required"] = required
    return schema


def _add_def(cls: type, defs: dict[str, Any]) -> None:
    if cls.__name__ not in defs:
        defs[cls.__name__] = {}  # placeholder first: classes may be reached again while building
        defs[cls.__name__] = _object_schema(cls, defs)


@functools.cache
def _job_schema_text() -> str:
    defs: dict[str, Any] = {}
    root = _object_schema(config.JobSpec, defs)
    schema = {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": SCHEMA_ID,
        "title": "rlhf-launch job spec",
        **root,
        "$defs": dict(sorted(defs.items())),
    }
    return json.dumps(schema, indent=2) + "\n"


def job_schema() -> dict[str, Any]:
    """The JSON Schema of a job spec (a fresh copy)."""
    return json.loads(_job_schema_text())


def schema_text() -> str:
    """The exact text committed as ``schemas/rlhf_job.schema.json``."""
    return _job_schema_text()


# --------------------------------------------------------------------------- dict -> objects
def from_dict(cls: type, data: dict[str, Any] | None) -> Any:
    """Build ``cls`` from a schema-checked dict; missing keys take their defaults.

    Lenient on purpose: on a dict that failed validation it keeps wrong values as they
    are and drops unknown keys, so that the semantic checks can still run and report
    every problem at once.
    """
    data = data if isinstance(data, dict) else {}
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in data:
            kwargs[f.name] = _convert(hints(cls)[f.name], data[f.name])
        elif field_default(f) is dataclasses.MISSING:
            inner, _ = _unwrap_optional(hints(cls)[f.name])
            kwargs[f.name] = from_dict(inner, {}) if dataclasses.is_dataclass(inner) else None
    return cls(**kwargs)


def _convert(tp: Any, value: Any) -> Any:
    inner, _ = _unwrap_optional(tp)
    if value is None:
        return None
    if dataclasses.is_dataclass(inner):
        return from_dict(inner, value)
    if typing.get_origin(inner) is list and isinstance(value, list):
        (item,) = typing.get_args(inner)
        return [_convert(item, v) for v in value]
    if inner is int and isinstance(value, float) and value.is_integer():
        return int(value)  # 1e9 in a config means the integer
    if inner is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


# --------------------------------------------------------------------------- reference
@dataclasses.dataclass
class KeyDoc:
    """One key of the spec reference: dotted path, type name, default and meaning."""

    path: str
    type: str
    default: Any
    doc: str


def _type_name(tp: Any) -> str:
    inner, nullable = _unwrap_optional(tp)
    origin = typing.get_origin(inner)
    if origin is Literal:
        name = " | ".join(repr(v) for v in typing.get_args(inner))
    elif origin is list:
        name = f"list of {_type_name(typing.get_args(inner)[0])}"
    elif origin is dict or inner is dict:
        name = "mapping"
    elif dataclasses.is_dataclass(inner):
        name = "section"
    else:
        name = getattr(inner, "__name__", str(inner))
    return f"{name} or null" if nullable else name


def iter_keys(cls: type = config.JobSpec, prefix: str = "") -> Iterator[KeyDoc]:
    """Every key of the spec, depth first, with its type, default and meaning."""
    for f in dataclasses.fields(cls):
        tp = hints(cls)[f.name]
        path = f"{prefix}{f.name}"
        default = field_default(f)
        yield KeyDoc(path, _type_name(tp), default, config.field_doc(f))
        inner, _ = _unwrap_optional(tp)
        if dataclasses.is_dataclass(inner):
            yield from iter_keys(inner, path + ".")
