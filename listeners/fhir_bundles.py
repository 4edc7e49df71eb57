"""Turning store results into FHIR responses: resources, Bundles, OperationOutcomes.

Kept apart from the HTTP handlers so the shapes (searchset, history,
transaction-response) can be read against the spec in one place.
"""

from __future__ import annotations

import json
from email.utils import formatdate
from typing import Any
from urllib.parse import urlencode

from starlette.responses import Response

from engine.store.fhir.bundle import EntryResult
from engine.store.fhir.params import FhirError
from engine.store.fhir.resources import etag, iso_instant
from engine.store.fhir.search import HistoryEntry, SearchResult

FHIR_JSON = "application/fhir+json"
CONTENT_TYPE = "application/fhir+json; charset=utf-8"


def fhir_response(body: dict[str, Any] | None, status: int = 200, headers: dict[str, str] | None = None
                  ) -> Response:
    content = b"" if body is None else json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()
    hdrs = dict(headers or {})
    if body is not None:
        hdrs["Content-Type"] = CONTENT_TYPE
    return Response(content, status_code=status, headers=hdrs)


def error_response(e: FhirError) -> Response:
    return fhir_response(e.outcome(), e.status, e.headers)


def http_date(ts: float) -> str:
    return formatdate(ts, usegmt=True)


def version_headers(version: int, last_updated: float) -> dict[str, str]:
    return {"ETag": etag(version), "Last-Modified": http_date(last_updated)}


def _link(base: str, rtype: str, params: list[tuple[str, str]]) -> str:
    return f"{base}/{rtype}" + (f"?{urlencode(params)}" if params else "")


def searchset(base: str, rtype: str, result: SearchResult, includes: list[str]) -> dict[str, Any]:
    """A searchset Bundle; ``next`` carries the opaque cursor so pages stay stable."""
    params = [*result.used, ("_count", str(result.count))]  # used: what was applied, _include too
    links = [{"relation": "self", "url": _link(base, rtype, params)}]
    if result.next_cursor:
        links.append({"relation": "next", "url": _link(base, rtype, [*params, ("_cursor", result.next_cursor)])})
    entries = [{"fullUrl": f"{base}/{row.type}/{row.id}", "resource": body, "search": {"mode": "match"}}
               for row, body in result.rows]
    entries += [{"fullUrl": f"{base}/{row.type}/{row.id}", "resource": body, "search": {"mode": "include"}}
                for row, body in result.included]
    if result.notes:
        entries.append({"resource": {"resourceType": "OperationOutcome", "issue": [
            {"severity": "warning", "code": "informational", "diagnostics": n} for n in result.notes]},
            "search": {"mode": "outcome"}})
    bundle: dict[str, Any] = {"resourceType": "Bundle", "type": "searchset", "link": links}
    if result.total is not None:
        bundle["total"] = result.total
    if entries:
        bundle["entry"] = entries
    return bundle


def plain_searchset(base: str, rtype: str, resources: list[dict[str, Any]], total: int,
                    params: list[tuple[str, str]], next_params: list[tuple[str, str]] | None) -> dict[str, Any]:
    """A searchset for sources other than the store (AuditEvent from the audit trail)."""
    links = [{"relation": "self", "url": _link(base, rtype, params)}]
    if next_params is not None:
        links.append({"relation": "next", "url": _link(base, rtype, next_params)})
    bundle: dict[str, Any] = {"resourceType": "Bundle", "type": "searchset", "total": total, "link": links}
    if resources:
        bundle["entry"] = [{"fullUrl": f"{base}/{rtype}/{r['id']}", "resource": r, "search": {"mode": "match"}}
                           for r in resources]
    return bundle


def history_bundle(base: str, path: str, entries: list[HistoryEntry], total: int, next_cursor: str | None,
                   params: list[tuple[str, str]]) -> dict[str, Any]:
    keep = [(k, v) for k, v in params if k in ("_count", "_since")]
    links = [{"relation": "self", "url": f"{base}/{path}" + (f"?{urlencode(keep)}" if keep else "")}]
    if next_cursor:
        links.append({"relation": "next", "url": f"{base}/{path}?{urlencode([*keep, ('_cursor', next_cursor)])}"})
    out = []
    for h in entries:
        status = {"POST": "201 Created", "PUT": "200 OK", "DELETE": "204 No Content"}.get(h.method, "200 OK")
        entry: dict[str, Any] = {
            "fullUrl": f"{base}/{h.type}/{h.id}",
            "request": {"method": h.method, "url": h.type if h.method == "POST" else f"{h.type}/{h.id}"},
            "response": {"status": status, "etag": etag(h.version), "lastModified": iso_instant(h.last_updated)},
        }
        if h.resource is not None:
            entry["resource"] = h.resource
        out.append(entry)
    bundle: dict[str, Any] = {"resourceType": "Bundle", "type": "history", "total": total, "link": links}
    if out:
        bundle["entry"] = out
    return bundle


def response_bundle(btype: str, base: str, results: list[EntryResult], *, representation: bool
                    ) -> dict[str, Any]:
    """transaction-response / batch-response. A GET entry answers with its resource (R4
    http.html#transaction-response: "for a GET, the resource"); a write's resource only with
    Prefer: return=representation, which governs what writes return."""
    entries = []
    for r in results:
        resp: dict[str, Any] = {"status": r.status_line}
        entry: dict[str, Any] = {"response": resp}
        w = r.written
        if w is not None:
            entry["fullUrl"] = f"{base}/{w.type}/{w.id}"
            resp["etag"] = w.etag
            resp["lastModified"] = w.last_modified
            if r.location:
                resp["location"] = f"{r.location}"
        if r.outcome is not None:
            resp["outcome"] = r.outcome
        if r.read and r.resource is not None:
            meta = r.resource.get("meta") or {}
            entry["fullUrl"] = f"{base}/{r.resource.get('resourceType')}/{r.resource.get('id')}"
            if meta.get("versionId"):
                resp["etag"] = etag(meta["versionId"])
            if meta.get("lastUpdated"):
                resp["lastModified"] = meta["lastUpdated"]
        if (representation or r.read) and r.resource is not None:
            entry["resource"] = r.resource
        entries.append(entry)
    return {"resourceType": "Bundle", "type": f"{btype}-response", "entry": entries}
