"""Executing an XTuner-RLHF config file, as XTuner's ``Config.from_file`` does, without its dependencies.

The file runs with its own ``__import__``: the standard library is imported for real, ``torch`` is a
stand-in that has only dtypes, and any other module is a stub whose names stand for themselves (real
configs import model classes only to pass them as ``model_class``, which XTuner ignores). Nothing is
put into ``sys.modules``, so no stub outlives the conversion.
"""

from __future__ import annotations

import builtins
import importlib.util
import sys
import types
from pathlib import Path
from typing import Any

_DTYPES = ("float32", "float16", "bfloat16", "float64", "half", "float", "bfloat")
_DTYPE_ALIASES = {"half": "float16", "float": "float32"}


class ConvertError(Exception):
    """An XTuner config that cannot be converted into a spec; the message says why."""


class Dtype:
    """``torch.<dtype>`` as the stand-in provides it: only its name."""

    def __init__(self, name: str):
        self.name = _DTYPE_ALIASES.get(name, name)

    def __repr__(self) -> str:
        return f"torch.{self.name}"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Dtype) and other.name == self.name

    def __hash__(self) -> int:
        return hash(self.name)


class Stub:
    """A name from a stubbed module (``xtuner.rlhf.loss.PPOPolicyLoss``); calling it records the call."""

    def __init__(self, qualname: str):
        self.qualname = qualname

    def __getattr__(self, attr: str) -> Stub:
        if attr.startswith("__"):
            raise AttributeError(attr)
        return Stub(f"{self.qualname}.{attr}")

    def __call__(self, *args: Any, **kwargs: Any) -> Call:
        return Call(self.qualname, args, kwargs)

    def __repr__(self) -> str:
        return self.qualname


class Call:
    """``Name(*args, **kwargs)`` of a stubbed name, e.g. a loss object: ``name`` is the last part."""

    def __init__(self, qualname: str, args: tuple, kwargs: dict):
        self.qualname, self.args, self.kwargs = qualname, args, kwargs

    @property
    def name(self) -> str:
        """The called name without its module."""
        return self.qualname.rsplit(".", 1)[-1]

    def __repr__(self) -> str:
        parts = [repr(a) for a in self.args] + [f"{k}={v!r}" for k, v in self.kwargs.items()]
        return f"{self.name}({', '.join(parts)})"


def _torch_stand_in() -> types.ModuleType:
    module = types.ModuleType("torch")
    for name in _DTYPES:
        setattr(module, name, Dtype(name))

    def missing(attr: str) -> Any:
        raise ConvertError(f"the config uses torch.{attr}; converting provides only torch dtypes")

    module.__getattr__ = missing  # type: ignore[attr-defined]
    return module


class _Importer:
    """The config's ``__import__``: real standard library, the torch stand-in, stubs for the rest."""

    def __init__(self, notes: list[str]):
        self.notes = notes
        self.torch = _torch_stand_in()
        self.stubbed: set[str] = set()

    def __call__(self, name: str, globals_: Any = None, locals_: Any = None, fromlist: Any = (), level: int = 0) -> Any:
        if level:
            raise ConvertError(f"the config imports relatively ({'.' * level}{name}); converting reads a config as a single file")
        top = name.partition(".")[0]
        if top == "torch":
            return self.torch
        if top in sys.stdlib_module_names or top == "__future__":
            return builtins.__import__(name, globals_, locals_, fromlist, level)
        self._note(top)
        return Stub(name if fromlist else top)

    def _note(self, top: str) -> None:
        if top in self.stubbed:
            return
        self.stubbed.add(top)
        why = "is not installed here" if importlib.util.find_spec(top) is None else "is not run by convert"
        self.notes.append(
            f"the config imports {top}, which {why}: it is stubbed, so its names can only be passed on "
            "(as model_class, which XTuner ignores, or as a loss object convert understands)"
        )


def execute(path: Path, notes: list[str]) -> dict[str, Any]:
    """The module-level names of the config at ``path`` after running it."""
    try:
        source = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConvertError(f"{path}: cannot read the config: {getattr(exc, 'strerror', None) or exc}") from None
    namespace: dict[str, Any] = {
        "__name__": "__xtuner_config__",
        "__file__": str(path),
        "__builtins__": {**vars(builtins), "__import__": _Importer(notes)},
    }
    try:
        exec(compile(source, str(path), "exec"), namespace)  # noqa: S102 - converting runs the user's config, as XTuner does
    except ConvertError:
        raise
    except SystemExit as exc:
        raise ConvertError(f"{path}: the config exited ({exc.code})") from None
    except AssertionError as exc:
        raise ConvertError(f"{path}: an assert in the config failed{': ' + str(exc) if str(exc) else ''}") from None
    except Exception as exc:  # the file is the user's code: any error is reported, not raised
        raise ConvertError(f"{path}: executing the config failed: {type(exc).__name__}: {exc}") from None
    return namespace
