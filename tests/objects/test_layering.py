"""The objects package is layered: no import cycle (type-checking imports included), and no part
imports the worker, the composition root that wires them."""

from __future__ import annotations

import ast
from pathlib import Path

import durable.objects

PACKAGE = Path(durable.objects.__file__).parent


def _imports(path: Path) -> set[str]:
    """Modules of durable.objects that ``path`` imports, by dotted name relative to the package."""
    here = path.relative_to(PACKAGE).with_suffix("").parts
    package = here[:-1]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, ast.ImportFrom) or node.level == 0:
            continue
        base = list(package[: len(package) - (node.level - 1)] if node.level > 1 else package)
        if node.level - 1 > len(package):
            continue  # above the package (..core, ..client)
        target = [*base, *(node.module.split(".") if node.module else [])]
        for alias in node.names:
            candidate = [*target, alias.name]
            if (PACKAGE.joinpath(*candidate).with_suffix(".py")).exists():
                found.add(".".join(candidate))
            elif target and (PACKAGE.joinpath(*target).with_suffix(".py").exists()
                             or PACKAGE.joinpath(*target, "__init__.py").exists()):
                found.add(".".join(target))
    return found


def _graph() -> dict[str, set[str]]:
    graph = {}
    for path in PACKAGE.rglob("*.py"):
        name = ".".join(path.relative_to(PACKAGE).with_suffix("").parts)
        if name.endswith("__init__"):
            continue  # the package's own re-exports sit above everything
        graph[name] = {m for m in _imports(path) if not m.endswith("__init__") and m}
    return graph


def test_no_part_imports_the_worker() -> None:
    graph = _graph()
    assert "worker" in graph
    importers = sorted(name for name, deps in graph.items() if "worker" in deps)
    assert importers == [], f"these modules import the composition root back: {importers}"


def test_the_objects_package_has_no_import_cycle() -> None:
    graph = _graph()
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for dep in sorted(graph.get(node, ())):
            if dep not in graph:
                continue
            if state.get(dep) == 1:
                cycle = path[path.index(dep):] + [dep]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep)
        path.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
