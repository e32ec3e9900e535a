"""Imports run one way: ``cli`` -> commands -> library, and no module of the package imports
itself back through others (no import cycle).

The graph: one node per module of ``streamvae/`` (a package is its ``__init__``), an edge for
every import of another ``streamvae`` module anywhere in a file, inside functions too (a lazy
import still ties the two modules together for a reader), ``importlib.import_module("...")``
with a literal name included, and imports under ``if TYPE_CHECKING:`` too (a type-only import
still ties the two modules together for a reader). Relative imports are resolved; ``from pkg
import name`` is an edge to ``pkg.name`` where that is a module, else to ``pkg``. Not an edge:
the implicit import of a module's parent packages (every submodule would otherwise form a cycle
with a package ``__init__`` that re-exports it). Strings such as ``logging.getLogger("streamvae.fleet")`` are not imports.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Mapping
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "streamvae"

# The layers above the library: the top (nothing imports it) and the commands it runs.
TOP = "streamvae.cli"
COMMANDS = frozenset(
    {
        "streamvae.io.commands",
        "streamvae.io.serve",
        "streamvae.fleet.commands",
        "streamvae.web.commands",
        "streamvae.bench.command",
        "streamvae.bench.__main__",
    }
)

Graph = dict[str, set[str]]


def module_names(root: Path) -> dict[str, Path]:
    """``{"pkg.sub.mod": path}`` for every ``.py`` file under the package folder ``root``."""
    names = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        names[".".join(parts)] = path
    return names


class _Imports(ast.NodeVisitor):
    """Every imported module name in a file (absolute, relative ones resolved)."""

    def __init__(self, module: str, is_package: bool) -> None:
        self.package = module.split(".") if is_package else module.split(".")[:-1]
        self.found: list[tuple[str, tuple[str, ...]]] = []  # (module, names imported from it)

    def visit_Import(self, node: ast.Import) -> None:
        self.found += [(alias.name, ()) for alias in node.names]

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.level:
            base = self.package[: len(self.package) - node.level + 1]
            name = ".".join(base + ([node.module] if node.module else []))
        else:
            name = node.module or ""
        self.found.append((name, tuple(alias.name for alias in node.names)))

    def visit_Call(self, node: ast.Call) -> None:
        func = node.func
        called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
        if (
            called == "import_module"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            self.found.append((node.args[0].value, ()))
        self.generic_visit(node)


def _known(name: str, modules: Iterable[str]) -> str | None:
    """``name`` or its longest prefix that is one of ``modules``."""
    known = set(modules)
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        candidate = ".".join(parts[:end])
        if candidate in known:
            return candidate
    return None


def import_graph(root: Path) -> Graph:
    """The package's import graph (see the module docstring for what counts as an edge)."""
    modules = module_names(root)
    graph: Graph = {}
    for module, path in modules.items():
        visitor = _Imports(module, path.name == "__init__.py")
        visitor.visit(ast.parse(path.read_text(), filename=str(path)))
        targets: set[str] = set()
        for name, names in visitor.found:
            submodules = [f"{name}.{n}" for n in names if f"{name}.{n}" in modules]
            resolved = submodules if submodules else [_known(name, modules)]
            if submodules and len(submodules) < len(names):  # also plain names from the package
                resolved.append(_known(name, modules))
            targets |= {t for t in resolved if t is not None and t != module}
        graph[module] = targets
    return graph


def find_cycles(graph: Mapping[str, Iterable[str]]) -> list[list[str]]:
    """One cycle (``[a, b, ..., a]``) per strongly connected component that has one."""
    edges = {node: sorted(set(targets)) for node, targets in graph.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def connect(node: str) -> None:  # Tarjan's algorithm
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in edges.get(node, []):
            if target not in index:
                connect(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            components.append(component)

    for node in sorted(edges):
        if node not in index:
            connect(node)
    cycles = []
    for component in components:
        members = set(component)
        start = min(component)
        if len(component) == 1 and start not in edges.get(start, []):
            continue
        # The shortest path from start back to start inside the component.
        paths = {start: [start]}
        frontier = [start]
        while frontier:
            following = []
            for node in frontier:
                for target in edges.get(node, []):
                    if target == start:
                        cycles.append(paths[node] + [start])
                        following = []
                        break
                    if target in members and target not in paths:
                        paths[target] = paths[node] + [target]
                        following.append(target)
                else:
                    continue
                break
            frontier = following
    return sorted(cycles)


def reachable(graph: Mapping[str, Iterable[str]], start: str) -> set[str]:
    seen: set[str] = set()
    todo = [start]
    while todo:
        for target in graph.get(todo.pop(), []):
            if target not in seen:
                seen.add(target)
                todo.append(target)
    return seen


@pytest.fixture(scope="module")
def graph() -> Graph:
    return import_graph(PACKAGE)


def test_the_package_has_no_import_cycle(graph):
    cycles = find_cycles(graph)
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_nothing_imports_the_cli(graph):
    callers = sorted(m for m, targets in graph.items() if TOP in targets)
    assert not callers, f"{TOP} is the top: nothing may import it, but {callers} do"


def test_library_modules_import_no_command(graph):
    for name in COMMANDS - {"streamvae.bench.__main__"}:
        assert name in graph, f"{name} is listed as a command module but does not exist"
    wrong = {
        module: sorted(targets & COMMANDS)
        for module, targets in graph.items()
        if module not in COMMANDS and module != TOP and targets & COMMANDS
    }
    assert not wrong, f"library modules import commands (their callers): {wrong}"


def test_io_never_imports_the_bench(graph):
    for module in graph:
        if module == "streamvae.io" or module.startswith("streamvae.io."):
            bench = sorted(
                m
                for m in reachable(graph, module)
                if m == "streamvae.bench" or m.startswith("streamvae.bench.")
            )
            assert not bench, f"{module} reaches {bench}"


def test_the_graph_sees_the_imports_it_should(graph):
    """Edges the rules above rely on: top-level, lazy (inside a function), relative-free
    ``from pkg import module``, and ``importlib.import_module`` all count."""
    assert "streamvae.io.commands" in graph["streamvae.cli"]  # a lazy import in build_parser
    assert "streamvae.fleet.commands" in graph["streamvae.cli"]  # importlib.import_module
    assert "streamvae.bench.command" in graph["streamvae.cli"]
    assert "streamvae.model_args" in graph["streamvae.io.commands"]
    assert "streamvae.stream" in graph["streamvae"]


def test_find_cycles_names_a_synthetic_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "e": {"e"}, "f": {"a"}}
    assert find_cycles(graph) == [["a", "b", "c", "a"], ["e", "e"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def test_import_graph_of_a_synthetic_package(tmp_path):
    """Lazy, relative and TYPE_CHECKING-only imports all make edges (and so cycles); a logger's
    dotted name does not."""
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("from pkg.low import thing\n")
    (package / "low.py").write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from pkg.top import Top\n"
        "thing = 1\n"
        "def later():\n    from .sub import lazy\n"
    )
    (package / "top.py").write_text(
        "import logging\nlogging.getLogger('pkg.low')\nclass Top: ...\n"
        "def f():\n    import importlib\n    importlib.import_module('pkg.sub')\n"
    )
    (package / "sub" / "__init__.py").write_text("")
    (package / "sub" / "lazy.py").write_text("from .. import low\nfrom ..top import Top\n")
    graph = import_graph(package)
    assert graph == {
        "pkg": {"pkg.low"},
        "pkg.low": {"pkg.sub.lazy", "pkg.top"},
        "pkg.top": {"pkg.sub"},
        "pkg.sub": set(),
        "pkg.sub.lazy": {"pkg.low", "pkg.top"},
    }
    # One strongly connected component, named by its shortest cycle from its first module.
    assert find_cycles(graph) == [["pkg.low", "pkg.sub.lazy", "pkg.low"]]
    del graph["pkg.sub.lazy"]
    assert find_cycles(graph) == []
