"""The architecture's rules, checked on the source with ``ast`` (DESIGN.md, the architecture
issue): no import cycle among lb's modules; the layers (health, discovery and balancer import
nothing from proxy or admin; proxy nothing from discovery, health or admin); only lb/tap.py
and lb/reactor.py touch the global reactor; no registry keyed by ``id(...)``."""

from __future__ import annotations

import ast
import os
from typing import Dict, Iterator, List, Set, Tuple

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LB = os.path.join(REPO, "lb")


def modules() -> Dict[str, str]:
    """Every module of lb: dotted name → file."""
    found = {}
    for folder, _, files in os.walk(LB):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                rel = os.path.relpath(path, REPO)[:-3].replace(os.sep, ".")
                found[rel[:-len(".__init__")] if rel.endswith(".__init__") else rel] = path
    return found


MODULES = modules()


def trees() -> Iterator[Tuple[str, ast.AST]]:
    for name, path in sorted(MODULES.items()):
        with open(path, encoding="utf-8") as f:
            yield name, ast.parse(f.read(), path)


def imported(name: str, tree: ast.AST) -> Set[str]:
    """The lb modules ``name`` imports, wherever in the file (type-only imports included:
    a cycle through them is a cycle of ideas all the same)."""
    package = name if MODULES[name].endswith("__init__.py") else name.rpartition(".")[0]
    out: Set[str] = set()
    for node in ast.walk(tree):
        targets: List[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
            # `from pkg import sub` imports the submodule; `from mod import name` the module
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base
                       for alias in node.names]
        for target in targets:
            while target and target not in MODULES:
                target = target.rpartition(".")[0]  # lb.peer.Peer → lb.peer
            if target and target != name:
                out.add(target)
    return out


GRAPH = {name: imported(name, tree) for name, tree in trees()}


def test_no_import_cycle() -> None:
    """No lb module imports itself through others."""
    state: Dict[str, int] = {}  # 1: on the current path, 2: done
    path: List[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(GRAPH[node]):
            if state.get(nxt) == 1:
                cycle = path[path.index(nxt):] + [nxt]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        path.pop()
        state[node] = 2

    for name in sorted(GRAPH):
        if name not in state:
            visit(name)


@pytest.mark.parametrize("layer,forbidden", [
    ("lb.health", ("lb.proxy", "lb.admin")),
    ("lb.discovery", ("lb.proxy", "lb.admin")),
    ("lb.balancer", ("lb.proxy", "lb.admin")),
    ("lb.proxy", ("lb.discovery", "lb.health", "lb.admin")),
])
def test_layers(layer: str, forbidden: Tuple[str, ...]) -> None:
    """Policies and discovery know nothing of the data path or the admin server; the data
    path knows nothing of Consul, health checks or the admin server."""
    bad = sorted((name, dep) for name, deps in GRAPH.items()
                 if name == layer or name.startswith(layer + ".")
                 for dep in deps if dep.startswith(forbidden))
    assert bad == [], bad


def test_only_the_twistd_glue_and_the_reactor_module_touch_the_global_reactor() -> None:
    """Everything else gets its reactor or clock injected (testable with fakes)."""
    allowed = {"lb.tap", "lb.reactor"}
    offenders = []
    for name, tree in trees():
        for node in ast.walk(tree):
            hit = (isinstance(node, ast.ImportFrom) and node.module == "twisted.internet"
                   and any(alias.name == "reactor" for alias in node.names)) or (
                isinstance(node, ast.Import)
                and any(alias.name == "twisted.internet.reactor" for alias in node.names))
            if hit and name not in allowed:
                offenders.append(f"{name}:{node.lineno}")
    assert offenders == []


def registries_keyed_by_id(tree: ast.Module) -> List[int]:
    """Lines of functions that call ``id()`` and use a module-level dict."""
    dicts = set()
    for node in tree.body:
        value = getattr(node, "value", None)
        targets = node.targets if isinstance(node, ast.Assign) else (
            [node.target] if isinstance(node, ast.AnnAssign) else [])
        if isinstance(value, (ast.Dict, ast.DictComp)) or (
                isinstance(value, ast.Call) and isinstance(value.func, ast.Name)
                and value.func.id in ("dict", "WeakValueDictionary", "defaultdict")):
            dicts |= {t.id for t in targets if isinstance(t, ast.Name)}
    lines = []
    for func in ast.walk(tree):
        if isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
            names = {n.id for n in ast.walk(func) if isinstance(n, ast.Name)}
            calls_id = any(isinstance(n, ast.Call) and isinstance(n.func, ast.Name)
                           and n.func.id == "id" for n in ast.walk(func))
            if calls_id and names & dicts:
                lines.append(func.lineno)
    return lines


def test_no_registry_keyed_by_id() -> None:
    """No module-level registry keyed by ``id(obj)`` (``pump_for(reactor)`` was one): ids are
    reused after an object dies, so such a registry hands a new object an old one's state.
    (A memo local to one call, like the config loader's node counts, is fine.)"""
    offenders = [f"{name}:{line}" for name, tree in trees()
                 for line in registries_keyed_by_id(tree)]  # type: ignore[arg-type]
    assert offenders == []


def test_the_registry_check_finds_one() -> None:
    """A check on the checker: the shape the data path once had is found."""
    old = ast.parse("_pumps = {}\n\ndef pump_for(reactor):\n    key = id(reactor)\n"
                    "    return _pumps.get(key)\n")
    assert registries_keyed_by_id(old) == [3]


def test_the_graph_sees_known_edges() -> None:
    """A check on the checker: it resolves plain, from- and relative imports."""
    assert "lb.pool" in GRAPH["lb.proxy.session"]
    assert "lb.net" in GRAPH["lb.config"]
    assert "lb.proxy.carriers.pump" in GRAPH["lb.reactor"]
    assert "lb.discovery.consul.snapshot" in GRAPH["lb.discovery.consul.watch"]
