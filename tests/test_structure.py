"""The package's import structure: no module-level import cycles, between modules or between rooms.

A *room* is a top-level module (``slimformer.train``) or subpackage (``slimformer.prune``) of ``slimformer``; a
module-level import from one room into another means the first builds on the second, so rooms must form layers too
(e.g. ``importance`` may use ``gates`` but not ``prune``, because ``prune`` uses ``importance``). Imports inside
functions and under ``if TYPE_CHECKING:`` do not run at import time and are not counted.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "slimformer"


def module_names(package: Path = PACKAGE) -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package (``__init__.py`` names its package)."""
    names = {}
    for path in sorted(package.rglob("*.py")):
        parts = list(path.relative_to(package.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        names[".".join(parts)] = path
    return names


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def module_level_imports(tree: ast.Module) -> Iterator[ast.Import | ast.ImportFrom]:
    """Import statements that run when the module is imported: not in functions, not under TYPE_CHECKING."""
    pending: list[ast.stmt] = list(tree.body)
    while pending:
        node = pending.pop(0)
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        elif isinstance(node, ast.If) and _is_type_checking(node):
            pending.extend(node.orelse)
        else:
            # if / try / with / class bodies at module level run on import
            for field in ("body", "orelse", "finalbody", "handlers"):
                pending.extend(getattr(node, field, []) or [])


def _absolute(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    """Module -> the package's modules it imports at module level."""
    names = module_names(package)
    graph: dict[str, set[str]] = {}
    for module, path in names.items():
        is_package = path.name == "__init__.py"
        targets: set[str] = set()
        for node in module_level_imports(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            else:
                source = _absolute(module, is_package, node)
                targets.add(source)
                # "from package import submodule" imports the submodule too
                targets.update(f"{source}.{alias.name}" for alias in node.names)
        graph[module] = {t for t in targets if t in names and t != module}
    return graph


def room_of(module: str) -> str:
    """``slimformer.prune.apply`` -> ``slimformer.prune``; a top-level module is its own room."""
    return ".".join(module.split(".")[:2])


def room_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    rooms: dict[str, set[str]] = {}
    for module, targets in graph.items():
        room = room_of(module)
        rooms.setdefault(room, set()).update(room_of(t) for t in targets if room_of(t) != room)
    return rooms


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as ``[a, b, ..., a]``, or None when the graph is acyclic (depth-first search, sorted order)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: finished
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                return [*path[path.index(target) :], target]
            if target not in state:
                found = visit(target)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"x": {"y"}, "y": {"z"}, "z": {"y"}}) == ["y", "z", "y"]


def test_the_graph_reads_module_level_imports_only(tmp_path):
    package = tmp_path / "slimformer"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "sub" / "__init__.py").write_text("from slimformer.sub import leaf\n")
    (package / "sub" / "leaf.py").write_text(
        "from typing import TYPE_CHECKING\n"
        "from .. import top\n"
        "if TYPE_CHECKING:\n    from slimformer import hidden\n"
        "def f():\n    from slimformer import late\n"
    )
    for name in ("top", "hidden", "late"):
        (package / f"{name}.py").write_text("import slimformer.sub.leaf\n" if name == "top" else "")
    graph = import_graph(package)
    assert graph["slimformer.sub"] == {"slimformer.sub.leaf"}
    assert graph["slimformer.sub.leaf"] == {"slimformer", "slimformer.top"}
    assert find_cycle(graph) == ["slimformer.sub.leaf", "slimformer.top", "slimformer.sub.leaf"]
    assert room_graph(graph)["slimformer.sub"] == {"slimformer", "slimformer.top"}


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    graph = import_graph()
    assert "slimformer.models" in graph and "slimformer.prune.apply" in graph  # the package was found
    return graph


def test_no_module_level_import_cycle(graph):
    cycle = find_cycle(graph)
    assert cycle is None, "module-level import cycle: " + " -> ".join(cycle or [])


def test_no_import_cycle_between_rooms(graph):
    cycle = find_cycle(room_graph(graph))
    assert cycle is None, "rooms import each other: " + " -> ".join(cycle or [])


def test_the_portable_module_needs_only_torch():
    # its source is copied into saved folders and run where slimformer is not installed (slimformer.remote_code)
    path = PACKAGE / "portable.py"
    imported = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            imported.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            imported.add((node.module or "").split(".")[0])
    assert imported <= {"__future__", "collections", "typing", "warnings", "torch"}, imported
