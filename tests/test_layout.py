"""The engine's layout a newcomer navigates: sidecar/ holds a handful of modules and rooms (subpackages),
each room says in its docstring what lives there, policies are addons under addons/, and no module
imports another that (through any chain) imports it back."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.harness import ROOT

MAX_TOP_LEVEL_MODULES = 8
POLICY_ADDONS = {"guard", "shield", "evidence", "grants", "record", "client_access", "audit"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def sources() -> dict[str, Path]:
    return {module_name(p): p for p in [*ROOT.glob("sidecar/**/*.py"), *ROOT.glob("addons/*.py")]}


def top_level_imports(path: Path, known: set[str]) -> set[str]:
    """The project modules a module imports when it is imported (not inside functions)."""
    out: set[str] = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        out |= {n for n in names if n in known}
    return out


def test_sidecar_holds_a_handful_of_modules_and_rooms_with_docstrings() -> None:
    top = sorted(p.name for p in (ROOT / "sidecar").glob("*.py"))
    assert len(top) <= MAX_TOP_LEVEL_MODULES, top
    rooms = sorted(p.parent.name for p in (ROOT / "sidecar").glob("*/__init__.py"))
    assert {"app", "net", "proxy", "token", "egress", "state", "ops", "sim"} <= set(rooms), rooms
    for room in rooms:
        doc = ast.get_docstring(ast.parse((ROOT / "sidecar" / room / "__init__.py").read_text()))
        assert doc and len(doc) > 60, f"sidecar/{room}/__init__.py must say what the room holds"


def test_the_policies_are_addons() -> None:
    assert POLICY_ADDONS <= {p.stem for p in (ROOT / "addons").glob("*.py")}
    for name in POLICY_ADDONS:
        tree = ast.parse((ROOT / "addons" / f"{name}.py").read_text())
        assert ast.get_docstring(tree), f"addons/{name}.py: a docstring says why the policy exists"
        assert [n for n in tree.body if isinstance(n, ast.ClassDef)], f"addons/{name}.py has no addon class"


def all_imports(path: Path) -> set[str]:
    """Every module a module names in an import, at any depth (inside functions too)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
    return out


# net is bytes on the wire: it knows neither the token core, the proxy's rules, state nor the service around
# it (the destination rules reach it as a Protocol, sidecar.net.upstream.DestinationRules).
NET_MAY_NOT_IMPORT = ("sidecar.token", "sidecar.proxy", "sidecar.state", "sidecar.ops", "sidecar.app",
                      "sidecar.sim", "addons")


def test_net_imports_nothing_from_the_rooms_above_it() -> None:
    bad = {}
    for name, path in sources().items():
        if name == "sidecar.net" or name.startswith("sidecar.net."):
            found = {m for m in all_imports(path) if m.startswith(NET_MAY_NOT_IMPORT)}
            if found:
                bad[name] = sorted(found)
    assert not bad, f"sidecar/net imports from the rooms above it: {bad}"


def test_no_import_cycles() -> None:
    src = sources()
    known = set(src)
    graph = {name: top_level_imports(path, known) - {name} for name, path in src.items()}
    # A package's __init__ is imported with each of its modules: an edge to "a.b.c" also reaches "a.b".
    for name in list(graph):
        graph[name] |= {parent for dep in set(graph[name]) for parent in _parents(dep) if parent in known}
        graph[name].discard(name)
    cycles = _cycles(graph)
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def _parents(module: str) -> list[str]:
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
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
                    work.append((child, iter(sorted(graph.get(child, ())))))
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


def test_only_the_codec_touches_an_h11_connection() -> None:
    """Callers use HttpConnection's own properties (``leftover``, ``expects_continue``, ...), never ``.h11``: the
    codec is the one place that knows h11's connection state (the simulators in sidecar/sim keep their own)."""
    found = []
    for name, path in sources().items():
        if name in ("sidecar.net.http1",) or name.startswith("sidecar.sim"):
            continue
        found += [f"{name}:{n.lineno}" for n in ast.walk(ast.parse(path.read_text()))
                  if isinstance(n, ast.Attribute) and n.attr == "h11"]
    assert not found, f"reaching into h11 through .h11: {found}"
