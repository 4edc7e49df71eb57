"""The dependency arrows of docs/architecture.md ("Layout"), checked on the source.

Outside engine: engine imports none of listeners/routes/transforms, and nothing imports
listeners (routes and transforms stay usable without any inbound protocol).

Inside engine: every module belongs to one layer of ``LAYERS`` and imports only its own
layer and the ones below it; and no modules import each other in a circle, counting imports
inside functions (a lazy import hides a circle, it does not remove it). Imports under
``if TYPE_CHECKING:`` are annotations only and are not arrows.
"""

from __future__ import annotations

import ast

from conftest import ROOT

# Lowest first. A module's layer is the longest prefix listed here.
LAYERS: list[tuple[str, ...]] = [
    # foundation: no engine imports but each other
    ("engine.envelope", "engine.registry", "engine.components", "engine.logging", "engine.hl7", "engine.security",
     "engine.mapping", "engine.dimse"),
    # the store: database, schema (including the feature rooms' table modules), blobs, gc, key rotation
    ("engine.store", "engine.store.dicom.tables", "engine.store.dicom.workflow_tables", "engine.store.dicom.terms",
     "engine.store.dicom.upgrade",
     "engine.store.fhir.tables", "engine.auth.tables", "engine.store.dicom.scan"),
    # the audit trail writes into the store
    ("engine.audit",),
    # the one HTTP serving stack (uvicorn in the loop, guarded h11, audited TLS, bearer tokens):
    # under the console (core) and the HTTP listeners
    ("engine.http",),
    # core: configuration, intake, routing, queue, workers, runtime, metrics, message queries
    ("engine.config", "engine.context", "engine.intake", "engine.match", "engine.queue", "engine.pipeline",
     "engine.runtime", "engine.metrics", "engine.ops", "engine.auth", "engine.messages", "engine.routing_keys",
     # the admin API and console: started by the runtime, never importing it (it is handed the runtime)
     "engine.console",
     # FHIR Provenance of what destinations write (issue 15)
     "engine.provenance"),
    # feature rooms of the store
    ("engine.store.dicom", "engine.store.fhir"),
    # the command line uses everything
    ("engine.cli",),
]


def _module_name(path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for inner in node.body:
                skip.update(id(n) for n in ast.walk(inner))
    return skip


def _modules(package: str) -> dict[str, set[str]]:
    """Module -> the modules it imports (``from a import b`` counts as ``a.b`` where that is a module)."""
    files = {_module_name(p): p for p in (ROOT / package).rglob("*.py") if ".venv" not in p.parts}
    known = set(files)
    found: dict[str, set[str]] = {}
    for name, path in files.items():
        tree = ast.parse(path.read_text(), str(path))
        skip = _type_checking_nodes(tree)
        names: set[str] = set()
        for node in ast.walk(tree):
            if id(node) in skip:
                continue
            if isinstance(node, ast.Import):
                names.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                for a in node.names:
                    full = f"{node.module}.{a.name}"
                    names.add(full if full in known else node.module)
            elif (isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "import_module"
                  and node.args and isinstance(node.args[0], ast.Constant)):
                names.add(node.args[0].value)
        found[name] = names
    return found


def _top(names: set[str]) -> set[str]:
    return {n.split(".")[0] for n in names}


def layer_of(module: str) -> int:
    best, rank = -1, -1
    for i, prefixes in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and len(p) > best:
                best, rank = len(p), i
    return rank


def test_engine_imports_no_component_package():
    bad = {f: _top(n) & {"listeners", "routes", "transforms"} for f, n in _modules("engine").items()}
    assert not {f: n for f, n in bad.items() if n}


def test_nothing_imports_listeners():
    for pkg in ("engine", "routes", "transforms"):
        bad = {f: n for f, n in _modules(pkg).items() if "listeners" in _top(n)}
        assert not bad, bad


def test_every_engine_module_has_a_layer():
    assert not [m for m in _modules("engine") if m != "engine" and layer_of(m) < 0]


def test_engine_arrows_point_down():
    wrong = []
    for mod, names in _modules("engine").items():
        for target in names:
            if target.startswith("engine.") and layer_of(target) > layer_of(mod):
                wrong.append(f"{mod} (layer {layer_of(mod)}) -> {target} (layer {layer_of(target)})")
    assert not wrong, "\n".join(sorted(wrong))


def test_no_import_circle_in_engine():
    graph = {m: {t for t in names if t.startswith("engine.") and t != m} for m, names in _modules("engine").items()}
    state: dict[str, int] = {}
    circles: list[list[str]] = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                circles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, [*stack, nxt])
        state[node] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not circles, "\n".join(" -> ".join(c) for c in circles)


def test_the_layer_check_sees_a_wrong_arrow():
    """The check itself: an arrow from the store up to the core is found."""
    assert layer_of("engine.store.db") < layer_of("engine.intake") < layer_of("engine.store.dicom.index")
    assert layer_of("engine.store.dicom.tables") == layer_of("engine.store.db")
