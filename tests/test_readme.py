"""The README's Python snippets run as pasted (issue 14).

The ```python blocks of each README section (a ``## `` heading and what follows it) run in order, in one
fresh temporary working directory and one namespace, as a reader following that section would paste
them: a later block may use the files and names an earlier block of its section made. Commands and
configs the user supplies files for are ```bash / ```yaml blocks, which are not run.
"""

from __future__ import annotations

import os
import re

import pytest

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def python_blocks() -> list[tuple[str, int, str]]:
    """(section heading, line number, source) of every ```python block of the README, in order."""
    with open(README, encoding="utf-8") as f:
        text = f.read()
    headings = [(m.start(), m.group(1)) for m in re.finditer(r"^## (.+)$", text, re.MULTILINE)]
    blocks = []
    for match in re.finditer(r"^```python[ \t]*\n(.*?)^```[ \t]*$", text, re.MULTILINE | re.DOTALL):
        section = next((title for start, title in reversed(headings) if start < match.start()), "(top)")
        blocks.append((section, text.count("\n", 0, match.start()) + 1, match.group(1)))
    return blocks


def sections() -> dict[str, list[tuple[int, str]]]:
    out: dict[str, list[tuple[int, str]]] = {}
    for section, line, source in python_blocks():
        out.setdefault(section, []).append((line, source))
    return out


def test_the_readme_has_python_blocks():
    assert len(python_blocks()) >= 3


@pytest.mark.parametrize("section", list(sections()))
def test_readme_python_blocks_run_as_pasted(section, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "__readme__"}
    for line, source in sections()[section]:
        exec(compile(source, f"README.md (block at line {line})", "exec"), namespace)
