"""The package's import graph has no cycles (issue 11): every module of ``fusion_engine`` (and the
``triton_kernels`` it installs as ``fusion_engine.triton_kernels``) can be read bottom-up.

Imports are read from the source with :mod:`ast`, function-level (lazy) imports included: a cycle
hidden inside a function is still a cycle a reader has to untangle. Importing ``a.b.c`` also runs
``a`` and ``a.b``, but those implicit parent edges are not counted; ``from .. import name`` is an
edge to the submodule ``name`` when there is one, else to the package itself.
"""

from __future__ import annotations

import ast
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = {"fusion_engine": os.path.join(ROOT, "fusion_engine"),
            "fusion_engine.triton_kernels": os.path.join(ROOT, "triton_kernels")}


def package_modules() -> dict[str, str]:
    """Module name -> source file, for every .py file of the package (symlinks not followed) and the
    compiled extensions setup.py builds (leaves of the graph: they import no package module)."""
    with open(os.path.join(ROOT, "setup.py"), encoding="utf-8") as fh:
        modules = {name: "" for name in re.findall(r'"(fusion_engine\.\w+)"', fh.read())}
    for package, folder in PACKAGES.items():
        for directory, subdirs, files in os.walk(folder):
            subdirs[:] = [d for d in subdirs if d != "__pycache__"
                          and not os.path.islink(os.path.join(directory, d))]
            rel = os.path.relpath(directory, folder)
            prefix = package if rel == "." else f"{package}.{rel.replace(os.sep, '.')}"
            for file in files:
                if file.endswith(".py"):
                    name = prefix if file == "__init__.py" else f"{prefix}.{file[:-3]}"
                    modules[name] = os.path.join(directory, file)
    return modules


def import_edges(module: str, path: str, modules: dict[str, str]) -> set[str]:
    """The package modules ``module`` imports, anywhere in its source."""
    if not path:  # a compiled extension
        return set()
    is_package = os.path.basename(path) == "__init__.py"
    with open(path, encoding="utf-8") as fh:
        tree = ast.parse(fh.read(), path)
    edges = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = module.split(".") if is_package else module.split(".")[:-1]
                parts = parts[:len(parts) - (node.level - 1)]
                base = ".".join(parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:  # `import a.b.c` of a non-module attribute: its module
                target = target.rpartition(".")[0]
            if target and target != module:
                edges.add(target)
    return edges


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []

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


def test_the_checker_finds_cycles():
    assert import_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert import_cycles({"a": {"b"}, "b": set()}) == []


def test_the_graph_sees_lazy_and_relative_imports():
    modules = package_modules()
    graph = {m: import_edges(m, p, modules) for m, p in modules.items()}
    assert "fusion_engine.checkpoint.executor" in modules and "fusion_engine.triton_kernels" in modules
    assert "fusion_engine._C" in modules and not graph["fusion_engine._C"]
    assert "fusion_engine.checkpoint.planner" in graph["fusion_engine.cli"]  # imported inside merge()
    assert "fusion_engine.checkpoint.plan" in graph["fusion_engine.checkpoint.executor"]


def test_no_import_cycles_in_the_package():
    modules = package_modules()
    graph = {m: import_edges(m, p, modules) for m, p in modules.items()}
    cycles = import_cycles(graph)
    assert not cycles, "modules that import each other (directly or through others):\n" + "\n".join(
        " <-> ".join(c) for c in cycles)
