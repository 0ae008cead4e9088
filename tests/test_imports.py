"""The package's import graph has no cycle: no module of src/loraplace imports — at the top or lazily, inside a
function — a module that imports it back (directly or through others)."""

from __future__ import annotations

import ast
from pathlib import Path

from helpers import ROOT

SRC = ROOT / "src"


def _modules(src: Path) -> dict[str, Path]:
    out = {}
    for path in (src / "loraplace").rglob("*.py"):
        name = ".".join(path.relative_to(src).with_suffix("").parts)
        out[name.removesuffix(".__init__")] = path
    return out


def import_graph(src: Path = SRC) -> dict[str, set[str]]:
    """module → the loraplace modules it imports anywhere in its source (``from pkg import sub`` counts both the
    package, whose ``__init__`` runs, and the submodule)."""
    modules = _modules(src)
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                graph[name] |= {alias.name for alias in node.names if alias.name in modules}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: resolved against this module's package
                    parts = package.split(".")
                    base = ".".join(parts[:len(parts) - node.level + 1] + ([node.module] if node.module else []))
                if base in modules:
                    graph[name].add(base)
                graph[name] |= {f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in modules}
    for name in graph:
        graph[name].discard(name)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan, iteratively)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
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
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_no_module_imports_a_module_that_imports_it_back():
    graph = import_graph()
    assert {"loraplace.trial", "loraplace.fused", "loraplace.stepper", "loraplace.peft_io"} <= graph.keys()
    found = cycles(graph)
    assert not found, "import cycles: " + "; ".join(
        " ↔ ".join(f"{m} → {sorted(graph[m] & set(c))}" for m in c) for c in found)


def test_the_check_finds_a_cycle_through_a_lazy_import(tmp_path):
    """The check can fail: a cycle closed by an import inside a function (as fused ⇄ trial was) is found."""
    package = tmp_path / "loraplace"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "sub" / "__init__.py").write_text("from .inner import thing\n")
    (package / "sub" / "inner.py").write_text("thing = 1\n")
    (package / "a.py").write_text("from loraplace.b import helper\n")
    (package / "b.py").write_text("def helper():\n    from loraplace import a\n    return a\n")
    (package / "c.py").write_text("from loraplace.sub import thing\n")
    graph = import_graph(tmp_path)
    assert graph["loraplace.sub"] == {"loraplace.sub.inner"} and graph["loraplace.c"] == {"loraplace.sub"}
    assert cycles(graph) == [["loraplace.a", "loraplace.b"]]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
