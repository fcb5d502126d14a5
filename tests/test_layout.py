"""The package layout: one import package whose folders are its layers, with imports going one way
(frontend -> runtime -> core); the core stays torch-free, and so does everything the front end loads."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "rlhf_launch"
HEAVY = ("torch", "transformers", "deepspeed", "vllm", "datasets")

# The runtime modules the front end may import: each loads no heavy library when imported (checked below).
# They are what the launcher shares with the ranks: the run-folder lock, checkpoint naming, provenance, the
# metrics and rollouts files, the built-in reward functions, the reward-function contract, prompt rendering
# (whose tokenizer work imports transformers only when called) and the worker's launcher-pipe names.
FRONTEND_MAY_IMPORT = (
    "rlhf_launch.runtime.checkpoint",
    "rlhf_launch.runtime.data",
    "rlhf_launch.runtime.metrics",
    "rlhf_launch.runtime.provenance",
    "rlhf_launch.runtime.reward_function",
    "rlhf_launch.runtime.rewards",
    "rlhf_launch.runtime.rollout_log",
    "rlhf_launch.runtime.run_lock",
    "rlhf_launch.runtime.worker",
)
# The one place that runs the runtime itself: the local backend, which runs a small job in its own process (and
# asks torch, inside its functions, how many threads and GPUs this machine offers).
IN_PROCESS_RUNNER = ROOT / "rlhf_launch" / "frontend" / "backends" / "local.py"
IN_PROCESS_MODULES = ("rlhf_launch.runtime.training_run", "rlhf_launch.runtime.preemption", "torch")


def imported_modules(path: Path) -> set[str]:
    """Every module a file imports, at any depth (function-level imports included); relative imports resolved."""
    names: set[str] = set()
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module
            names.add(module)
            # ``from pkg import module`` names a module as much as ``import pkg.module`` does
            names.update(f"{module}.{alias.name}" for alias in node.names)
    return names


def offenders(folder: Path, forbidden: tuple[str, ...], allowed: tuple[str, ...] = ()) -> list[str]:
    """Imports under ``folder`` of a module under one of ``forbidden`` that is not one of ``allowed``."""
    found = []
    for path in sorted(folder.rglob("*.py")):
        for name in sorted(imported_modules(path)):
            hit = any(name == f or name.startswith(f + ".") for f in forbidden)
            ok = any(name == a or name.startswith(a + ".") for a in allowed)
            if hit and not ok and not _is_package_attribute(name, forbidden, allowed):
                found.append(f"{path.relative_to(ROOT)} imports {name}")
    return found


def _is_package_attribute(name: str, forbidden: tuple[str, ...], allowed: tuple[str, ...]) -> bool:
    """``from rlhf_launch.runtime import x`` adds the package itself; only ``.x`` decides."""
    return name in forbidden and any(a.startswith(name + ".") for a in allowed)


def test_the_package_has_three_layers_and_the_demo_builders():
    folders = sorted(p.name for p in PACKAGE.iterdir() if p.is_dir() and p.name != "__pycache__")
    assert folders == ["core", "demo", "frontend", "runtime"]


def test_the_core_imports_no_heavy_library_and_nothing_above_it():
    assert offenders(PACKAGE / "core", (*HEAVY, "rlhf_launch.runtime", "rlhf_launch.frontend", "rlhf_launch.demo")) == []


def test_the_runtime_never_imports_the_front_end():
    assert offenders(PACKAGE / "runtime", ("rlhf_launch.frontend",)) == []


def test_the_front_end_imports_only_the_core_and_the_named_runtime_modules():
    found = offenders(PACKAGE / "frontend", ("rlhf_launch.runtime", "rlhf_launch.demo", *HEAVY), FRONTEND_MAY_IMPORT)
    runner = f"{IN_PROCESS_RUNNER.relative_to(ROOT)} imports "
    assert [f for f in found if not (f.startswith(runner) and f[len(runner):].startswith(IN_PROCESS_MODULES))] == []


def test_the_scan_sees_imports_inside_functions_and_relative_ones(tmp_path):
    # The guards above are only worth something if they would catch a lazy or a relative import.
    folder = PACKAGE / "frontend"
    probe = folder / "_layout_probe.py"
    probe.write_text("def f():\n    from rlhf_launch.runtime.loop import run\n    import torch.nn\n    from ..runtime import engine\n")
    try:
        assert imported_modules(probe) >= {"rlhf_launch.runtime.loop", "torch.nn", "rlhf_launch.runtime.engine"}
        assert f"{probe.relative_to(ROOT)} imports torch.nn" in offenders(folder, ("torch",))
    finally:
        probe.unlink()


def _loaded_after_import(modules: list[str]) -> list[str]:
    code = f"import sys; import {', '.join(modules)}; print(sorted(m for m in {HEAVY!r} if m in sys.modules))"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True).stdout.strip()


def _modules_under(folder: Path) -> list[str]:
    return [".".join(p.relative_to(ROOT).with_suffix("").parts) for p in sorted(folder.rglob("*.py")) if p.stem != "__init__"]


def test_importing_every_core_module_loads_no_torch():
    assert _loaded_after_import(_modules_under(PACKAGE / "core")) == "[]"


def test_importing_the_front_end_and_its_runtime_modules_loads_no_torch():
    # login nodes and --dry-run import exactly these
    assert _loaded_after_import([*_modules_under(PACKAGE / "frontend"), *FRONTEND_MAY_IMPORT]) == "[]"


def import_graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports (at any depth)."""
    modules = {".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        graph[name] = {m for m in imported_modules(path) if m in modules and m != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected group of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_import_graph_has_no_circle():
    # package __init__ files are modules too, so a circle through a package that re-exports is caught
    assert cycles(import_graph()) == []


def test_the_cycle_finder_finds_a_circle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_module_is_over_700_lines():
    long = [f"{p.relative_to(ROOT)}: {n}" for p in sorted(PACKAGE.rglob("*.py")) if (n := len(p.read_text().splitlines())) > 700]
    assert long == []


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
    assert missing_docstrings(PACKAGE) == []
