"""FHIR paths for mapping rules, and the resource (or Bundle) document they change.

Paths start with a resource type and apply to every resource of that type: the
resource itself, or each entry of a Bundle (what `hl7_to_fhir` and `dicom_to_fhir`
send). Reading uses FHIRPath in full (fhirpathpy): ``Observation.code.coding.where(
system='http://loinc.org').code``. Writing needs a place, not a value, so set/delete/add
take the navigable part of the grammar: ``name``, ``name[n]`` (0-based, as in FHIRPath)
and ``.where(field='value')`` steps, e.g. ``Patient.identifier.where(system='urn:mrn').value``.
A write creates what is missing, as a list where the R4 model says the element repeats
(fhir.resources), and a ``where`` that matches nothing creates the item it describes.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from engine.mapping.base import MappingError, Scope

_STEP = re.compile(r"""^([A-Za-z_][A-Za-z0-9_]*)(?:\[(\d+)\])?$""")
_WHERE = re.compile(r"""^where\(\s*([A-Za-z_][A-Za-z0-9_.]*)\s*=\s*'((?:[^'\\]|\\.)*)'\s*\)$""")
MAX_INDEX = 9999
PHI_ELEMENTS = frozenset({"identifier", "name", "telecom", "address", "birthDate", "subject", "patient", "photo",
                          "contact", "text"})


@dataclass(frozen=True)
class Step:
    name: str
    index: int | None = None
    where: tuple[str, str] | None = None  # (dotted field, value) on the items of ``name``


@dataclass(frozen=True)
class FhirPath:
    text: str
    resource_type: str
    steps: tuple[Step, ...] | None  # None: readable (FHIRPath) but not a place to write
    read: Any  # fhirpathpy's compiled function

    @property
    def group(self) -> str | None:
        return self.resource_type


def _split(text: str) -> list[str]:
    """Split on dots outside parentheses and quotes."""
    out, depth, quote, cur = [], 0, False, []
    for ch in text:
        if ch == "'" and (not cur or cur[-1] != "\\"):
            quote = not quote
        elif not quote and ch == "(":
            depth += 1
        elif not quote and ch == ")":
            depth -= 1
        if ch == "." and depth == 0 and not quote:
            out.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    out.append("".join(cur))
    return out


def _steps(parts: list[str]) -> tuple[Step, ...] | None:
    steps: list[Step] = []
    for part in parts:
        w = _WHERE.match(part)
        if w:
            if not steps or steps[-1].where is not None or steps[-1].index is not None:
                return None
            steps[-1] = Step(steps[-1].name, None, (w.group(1), w.group(2).replace("\\'", "'")))
            continue
        m = _STEP.match(part)
        if not m:
            return None
        index = int(m.group(2)) if m.group(2) is not None else None
        if index is not None and index > MAX_INDEX:
            return None  # not a place to write (a write creates the items up to it)
        steps.append(Step(m.group(1), index))
    return tuple(steps)


@lru_cache(maxsize=1024)
def _model(name: str) -> Any:
    from fhir.resources.R4B import get_fhir_model_class

    try:
        return get_fhir_model_class(name)
    except (KeyError, ValueError, AttributeError):
        return None


@lru_cache(maxsize=4096)
def _element(owner: str, name: str) -> tuple[bool, str] | None:
    """(repeats, type name) of element ``name`` of model ``owner`` (R4B), None when unknown."""
    cls = _model(owner)
    if cls is None:
        return None
    f = cls.model_fields.get(name)
    if f is None:
        return None
    text = repr(f.annotation)
    repeats = "List[" in text
    m = re.search(r"abc\.([A-Za-z0-9]+)Type", text)
    return repeats, (m.group(1) if m else "")


@lru_cache(maxsize=1024)
def is_resource_type(name: str) -> bool:
    from fhir.resources.R4B.resource import Resource

    cls = _model(name) if re.match(r"^[A-Z][A-Za-z]+$", name) else None
    return isinstance(cls, type) and issubclass(cls, Resource)


@lru_cache(maxsize=4096)
def parse_fhir_path(text: str) -> FhirPath:
    import fhirpathpy

    text = text.strip()
    parts = _split(text)
    rtype = parts[0]
    if not is_resource_type(rtype):
        raise ValueError(f"{text}: FHIR paths start with a resource type (Patient.gender, Observation.code)")
    try:
        fn = fhirpathpy.compile(text)
        fn({"resourceType": rtype})  # fhirpathpy reports unknown functions on first use
    except Exception as e:
        raise ValueError(f"{text}: not a FHIRPath expression ({str(e)[:120]})") from None
    steps = _steps(parts[1:])
    if steps:
        owner = rtype
        for s in steps:
            info = _element(owner, s.name)
            if info is None and _model(owner) is not None and s.name != "extension":
                raise ValueError(f"{text}: {owner} has no element {s.name!r}")
            owner = info[1] if info else ""
    return FhirPath(text, rtype, steps or None, fn)


class FhirKind:
    name = "fhir"

    def compile_path(self, text: str, *, write: bool = False) -> FhirPath:
        p = parse_fhir_path(str(text))
        if write and p.steps is None:
            raise ValueError(f"{p.text}: to write, use element names, [n] and .where(field='value') only")
        if write and p.steps and p.steps[0].name in ("resourceType", "id") and len(p.steps) == 1:
            raise ValueError(f"{p.text}: resourceType and id are not mapped")
        return p

    def group_path(self, text: str) -> str:
        t = str(text).strip()
        if not is_resource_type(t):
            raise ValueError(f"foreach takes a FHIR resource type such as Observation, not {t!r}")
        return t

    def phi_path(self, path: Any) -> bool:
        return path.resource_type == "Patient" or any(s.name in PHI_ELEMENTS for s in path.steps or ())


FHIR = FhirKind()


def _get(node: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def _scalar(v: Any) -> Any:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float | str):
        return v
    return str(v) if not isinstance(v, dict | list) else v


class FhirDocument:
    """A FHIR resource or Bundle as JSON (dicts and lists), changed in place."""

    kind = FHIR

    def __init__(self, root: dict[str, Any]) -> None:
        if not isinstance(root, dict) or "resourceType" not in root:
            raise MappingError("not a FHIR resource (no resourceType)")
        self.root = root

    @classmethod
    def from_bytes(cls, payload: bytes) -> FhirDocument:
        try:
            return cls(json.loads(payload))
        except ValueError as e:
            raise MappingError(f"not FHIR JSON: {e}") from None

    def to_bytes(self) -> bytes:
        return json.dumps(self.root, ensure_ascii=False, separators=(",", ":")).encode("utf-8")

    def resources(self, rtype: str) -> list[dict[str, Any]]:
        if self.root.get("resourceType") == rtype:
            return [self.root]
        if self.root.get("resourceType") == "Bundle":
            return [e["resource"] for e in self.root.get("entry") or [] if isinstance(e, dict)
                    and isinstance(e.get("resource"), dict) and e["resource"].get("resourceType") == rtype]
        return []

    def _targets(self, p: FhirPath, scope: Scope) -> list[dict[str, Any]]:
        cur = scope.get(p.resource_type)
        return [cur] if cur is not None else self.resources(p.resource_type)

    # -- reading ---------------------------------------------------------------------
    def values(self, p: FhirPath, scope: Scope) -> list[Any]:
        out: list[Any] = []
        for r in self._targets(p, scope):
            out.extend(_scalar(v) for v in p.read(r))
        return out

    def value(self, p: FhirPath, scope: Scope) -> str:
        for r in self._targets(p, scope):
            for v in p.read(r):
                s = _scalar(v)
                return s if isinstance(s, str) else ("" if isinstance(s, dict | list) else str(s))
        return ""

    # -- places ------------------------------------------------------------------------
    def _places(self, node: dict[str, Any], owner: str, steps: tuple[Step, ...], create: bool
                ) -> list[tuple[Any, Any, str]]:
        """(container, key or index, owner type) for every place ``steps`` reach from ``node``."""
        places: list[tuple[Any, Any, str]] = [(None, None, owner)]
        current: list[tuple[Any, str]] = [(node, owner)]
        for i, s in enumerate(steps):
            last = i == len(steps) - 1
            nxt: list[tuple[Any, str]] = []
            places = []
            for parent, ptype in current:
                if not isinstance(parent, dict):
                    continue
                info = _element(ptype, s.name) if ptype else None
                repeats, ctype = info if info else (s.name == "extension", "")
                have = parent.get(s.name)
                if have is None:
                    if not create:
                        continue
                    if repeats or s.index is not None or s.where is not None:
                        have = parent[s.name] = []
                    elif last:
                        places.append((parent, s.name, ctype))
                        continue
                    else:
                        have = parent[s.name] = {}
                if isinstance(have, list):
                    items = self._items(have, s, create)
                    if last:
                        places.extend((have, j, ctype) for j in items)
                    nxt.extend((have[j], ctype) for j in items)
                else:
                    if last:
                        places.append((parent, s.name, ctype))
                    nxt.append((have, ctype))
            current = nxt
        return places

    @staticmethod
    def _items(items: list[Any], s: Step, create: bool) -> list[int]:
        if s.index is not None:
            if s.index < len(items):
                return [s.index]
            if not create:
                return []
            items.extend({} for _ in range(s.index + 1 - len(items)))
            return [s.index]
        if s.where is not None:
            key, want = s.where
            hit = [j for j, it in enumerate(items) if str(_get(it, key)) == want]
            if hit or not create:
                return hit
            item: dict[str, Any] = {}
            node = item
            parts = key.split(".")
            for part in parts[:-1]:
                node = node.setdefault(part, {})
            node[parts[-1]] = want
            items.append(item)
            return [len(items) - 1]
        if not items and create:
            items.append({})
        return list(range(len(items)))

    # -- writing ---------------------------------------------------------------------------
    def write(self, p: FhirPath, value: Any, scope: Scope) -> None:
        assert p.steps is not None
        for r in self._targets(p, scope):
            for container, key, _ in self._places(r, p.resource_type, p.steps, True):
                container[key] = copy.deepcopy(value)

    def add(self, p: FhirPath, value: Any, scope: Scope) -> None:
        assert p.steps is not None
        *head, last = p.steps
        for r in self._targets(p, scope):
            parents = [(r, p.resource_type)]
            if head:
                parents = [(c[k], t) for c, k, t in self._places(r, p.resource_type, tuple(head), True)]
            for parent, _ in parents:
                if not isinstance(parent, dict):
                    continue
                items = parent.setdefault(last.name, [])
                if not isinstance(items, list):
                    parent[last.name] = items = [items]
                if value not in items:  # adding the same coding twice is a no-op
                    items.append(copy.deepcopy(value))

    def remove(self, p: FhirPath, scope: Scope) -> None:
        assert p.steps is not None
        for r in self._targets(p, scope):
            places = self._places(r, p.resource_type, p.steps, False)
            for container, key, _ in sorted(places, key=lambda x: -x[1] if isinstance(x[1], int) else 0):
                if isinstance(container, list):
                    del container[key]
                else:
                    container.pop(key, None)
            _prune(r)

    def copy(self, source: FhirPath, target: FhirPath, scope: Scope) -> None:
        for r in self._targets(source, scope):
            got = source.read(r)
            if got:
                self.write(target, got[0], scope)
                return

    def occurrences(self, group: str, scope: Scope) -> Iterable[dict[str, Any]]:
        return self.resources(group)

    def scope_for(self, group: str, occurrence: dict[str, Any]) -> dict[str, Any]:
        return {group: occurrence}


def _prune(node: Any) -> bool:
    """Drop empty lists and objects left by a delete (FHIR forbids empty elements); True if empty."""
    if isinstance(node, dict):
        for k in [k for k, v in node.items() if isinstance(v, dict | list) and _prune(v)]:
            del node[k]
        return not node
    if isinstance(node, list):
        node[:] = [v for v in node if not (isinstance(v, dict | list) and _prune(v))]
        return not node
    return False


def validate(root: dict[str, Any]) -> None:
    """Validate with fhir.resources (R4B); pydantic's ValidationError when the result does not conform."""
    cls = _model(str(root.get("resourceType")))
    if cls is None:
        raise MappingError(f"unknown resourceType {root.get('resourceType')!r}")
    cls.model_validate(root)

