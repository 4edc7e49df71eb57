"""The CapabilityStatement, generated from what the code implements.

Resource types, search parameters and _include targets come from the same table
the store indexes with (engine.store.fhir.params.SEARCH_PARAMS), so `/metadata`
cannot advertise something the server does not do. The committed snapshot
``conformance/fhir-capability-statement.json`` is regenerated with
``python -m listeners.fhir_capability > conformance/fhir-capability-statement.json``
and a test checks it equals what `/metadata` serves.
"""

from __future__ import annotations

import json
from typing import Any

from engine.store.fhir.params import FHIR_VERSION, SEARCH_PARAMS
from listeners.fhir_audit import AUDIT_PARAMS

# Bumped by hand when the statement changes (kept fixed so the snapshot is reproducible).
STATEMENT_DATE = "2025-01-15"
SOFTWARE_VERSION = "0.1.0"
_SP = "http://hl7.org/fhir/SearchParameter/"

_COMMON = [
    {"name": "_id", "type": "token", "definition": _SP + "Resource-id", "documentation": "logical id"},
    {"name": "_lastUpdated", "type": "date", "definition": _SP + "Resource-lastUpdated",
     "documentation": "meta.lastUpdated; prefixes eq ne lt gt le ge sa eb"},
]
_WRITE_INTERACTIONS = ["read", "vread", "update", "delete", "history-instance", "history-type", "create",
                       "search-type"]


def _resource(rtype: str) -> dict[str, Any]:
    params = SEARCH_PARAMS[rtype]
    search = list(_COMMON)
    for p in params.values():
        doc = p.doc + ("; prefixes eq ne lt gt le ge sa eb" if p.type == "date" else "")
        search.append({"name": p.name, "type": p.type, "documentation": doc})
    includes = [f"{rtype}:{p.name}" for p in params.values() if p.type == "reference"]
    res: dict[str, Any] = {
        "type": rtype,
        "interaction": [{"code": c} for c in _WRITE_INTERACTIONS],
        "versioning": "versioned-update",
        "readHistory": True,
        "updateCreate": True,
        "conditionalCreate": True,
        "conditionalRead": "not-supported",
        "conditionalUpdate": True,
        "conditionalDelete": "single",
        "referencePolicy": ["literal", "local"],
    }
    if includes:
        res["searchInclude"] = includes
    res["searchParam"] = search
    return res


def _audit_event() -> dict[str, Any]:
    return {
        "type": "AuditEvent",
        "documentation": "Read-only view of medrelay's audit trail",
        "interaction": [{"code": "read"}, {"code": "search-type"}],
        "searchParam": [{"name": n, "type": t} for n, t in AUDIT_PARAMS.items()],
    }


def capability_statement(*, auth_open: bool = False) -> dict[str, Any]:
    """The statement `/metadata` serves; ``auth_open`` changes only the security text."""
    security = ("No authentication: this endpoint was explicitly opened (auth: {open: true})." if auth_open
                else "Every interaction except /metadata needs an Authorization: Bearer token "
                     "configured on the listener; missing or unknown tokens get 401.")
    return {
        "resourceType": "CapabilityStatement",
        "status": "active",
        "date": STATEMENT_DATE,
        "publisher": "medrelay",
        "kind": "instance",
        "software": {"name": "medrelay", "version": SOFTWARE_VERSION},
        "implementation": {"description": "medrelay FHIR R4 server (engine-integrated, encrypted store)"},
        "fhirVersion": FHIR_VERSION,
        "format": ["application/fhir+json", "json"],
        "rest": [{
            "mode": "server",
            "security": {"cors": False, "description": security},
            "resource": [*(_resource(t) for t in SEARCH_PARAMS), _audit_event()],
            "interaction": [{"code": "transaction"}, {"code": "batch"}],
        }],
    }


if __name__ == "__main__":
    print(json.dumps(capability_statement(), indent=2))
