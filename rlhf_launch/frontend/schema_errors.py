"""jsonschema's errors rewritten as one line each: found X, expected Y, did you mean Z."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import jsonschema

from rlhf_launch.core import schema
from rlhf_launch.core.problems import Problem, did_you_mean, error, show

_TYPE_WORDS = {
    "integer": "an integer",
    "number": "a number",
    "string": "a string",
    "boolean": "true or false",
    "object": "a mapping",
    "array": "a list",
    "null": "null",
}


def _validator() -> jsonschema.protocols.Validator:
    return jsonschema.Draft202012Validator(schema.job_schema())


def schema_problems(data: Any) -> list[Problem]:
    """Every JSON Schema violation of ``data`` as a one-line Problem, without duplicates, sorted by key path."""
    problems = [p for err in _validator().iter_errors(data) for p in _explain(err)]
    return sorted(set(problems), key=lambda p: p.path)


def dotted(path: Any) -> str:
    """A key path as 'a.b.0.c'."""
    return ".".join(str(p) for p in path)


def _expected_type(type_: str | list[str]) -> str:
    types = type_ if isinstance(type_, list) else [type_]
    return " or ".join(_TYPE_WORDS.get(t, t) for t in types)


def _explain(err: jsonschema.ValidationError) -> Iterator[Problem]:
    path = tuple(err.absolute_path)
    where = dotted(path)
    kind = err.validator
    found = f"found {show(err.instance)}"
    if kind == "additionalProperties":
        allowed = set(err.schema.get("properties", {}))
        for key in sorted(set(err.instance) - allowed, key=str):
            hint = did_you_mean(str(key), allowed) or f"; expected one of: {', '.join(sorted(allowed))}"
            yield error(dotted((*path, key)), f"unknown key{hint}")
    elif kind == "required":
        missing = err.message.split("'")[1]
        doc = err.schema["properties"][missing].get("description", "")
        yield error(dotted((*path, missing)), f"missing; expected {doc[0].lower() + doc[1:] if doc else 'a value'}")
    elif kind == "anyOf":
        # Optional sections are anyOf [section, null]: explain the section branch's errors.
        inner = [e for e in err.context if e.relative_schema_path[0] == 0]
        if isinstance(err.instance, dict) and inner:
            for sub in inner:
                yield from _explain(sub)
        else:
            yield error(where, f"{found}, expected a mapping or null")
    elif kind == "type":
        yield error(where, f"{found}, expected {_expected_type(err.validator_value)}{_yaml_hint(err)}")
    elif kind == "enum":
        options = ", ".join(show(v) for v in err.validator_value)
        hint = did_you_mean(str(err.instance), [str(v) for v in err.validator_value])
        yield error(where, f"{found}, expected one of {options}{hint}")
    elif kind in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"):
        sign = {"minimum": ">=", "maximum": "<=", "exclusiveMinimum": ">", "exclusiveMaximum": "<"}[kind]
        yield error(where, f"{found}, expected a value {sign} {err.validator_value}")
    elif kind == "pattern":
        doc = _description(path)
        yield error(where, f"{found}, which is not allowed here; expected {doc or 'text matching ' + err.validator_value}")
    elif kind == "minItems":
        yield error(where, f"{found} with {len(err.instance)} items, expected at least {err.validator_value}")
    else:  # a keyword added to the schema later still gets a readable line
        yield error(where, err.message)


def _yaml_hint(err: jsonschema.ValidationError) -> str:
    wanted = err.validator_value if isinstance(err.validator_value, list) else [err.validator_value]
    if isinstance(err.instance, str) and {"number", "integer"} & set(wanted):
        try:
            float(err.instance)
        except ValueError:
            return ""
        return " (a number in quotes is text in YAML: remove the quotes)"
    return ""


def _description(path: tuple) -> str:
    """The documented meaning of the key at ``path`` (list items take their list's)."""
    keys = tuple(p for p in path if isinstance(p, str))
    for key in schema.iter_keys():
        if key.path == dotted(keys):
            return key.doc[0].lower() + key.doc[1:] if key.doc else ""
    return ""
