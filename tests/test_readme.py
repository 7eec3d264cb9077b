"""The README's Python snippets run as pasted (issue 14).

Every ```python fenced block of README.md is executed on its own: a fresh namespace, a fresh temporary
working directory, the package importable. A block must therefore be self-contained (it builds the
small tensors or models it uses); commands and configs the user supplies files for are ```bash /
```yaml blocks, which are not run.
"""

from __future__ import annotations

import os
import re

import pytest

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def python_blocks() -> list[tuple[int, str]]:
    """(line number, source) of every ```python block of the README, in order."""
    with open(README, encoding="utf-8") as f:
        text = f.read()
    blocks = []
    for match in re.finditer(r"^```python[ \t]*\n(.*?)^```[ \t]*$", text, re.MULTILINE | re.DOTALL):
        blocks.append((text.count("\n", 0, match.start()) + 1, match.group(1)))
    return blocks


def test_the_readme_has_python_blocks():
    assert len(python_blocks()) >= 3


@pytest.mark.parametrize("line,source", python_blocks(), ids=[f"README.md:{line}" for line, _ in python_blocks()])
def test_readme_python_block_runs_as_pasted(line, source, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = compile(source, f"README.md (block at line {line})", "exec")
    exec(code, {"__name__": "__readme__"})
