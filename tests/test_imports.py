"""No import cycle anywhere in the zoexp package, read statically from the source (ast).

What counts as an import of module B by module A: any ``import`` statement in A's source -- at module
level, inside functions and under ``if TYPE_CHECKING:`` alike (a function-level import only delays a
cycle, it does not remove it). ``from P import n`` imports ``P.n`` when that is a module of the package,
else ``P``; relative imports are resolved. Importing a submodule is not counted as importing its
parent package's ``__init__`` (every submodule import runs it; counting that would make every package
that re-exports its submodules, like ``zoexp.methods``, a cycle by construction).
"""

from __future__ import annotations

from conftest import REPO

from zoexp.provenance import import_graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_zoexp_has_no_import_cycle():
    graph = import_graph(REPO / "zoexp")
    assert len(graph) > 20 and "zoexp.runner" in graph
    found = cycles(graph)
    described = ["; ".join(f"{m} -> {sorted(graph[m] & set(c))}" for m in c) for c in found]
    assert not found, "import cycles in zoexp:\n" + "\n".join(described)


def test_the_model_side_ring_imports_no_method():
    assert not {m for m in import_graph(REPO / "zoexp")["zoexp.offload"] if m.startswith("zoexp.methods")}


def test_the_checker_finds_cycles_through_function_level_and_relative_imports(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("from pkg import a\n")
    (pkg / "a.py").write_text("import os\n\ndef f():\n    from pkg.sub import b\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "b.py").write_text("from .. import a\n")
    (pkg / "c.py").write_text("from pkg.sub.b import f\n")  # imports b, not a cycle
    graph = import_graph(pkg)
    assert graph["pkg.a"] == {"pkg.sub.b"} and graph["pkg.sub.b"] == {"pkg.a"}
    assert cycles(graph) == [["pkg.a", "pkg.sub.b"]]
