"""Models of their own code: a model whose ``model_type`` this machine's transformers does not know loads only through
the Python files its config.json names in ``auto_map`` (InternLM2's), and only with ``model_configs.<role>.
trust_remote_code``. Refused here, in one line and before any rank starts: such a model with the key off, one
without code of its own, one whose folder (or hub snapshot) lacks a file its ``auto_map`` names (or a file those
import), and one whose ``auto_map`` has no class the role can load.

The model types transformers knows are read from its installed files, without importing it (no torch on login
nodes): a model type is known when transformers has a ``models/<type>`` package, or its auto mappings name it.
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import re
from pathlib import Path

from rlhf_launch.core.problems import error
from rlhf_launch.frontend.preflight.findings import Preflight

# The auto_map entries each role can load through (rlhf_launch/runtime/models.py): the first present is used.
ROLE_CLASSES = {
    "actor": ("AutoModelForCausalLM",),
    "reference": ("AutoModelForCausalLM",),
    "critic": ("AutoModelForSequenceClassification", "AutoModel", "AutoModelForCausalLM"),
    "reward": ("AutoModelForSequenceClassification", "AutoModel", "AutoModelForCausalLM"),
}
_AUTO_FILES = ("configuration_auto.py", "auto_mappings.py")  # where transformers lists its model types
_RELATIVE_IMPORT = re.compile(r"^[ \t]*from[ \t]+\.(\w*)[ \t]+import[ \t]+(\([^)]*\)|[\w \t,]+)", re.MULTILINE)


@functools.lru_cache(maxsize=1)
def _transformers_files() -> tuple[str, Path, str] | None:
    """(version, package folder, text of its auto mappings) of the installed transformers, or None without one."""
    found = importlib.util.find_spec("transformers")  # locates the package; imports nothing
    if found is None or not found.submodule_search_locations:
        return None
    package = Path(next(iter(found.submodule_search_locations)))
    auto = package / "models" / "auto"
    text = "".join(f.read_text(encoding="utf-8", errors="replace") for f in (auto / n for n in _AUTO_FILES) if f.is_file())
    try:
        version = importlib.metadata.version("transformers")
    except importlib.metadata.PackageNotFoundError:
        version = "?"
    return version, package, text


def transformers_knows(model_type: str) -> tuple[bool, str] | None:
    """(whether this machine's transformers knows ``model_type``, its version), or None when it has no transformers."""
    files = _transformers_files()
    if files is None:
        return None
    version, package, text = files
    known = (package / "models" / model_type.replace("-", "_")).is_dir() or f'"{model_type}"' in text
    return known, version


def code_files(auto_map: dict) -> list[str]:
    """The Python files an ``auto_map`` names in its own folder ('module.Class' -> module.py; a class of another
    repository, 'repo--module.Class', is not in the folder and not listed)."""
    files: list[str] = []
    for value in auto_map.values():
        for ref in value if isinstance(value, list) else [value]:
            if isinstance(ref, str) and "--" not in ref and "." in ref:
                name = ref.rsplit(".", 1)[0] + ".py"
                if name not in files:
                    files.append(name)
    return files


def missing_code(folder: Path, files: list[str]) -> list[str]:
    """Which of ``files``, and of the files they import relatively (``from .x import y``), ``folder`` lacks."""
    missing, seen, todo = [], set(), list(files)
    while todo:
        name = todo.pop(0)
        if name in seen:
            continue
        seen.add(name)
        path = folder / name
        if not path.is_file():
            missing.append(name)
            continue
        for module, names in _RELATIVE_IMPORT.findall(path.read_text(encoding="utf-8", errors="replace")):
            if module:
                todo.append(f"{module}.py")
            else:  # from . import a, b
                todo.extend(f"{n.strip()}.py" for n in names.strip("() \n").split(",") if n.strip())
    return missing


def check_model_code(pf: Preflight, role: str, key: str, folder: Path, config: dict, trust_remote_code: bool) -> None:
    """A model of a type transformers does not know loads through its own code, allowed and present (module docstring)."""
    model_type = config.get("model_type")
    known = transformers_knows(model_type) if isinstance(model_type, str) and model_type else None
    if known is None or known[0]:
        return
    version = known[1]
    what = f"{folder} is model_type {model_type!r}, which transformers {version} here does not know"
    auto_map = config.get("auto_map") if isinstance(config.get("auto_map"), dict) else {}
    files = code_files(auto_map)
    if not auto_map:
        pf.problems.append(error(key, (
            f"{what}, and it has no code of its own (no auto_map in its config.json); expected a model type of this "
            "transformers (a newer transformers may know it) or a folder with the model's code"
        )))
        return
    flag = f"model_configs.{role}.trust_remote_code"
    if not trust_remote_code:
        pf.problems.append(error(flag, (
            f"{what}: it loads only through its own code ({', '.join(files) or 'named in auto_map'}), which runs only "
            f"with {flag}: true; set it if you trust that code"
        )))
        return
    usable = [name for name in ROLE_CLASSES[role] if name in auto_map]
    if not usable:
        pf.problems.append(error(key, (
            f"{what}, and its config.json's auto_map names no class the {role} can load ({', '.join(auto_map)}); "
            f"expected one of {', '.join(ROLE_CLASSES[role])}"
        )))
    absent = missing_code(folder, files)
    if absent:
        pf.problems.append(error(key, (
            f"{what}, and {folder} lacks its code: {', '.join(absent)} (named by config.json's auto_map, or imported by "
            "those files); expected the model's .py files beside its config.json"
        )))
    elif usable:
        pf.notes.append(f"{role} model: model_type {model_type!r} through its own code ({', '.join(files)}), {usable[0]}")
