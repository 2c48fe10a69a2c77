"""The package's import graph has no cycles.

Every ``import``, ``from ... import`` and ``importlib.import_module("...")`` of a resnet_fast
module counts, at module level, inside
``if`` blocks (``TYPE_CHECKING`` included) and inside functions alike: a function-local import
that closes a cycle is still a cycle between two modules that need each other.
``from resnet_fast import x`` imports ``resnet_fast.x`` where ``x`` is a submodule, else the
package ``resnet_fast`` itself (the parent packages Python runs first on the way to a submodule
do not count: they are no dependency of the module's own). Read from the source (no module is
imported), so the check runs in a fraction of a second.

Run as a script (``python tests/test_import_graph.py``) it prints every cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = "resnet_fast"
ROOT = Path(__file__).resolve().parent.parent / PACKAGE


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _is_import_module_call(node: ast.AST) -> bool:
    """``importlib.import_module("literal")`` (or ``import_module("literal")``)."""
    if not isinstance(node, ast.Call) or not node.args:
        return False
    func = node.func
    name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
    return (name == "import_module" and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str))


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The resnet_fast modules that module ``name`` (its source at ``path``) imports."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if _is_import_module_call(node):
            found.add(node.args[0].value)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from the package level - 1 steps up
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module
            for alias in node.names:  # a submodule, or a name defined by ``source`` itself
                submodule = f"{source}.{alias.name}"
                found.add(submodule if submodule in modules else source)
    return {m for m in found if m in modules and m != name}


def import_graph() -> dict[str, set[str]]:
    """Module -> the resnet_fast modules it imports, for every module of the package."""
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import cycles of ``graph``: for every module on one, a shortest cycle through it,
    each cycle once, as a closed path ``[a, b, ..., a]`` that starts at its first module."""
    found = []
    for start in sorted(graph):
        path = _shortest_cycle(graph, start)
        if path is None:
            continue
        first = path.index(min(path))
        cycle = [*path[first:], *path[:first]]
        if cycle + cycle[:1] not in found:
            found.append(cycle + cycle[:1])
    return found


def _shortest_cycle(graph: dict[str, set[str]], start: str):
    """The modules of a shortest cycle through ``start`` (breadth first), or ``None``."""
    parents = {start: None}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v]):
                if w == start:  # the path start .. v, closed by the edge v -> start
                    path = [v]
                    while path[-1] != start:
                        path.append(parents[path[-1]])
                    return path[::-1]
                if w not in parents:
                    parents[w] = v
                    nxt.append(w)
        frontier = nxt
    return None


def _describe(found: list[list[str]]) -> str:
    return "\n".join(" -> ".join(c) for c in found)


def test_graph_sees_the_package():
    graph = import_graph()
    assert {"resnet_fast", "resnet_fast.ops", "resnet_fast.functional",
            "resnet_fast.triton.bn_act"} <= set(graph)
    assert "resnet_fast.dispatch" in graph["resnet_fast.functional"]
    assert "resnet_fast.backends" in graph["resnet_fast.dispatch"]


def test_cycles_are_found():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": {"c"}, "e": {"a"}}
    assert cycles(graph) == [["a", "b", "c", "a"], ["c", "d", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_leaves_import_nothing_of_the_package():
    """The conventions every layer shares and the extension's loader sit below everything."""
    graph = import_graph()
    for leaf in ("resnet_fast._conventions", "resnet_fast._extension"):
        assert graph[leaf] == set(), f"{leaf} imports {sorted(graph[leaf])}"


def test_triton_kernels_need_only_the_conventions():
    """The Triton modules import each other and the conventions only: not the op layer nor
    the compiled extension."""
    graph = import_graph()
    kernels = {m for m in graph if m.startswith("resnet_fast.triton.")}
    for module in sorted(kernels):
        extra = graph[module] - kernels - {"resnet_fast._conventions"}
        assert not extra, f"{module} imports {sorted(extra)}"


def test_no_import_cycles():
    found = cycles(import_graph())
    assert not found, "import cycles in resnet_fast:\n" + _describe(found)


if __name__ == "__main__":
    print(_describe(cycles(import_graph())) or "no import cycles")
