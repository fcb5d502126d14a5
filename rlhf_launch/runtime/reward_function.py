"""The contract of a reward function, the ``"package.module:function"`` that ``model_configs.reward.reward_function``
names: ``function(prompts, responses, **record fields)`` returns one number per response.

Both sides of a run hold a function to it through this one module: the pre-flight check (loading, the signature,
the scores of a sample call) and the reward role on the ranks (loading, the record fields it is given, the scores
of every call). Nothing here imports torch: the front end imports it.

- ``import_function`` / ``load_function``: the function a name names; a module the built-in reward functions
  were once in (``LEGACY_MODULES``) is read as the module they are in now, so older specs keep working;
- ``signature_problem``, ``accepted_fields`` and ``field_lists``: what the function can be called with;
- ``scores_problem`` and ``call_function``: what it must return.
"""

from __future__ import annotations

import importlib
import inspect
import math
import numbers
from collections.abc import Sequence
from typing import Any

from rlhf_launch.core.problems import InputError

SPEC_KEY = "model_configs.reward.reward_function"
# Modules the built-in reward functions moved out of -> the module that holds them now: run folders' spec.yaml
# and users' specs written before the move name the old one (rlhf.rewards:vowel_ratio).
LEGACY_MODULES = {"rlhf.rewards": "rlhf_launch.runtime.rewards"}
EXPECTED_SIGNATURE = "expected a function of (prompts, responses), two lists of str, and optionally record fields by name"


class RewardFunctionError(InputError, ValueError):
    """A ``reward_function`` that cannot be imported, cannot be called with the prompts and responses, or does not
    return one number per response."""


def current_name(path: str) -> str:
    """``path`` ('module:function') with a module of ``LEGACY_MODULES`` replaced by the module that holds it now."""
    module_name, colon, name = path.partition(":")
    return f"{LEGACY_MODULES.get(module_name, module_name)}{colon}{name}"


def import_function(path: str):
    """The function named 'module:function' (``current_name``); whatever importing the module or finding the name
    raises propagates (ImportError, AttributeError, or anything a user's module raises while it is imported)."""
    module_name, _, name = current_name(path).partition(":")
    return getattr(importlib.import_module(module_name), name)


def load_function(path: str):
    """``import_function``, with a name that cannot be imported (a missing module or function) as a
    RewardFunctionError naming the spec key; anything else importing raises is a bug of the module and propagates."""
    try:
        return import_function(path)
    except (ImportError, AttributeError) as exc:
        raise RewardFunctionError(f"{SPEC_KEY}: cannot load {path!r}: {exc}") from None


def signature_problem(function, fields: set[str] = frozenset()) -> str | None:
    """Why ``function(prompts, responses, **record fields)`` cannot be called, naming the parameter; None when it can.
    A required parameter is fine when it names one of ``fields``, the record fields of the data."""
    try:
        sig = inspect.signature(function)
    except (TypeError, ValueError):
        return None  # a builtin or extension function: only the call can tell
    params = list(sig.parameters.values())
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(positional) < 2 and not any(p.kind == p.VAR_POSITIONAL for p in params):
        names = ", ".join(p.name for p in positional) or "none"
        return f" takes {len(positional)} positional parameter{'s' if len(positional) != 1 else ''} ({names}), not 2"
    for p in positional[2:]:
        if p.default is p.empty and p.name not in fields:
            return f" has a third required parameter {p.name!r}, not a field of the prompt records; give it a default"
    for p in params:
        if p.kind == p.KEYWORD_ONLY and p.default is p.empty and p.name not in fields:
            return f" has a required keyword-only parameter {p.name!r}, not a field of the prompt records; give it a default"
    return None


def accepted_fields(function) -> frozenset[str] | None:
    """The record fields a reward function ``fn(prompts, responses, ...)`` takes by name: None for any (it has
    ``**kwargs``), else the names of its parameters after the first two (an empty set for ``fn(prompts, responses)``)."""
    try:
        parameters = list(inspect.signature(function).parameters.values())
    except (TypeError, ValueError):  # a builtin without a signature: give it what it was always given
        return frozenset()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return None
    named = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return frozenset(p.name for p in parameters[2:] if p.kind in named)


def field_lists(accepts: frozenset[str] | None, rows: list[dict[str, Any]]) -> dict[str, list]:
    """The keyword arguments of a reward function from the record fields of its rows: each field the function
    accepts (``accepted_fields``; None: all), as a list aligned with the rows, None where a row's record lacks it."""
    names = sorted({name for row in rows for name in row})
    if accepts is not None:
        names = [name for name in names if name in accepts]
    return {name: [row.get(name) for row in rows] for name in names}


def scores_problem(scores: Any, expected: int, finite: bool = True) -> str | None:
    """Why a reward function's result is not ``expected`` numbers, one per response (finite ones when ``finite``),
    naming the type or value found; None when it is. A list or tuple of numbers, a numpy array or a 1-D tensor is."""
    if hasattr(scores, "tolist") and not isinstance(scores, Sequence):
        values = scores.tolist()  # a numpy array or a tensor (a 0-d one gives a number, refused below)
    else:
        values = scores
    if not isinstance(values, Sequence) or isinstance(values, (str, bytes, bytearray)):
        return f"returned {_described(scores)}, expected a list of {expected} numbers, one per response"
    if len(values) != expected:
        return f"returned {len(values)} scores for {expected} responses, expected one per response"
    for i, value in enumerate(values):
        value = value.tolist() if hasattr(value, "tolist") else value  # a numpy or 0-d tensor element
        if not isinstance(value, numbers.Real):
            return f"returned score {i} = {value!r:.60} (a {type(value).__name__}), expected a number"
        if finite and not math.isfinite(value):
            return f"returned score {i} = {value}, expected a finite number"
    return None


def _described(value: Any) -> str:
    """A value's type, and the value itself when it is short to show (a str, a number)."""
    if value is None:
        return "None"
    if isinstance(value, (str, bytes, numbers.Number)):
        return f"a {type(value).__name__} {value!r:.60}"
    return f"a {type(value).__name__}"


def call_function(function, path: str, prompts: list[str], responses: list[str], fields: dict[str, list]):
    """``function(prompts, responses, **fields)``: its scores, one number per response. A call that its signature
    refuses, or a result of another shape, is a RewardFunctionError (an input error: one line, no traceback);
    a TypeError raised inside the function stays what it is, a bug there."""
    try:
        scores = function(prompts, responses, **fields)
    except TypeError as exc:
        if _accepts(function, prompts, responses, fields=fields):
            raise
        call = ", ".join(["prompts", "responses", *(f"{name}=..." for name in fields)])
        raise RewardFunctionError(
            f"{SPEC_KEY}: {path} cannot be called with ({call}): {exc}; {EXPECTED_SIGNATURE}"
        ) from None
    problem = scores_problem(scores, len(responses), finite=False)
    if problem:
        raise RewardFunctionError(f"{SPEC_KEY}: {path} {problem}")
    return scores


def _accepts(function, *args, fields: dict) -> bool:
    """Whether ``function``'s signature takes these arguments (True when it has no signature to tell)."""
    try:
        signature = inspect.signature(function)
    except (TypeError, ValueError):
        return True
    try:
        signature.bind(*args, **fields)
    except TypeError:
        return False
    return True
