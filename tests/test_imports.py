"""The import graph of crosscoder_pl: no cycles (function-level imports counted), analysis/ below dashboard/.

Every module is parsed with `ast` (nothing is imported); each ``import a.b`` and ``from a.b import c`` anywhere in
the file, at module level or inside a function, is an edge to the imported crosscoder_pl module (``c`` itself
when ``a.b.c`` is a module of the package, else ``a.b``). A strongly connected component of more than one module,
or a module importing itself, is a cycle; the test names it as a path ``a -> b -> ... -> a``.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = "crosscoder_pl"
ROOT = Path(__file__).resolve().parents[1] / PACKAGE


def modules(root: Path = ROOT) -> dict[str, Path]:
    """Dotted module name -> file, for every ``.py`` file of the package (``pkg/__init__.py`` is ``pkg``)."""
    found = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root.parent).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The modules of ``known`` that module ``name`` (file ``path``) imports, at any depth of its code."""
    is_package = path.name == "__init__.py"
    edges: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            edges |= {_owner(alias.name, known) for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(node, name, is_package)
            for alias in node.names:
                child = f"{base}.{alias.name}"
                edges.add(child if child in known else _owner(base, known))
    return edges - {None}


def _absolute(node: ast.ImportFrom, name: str, is_package: bool) -> str:
    """The absolute module of ``from ... import`` (relative imports resolved against ``name``)."""
    if not node.level:
        return node.module or ""
    parts = name.split(".")
    anchor = parts if is_package else parts[:-1]
    anchor = anchor[: len(anchor) - (node.level - 1)]
    return ".".join([*anchor, *([node.module] if node.module else [])])


def _owner(dotted: str, known: set[str]) -> str | None:
    """The longest prefix of ``dotted`` that is a module of the package (None: not the package's)."""
    parts = dotted.split(".")
    for end in range(len(parts), 0, -1):
        if ".".join(parts[:end]) in known:
            return ".".join(parts[:end])
    return None


def graph(root: Path = ROOT) -> dict[str, set[str]]:
    found = modules(root)
    known = set(found)
    return {name: imports(name, path, known) for name, path in found.items()}


def strongly_connected(edges: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm, iterative: the strongly connected components of ``edges``."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []
    for start in sorted(edges):
        if start in index:
            continue
        work = [(start, iter(sorted(edges[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                components.append(sorted(component))
    return components


def cycle_path(component: list[str], edges: dict[str, set[str]]) -> list[str]:
    """One cycle through ``component``'s first module, as a path that ends where it starts (breadth first)."""
    start, members = component[0], set(component)
    if start in edges[start]:
        return [start, start]
    previous: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for child in sorted(edges[node] & members):
                if child == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(previous[path[-1]])
                    return [*reversed(path), start]
                if child not in previous:
                    previous[child] = node
                    following.append(child)
        frontier = following
    return component


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    return [cycle_path(c, edges) for c in strongly_connected(edges) if len(c) > 1 or c[0] in edges[c[0]]]


def test_the_graph_sees_function_level_and_submodule_imports(tmp_path):
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "sub" / "__init__.py").write_text("from pkg.sub import b\n")
    (package / "a.py").write_text("def f():\n    from pkg.sub import b\n")
    (package / "sub" / "b.py").write_text("from .. import a\nfrom pkg.sub import VALUE\n")
    edges = graph(package)
    assert edges["pkg.a"] == {"pkg.sub.b"}
    assert edges["pkg.sub.b"] == {"pkg.a", "pkg.sub"}
    assert edges["pkg.sub"] == {"pkg.sub.b"}
    assert sorted(map(sorted, strongly_connected(edges)))[-1] == ["pkg.a", "pkg.sub", "pkg.sub.b"]
    path = cycles(edges)[0]
    assert path[0] == path[-1] and len(path) >= 3


def test_no_import_cycles():
    edges = graph()
    found = cycles(edges)
    assert not found, "import cycles in crosscoder_pl (function-level imports count):\n" + "\n".join(
        "  " + " -> ".join(path) for path in found
    )


def test_analysis_does_not_import_the_dashboard():
    edges = graph()
    wrong = {
        name: sorted(m for m in targets if m == f"{PACKAGE}.dashboard" or m.startswith(f"{PACKAGE}.dashboard."))
        for name, targets in edges.items()
        if name == f"{PACKAGE}.analysis" or name.startswith(f"{PACKAGE}.analysis.")
    }
    wrong = {name: targets for name, targets in wrong.items() if targets}
    assert not wrong, "crosscoder_pl.analysis must not import crosscoder_pl.dashboard: " + "; ".join(
        f"{name} imports {', '.join(targets)}" for name, targets in sorted(wrong.items())
    )
