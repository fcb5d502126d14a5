"""A problem found in a spec, and how it is shown: one line with where, what was found and
what was expected."""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal


@dataclass(frozen=True)
class Problem:
    """One finding in a spec: key path, message, severity and 1-based YAML line when known."""

    path: str  # dotted key path; "" for the whole document
    message: str
    severity: Literal["error", "warning"] = "error"
    line: int | None = None

    def format(self, source: str) -> str:
        """The one-line form 'source:line: key: message', with 'warning:' before the key of a warning."""
        where = f"{source}:{self.line}" if self.line else source
        key = f" {self.path}:" if self.path else ""
        label = "" if self.severity == "error" else " warning:"
        return f"{where}:{label}{key} {self.message}"


class SpecError(Exception):
    """A spec that cannot be used; carries every problem found."""

    def __init__(self, source: str, problems: list[Problem]):
        self.source = source
        self.problems = problems
        super().__init__("\n".join(p.format(source) for p in problems))

    @property
    def errors(self) -> list[Problem]:
        """The problems of severity error; the others are warnings."""
        return [p for p in self.problems if p.severity == "error"]


class InputError(Exception):
    """An input of the run (a data file, a model folder, a checkpoint) that cannot be used. Its
    message says where and what was found: a rank reports it in that one line, without a
    traceback, since the traceback would only show where the input was read."""


def error(path: str, message: str) -> Problem:
    """A problem that makes the spec unusable."""
    return Problem(path, message, "error")


def warning(path: str, message: str) -> Problem:
    """A problem worth reporting that still lets the spec run."""
    return Problem(path, message, "warning")


def show(value: Any, limit: int = 60) -> str:
    """A value as the user wrote it in YAML, shortened."""
    if value is None:
        text = "null"
    elif isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, str):
        text = repr(value)
    elif isinstance(value, dict):
        text = "a mapping"
    elif isinstance(value, list):
        text = "a list"
    else:
        text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """A hint naming the closest of ``choices`` to ``word``, `` (did you mean 'x'?)``; '' when none is close."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""
