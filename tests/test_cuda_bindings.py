"""The CUDA launcher calls every _C_cuda binding by keyword, with exactly the binding's argument names.

The CUDA extension is not built without a GPU toolchain run, so this reads both sides as text: the
``py::arg`` names of each ``m.def`` in csrc/python/bind_cuda.cpp (all keyword-only) and the keywords
fusion_engine/launchers/cuda.py passes (``_launch`` adds ``stream``). A renamed or missing argument fails
here instead of on the first GPU run.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def binding_arguments() -> dict[str, list[str]]:
    source = (ROOT / "csrc" / "python" / "bind_cuda.cpp").read_text()
    out = {}
    for match in re.finditer(r'm\.def\("(\w+)",\s*&\w+,(.*?)"[^"]*"\);', source, re.DOTALL):
        name, body = match.group(1), match.group(2)
        if "py::arg(" in body:
            assert "py::kw_only()" in body, f"{name}: its arguments must be keyword-only"
            out[name] = re.findall(r'py::arg\("(\w+)"\)', body)
    return out


def launcher_keywords() -> dict[str, set[str]]:
    tree = ast.parse((ROOT / "fusion_engine" / "launchers" / "cuda.py").read_text())
    out = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "_launch":
            kernel = node.args[0]
            assert isinstance(kernel, ast.Attribute), ast.dump(kernel)
            assert len(node.args) == 2, f"{kernel.attr}: pass every binding argument by keyword"
            out[kernel.attr] = {k.arg for k in node.keywords} | {"stream"}
    return out


def test_the_cuda_launcher_passes_each_binding_its_own_keywords():
    bindings, calls = binding_arguments(), launcher_keywords()
    assert set(calls) <= set(bindings) and calls, (sorted(calls), sorted(bindings))
    for name, keywords in calls.items():
        assert keywords == set(bindings[name]), (name, sorted(keywords ^ set(bindings[name])))
