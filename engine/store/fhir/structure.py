"""A resource's JSON against the FHIR R4 element definitions: shapes, kinds, required codes.

fhir.resources (the model validation that follows) checks regexes, cardinality and
unknown elements, but it coerces (``"active": "yes"`` becomes true, and the body is
stored as sent), lets ``null`` through, fails with a KeyError on an unknown contained
type and never enforces a required binding. This pass runs first, over the table
``r4_structure.json`` (generated from the FHIR R4 4.0.1 definitions by
scripts/gen_fhir_structure.py; see its docstring for the source), and reports each
problem with the FHIRPath of the element (``Patient.telecom[0].system``) and without
quoting the value, which may be PHI.

Rules (FHIR R4 json.html): objects where the type is complex, arrays exactly where the
element repeats and never empty, no ``null`` (except in a primitive array aligned with
its ``_element`` array), booleans/integers/decimals as JSON true/false and numbers, all
other primitives as strings, and a ``code`` with a required binding drawn from its
ValueSet.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from engine.store.fhir import narrative

TABLE = Path(__file__).with_name("r4_structure.json")
MAX_DEPTH = 200  # far deeper than any real resource; keeps the recursion below Python's limit
MAX_ISSUES = 20
_NAMES = {list: "an array", dict: "an object", str: "a string", bool: "a boolean", int: "a number",
          float: "a number", type(None): "null"}


@dataclass(frozen=True)
class Issue:
    """One problem, in OperationOutcome.issue terms (IssueType code, text, FHIRPath)."""

    code: str
    diagnostics: str
    expression: str

    def as_dict(self) -> dict[str, Any]:
        return {"severity": "error", "code": self.code, "diagnostics": self.diagnostics,
                "expression": [self.expression]}


@dataclass(frozen=True)
class _Table:
    types: dict[str, dict[str, list[Any]]]
    primitives: frozenset[str]
    json_kinds: dict[str, str]
    resources: frozenset[str]
    codes: dict[str, frozenset[str]]  # ValueSet url -> every code it holds (any system)
    listing: dict[str, str]  # ValueSet url -> "a | b | c" for the message


@cache
def _table() -> _Table:
    data = json.loads(TABLE.read_text())
    codes = {url: frozenset(c for system in vs.values() for c in system) for url, vs in data["valueSets"].items()}
    listing = {url: " | ".join(sorted(c)[:12]) + (" | ..." if len(c) > 12 else "") for url, c in codes.items()}
    return _Table(data["types"], frozenset(data["primitives"]), data["jsonKinds"], frozenset(data["resources"]),
                  codes, listing)


def known_resource_type(name: str) -> bool:
    return name in _table().resources


def check(node: Any, tname: str, *, path: str | None = None, into_resources: bool = True) -> list[Issue]:
    """The problems found in ``node`` (a resource, or an element of type ``tname`` such as
    ``Bundle.entry``, reported under ``path``), at most MAX_ISSUES.

    ``into_resources=False`` stops at nested resources (a Bundle entry's resource is
    judged on its own).
    """
    t = _table()
    issues: list[Issue] = []
    if tname in t.types:
        _object(t, node, tname, path or tname, issues, 0, into_resources)
    return issues[:MAX_ISSUES]


def _kind(value: Any) -> str:
    return _NAMES.get(type(value), "a value")


def _object(t: _Table, node: Any, tname: str, path: str, issues: list[Issue], depth: int, deep: bool) -> None:
    if len(issues) >= MAX_ISSUES:
        return
    if not isinstance(node, dict):
        issues.append(Issue("structure", f"{path}: expected an object, got {_kind(node)}", path))
        return
    if depth > MAX_DEPTH:
        issues.append(Issue("too-costly", f"{path}: nested more than {MAX_DEPTH} levels deep", path))
        return
    elements = t.types.get(tname)
    if elements is None:
        if tname in t.resources and deep:  # a contained type the table does not hold: still its narrative
            _narrative_only(t, node, path, issues, depth)
        return
    for key, value in node.items():
        if key == "resourceType" or not isinstance(key, str):
            continue
        if key.startswith("_"):
            base = elements.get(key[1:])
            if base is not None and (base[0] in t.primitives or base[0] == "xhtml"):
                _extension_of_primitive(t, value, bool(base[1]), f"{path}.{key}", issues, depth, deep)
            continue  # an unknown _name is fhir.resources' to refuse
        spec = elements.get(key)
        if spec is None:
            continue  # unknown elements: fhir.resources refuses them by name
        etype, many = spec[0], bool(spec[1])
        valueset = spec[2] if len(spec) > 2 else None
        where = f"{path}.{key}"
        if value is None:
            issues.append(Issue("structure", f"{where}: null is not allowed (leave the element out)", where))
            continue
        if many:
            if not isinstance(value, list):
                issues.append(Issue("structure", f"{where}: expected an array, got {_kind(value)}", where))
                continue
            if not value:
                issues.append(Issue("structure", f"{where}: an empty array is not allowed (leave it out)", where))
                continue
            aligned = isinstance(node.get("_" + key), list)
            for i, item in enumerate(value):
                if item is None and aligned and etype in t.primitives:
                    continue  # value only in the _element array at this index
                _value(t, item, etype, valueset, f"{where}[{i}]", issues, depth, deep)
        elif isinstance(value, list):
            issues.append(Issue("structure", f"{where}: expected a single value, got an array", where))
        else:
            _value(t, value, etype, valueset, where, issues, depth, deep)


def _narrative_only(t: _Table, node: dict[str, Any], path: str, issues: list[Issue], depth: int) -> None:
    """txt-1/txt-2 of a resource whose elements are not in the table (every DomainResource has
    ``text`` and ``contained``): what a client could use to slip a narrative past the check."""
    text = node.get("text")
    if isinstance(text, dict):
        _object(t, text, "Narrative", f"{path}.text", issues, depth + 1, True)
    contained = node.get("contained")
    if isinstance(contained, list):
        for i, item in enumerate(contained):
            _value(t, item, "Resource", None, f"{path}.contained[{i}]", issues, depth + 1, True)


def _extension_of_primitive(t: _Table, value: Any, many: bool, where: str, issues: list[Issue], depth: int,
                            deep: bool) -> None:
    if many and isinstance(value, list):
        for i, item in enumerate(value):
            if item is not None:
                _object(t, item, "Element", f"{where}[{i}]", issues, depth + 1, deep)
    elif many or not isinstance(value, dict):
        issues.append(Issue("structure", f"{where}: expected {'an array' if many else 'an object'}, "
                                         f"got {_kind(value)}", where))
    else:
        _object(t, value, "Element", where, issues, depth + 1, deep)


def _value(t: _Table, value: Any, etype: str, valueset: str | None, where: str, issues: list[Issue], depth: int,
           deep: bool) -> None:
    if len(issues) >= MAX_ISSUES:
        return
    if value is None:
        issues.append(Issue("structure", f"{where}: null is not allowed", where))
    elif etype in t.primitives or etype == "xhtml":
        kind = t.json_kinds.get(etype, "string")
        number = isinstance(value, int | float) and not isinstance(value, bool)
        ok = {"boolean": isinstance(value, bool), "integer": number and isinstance(value, int),
              "number": number}.get(kind, isinstance(value, str))
        if not ok:
            want = {"boolean": "true or false", "integer": "an integer", "number": "a number"}.get(kind, "a string")
            issues.append(Issue("structure", f"{where}: must be {want} in JSON (FHIR {etype}), got {_kind(value)}",
                                where))
        elif etype == "xhtml":
            for text in narrative.problems(value)[:MAX_ISSUES]:
                issues.append(Issue("invariant", f"{where}: {text}", where))
        elif valueset is not None and value not in t.codes[valueset]:
            issues.append(Issue("code-invalid", f"{where}: the code is not in the required value set {valueset} "
                                                f"({t.listing[valueset]})", where))
    elif etype == "Resource":
        if not isinstance(value, dict):
            issues.append(Issue("structure", f"{where}: expected a resource (an object), got {_kind(value)}", where))
            return
        rtype = value.get("resourceType")
        if not isinstance(rtype, str) or rtype not in t.resources:
            issues.append(Issue("structure", f"{where}.resourceType: missing or not an R4 resource type",
                                f"{where}.resourceType"))
        elif deep:
            _object(t, value, rtype, where, issues, depth + 1, deep)
    else:
        _object(t, value, etype, where, issues, depth + 1, deep)
