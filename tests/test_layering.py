"""The dependency arrows of docs/architecture.md, checked on the source: engine imports none of
listeners/routes/transforms, and nothing imports listeners (routes and transforms stay usable
without any inbound protocol)."""

import ast

from conftest import ROOT


def imports(package: str) -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for path in (ROOT / package).rglob("*.py"):
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names.update(a.name.split(".")[0] for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module.split(".")[0])
        found[str(path.relative_to(ROOT))] = names
    return found


def test_engine_imports_no_component_package():
    bad = {f: n & {"listeners", "routes", "transforms"} for f, n in imports("engine").items()}
    assert not {f: n for f, n in bad.items() if n}


def test_nothing_imports_listeners():
    for pkg in ("engine", "routes", "transforms"):
        bad = {f: n for f, n in imports(pkg).items() if "listeners" in n}
        assert not bad, bad
