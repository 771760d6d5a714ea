"""ARCHITECTURE.md rules 1 and 2: pure packages open no sockets, and the pool never imports routing."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PURE = ["proxy/protocol", "auth", "routing", "config"]
FORBIDDEN_IN_PURE = {"asyncio", "socket", "selectors", "uvloop", "ssl"}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package", PURE)
def test_pure_packages_do_no_io(package: str) -> None:
    files = sorted((ROOT / package).rglob("*.py"))
    assert files, f"{package} has no modules"
    offenders = {str(f.relative_to(ROOT)): sorted(_imports(f) & FORBIDDEN_IN_PURE) for f in files}
    assert {k: v for k, v in offenders.items() if v} == {}


def test_pool_does_not_import_routing() -> None:
    assert "routing" not in _imports(ROOT / "proxy" / "pool.py")
