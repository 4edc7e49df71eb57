"""Literal references (FHIR R4 references.html): which strings are references, and which are not.

A write's ``Reference.reference`` values are checked before anything is stored, on every
write path (REST, transaction, batch, the `store` destination), because a reference is
resolved against this server's base: ``Organization/../../x`` would name something else
once a client joins it to the base, and ``urn:uuid:`` names only an entry of the same
Bundle. The forms taken are those the specification defines:

  ``#`` or ``#id``                           a contained resource (or the container)
  ``urn:uuid:...``, ``urn:oid:...``          a Bundle entry's fullUrl (transactions)
  ``Type/id``, ``Type/id/_history/vid``      relative to this server's base
  ``Type?query``                             a conditional reference (resolved on write)
  ``http(s)://.../Type/id[/_history/vid]``   an absolute RESTful URL (references.html#regex)

with ``Type`` an R4 resource type and ids of ``[A-Za-z0-9-.]{1,64}``; an absolute URL with a
``.`` or ``..`` path segment, a query or a fragment is not one of them. Anything else is 400
naming the element (its value is not quoted: it may be an identifier).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

from engine.store.fhir import structure
from engine.store.fhir.params import FhirError

_ID = r"[A-Za-z0-9\-.]{1,64}"
_TYPE = r"[A-Z][A-Za-z]{1,63}"
RELATIVE = re.compile(rf"^({_TYPE})/({_ID})(?:/_history/({_ID}))?$")
_CONDITIONAL = re.compile(rf"^({_TYPE})\?.+$", re.DOTALL)
_CONTAINED = re.compile(rf"^#(?:{_ID})?$")
# Any urn:uuid:/urn:oid: string: it must be the fullUrl of an entry of the same Bundle, which
# the resolver checks (engine.store.fhir.bundle), so its spelling needs no check of its own.
_URN = re.compile(r"^urn:(?:uuid|oid):\S+$")
_ABSOLUTE = re.compile(rf"^https?://([A-Za-z0-9\-\\.:%$]*/)+({_TYPE})/({_ID})(?:/_history/({_ID}))?$")


def literal_references(node: Any, path: str) -> Iterator[tuple[str, str]]:
    """(FHIRPath of the element, value) of every ``Reference.reference`` string in ``node``.

    An object with ``language`` is an ``Expression`` (its ``reference`` is a uri, not a
    Reference): R4 has no other element named ``reference``."""
    if isinstance(node, dict):
        ref = node.get("reference")
        if isinstance(ref, str) and "language" not in node:
            yield f"{path}.reference", ref
        for k, v in node.items():
            if k != "reference":
                yield from literal_references(v, f"{path}.{k}")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from literal_references(v, f"{path}[{i}]")


def is_valid(ref: str) -> bool:
    """One of the forms in the module text."""
    if _CONTAINED.match(ref) or _URN.match(ref):
        return True
    m = RELATIVE.match(ref) or _CONDITIONAL.match(ref)
    if m:
        return structure.known_resource_type(m.group(1))
    m = _ABSOLUTE.match(ref)
    if not m or not structure.known_resource_type(m.group(2)):
        return False
    return not any(seg in (".", "..") for seg in ref.split("://", 1)[1].split("?")[0].split("/"))


def check(resource: dict[str, Any], rtype: str) -> None:
    """400 (code invalid, one issue per bad element) unless every reference has a form above."""
    bad = [where for where, ref in literal_references(resource, rtype) if not is_valid(ref)]
    if bad:
        issues = [
            {
                "severity": "error",
                "code": "invalid",
                "expression": [where],
                "diagnostics": f"{where} is not a valid reference: Type/id, Type/id/_history/vid, Type?query, "
                "#id, urn:uuid:, urn:oid: or an absolute http(s) URL to Type/id",
            }
            for where in bad[:20]
        ]
        raise FhirError(400, "invalid", issues[0]["diagnostics"], issues=issues)
