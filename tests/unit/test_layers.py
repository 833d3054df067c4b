"""The house's arrows point one way: the library (enorm/, cloud_manager/) imports no app
(games/), no bench and no test, and the edge node (enorm/) nothing of the cloud side."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# package -> the top-level packages it must not import
BELOW = {
    "enorm": ("cloud_manager", "games", "bench", "tests"),
    "cloud_manager": ("games", "bench", "tests"),
}


def imports(source: str) -> Iterator[tuple[int, str]]:
    """(line, module) of every absolute import, also inside functions."""
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            yield from ((node.lineno, a.name) for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.lineno, node.module


def test_imports_are_found_wherever_they_are():
    src = "import os\ndef f():\n    from games.pokemon import keys\n    import bench.x as b\n"
    assert [m for _, m in imports(src)] == ["os", "games.pokemon", "bench.x"]


@pytest.mark.parametrize("package", sorted(BELOW))
def test_the_library_imports_no_app(package: str):
    wrong = [f"{path.relative_to(ROOT)}:{line}: {module}"
             for path in sorted((ROOT / package).rglob("*.py"))
             for line, module in imports(path.read_text())
             if module.split(".")[0] in BELOW[package]]
    assert wrong == []
