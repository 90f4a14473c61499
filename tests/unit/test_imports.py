"""The `sparsify` package's import structure, read from the source with `ast` (nothing is imported).

- No import cycle between modules. Every ``import sparsify...`` / ``from sparsify... import ...``
  counts, at module level AND inside functions: a lazy import delays a cycle to the first call, it
  does not remove it (the two modules still depend on each other, and whichever is imported first
  sees the other half-initialised when the call happens during import). Two kinds of edge are not
  drawn: the implicit import of a module's parent package (Python runs ``pkg/__init__.py`` before
  ``pkg/mod.py``; a package that imports its own submodules is the normal package pattern), and
  imports under ``if TYPE_CHECKING:`` (never executed).
- No ``_private`` name of one package is used by another: neither ``from sparsify.x import _name``
  nor ``module._name`` on an imported sparsify module. Inside one package (same directory) private
  helpers may be shared.
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2] / "sparsify"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_of(name: str, path: Path) -> str:
    """The package a module belongs to (a package's __init__ belongs to itself)."""
    return name if path.name == "__init__.py" else name.rpartition(".")[0]


MODULES = {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    """ids of the nodes under ``if TYPE_CHECKING:`` blocks."""
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    return skip


def _absolute(node: ast.ImportFrom, name: str, path: Path) -> str:
    if not node.level:
        return node.module or ""
    base = package_of(name, path).split(".")
    base = base[:len(base) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


def imports(name: str, path: Path) -> list[tuple[str, str | None, int]]:
    """(target module, imported name or None, line) for every sparsify import in the module."""
    tree = ast.parse(path.read_text(), str(path))
    skip, found = _type_checking_nodes(tree), []
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "sparsify":
                    found.append((alias.name, None, node.lineno))
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(node, name, path)
            if base.split(".")[0] != "sparsify":
                continue
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.append((sub, None, node.lineno) if sub in MODULES else (base, alias.name, node.lineno))
    return found


def import_graph() -> dict[str, set[str]]:
    """module -> the sparsify modules it imports (self-imports dropped)."""
    graph = {}
    for name, path in MODULES.items():
        targets = set()
        for target, _, _ in imports(name, path):
            while target not in MODULES:  # `import sparsify.a.b` of a name that is not a file: its module
                target = target.rpartition(".")[0]
            if target != name:
                targets.add(target)
        graph[name] = targets
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as [a, b, ..., a], or None (iterative depth-first search, white/grey/black)."""
    state = dict.fromkeys(graph, 0)  # 0 unvisited, 1 on the stack, 2 done
    for start in sorted(graph):
        if state[start]:
            continue
        stack, state[start] = [(start, iter(sorted(graph[start])))], 1
        while stack:
            node, children = stack[-1]
            child = next(children, None)
            if child is None:
                state[node] = 2
                stack.pop()
            elif state[child] == 1:
                path = [n for n, _ in stack]
                return path[path.index(child):] + [child]
            elif state[child] == 0:
                state[child] = 1
                stack.append((child, iter(sorted(graph[child]))))
    return None


def all_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per tangle: while a cycle remains, report it and drop the modules it passes through."""
    graph, cycles = {k: set(v) for k, v in graph.items()}, []
    while (cycle := find_cycle(graph)) is not None:
        cycles.append(cycle)
        graph = {k: v - set(cycle) for k, v in graph.items() if k not in cycle}
    return cycles


def test_graph_sees_lazy_and_module_level_imports():
    graph = import_graph()
    assert "sparsify.errors" in graph["sparsify.config"]  # module level
    assert "sparsify.pipeline" in graph["sparsify"]  # inside a function (__getattr__)
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle():
    cycles = all_cycles(import_graph())
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def _cross_package(name: str, path: Path, target: str) -> bool:
    return package_of(target, MODULES[target]) != package_of(name, path)


def test_no_private_name_imported_across_packages():
    bad = []
    for name, path in MODULES.items():
        for target, imported, line in imports(name, path):
            if imported and imported.startswith("_") and not imported.startswith("__") \
                    and _cross_package(name, path, target):
                bad.append(f"{path.relative_to(ROOT.parent)}:{line}: from {target} import {imported}")
    assert not bad, "private names imported from another package:\n" + "\n".join(bad)


def test_no_private_attribute_of_another_package():
    """``from sparsify import registry`` then ``registry._load_all()`` is the same leak as importing it."""
    bad = []
    for name, path in MODULES.items():
        tree = ast.parse(path.read_text(), str(path))
        bound = {}  # local name -> sparsify module it stands for
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "sparsify":
                for alias in node.names:
                    if f"{node.module}.{alias.name}" in MODULES:
                        bound[alias.asname or alias.name] = f"{node.module}.{alias.name}"
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.asname and alias.name in MODULES:
                        bound[alias.asname] = alias.name
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in bound
                    and node.attr.startswith("_") and not node.attr.startswith("__")
                    and _cross_package(name, path, bound[node.value.id])):
                bad.append(f"{path.relative_to(ROOT.parent)}:{node.lineno}: {bound[node.value.id]}.{node.attr}")
    assert not bad, "private names of another package used:\n" + "\n".join(bad)
