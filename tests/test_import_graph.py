"""No module and no package imports another in a circle.

The imports are read from the source with ``ast`` (nothing is imported or run), every
import in a file, a function's included: an import deferred to call time is still a
dependency. Three folders are the source, under the names they import as
(``pyproject.toml``): ``flotilla/``, ``services/`` (``flotilla.services``) and
``clients/`` (``flotilla.clients``).

Two graphs must be free of circles:

- modules: A -> B when module A imports module B;
- packages: within each package its children, modules and subpackages, are the nodes, and
  child A -> child B when something inside A imports something inside B. An import from a
  subpackage up to a module of its parent (an adapter naming the port it implements) is an
  arrow between siblings of the parent, not a circle; ``services/batcher`` importing
  ``services/router`` while ``router`` imports ``batcher`` is one.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ROOTS = {"flotilla": REPO / "flotilla", "flotilla.services": REPO / "services", "flotilla.clients": REPO / "clients"}

Module = tuple[str, ...]
"""A module as its dotted name's parts; a package's ``__init__`` ends in ``"__init__"``."""


def source_modules() -> dict[Module, Path]:
    modules: dict[Module, Path] = {}
    for prefix, root in ROOTS.items():
        for path in root.rglob("*.py"):
            if "__pycache__" in path.parts:
                continue
            modules[(*prefix.split("."), *path.relative_to(root).with_suffix("").parts)] = path
    return modules


def imported_names(tree: ast.Module, module: Module) -> Iterator[tuple[str, int]]:
    """Every dotted name the module imports (``from a import b`` gives ``a.b``), with its line."""
    package = module[:-1]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package[: len(package) - node.level + 1]
                base = ".".join(filter(None, [*parent, base]))
            for alias in node.names:
                yield f"{base}.{alias.name}", node.lineno


def resolve(name: str, modules: dict[Module, Path]) -> Module | None:
    """The source module a dotted name lands in: the longest prefix that is one, or None."""
    parts = tuple(name.split("."))
    for end in range(len(parts), 0, -1):
        for candidate in (parts[:end], (*parts[:end], "__init__")):
            if candidate in modules:
                return candidate
    return None


def import_graph() -> dict[Module, dict[Module, int]]:
    """module -> {module it imports: the line of the first such import}."""
    modules = source_modules()
    graph: dict[Module, dict[Module, int]] = {}
    for module, path in modules.items():
        edges = graph.setdefault(module, {})
        for name, line in imported_names(ast.parse(path.read_text(), str(path)), module):
            target = resolve(name, modules)
            if target is not None and target != module:
                edges.setdefault(target, line)
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one node (Tarjan), each sorted."""
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
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def dotted(module: Module) -> str:
    return ".".join(module[:-1] if module[-1] == "__init__" else module)


def where(module: Module, line: int) -> str:
    return f"{dotted(module)}:{line}"


def module_circles(graph: dict[Module, dict[Module, int]]) -> list[str]:
    named = {dotted(a): {dotted(b) for b in targets} for a, targets in graph.items()}
    by_name = {dotted(m): m for m in graph}
    report = []
    for members in circles(named):
        ties = [
            f"{a} -> {b} ({where(by_name[a], graph[by_name[a]][by_name[b]])})"
            for a in members for b in members if b in named[a]
        ]
        report.append("modules " + ", ".join(members) + ": " + "; ".join(ties))
    return report


def sibling_edges(graph: dict[Module, dict[Module, int]]) -> Iterable[tuple[Module, str, str, str]]:
    """(package, child, child, the import that ties them) for every import between two children of a package."""
    for source, targets in graph.items():
        for target, line in targets.items():
            depth = 0
            while depth < min(len(source), len(target)) - 1 and source[depth] == target[depth]:
                depth += 1
            yield source[:depth], source[depth], target[depth], f"{where(source, line)} imports {dotted(target)}"


def package_circles(graph: dict[Module, dict[Module, int]]) -> list[str]:
    packages = {m[:-1] for m in graph if m[-1] == "__init__"}
    siblings: dict[Module, dict[str, set[str]]] = {}
    witness: dict[tuple[Module, str, str], str] = {}
    for package, a, b, why in sibling_edges(graph):
        siblings.setdefault(package, {}).setdefault(a, set()).add(b)
        witness.setdefault((package, a, b), why)
    report = []
    for package, children in sorted(siblings.items()):
        for members in circles(children):
            if not any((*package, child) in packages for child in members):
                continue  # modules only: a module circle, reported as one
            ties = [witness[(package, a, b)] for a in members for b in members if b in children.get(a, ())]
            report.append(f"in {'.'.join(package)}: " + ", ".join(members) + ": " + "; ".join(ties))
    return report


def test_the_source_is_read() -> None:
    graph = import_graph()
    assert ("flotilla", "cli") in graph
    assert ("flotilla", "services", "router", "server") in graph
    assert ("flotilla", "common", "server") in graph[("flotilla", "services", "router", "server")]


def test_no_module_imports_another_in_a_circle() -> None:
    found = module_circles(import_graph())
    assert found == [], "import circles between modules:\n" + "\n".join(found)


def test_no_package_imports_another_in_a_circle() -> None:
    found = package_circles(import_graph())
    assert found == [], "import circles between packages:\n" + "\n".join(found)


def test_a_circle_is_found() -> None:
    """The checks see a circle where one is: two packages, and two modules, that import each other."""
    a = ("flotilla", "services", "a", "m")
    b = ("flotilla", "services", "b", "m")
    graph = {
        a: {b: 1}, b: {a: 2},
        ("flotilla", "services", "a", "__init__"): {}, ("flotilla", "services", "b", "__init__"): {},
    }
    assert package_circles(graph) == [
        "in flotilla.services: a, b: flotilla.services.a.m:1 imports flotilla.services.b.m; "
        "flotilla.services.b.m:2 imports flotilla.services.a.m"
    ]
    assert len(module_circles(graph)) == 1
