"""Writes as operations: single REST writes, transaction and batch Bundles.

A REST create/update/delete is a transaction of one operation, so conditional
create, conditional update, If-Match and reference checks have a single
implementation. Everything here runs inside the caller's database transaction;
a FhirError aborts it (transaction) or becomes that entry's answer (batch).
Each operation checks all its preconditions before it writes, so a batch entry
that fails leaves nothing behind.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, urlencode

from sqlalchemy import Connection

from engine.store import leases
from engine.store.fhir import jsontext, references, structure
from engine.store.fhir.binary import SealedData, attachment_path, attachments, decode_data
from engine.store.fhir.params import ID_RE, STORED_TYPES, FhirError, operation_outcome, validate_resource
from engine.store.fhir.resources import DATA_TYPES, FhirStore, Written, check_if_match, parse_if_match
from engine.store.fhir.search import find

# FHIR R4 3.1.0.11.2: DELETE, then POST, then PUT/PATCH, then GET.
PROCESSING_ORDER = {"DELETE": 0, "POST": 1, "PUT": 2, "GET": 3}
REASONS = {200: "OK", 201: "Created", 204: "No Content", 400: "Bad Request", 404: "Not Found",
           405: "Method Not Allowed", 409: "Conflict", 410: "Gone", 412: "Precondition Failed",
           422: "Unprocessable Entity"}
VERSION_RE = re.compile(r"^[0-9]{1,18}$")  # a 64-bit column holds it
PAYLOAD_MAX_DEPTH = 150  # `store` destination payloads come from our own transforms; this only keeps them parseable


@dataclass
class Op:
    """One interaction: from a REST request or a Bundle entry's ``request``."""

    method: str
    type: str
    id: str | None = None
    query: list[tuple[str, str]] | None = None  # conditional PUT/DELETE
    resource: dict[str, Any] | None = None
    if_match: str | None = None
    if_none_exist: str | None = None
    full_url: str | None = None
    version: int | None = None  # GET .../_history/{vid}
    assigned_id: str | None = None  # POST: the id the server chose before submitting
    data: SealedData | None = None  # a Binary's bytes, sealed by the listener from a raw body
    index: int | None = None  # its Bundle entry (errors name Bundle.entry[index]); None: a REST request


@dataclass
class EntryResult:
    status: int
    written: Written | None = None
    resource: dict[str, Any] | None = None
    outcome: dict[str, Any] | None = None
    read: bool = False  # a GET entry: its resource is the answer, whatever Prefer: return says

    @property
    def status_line(self) -> str:
        return f"{self.status} {REASONS.get(self.status, '')}".strip()

    @property
    def location(self) -> str | None:
        w = self.written
        return None if w is None or w.resource is None else f"{w.type}/{w.id}/_history/{w.version}"


@dataclass
class _Plan:
    op: Op
    id: str | None = None
    matched: Written | None = None  # conditional create found it: no write
    skip: bool = False  # conditional delete with no match
    resource: dict[str, Any] | None = None  # the body with references resolved


def parse_url(url: str) -> tuple[str, str | None, int | None, list[tuple[str, str]] | None]:
    """``Type``, ``Type/id``, ``Type/id/_history/vid`` or ``Type?query`` (relative to the base)."""
    path, sep, query = url.partition("?")
    parts = [p for p in path.strip("/").split("/") if p]
    q = parse_qsl(query, keep_blank_values=True) if sep else None
    if not parts or (len(parts) not in (1, 2, 4)) or (len(parts) == 4 and parts[2] != "_history"):
        raise FhirError(400, "invalid", "request.url must be Type, Type/id, Type/id/_history/vid or Type?query")
    if parts[0] not in STORED_TYPES:
        raise FhirError(404, "not-supported", f"resource type {parts[0]} is not supported")
    rid = parts[1] if len(parts) >= 2 else None
    if rid is not None and not ID_RE.match(rid):
        raise FhirError(400, "invalid", "id must match [A-Za-z0-9-.]{1,64}")
    version = None
    if len(parts) == 4:
        if not VERSION_RE.match(parts[3]):
            raise FhirError(400, "invalid", "version id must be a number of at most 18 digits")
        version = int(parts[3])
    return parts[0], rid, version, q


def op_from_entry(entry: Any, index: int = 0) -> Op:
    """One Bundle entry as an Op; every error names the entry (``Bundle.entry[2].request.url``).

    The entry's own elements are checked against the R4 table first (request.ifNoneExist
    a string, request.method a code of http-verb, ...), so nothing below meets a value of
    the wrong JSON type.
    """
    where = f"Bundle.entry[{index}]"
    problems = structure.check(entry, "Bundle.entry", path=where, into_resources=False)
    if problems:
        raise FhirError(400, problems[0].code, f"{where} is not valid", issues=[p.as_dict() for p in problems])
    req = entry.get("request")
    if not isinstance(req, dict):
        raise FhirError(400, "required", f"{where}.request is missing",
                        issues=[_issue("required", f"{where}.request: every entry needs a request",
                                       f"{where}.request")])
    method = str(req.get("method") or "").upper()
    if method not in PROCESSING_ORDER:
        raise FhirError(405 if method in ("PATCH", "HEAD") else 400, "not-supported",
                        f"{where}.request.method {method or '(missing)'} is not supported")
    try:
        rtype, rid, version, query = parse_url(str(req.get("url") or ""))
        op = Op(method, rtype, rid, query, entry.get("resource"), req.get("ifMatch"), req.get("ifNoneExist"),
                entry.get("fullUrl"), version, index=index)
        check_op(op)
    except FhirError as e:
        raise _at_entry(e, where) from None
    return op


def _issue(code: str, diagnostics: str, expression: str) -> dict[str, Any]:
    return {"severity": "error", "code": code, "diagnostics": diagnostics, "expression": [expression]}


def _at_entry(e: FhirError, where: str) -> FhirError:
    """The error of one entry's resource, with its FHIRPaths rooted at the entry
    (``Observation.status`` -> ``Bundle.entry[1].resource.status``)."""
    if not e.issues:
        e.diagnostics = f"{where}: {e.diagnostics}"
        return e
    for issue in e.issues:
        exprs = issue.get("expression") or []
        fixed = [f"{where}.resource" + x[x.index("."):] if "." in x else f"{where}.resource" for x in exprs]
        issue["expression"] = fixed
        text = str(issue.get("diagnostics", ""))
        if exprs and text.startswith(exprs[0]):
            issue["diagnostics"] = fixed[0] + text[len(exprs[0]):]
    return e


def check_op(op: Op) -> None:
    """Shape checks that need no database: body present and valid, URL fits the method."""
    if op.method in ("POST", "PUT"):
        if op.resource is None:
            raise FhirError(400, "required", f"{op.method} needs a resource")
        validate_resource(op.resource, op.type)
        if op.type in DATA_TYPES and "data" in op.resource:  # refused here, not inside the write's transaction
            decode_data(op.resource["data"], f"{op.type}.data")
        for i, att in attachments(op.type, op.resource):
            if "data" in att:
                decode_data(att["data"], attachment_path(op.type, i))
        references.check(op.resource, op.type)
        if op.method == "POST" and (op.id is not None or op.query is not None):
            raise FhirError(400, "invalid", "POST goes to the type (Type), not an instance or a query")
        if op.method == "PUT" and op.id is None and op.query is None:
            raise FhirError(405, "not-supported", "PUT needs Type/id or Type?query")
        if op.method == "PUT" and op.id is not None and op.resource.get("id") != op.id:
            # R4 http.html#update: no id, or one that disagrees with the URL, SHALL be 400
            text = ("the resource has no id; an update must carry the id of the URL" if "id" not in op.resource
                    else "the resource id does not match the id in the URL")
            raise FhirError(400, "invalid", text, issues=[_issue("invalid", f"{op.type}.id: {text}", f"{op.type}.id")])
    elif op.method == "DELETE" and op.id is None and op.query is None:
        raise FhirError(405, "not-supported", "DELETE needs Type/id or Type?query")
    elif op.method == "GET" and (op.id is None or op.query is not None):
        raise FhirError(400, "not-supported", "GET entries may only read (Type/id[/_history/vid])")
    if op.if_match is not None and op.method in ("PUT", "DELETE"):
        parse_if_match(op.if_match)  # malformed: 400 before any database work


# -- planning (reads only) -----------------------------------------------------
def precheck(fs: FhirStore, conn: Connection, op: Op) -> EntryResult | None:
    """Run a single write's preconditions read-only, before it is submitted.

    Returns the answer when nothing needs writing (conditional create matched), raises
    FhirError when the write would fail; None when it should be submitted.
    """
    _, plans = prepare(fs, conn, [op])  # references too: a dangling one is refused before the intake
    plan = plans[0]
    if plan.matched is not None:
        return EntryResult(200, plan.matched, plan.matched.resource)
    return None


def _condition_lock(conn: Connection, op: Op, query: list[tuple[str, str]]) -> None:
    """Serialise conditional writes with one condition across engines (a transaction lock).

    Two engines creating ``Patient?identifier=X`` at the same moment each search, see nothing
    committed and both create; under the lock the second waits for the first's commit, and its
    search then finds what the first created (issue 10). SQLite: one writer already.
    """
    leases.xact_lock(conn, "fhir-condition", [f"{op.type}?{urlencode(sorted(query))}"])


def _plan(fs: FhirStore, conn: Connection, op: Op, lock: bool = False) -> _Plan:
    plan = _Plan(op)
    if op.method == "POST":
        if op.if_none_exist:
            if lock:
                _condition_lock(conn, op, parse_qsl(op.if_none_exist.lstrip("?"), keep_blank_values=True))
            rows = find(fs, conn, op.type, parse_qsl(op.if_none_exist.lstrip("?"), keep_blank_values=True))
            if len(rows) > 1:
                raise FhirError(412, "duplicate", "ifNoneExist matched more than one resource")
            if rows:
                row, body = fs.read(conn, op.type, rows[0].id)
                plan.matched = Written(op.type, row.id, row.version, row.last_updated, False, body,
                                       changed=False)
                plan.id = row.id
                return plan
        plan.id = op.assigned_id or fs.new_id()
    elif op.query is not None:  # conditional PUT / DELETE
        if lock:
            _condition_lock(conn, op, op.query)
        rows = find(fs, conn, op.type, op.query)
        if len(rows) > 1:
            raise FhirError(412, "multiple-matches", f"conditional {op.method} matched more than one resource")
        if op.method == "DELETE":
            plan.skip = not rows
            plan.id = rows[0].id if rows else None
        else:
            rid = op.resource.get("id") if op.resource else None
            if rows and rid not in (None, rows[0].id):
                raise FhirError(400, "invalid", "the resource id differs from the resource the query matched")
            plan.id = rows[0].id if rows else (rid or fs.new_id())
    else:
        plan.id = op.id
        if op.method == "DELETE" and fs.current(conn, op.type, op.id or "") is None:
            plan.skip = True  # R4 http.html#delete: a resource that never existed is deleted already (204)
    if op.if_match is not None and op.method in ("PUT", "DELETE"):  # checked again by the write itself
        row = fs.current(conn, op.type, plan.id) if plan.id is not None else None
        check_if_match(op.if_match, row, f"{op.type}/{plan.id}" if plan.id else f"the {op.type} the query names")
    return plan


def _rewrite(node: Any, resolve: Any, urls: dict[str, str] | None, path: str) -> Any:
    """References resolved; an Attachment ``url`` naming an entry's fullUrl becomes that entry's
    ``Type/id`` too (R4 3.1.0.11.2: matching uri/url elements are replaced like references), so a
    DocumentReference can point at the Binary created in the same transaction. ``path`` is the
    FHIRPath of ``node``, for errors. An ``Expression`` (it has ``language``) keeps its uri."""
    if isinstance(node, dict):
        out = {}
        for k, v in node.items():
            if k == "reference" and isinstance(v, str) and "language" not in node:
                out[k] = resolve(v, f"{path}.reference")
            elif k == "url" and urls and isinstance(v, str) and v in urls:
                out[k] = urls[v]
            else:
                out[k] = _rewrite(v, resolve, urls, f"{path}.{k}")
        return out
    if isinstance(node, list):
        return [_rewrite(v, resolve, urls, f"{path}[{i}]") for i, v in enumerate(node)]
    return node


def _dangling(where: str, text: str) -> FhirError:
    return FhirError(400, "not-found", f"{where} {text}", issues=[_issue("not-found", f"{where} {text}", where)])


def _resolver(fs: FhirStore, conn: Connection, mapping: dict[str, str],
              written: frozenset[tuple[str, str]] = frozenset(), deleted: frozenset[tuple[str, str]] = frozenset()
              ) -> Any:
    """Resolves the references of a write (a transaction's: ``mapping`` fullUrl -> Type/id, what it
    writes and what it deletes). Referential integrity, as HAPI FHIR's default: a relative
    reference to a type this server stores must name a resource that exists after the write
    (or that version), else 400; references to other types and absolute URLs are kept unchecked."""
    seen: dict[tuple[str, str, str | None], str | None] = {}

    def missing(rtype: str, rid: str, version: str | None) -> str | None:
        if (rtype, rid) in deleted:
            return f"points to a {rtype} this transaction deletes"
        if (rtype, rid) in written:
            return None
        row = fs.current(conn, rtype, rid)
        if row is None:
            return f"points to a {rtype} that does not exist on this server"
        if version is None:
            return f"points to a {rtype} that was deleted" if row.deleted else None
        if not VERSION_RE.match(version) or not fs.has_version(conn, rtype, rid, int(version)):
            return f"points to a version of a {rtype} that does not exist on this server"
        return None

    def resolve(ref: str, where: str) -> str:
        if ref in mapping:
            return mapping[ref]
        if ref.startswith(("urn:uuid:", "urn:oid:")):
            raise FhirError(400, "not-found", "a reference points to an entry that is not in the bundle")
        m = references.RELATIVE.match(ref)
        if m and m.group(1) in STORED_TYPES:
            key = (m.group(1), m.group(2), m.group(3))
            if key not in seen:
                seen[key] = missing(*key)
            if seen[key] is not None:
                raise _dangling(where, seen[key] or "")
            return ref
        if "?" in ref and not ref.startswith("#"):
            rtype, _, query = ref.partition("?")
            if rtype not in STORED_TYPES:
                raise FhirError(400, "not-supported", f"conditional reference to {rtype} is not supported")
            rows = find(fs, conn, rtype, parse_qsl(query, keep_blank_values=True))
            if len(rows) != 1:
                raise FhirError(412, "not-found", f"a conditional reference matched {len(rows)} resources")
            return f"{rtype}/{rows[0].id}"
        return ref

    return resolve


# -- execution -----------------------------------------------------------------
def _execute(fs: FhirStore, conn: Connection, plan: _Plan, message_id: str | None) -> EntryResult:
    op = plan.op
    if plan.matched is not None:
        return EntryResult(200, plan.matched, plan.matched.resource)
    if op.method == "DELETE":
        if plan.skip or plan.id is None:
            return EntryResult(204)  # nothing matched, or a DELETE of an id never known
        return EntryResult(204, fs.delete(conn, op.type, plan.id, if_match=op.if_match, message_id=message_id))
    if op.method == "GET":
        if op.version is not None:
            body, _ = fs.vread(conn, op.type, op.id or "", op.version)
        else:
            _, body = fs.read(conn, op.type, op.id or "")
        return EntryResult(200, resource=body, read=True)
    body = plan.resource if plan.resource is not None else op.resource
    assert body is not None
    w = fs.write(conn, op.type, plan.id, body, if_match=op.if_match, message_id=message_id,
                 method=op.method, data=op.data)
    return EntryResult(201 if w.created else 200, w, w.resource)


def prepare(fs: FhirStore, conn: Connection, ops: list[Op], lock: bool = False) -> tuple[list[int], dict[int, _Plan]]:
    """Resolve every target and reference without writing: all of a transaction's 4xx come from here.

    Also run read-only before submitting, so a bad transaction is refused without
    touching the intake.
    """
    order = sorted(range(len(ops)), key=lambda i: PROCESSING_ORDER[ops[i].method])
    plans: dict[int, _Plan] = {}
    mapping: dict[str, str] = {}
    targets: set[tuple[str, str]] = set()
    conditions: set[tuple[str, str, str]] = set()
    for i in order:
        op = ops[i]
        if op.method == "GET":
            continue
        condition = op.if_none_exist if op.method == "POST" else (
            "&".join(f"{k}={v}" for k, v in sorted(op.query)) if op.query is not None else None)
        if condition:  # two conditional writes with one condition would both create when nothing matches
            key = (op.method, op.type, condition.lstrip("?"))
            if key in conditions:
                raise FhirError(400, "duplicate", f"two {op.method} entries for {op.type} share one condition")
            conditions.add(key)
        if op.id is not None and op.query is None:  # R4 http.html#trules: one entry per resource, checked
            _once(targets, op.type, op.id)       # before the DELETE's target is looked up (a PUT may create it)
        plan = plans[i] = _plan(fs, conn, op, lock)
        if plan.id is not None and plan.matched is None and plan.id != op.id:
            _once(targets, op.type, plan.id)
        if op.full_url and plan.id is not None:
            mapping[op.full_url] = f"{op.type}/{plan.id}"
    written = frozenset((p.op.type, p.id) for p in plans.values() if p.id and p.op.method in ("POST", "PUT"))
    deleted = frozenset((p.op.type, p.id) for p in plans.values() if p.id and p.op.method == "DELETE")
    resolve = _resolver(fs, conn, mapping, written, deleted)
    for plan in plans.values():
        if plan.op.resource is not None and plan.matched is None:
            plan.resource = _resolved(plan.op, resolve, mapping)
    return order, plans


def _once(targets: set[tuple[str, str]], rtype: str, rid: str) -> None:
    if (rtype, rid) in targets:
        raise FhirError(400, "duplicate", f"{rtype}/{rid} is the target of more than one entry of the transaction "
                                          "(R4 http.html#trules: a resource may appear only once)")
    targets.add((rtype, rid))


def _resolved(op: Op, resolve: Any, mapping: dict[str, str] | None) -> Any:
    assert op.resource is not None
    try:
        return _rewrite(op.resource, resolve, mapping, op.type)
    except FhirError as e:
        raise _at_entry(e, f"Bundle.entry[{op.index}]") if op.index is not None else e from None


def run_transaction(fs: FhirStore, conn: Connection, ops: list[Op], *, message_id: str | None = None
                    ) -> list[EntryResult]:
    """All or nothing: any FhirError propagates and the caller's transaction rolls back."""
    order, plans = prepare(fs, conn, ops, lock=True)
    results: dict[int, EntryResult] = {}
    for i in order:
        plan = plans.get(i) or _Plan(ops[i])
        results[i] = _execute(fs, conn, plan, message_id)
    return [results[i] for i in range(len(ops))]


def parse_batch(entries: list[Any]) -> list[Op | FhirError]:
    """Parse and validate batch entries up front; a bad entry becomes its own error."""
    out: list[Op | FhirError] = []
    for i, entry in enumerate(entries):
        try:
            out.append(op_from_entry(entry, i))
        except FhirError as e:
            out.append(e)
    return out


def run_batch(fs: FhirStore, conn: Connection, entries: list[Any], *, message_id: str | None = None
              ) -> list[EntryResult]:
    """Each entry on its own: a failure answers that entry and leaves the others alone.

    ``entries`` are raw Bundle entries or what parse_batch made of them.
    """
    results = []
    for i, entry in enumerate(entries):
        try:
            if isinstance(entry, FhirError):
                raise entry
            op = entry if isinstance(entry, Op) else op_from_entry(entry, i)
            plan = _plan(fs, conn, op, lock=True)
            if op.resource is not None and plan.matched is None:
                plan.resource = _resolved(op, _resolver(fs, conn, {}), None)  # per entry: earlier ones wrote
            results.append(_execute(fs, conn, plan, message_id))
        except FhirError as e:
            results.append(EntryResult(e.status, outcome=e.outcome()))
    return results


def parse_bundle(bundle: Any) -> tuple[str, list[Any]]:
    if not isinstance(bundle, dict) or bundle.get("resourceType") != "Bundle":
        raise FhirError(400, "invalid", "POST to the base needs a Bundle")
    btype = bundle.get("type")
    if btype not in ("transaction", "batch"):
        raise FhirError(422, "not-supported", "only transaction and batch Bundles can be posted to the base")
    entries = bundle.get("entry") or []
    if not isinstance(entries, list):
        raise FhirError(400, "invalid", "Bundle.entry must be a list")
    _unique_full_urls(entries)
    return btype, entries


def _unique_full_urls(entries: list[Any]) -> None:
    """bdl-7: no two entries share a fullUrl, else 400 naming each pair (not the value: it may be
    an identifier). Stricter than bdl-7, which lets entries share one with different
    meta.versionId (history): in a transaction or batch a reference to it would be ambiguous."""
    first: dict[str, int] = {}
    issues = []
    for i, entry in enumerate(entries):
        url = entry.get("fullUrl") if isinstance(entry, dict) else None
        if not isinstance(url, str):
            continue
        if url in first:
            text = (f"Bundle.entry[{i}].fullUrl is the same as Bundle.entry[{first[url]}].fullUrl "
                    "(bdl-7: fullUrl must be unique in a Bundle)")
            issues.append(_issue("duplicate", text, f"Bundle.entry[{i}].fullUrl"))
        else:
            first[url] = i
    if issues:
        raise FhirError(400, "duplicate", issues[0]["diagnostics"], issues=issues[:20])


def apply_bundle(fs: FhirStore, conn: Connection, bundle: Any, *, message_id: str | None = None
                 ) -> tuple[str, list[EntryResult]]:
    btype, entries = parse_bundle(bundle)
    if btype == "batch":
        return btype, run_batch(fs, conn, entries, message_id=message_id)
    ops = [op_from_entry(e, i) for i, e in enumerate(entries)]
    return btype, run_transaction(fs, conn, ops, message_id=message_id)


def apply_payload(fs: FhirStore, conn: Connection, payload: bytes, *, message_id: str | None = None) -> str:
    """The `store` destination: a transaction/batch Bundle, or one resource (PUT if it has an id)."""
    doc = jsontext.loads(payload, max_depth=PAYLOAD_MAX_DEPTH)
    if isinstance(doc, dict) and doc.get("resourceType") == "Bundle" and doc.get("type") in ("transaction",
                                                                                            "batch"):
        btype, results = apply_bundle(fs, conn, doc, message_id=message_id)
        failed = [r.status for r in results if r.status >= 400]
        if failed:
            raise FhirError(max(failed), "processing", f"{len(failed)} batch entries failed")
        return f"fhir {btype} entries={len(results)}"
    rtype = validate_resource(doc)
    rid = doc.get("id")
    op = Op("PUT" if rid else "POST", rtype, rid, None, doc)
    (res,) = run_transaction(fs, conn, [op], message_id=message_id)
    return f"fhir {rtype} {res.status}"


def error_entry(e: FhirError) -> dict[str, Any]:
    return {"response": {"status": f"{e.status} {REASONS.get(e.status, '')}".strip(), "outcome": e.outcome()}}


__all__ = ["EntryResult", "Op", "apply_bundle", "apply_payload", "check_op", "error_entry",
           "operation_outcome", "parse_batch", "parse_url", "precheck", "prepare", "run_batch", "run_transaction"]
