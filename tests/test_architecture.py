"""The layering the project promises (shared/ARCHITECTURE.md), read from the code's own imports.

Every module is parsed with :mod:`ast`, never imported, so the test sees what a module WOULD
import: top-level imports and the ones inside functions alike (a lazy import still makes a circle
when both functions run). Imports under ``if TYPE_CHECKING:`` are left out: they never run.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

#: the pyfunc model files MLflow itself loads (models-from-code): they may import mlflow
PYFUNC_MODEL_FILES = {"domainfm/raw_pixels_model.py", "domainfm/backbone_model.py", "plugins/histo/pyfunc_model.py",
                      "plugins/sgd_ft/classifier_model.py"}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _modules(*packages: str) -> dict[str, Path]:
    """Dotted module name -> file, for every .py under the given top-level packages."""
    out: dict[str, Path] = {}
    for pkg in packages:
        for path in sorted((REPO / pkg).rglob("*.py")):
            out[_module_name(path)] = path
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(path: Path, module: str) -> set[str]:
    """Every dotted name ``path`` imports at run time (``from a.b import c`` gives ``a.b`` and
    ``a.b.c``: c may be a submodule); relative imports resolved against ``module``."""
    tree = ast.parse(path.read_text(), filename=str(path))
    is_pkg = path.name == "__init__.py"
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".") if is_pkg else module.split(".")[:-1]
                base = base[:len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.add(target)
            found.update(f"{target}.{alias.name}" for alias in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def _graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    """module -> the modules of ``modules`` it imports (a name that is not a module file of its own,
    ``from pkg import func``, counts as an import of ``pkg``)."""
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        edges = set()
        for imported in _imports(path, name):
            while imported and imported not in modules:
                imported = imported.rpartition(".")[0]
            if imported and imported != name:
                edges.add(imported)
        graph[name] = edges
    return graph


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle as [a, b, ..., a], or None (depth-first search, three colours)."""
    state: dict[str, int] = {}  # 1 on the current path, 2 done
    stack: list[str] = []

    def dfs(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = dfs(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = dfs(node)
            if found:
                return found
    return None


# ---------------------------------------------------------------- the checker itself

def test_cycle_finder_finds_a_circle_and_only_a_circle():
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    # a diamond is no circle
    assert _find_cycle({"a": {"b", "c"}, "b": {"d"}, "c": {"d"}, "d": set()}) is None


def test_imports_inside_functions_and_relative_ones_count(tmp_path):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "m.py").write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    import pkg.hidden\n"
        "def f():\n    from . import other\n    import mlflow.pyfunc\n")
    assert _imports(pkg / "m.py", "pkg.m") == {"typing", "typing.TYPE_CHECKING", "pkg", "pkg.other",
                                               "mlflow.pyfunc"}


# ---------------------------------------------------------------- the project

def test_no_import_circle_in_the_core():
    modules = _modules("domainfm")
    assert "domainfm.tracking" in modules and "domainfm.jobs" in modules
    graph = _graph(modules)
    assert _find_cycle(graph) is None, " -> ".join(_find_cycle(graph))
    # the one MLflow module knows nothing of what it records (output: the leaf that quiets MLflow)
    assert not graph["domainfm.tracking"] - {"domainfm.errors", "domainfm.config", "domainfm.output"}, graph["domainfm.tracking"]
    assert not graph["domainfm.output"], graph["domainfm.output"]
    assert "domainfm.tracking" not in graph["domainfm.training"]


def test_no_plugin_imports_another_plugin():
    offenders = []
    for name, path in _modules("plugins").items():
        parts = name.split(".")
        if len(parts) < 2:
            continue
        own = parts[1]
        for imported in _imports(path, name):
            bits = imported.split(".")
            if bits[0] == "plugins" and len(bits) > 1 and bits[1] != own:
                offenders.append(f"{path.relative_to(REPO)} imports {imported}")
    assert not offenders, "\n".join(sorted(set(offenders)))


def test_mlflow_is_imported_only_by_tracking_and_pyfunc_model_files():
    allowed = {"domainfm/tracking.py", *PYFUNC_MODEL_FILES}
    offenders = []
    for name, path in {**_modules("domainfm"), **_modules("plugins"), **_modules("pipelines")}.items():
        rel = path.relative_to(REPO).as_posix()
        if rel in allowed:
            continue
        if any(i == "mlflow" or i.startswith("mlflow.") for i in _imports(path, name)):
            offenders.append(rel)
    assert not offenders, offenders


def test_mlflow_is_not_imported_by_the_core_jobs_layer():
    """The part of the mlflow rule this layer owns, held now (the whole rule above after merging)."""
    modules = _modules("domainfm")
    for name in ("domainfm.jobs", "domainfm.training", "domainfm.distributed", "domainfm.tasks.pretrain",
                 "domainfm.cli", "domainfm.config"):
        assert not any(i == "mlflow" or i.startswith("mlflow.") for i in _imports(modules[name], name)), name
