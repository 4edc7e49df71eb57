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

from engine.store.fhir.params import DATE_PREFIXES, FHIR_VERSION, SEARCH_PARAMS, SearchParam
from engine.store.fhir.query import RESULT_PARAMS, SORT_KEYS, SUMMARY_VALUES, TOTAL_VALUES
from engine.store.fhir.search import MAX_RECHECK
from listeners.fhir_audit import AUDIT_PARAMS

# Bumped by hand when the statement changes (kept fixed so the snapshot is reproducible).
STATEMENT_DATE = "2025-01-15"
SOFTWARE_VERSION = "0.1.0"
_SP = "http://hl7.org/fhir/SearchParameter/"

_COMMON = [
    {"name": "_id", "type": "token", "definition": _SP + "Resource-id", "documentation": "logical id"},
    {"name": "_lastUpdated", "type": "date", "definition": _SP + "Resource-lastUpdated",
     "documentation": "meta.lastUpdated; prefixes " + " ".join(DATE_PREFIXES)},
]
_SEARCH_RULES = (
    "Search: a parameter, modifier, chain or result parameter that is not listed here is refused with 400 "
    "and an OperationOutcome naming it; with 'Prefer: handling=lenient' it is ignored instead and the Bundle's "
    "self link shows only what was applied. Result parameters: " + ", ".join(
        p for p in RESULT_PARAMS if p not in ("_format", "_pretty", "_cursor"))
    + " (_summary: " + " ".join(SUMMARY_VALUES) + "; _total: " + " ".join(TOTAL_VALUES) + "; _sort: "
    + " ".join(SORT_KEYS) + ", each optionally with -; otherwise results come in the order resources were "
    "created). String parameters match the start of a "
    "field, case- and accent-insensitive; :exact and :contains decrypt at most "
    f"{MAX_RECHECK} candidates, a search that would need more is refused as too-costly.")
_WRITE_RULES = (
    " Writes: bodies are FHIR JSON in UTF-8 (application/fhir+json or application/json; another charset, or a "
    "body without Content-Type, is 415). If-Match (update, delete, conditional ones, Bundle entry ifMatch) "
    "takes * (any current version; 412 when the resource does not exist or is deleted) or entity-tags, weak or "
    "strong (W/\"3\" and \"3\" both name version 3); an empty or malformed value is 400. References: "
    "every Reference.reference must be Type/id, Type/id/_history/vid, Type?query (conditional, resolved on "
    "write), #id, urn:uuid:/urn:oid: (a fullUrl of the same Bundle) or an absolute http(s) URL to Type/id "
    "without . or .. segments; anything else is 400. Referential integrity is checked on every write: a "
    "relative reference to a stored type must name a resource (or version) that exists, or that the same "
    "transaction writes, else 400 not-found; references to other types and absolute URLs are not checked. "
    "An update (PUT Type/id) must carry that id in the body: none, or another one, is 400. Narrative "
    "(every text.div, contained resources too) must be an XHTML div in the XHTML namespace with only the "
    "elements and attributes of txt-1 (no script, forms, frames, objects, event handler attributes, "
    "javascript:/vbscript: or non-image data: URLs, style that loads or runs something) and some content "
    "(txt-2); no DOCTYPE, entity declarations or processing instructions; else 400 invariant naming the path.")
_BUNDLE_RULES = (
    "Transaction (all or nothing) and batch (each entry on its own); entries processed DELETE, POST, PUT, GET "
    "(R4 3.1.0.11.2). Two entries with the same fullUrl are 400 naming both (bdl-7; stricter than bdl-7's "
    "versionId exception, since a reference to that fullUrl would be ambiguous), as are two writes of one "
    "resource or two conditional writes with one condition. References between entries (urn:uuid: fullUrls) "
    "are resolved; one to an entry that is not in the Bundle is 400. A resource may be the target of one "
    "entry only (a PUT and a DELETE of one id is 400 duplicate, R4 http.html#trules). GET entries read "
    "(Type/id, Type/id/_history/vid) and answer with the resource whatever Prefer: return says (it governs "
    "writes); searches (Type?query) are not supported inside a Bundle: such an entry is 400 not-supported "
    "(in a batch, that entry alone). A DELETE of an id that never existed is 204, as one of a deleted resource.")
_WRITE_INTERACTIONS = ["read", "vread", "update", "delete", "history-instance", "history-type", "create",
                       "search-type"]


_TYPE_DOCS = {
    "Binary": "create/update take the content itself with its own Content-Type (any type other than FHIR JSON), "
              "up to the listener's max_binary_bytes (413 above), or a FHIR JSON Binary with base64 data; "
              "read/vread answer the raw bytes with the Binary's contentType unless Accept or _format asks for "
              "FHIR JSON (then the resource with data), one byte range (Range: bytes=a-b) answered 206; "
              "the bytes are stored as an encrypted blob apart from the resource and streamed; search and "
              "history entries carry Binaries without data",
    "DocumentReference": "inline attachment data over 256 KiB of base64 is stored as a Binary of its own and "
                         "the attachment answered with its url (Binary/id) and size",
    "DiagnosticReport": "inline presentedForm data over 256 KiB of base64 is stored as a Binary of its own "
                        "and answered with its url (Binary/id) and size",
}


def _documentation(p: SearchParam) -> str:
    """The parameter's text, with exactly the modifiers (and date prefixes) search accepts."""
    doc = p.doc
    if p.type == "date":
        doc += "; prefixes " + " ".join(DATE_PREFIXES)
    mods = [f":{m}" for m in p.modifiers]
    if p.type == "reference":
        mods[mods.index(":[type]")] = f":{p.target}" if p.target else ":[type]"
        doc += "; chains one level into a stored type" + (f" ({p.name}.<param>)" if p.target
                                                         else f" ({p.name}:<Type>.<param>)")
    return doc + "; modifiers " + " ".join(mods)


def _resource(rtype: str) -> dict[str, Any]:
    params = SEARCH_PARAMS[rtype]
    search = list(_COMMON)
    for p in params.values():
        search.append({"name": p.name, "type": p.type, "documentation": _documentation(p)})
    includes = [f"{rtype}:{p.name}" for p in params.values() if p.type == "reference"]
    revincludes = [f"{src}:{p.name}" for src, ps in SEARCH_PARAMS.items() for p in ps.values()
                   if p.type == "reference" and p.target in (None, rtype)]
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
    if rtype in _TYPE_DOCS:
        res["documentation"] = _TYPE_DOCS[rtype]
    if includes:
        res["searchInclude"] = includes
    if revincludes:
        res["searchRevInclude"] = revincludes
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
            "documentation": _SEARCH_RULES + _WRITE_RULES,
            "security": {"cors": False, "description": security},
            "resource": [*(_resource(t) for t in SEARCH_PARAMS), _audit_event()],
            "interaction": [{"code": "transaction", "documentation": _BUNDLE_RULES},
                            {"code": "batch", "documentation": _BUNDLE_RULES}],
        }],
    }


if __name__ == "__main__":
    print(json.dumps(capability_statement(), indent=2))
