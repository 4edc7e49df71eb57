"""FHIR search over the store's index: a parsed query to SQL, exact re-checks, stable pages, includes.

engine.store.fhir.query turns the request into filters (or refuses it); this module runs them.
Pages are keyset pages over ``fhir_resources.rid`` (the order resources were first created)
bounded by a snapshot (the highest rid when the first page was served): updates never move a
resource between pages, and resources created while a client walks the pages do not shift what
it sees. The cursor is opaque to clients.

Only the page is decrypted, except where the blind index can only narrow (``:exact``,
``:contains``, a string value longer than the index's prefixes): then the candidates SQL leaves
are decrypted and checked, at most ``MAX_RECHECK`` of them; a search that would need more is
refused (``too-costly``) with a request to narrow it, never answered from a partial scan.
``SearchResult.decrypted`` counts what a search decrypted (the tests hold it to the page).
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import structlog
from sqlalchemy import ColumnElement, Connection, and_, func, not_, or_, select

from engine.store.fhir import reindex as _reindex  # noqa: F401  (registers the index rebuild with migrate)
from engine.store.fhir.params import SEARCH_PARAMS, FhirError, _model_class, date_range
from engine.store.fhir.query import (
    DEFAULT_COUNT,
    MAX_COUNT,
    Filter,
    Query,
    chain_clause,
    date_clause,
    inner_ids_subquery,
    parse,
)
from engine.store.fhir.resources import FhirStore, Row, fhir_index, fhir_resources, fhir_versions

log = structlog.get_logger()

MAX_RECHECK = 2000  # candidates one search may decrypt to check :exact / :contains / long values
MAX_INCLUDE = 1000  # resources one page may pull in through _include and _revinclude
SUBSETTED = {"system": "http://terminology.hl7.org/CodeSystem/v3-ObservationValue", "code": "SUBSETTED",
             "display": "subsetted"}


@dataclass
class SearchResult:
    rows: list[tuple[Row, dict[str, Any]]]
    included: list[tuple[Row, dict[str, Any]]]
    total: int | None
    next_cursor: str | None
    used: list[tuple[str, str]]  # parameters applied (search and result), for the self link
    count: int = DEFAULT_COUNT
    ignored: list[str] = field(default_factory=list)
    decrypted: int = 0
    notes: list[str] = field(default_factory=list)  # warnings for an OperationOutcome entry


class _Work:
    """What one search decrypted, across its filters, page and includes."""

    def __init__(self, fs: FhirStore, conn: Connection) -> None:
        self.fs, self.conn, self.decrypted = fs, conn, 0

    def body(self, row: Row) -> dict[str, Any]:
        assert row.blob_id is not None
        self.decrypted += 1
        return self.fs.body(self.conn, row.type, row.id, row.version, row.blob_id)


def _row(x: Any) -> Row:
    return Row(x["rid"], x["type"], x["id"], x["version"], x["last_updated"], bool(x["deleted"]), x["blob_id"])


def _sql(work: _Work, f: Filter) -> ColumnElement[bool]:
    if f.chained is None:
        assert f.clause is not None
        return f.clause
    inner = f.chained[3]
    if inner.recheck is None:
        return chain_clause(f, inner_ids_subquery(f))
    target = f.chained[1]
    assert inner.clause is not None
    matched = _rechecked(work, target, [inner.clause], [inner.recheck])
    return chain_clause(f, [row.id for row, _ in matched])


def _rechecked(work: _Work, rtype: str, clauses: list[ColumnElement[bool]], checks: list[Any]
               ) -> list[tuple[Row, dict[str, Any]]]:
    """The candidates SQL leaves, decrypted and checked exactly, in rid order (bounded)."""
    r = fhir_resources
    base = and_(r.c.type == rtype, r.c.deleted == 0, *clauses)
    n = work.conn.execute(select(func.count()).select_from(r).where(base)).scalar_one()
    if n > MAX_RECHECK:
        raise FhirError(400, "too-costly", f"this search leaves {n} candidates to decrypt and check (limit "
                                           f"{MAX_RECHECK}); narrow it with another parameter or a longer value")
    out = []
    for x in work.conn.execute(select(r).where(base).order_by(r.c.rid)).mappings():
        row = _row(x)
        body = work.body(row)
        if all(check(body) for check in checks):
            out.append((row, body))
    return out


def encode_cursor(after: int, snapshot: int, key: Any = None) -> str:
    """The opaque ``_cursor``: last rid served, the snapshot, and with ``_sort`` the last sort value."""
    payload = [after, snapshot] if key is None else [after, snapshot, key]
    return base64.urlsafe_b64encode(json.dumps(payload).encode()).decode().rstrip("=")


def _decode(raw: str) -> tuple[int, int, Any]:
    try:
        payload = json.loads(base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4)))
        if not isinstance(payload, list) or len(payload) not in (2, 3):
            raise ValueError("not a cursor")
        after, snapshot = payload[:2]
        if not all(type(x) is int and 0 <= x < 2**63 for x in (after, snapshot)):
            raise ValueError("out of range")  # a huge number would be an OverflowError in SQL
        key = payload[2] if len(payload) == 3 else None
        if key is not None and not (isinstance(key, str) and len(key) <= 64 or type(key) is float):
            raise ValueError("not a sort value")
        return after, snapshot, key
    except Exception:
        raise FhirError(400, "invalid", "_cursor is not one this server issued") from None


def decode_cursor(raw: str) -> tuple[int, int]:
    after, snapshot, _ = _decode(raw)
    return after, snapshot


def _sort_value(q: Query, row: Row) -> Any:
    return None if q.sort is None else (row.id if q.sort[0] == "_id" else row.last_updated)


def _order(q: Query) -> list[Any]:
    r = fhir_resources
    if q.sort is None:
        return [r.c.rid]
    col = r.c.id if q.sort[0] == "_id" else r.c.last_updated
    return [col.desc(), r.c.rid.desc()] if q.sort[1] else [col, r.c.rid]


def _after(q: Query, after: int, key: Any) -> ColumnElement[bool]:
    """Keyset condition: what comes after the last row served, in the search's order."""
    r = fhir_resources
    if q.sort is None:
        return r.c.rid > after
    if key is None:
        if after:
            raise FhirError(400, "invalid", "_cursor is not one this search issued")
        return r.c.rid > 0
    if (q.sort[0] == "_id") != isinstance(key, str):
        raise FhirError(400, "invalid", "_cursor is not one this search issued")
    col = r.c.id if q.sort[0] == "_id" else r.c.last_updated
    if q.sort[1]:
        return or_(col < key, and_(col == key, r.c.rid < after))
    return or_(col > key, and_(col == key, r.c.rid > after))


def find(fs: FhirStore, conn: Connection, rtype: str, query: list[tuple[str, str]]) -> list[Row]:
    """Current, non-deleted resources matching a query (at most 3): conditional create/update/delete."""
    q = parse(fs.hash_key, rtype, query, strict=True)
    if not q.filters:
        raise FhirError(412, "invalid", "a conditional request needs at least one search parameter")
    work = _Work(fs, conn)
    clauses = [_sql(work, f) for f in q.filters]
    checks = [f.recheck for f in q.filters if f.recheck is not None]
    if checks:
        return [row for row, _ in _rechecked(work, rtype, clauses, checks)[:3]]
    r = fhir_resources
    rows = conn.execute(select(r).where(r.c.type == rtype, r.c.deleted == 0, *clauses)
                        .order_by(r.c.rid).limit(3)).mappings().all()
    return [_row(x) for x in rows]


def search(fs: FhirStore, conn: Connection, rtype: str, params: list[tuple[str, str]], *,
           strict: bool = True) -> SearchResult:
    """One page of a type-level search; ``strict`` refuses parameters it cannot apply (the default)."""
    q = parse(fs.hash_key, rtype, params, strict=strict)
    r = fhir_resources
    work = _Work(fs, conn)
    key: Any = None
    if q.cursor is not None:
        after, snapshot, key = _decode(q.cursor)
    else:
        after = 0
        snapshot = conn.execute(select(func.coalesce(func.max(r.c.rid), 0))).scalar_one()
    clauses = [_sql(work, f) for f in q.filters]
    checks = [f.recheck for f in q.filters if f.recheck is not None]
    count = 0 if q.summary == "count" else q.count
    want_total = q.total != "none" or q.summary == "count"
    page: list[tuple[Row, dict[str, Any]]] = []
    next_cursor = None
    total: int | None
    if checks:
        matched = _rechecked(work, rtype, [r.c.rid <= snapshot, *clauses], checks)
        total = len(matched)
        rest = _rest(q, matched, after, key)
        page = rest[:count]
        if len(rest) > count and page:
            next_cursor = encode_cursor(page[-1][0].rid, snapshot, _sort_value(q, page[-1][0]))
    else:
        base = and_(r.c.type == rtype, r.c.deleted == 0, r.c.rid <= snapshot, *clauses)
        total = conn.execute(select(func.count()).select_from(r).where(base)).scalar_one() if want_total else None
        if count > 0:
            found = conn.execute(select(r).where(base, _after(q, after, key)).order_by(*_order(q))
                                 .limit(count + 1)).mappings().all()
            if len(found) > count:
                found = found[:count]
                last = _row(found[-1])
                next_cursor = encode_cursor(last.rid, snapshot, _sort_value(q, last))
            page = [(row, work.body(row)) for row in map(_row, found)]
    notes = [f"ignored (not supported): {', '.join(q.ignored)}"] if q.ignored else []
    included = _includes(work, q, page, notes)
    page = [(row, subset(body, q.summary, q.elements)) for row, body in page]
    log.debug("fhir.search", type=rtype, filters=len(q.filters), rechecked=bool(checks), decrypted=work.decrypted)
    return SearchResult(page, included, total if want_total else None, next_cursor, q.used, count, q.ignored,
                        work.decrypted, notes)


def _rest(q: Query, matched: list[tuple[Row, dict[str, Any]]], after: int, key: Any
          ) -> list[tuple[Row, dict[str, Any]]]:
    """Re-checked matches in the search's order, from after the cursor."""
    if q.sort is None:
        return [m for m in matched if m[0].rid > after]
    _after(q, after, key)  # the same cursor checks as the SQL path
    desc = q.sort[1]
    ordered = sorted(matched, key=lambda m: (_sort_value(q, m[0]), m[0].rid), reverse=desc)
    if key is None:
        return ordered
    if desc:
        return [m for m in ordered if (_sort_value(q, m[0]), m[0].rid) < (key, after)]
    return [m for m in ordered if (_sort_value(q, m[0]), m[0].rid) > (key, after)]


def _includes(work: _Work, q: Query, page: list[tuple[Row, dict[str, Any]]], notes: list[str]
              ) -> list[tuple[Row, dict[str, Any]]]:
    """``_include=Type:param[:Target]`` and ``_revinclude=Type:param[:Target]`` of the page."""
    if not page or not (q.includes or q.revincludes):
        return []
    i, r = fhir_index, fhir_resources
    seen = {(row.type, row.id) for row, _ in page}
    out: list[tuple[Row, dict[str, Any]]] = []

    def take(row: Row) -> None:
        if (row.type, row.id) in seen or row.deleted or row.blob_id is None:
            return
        if len(out) >= MAX_INCLUDE:
            if not any(n.startswith("includes") for n in notes):
                notes.append(f"includes cut at {MAX_INCLUDE} resources for this page; ask for a smaller _count")
            return
        seen.add((row.type, row.id))
        out.append((row, work.body(row)))

    rids = [row.rid for row, _ in page]
    for inc in q.includes:
        tokens = work.conn.execute(select(i.c.token).where(i.c.rid.in_(rids), i.c.param == inc.param,
                                                           not_(i.c.token.like("*/%")))).scalars().all()
        for ref in sorted(t for t in set(tokens) if inc.target is None or t.startswith(f"{inc.target}/")):
            itype, _, iid = ref.partition("/")
            row = work.fs.current(work.conn, itype, iid)
            if row is not None:
                take(row)
    refs = [f"{q.rtype}/{row.id}" for row, _ in page]
    for inc in q.revincludes:
        sub = select(i.c.rid).where(i.c.type == inc.source, i.c.param == inc.param, i.c.token.in_(refs))
        found = work.conn.execute(select(r).where(r.c.type == inc.source, r.c.deleted == 0, r.c.rid.in_(sub))
                                  .order_by(r.c.rid).limit(MAX_INCLUDE + 1)).mappings().all()
        for x in found:
            take(_row(x))
    return out


# -- _summary and _elements ------------------------------------------------
@lru_cache(maxsize=64)
def _elements_of(rtype: str) -> tuple[frozenset[str], frozenset[str]]:
    """(summary elements, mandatory elements) of a resource type, from the fhir.resources model."""
    summary: set[str] = set()
    required: set[str] = set()
    for name, f in _model_class(rtype).model_fields.items():
        extra = f.json_schema_extra if isinstance(f.json_schema_extra, dict) else {}
        alias = f.alias or name
        if extra.get("summary_element_property"):
            summary.add(alias)
        if f.is_required() or extra.get("element_required") or extra.get("one_of_many_required"):
            required.add(alias)
    return frozenset(summary), frozenset(required)


def subset(body: dict[str, Any], summary: str | None, elements: list[str] | None) -> dict[str, Any]:
    """The resource as ``_summary`` / ``_elements`` ask (R4 3.1.1.5.7-8), tagged SUBSETTED."""
    if elements is None and summary in (None, "false", "count"):
        return body
    rtype = str(body.get("resourceType", ""))
    try:
        summary_elements, required = _elements_of(rtype)
    except Exception:  # no model for the type: keep the resource whole rather than guess
        return body
    base = {"resourceType", "id", "meta"}
    if elements is not None:
        keep = base | set(elements) | required
    elif summary == "data":
        keep = set(body) - {"text"}
    elif summary == "text":
        keep = base | {"text"} | required
    else:
        keep = base | summary_elements
    out = {k: v for k, v in body.items() if k in keep or (k.startswith("_") and k[1:] in keep)}
    meta = dict(out.get("meta") or {})
    tags = [t for t in meta.get("tag") or [] if isinstance(t, dict)]
    if not any(t.get("code") == "SUBSETTED" for t in tags):
        tags.append(SUBSETTED)
    meta["tag"] = tags
    out["meta"] = meta
    return out


# -- history -----------------------------------------------------------------
def _count(params: list[tuple[str, str]]) -> int:
    raw = [v for k, v in params if k == "_count"]
    if not raw:
        return DEFAULT_COUNT
    try:
        n = int(raw[-1])
    except ValueError:
        raise FhirError(400, "invalid", "_count must be an integer") from None
    if n < 0:
        raise FhirError(400, "invalid", "_count must not be negative")
    return min(n, MAX_COUNT)


@dataclass
class HistoryEntry:
    type: str
    id: str
    version: int
    last_updated: float
    method: str
    resource: dict[str, Any] | None


def history(fs: FhirStore, conn: Connection, rtype: str, rid: str | None, params: list[tuple[str, str]]
            ) -> tuple[list[HistoryEntry], int, str | None]:
    """Instance or type history, newest first; paged by an opaque cursor on the version sequence."""
    v = fhir_versions
    cond = [v.c.type == rtype] + ([v.c.id == rid] if rid is not None else [])
    for name, value in params:
        if name == "_since":
            try:
                cond.append(v.c.last_updated >= date_range(value)[0])
            except ValueError:
                raise FhirError(400, "invalid", "_since is not a FHIR instant") from None
    count = _count(params)
    cursors = [val for k, val in params if k == "_cursor"]
    if cursors:
        before, snapshot = decode_cursor(cursors[-1])
    else:
        snapshot = conn.execute(select(func.coalesce(func.max(v.c.seq), 0))).scalar_one()
        before = snapshot + 1
    base = and_(*cond, v.c.seq <= snapshot)
    total = conn.execute(select(func.count()).select_from(v).where(base)).scalar_one()
    if rid is not None and total == 0 and not cursors:
        raise FhirError(404, "not-found", f"{rtype}/{rid} is not known")
    rows = conn.execute(select(v).where(base, v.c.seq < before).order_by(v.c.seq.desc()).limit(count + 1)
                        ).mappings().all()
    next_cursor = None
    if len(rows) > count:
        rows = rows[:count]
        next_cursor = encode_cursor(rows[-1]["seq"], snapshot) if rows else None
    out = [HistoryEntry(x["type"], x["id"], x["version"], x["last_updated"], x["method"],
                        fs.body(conn, x["type"], x["id"], x["version"], x["blob_id"]) if x["blob_id"] else None)
           for x in rows]
    return out, total, next_cursor


__all__ = ["DEFAULT_COUNT", "MAX_COUNT", "SEARCH_PARAMS", "HistoryEntry", "SearchResult", "date_clause", "find",
           "history", "search", "subset"]
