"""Reading spec YAML safely, with the line of every key, and writing it back readably."""

from __future__ import annotations

import re
from typing import Any

import yaml

Path_ = tuple[str | int, ...]


class SpecLoader(yaml.SafeLoader):
    """Safe loading (no object tags), plus floats written without a dot such as 1e-6,
    which YAML 1.1 would otherwise read as strings."""


SpecLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+][0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


class YamlProblem(Exception):
    """YAML that cannot be read, with the 1-based line when known."""

    def __init__(self, message: str, line: int | None = None):
        super().__init__(message)
        self.line = line


def load(text: str) -> tuple[Any, dict[Path_, int], list[tuple[Path_, int]]]:
    """Parse one YAML document: (data, line of each key path, duplicated keys)."""
    loader = SpecLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None, {}, []
        lines: dict[Path_, int] = {}
        duplicates: list[tuple[Path_, int]] = []
        _index(node, (), lines, duplicates)
        return loader.construct_document(node), lines, duplicates
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else None
        reason = exc.problem or str(exc)
        if exc.context:
            reason = f"{exc.context}, {reason}"
        raise YamlProblem(f"invalid YAML: {reason}", line) from None
    except yaml.YAMLError as exc:
        raise YamlProblem(f"invalid YAML: {exc}") from None
    finally:
        loader.dispose()


def parse_value(text: str) -> Any:
    """A --set value: YAML typed (3 is an int, 1e-6 a float, [a, b] a list)."""
    try:
        return yaml.load(text, Loader=SpecLoader) if text.strip() else ""
    except yaml.YAMLError as exc:
        raise YamlProblem(f"invalid YAML value {text!r}: {getattr(exc, 'problem', exc)}") from None


def _index(node: yaml.Node, path: Path_, lines: dict, duplicates: list) -> None:
    if isinstance(node, yaml.MappingNode):
        seen = set()
        for key_node, value_node in node.value:
            key = key_node.value
            child = (*path, key)
            if key in seen:
                duplicates.append((child, key_node.start_mark.line + 1))
            seen.add(key)
            lines[child] = key_node.start_mark.line + 1
            _index(value_node, child, lines, duplicates)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            lines[(*path, i)] = item.start_mark.line + 1
            _index(item, (*path, i), lines, duplicates)


class _Dumper(yaml.SafeDumper):
    pass


def _str_representer(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


def _dict_representer(dumper: yaml.SafeDumper, value: dict) -> yaml.Node:
    # Short leaf mappings such as parallel.data read best on one line: {size: 8, mode: deepspeed}.
    leaf = 0 < len(value) <= 3 and not any(isinstance(v, (dict, list)) for v in value.values())
    return dumper.represent_mapping("tag:yaml.org,2002:map", value, flow_style=leaf)


_Dumper.add_representer(str, _str_representer)
_Dumper.add_representer(dict, _dict_representer)


def dump(data: Any) -> str:
    """``data`` as block YAML in insertion order; short leaf mappings on one line, multi-line strings as literal blocks."""
    return yaml.dump(data, Dumper=_Dumper, sort_keys=False, default_flow_style=False, width=100, allow_unicode=True)
