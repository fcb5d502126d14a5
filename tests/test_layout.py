"""The package layout: imports go one way (launcher -> rlhf), and rlhf.core stays torch-free."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def imported_modules(path: Path) -> set[str]:
    """Every module a file imports, at any depth (function-level imports included)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def offenders(folder: Path, forbidden: tuple[str, ...]) -> list[str]:
    found = []
    for path in sorted(folder.rglob("*.py")):
        for name in sorted(imported_modules(path)):
            if name.split(".")[0] in forbidden:
                found.append(f"{path.relative_to(ROOT)} imports {name}")
    return found


def test_the_library_never_imports_the_launcher():
    assert offenders(ROOT / "rlhf", ("launcher",)) == []


def test_the_core_imports_no_heavy_library():
    assert offenders(ROOT / "rlhf" / "core", ("torch", "transformers", "deepspeed", "vllm", "datasets", "launcher")) == []


def test_the_scan_sees_imports_inside_functions(tmp_path):
    # The guard above is only worth something if it would catch a lazy import.
    (tmp_path / "lazy.py").write_text("def f():\n    from launcher.spec import load_spec\n    import torch.nn\n")
    assert imported_modules(tmp_path / "lazy.py") == {"launcher.spec", "torch.nn"}


def test_importing_every_core_module_loads_no_torch():
    modules = [f"rlhf.core.{p.stem}" for p in sorted((ROOT / "rlhf" / "core").glob("*.py")) if p.stem != "__init__"]
    code = f"import sys; import {', '.join(modules)}; print(sorted(m for m in ('torch', 'transformers', 'launcher') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True).stdout
    assert out.strip() == "[]"


def missing_docstrings(folder: Path) -> list[str]:
    """Public classes, functions and methods without a docstring (``__init__`` excepted)."""
    found = []
    for path in sorted(folder.rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))

        def visit(nodes, prefix: str = "", path: Path = path) -> None:
            for node in nodes:
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and not node.name.startswith("_"):
                    if ast.get_docstring(node) is None:
                        found.append(f"{path.relative_to(ROOT)}:{node.lineno}: {prefix}{node.name}")
                    if isinstance(node, ast.ClassDef):
                        visit(node.body, f"{prefix}{node.name}.", path)

        visit(tree.body)
    return found


def test_every_public_class_and_function_says_what_it_is():
    assert missing_docstrings(ROOT / "rlhf") + missing_docstrings(ROOT / "launcher") == []
