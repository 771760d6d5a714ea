"""The rules of ARCHITECTURE.md's "Layers" section, checked on the source: who may import whom, no import
circles, pure packages do no I/O, and only the pool moves a server's session state."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ["proxy", "auth", "routing", "config", "localpg"]
PURE = ["proxy/protocol", "auth", "routing", "config"]
FORBIDDEN_IN_PURE = {"asyncio", "socket", "selectors", "uvloop", "ssl"}
# package (or module prefix) -> the project packages it may import; anything else of ours is refused
ALLOWED = {
    "config": {"config"},
    "auth": {"auth", "config"},
    "routing": {"routing"},
    "proxy.protocol": {"proxy.protocol"},
    "localpg": {"localpg", "proxy.protocol"},
}
# the modules a server connection, the pool and the runtime sit below: none of them may import a session
SESSION_MODULES = {"proxy.client", "proxy.relay", "proxy.fanout", "proxy.executor", "proxy.login", "proxy.handshake",
                   "proxy.splitter", "proxy.scatter", "proxy.app", "proxy.admin", "proxy.console",
                   "proxy.http_sql", "proxy.sql_runner", "proxy.listening"}
BELOW_SESSIONS = ["proxy.server", "proxy.pool", "proxy.cluster", "proxy.runtime", "proxy.session_state", "proxy.shardmap",
                  "proxy.views", "proxy.twophase.coordinator", "proxy.twophase.recovery", "proxy.twophase.decisions",
                  "proxy.twophase.gid", "proxy.twophase.cli", "proxy.tls", "proxy.catalog", "proxy.limits",
                  "proxy.notify", "proxy.autodb", "proxy.auth_query"]
# modules on the request path: they never import the throwaway-PostgreSQL tooling
TOOLING_IMPORTERS = {"proxy.quickstart"}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            found[_module_name(path)] = path
    return found


MODULES = _modules()


def _imported(path: Path) -> Iterator[str]:
    """Every module name imported anywhere in the file (type-checking imports and function bodies too)."""
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module
            for alias in node.names:  # `from proxy import topology` imports a module
                yield f"{node.module}.{alias.name}"


def _project_imports(path: Path) -> set[str]:
    """The project modules a file imports (each `a.b.c` resolved to the longest known module name)."""
    result = set()
    for name in _imported(path):
        while name and name not in MODULES:
            name = name.rpartition(".")[0]
        if name and name != _module_name(path):
            result.add(name)
    return result


GRAPH = {module: _project_imports(path) for module, path in MODULES.items()}


@pytest.mark.parametrize("package", PURE)
def test_pure_packages_do_no_io(package: str) -> None:
    files = sorted((ROOT / package).rglob("*.py"))
    assert files, f"{package} has no modules"
    offenders = {}
    for path in files:
        top = {name.split(".")[0] for name in _imported(path)}
        if top & FORBIDDEN_IN_PURE:
            offenders[str(path.relative_to(ROOT))] = sorted(top & FORBIDDEN_IN_PURE)
    assert offenders == {}


def test_pool_does_not_import_routing() -> None:
    assert not any(name.startswith("routing") for name in _imported(ROOT / "proxy" / "pool.py"))


@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_layer_imports_only_what_it_may(layer: str) -> None:
    allowed = ALLOWED[layer]
    members = [m for m in GRAPH if m == layer or m.startswith(layer + ".")]
    assert members, f"no modules in {layer}"
    offenders = {m: sorted(i for i in GRAPH[m] if not any(i == a or i.startswith(a + ".") for a in allowed))
                 for m in members}
    assert {m: bad for m, bad in offenders.items() if bad} == {}


@pytest.mark.parametrize("module", BELOW_SESSIONS)
def test_lower_modules_never_import_a_session(module: str) -> None:
    assert GRAPH[module] & SESSION_MODULES == set()


def test_request_path_does_not_import_the_tooling() -> None:
    offenders = {m for m, imports in GRAPH.items()
                 if m.startswith("proxy") and m not in TOOLING_IMPORTERS and any(i.startswith("localpg") for i in imports)}
    assert offenders == set()


def test_no_import_circles() -> None:
    """Depth-first search for a back edge; the circle found is named in the failure."""
    state: dict[str, int] = {}
    stack: list[str] = []
    circles: list[list[str]] = []

    def visit(module: str) -> None:
        state[module] = 1
        stack.append(module)
        for target in sorted(GRAPH.get(module, ())):
            if state.get(target) == 1:
                circles.append([*stack[stack.index(target):], target])
            elif target not in state:
                visit(target)
        stack.pop()
        state[module] = 2

    for module in sorted(GRAPH):
        if module not in state:
            visit(module)
    assert circles == []


def _server_state_writes(path: Path) -> list[str]:
    """`x.session_state = ...` and `x.prepared.add/clear/discard(...)` where x is not `self`."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        targets: list[ast.expr] = []
        if isinstance(node, ast.Assign):
            targets = list(node.targets)
        elif isinstance(node, ast.AugAssign | ast.AnnAssign):
            targets = [node.target]
        for target in targets:
            if (isinstance(target, ast.Attribute) and target.attr == "session_state"
                    and not (isinstance(target.value, ast.Name) and target.value.id == "self")):
                found.append(f"line {target.lineno}: assigns {ast.unparse(target)}")
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and node.func.attr in ("add", "clear", "discard", "update", "remove")
                and isinstance(node.func.value, ast.Attribute) and node.func.value.attr == "prepared"
                and not (isinstance(node.func.value.value, ast.Name) and node.func.value.value.id == "self")):
            found.append(f"line {node.lineno}: {ast.unparse(node.func)}")
    return found


def test_only_the_pool_moves_server_session_state() -> None:
    offenders = {}
    for module, path in MODULES.items():
        if module in ("proxy.pool", "proxy.server"):
            continue
        writes = _server_state_writes(path)
        if writes:
            offenders[module] = writes
    assert offenders == {}


def test_the_state_check_sees_a_violation(tmp_path: Path) -> None:
    """The AST check above is not vacuous: a file that writes a server's state is caught, `self` is not."""
    sample = tmp_path / "sample.py"
    sample.write_text("def f(server, self):\n    server.session_state = 1\n    server.prepared.add('x')\n"
                      "    self.session_state = 2\n")
    assert len(_server_state_writes(sample)) == 2
