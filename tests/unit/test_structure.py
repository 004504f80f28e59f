"""The code's shape: modules stay small, and no import cycle among HAIF's modules.

Read from the source with ``ast``, nothing is imported.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).parents[2]
PACKAGES = ("haif", "actors")
MAX_MODULE_LINES = 600


def module_files() -> dict[str, Path]:
    """Every module of haif/ and actors/ by its dotted name (a package by its ``__init__``)."""
    out: dict[str, Path] = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            if any(part in ("node_modules", "__pycache__") for part in parts):
                continue
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _import_time_statements(body: list[ast.stmt]) -> list[ast.Import | ast.ImportFrom]:
    """The imports that run when the module is imported: at the top level, in top-level
    ``if``/``try``/``with`` blocks and class bodies; not in functions, not under
    ``if TYPE_CHECKING:`` (its ``else`` does run)."""
    out: list[ast.Import | ast.ImportFrom] = []
    for node in body:
        if isinstance(node, ast.Import | ast.ImportFrom):
            out.append(node)
        elif isinstance(node, ast.If):
            if not _is_type_checking(node.test):
                out += _import_time_statements(node.body)
            out += _import_time_statements(node.orelse)
        elif isinstance(node, ast.Try):
            for block in (node.body, node.orelse, node.finalbody, *(h.body for h in node.handlers)):
                out += _import_time_statements(block)
        elif isinstance(node, ast.With | ast.ClassDef):
            out += _import_time_statements(node.body)
    return out


def imports_of(name: str, path: Path, modules: set[str]) -> set[str]:
    """The modules of ``modules`` that module ``name`` imports when it is imported.

    ``import a.b`` and ``from a.b import c`` import ``a.b`` (its ``__init__`` if a package);
    ``from a import b`` imports the submodule ``a.b`` when there is one. The parent packages
    Python initialises on the way are not counted: a package's submodules importing their
    siblings is no cycle.
    """
    is_package = path.name == "__init__.py"
    package = name if is_package else name.rpartition(".")[0]
    found: set[str] = set()
    for node in _import_time_statements(ast.parse(path.read_text(encoding="utf-8")).body):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        else:
            if node.level:
                base_parts = package.split(".")
                base_parts = base_parts[: len(base_parts) - (node.level - 1)]
                base = ".".join(base_parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            targets = []
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                targets.append(sub if sub in modules else base)
        found.update(t for t in targets if t in modules)
    found.discard(name)
    return found


def import_graph() -> dict[str, set[str]]:
    files = module_files()
    names = set(files)
    return {name: imports_of(name, path, names) for name, path in files.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle through each strongly connected component of more than one module
    (Tarjan's algorithm, then a shortest way back within the component)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.add(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(component)

    for node in sorted(graph):
        if node not in index:
            visit(node)

    out = []
    for component in components:
        start = min(component)
        # Breadth-first from start's successors back to start, inside the component.
        paths = {n: [start, n] for n in sorted(graph[start] & component)}
        frontier = list(paths)
        while start not in paths and frontier:
            nxt_frontier = []
            for node in frontier:
                for succ in sorted(graph[node] & component):
                    if succ not in paths:
                        paths[succ] = [*paths[node], succ]
                        nxt_frontier.append(succ)
            frontier = nxt_frontier
        out.append(paths.get(start, sorted(component)))
    return sorted(out)


def test_the_graph_sees_imports() -> None:
    """The parser finds what is there: absolute, relative, package and TYPE_CHECKING cases."""
    graph = import_graph()
    assert "haif.exceptions" in graph["haif.config._base"]
    assert "haif.config.root" in graph["haif.config.loading"]
    assert "haif.config.models" in graph["haif.config"]  # a package: its __init__
    assert "haif.config" not in graph["haif.bootstrap"]  # under TYPE_CHECKING only
    assert "haif.exceptions" in graph["haif.p2p.errors"]  # from haif import exceptions


def test_cycle_finder_reports_a_cycle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert cycles(graph) == [["a", "b", "c", "a"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles() -> None:
    found = cycles(import_graph())
    assert not found, "import cycles among haif/ and actors/ modules:\n" + "\n".join(
        "  " + " -> ".join(cycle) for cycle in found
    )


def test_no_module_is_too_long() -> None:
    long = {
        str(path.relative_to(ROOT)): n
        for path in module_files().values()
        if (n := len(path.read_text(encoding="utf-8").splitlines())) > MAX_MODULE_LINES
    }
    assert not long, f"modules over {MAX_MODULE_LINES} lines (split them by responsibility): {long}"
