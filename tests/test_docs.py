"""Every ```python block in README.md and docs/ runs as written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def _blocks() -> list[tuple[str, str]]:
    found = []
    for page in PAGES:
        for i, match in enumerate(BLOCK.finditer(page.read_text())):
            found.append((f"{page.name}#{i}", match.group(1)))
    return found


@pytest.mark.parametrize("name,code", _blocks(), ids=[name for name, _ in _blocks()])
def test_doc_example_runs(name: str, code: str) -> None:
    # dont_inherit: the example runs without this module's `from __future__ import annotations`, as a user runs it.
    exec(compile(code, name, "exec", dont_inherit=True), {"__name__": "__docs__"})
