"""FHIR search over the store's index: parameters to SQL, stable pages, _include.

Pages are keyset pages over ``fhir_resources.rid`` (the order resources were first
created) bounded by a snapshot (the highest rid when the first page was served):
updates never move a resource between pages, and resources created while a client
walks the pages do not shift what it sees. The cursor is opaque to clients.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import ColumnElement, Connection, and_, func, not_, or_, select

from engine.store.fhir.params import (
    DATE_PREFIXES,
    SEARCH_PARAMS,
    FhirError,
    SearchParam,
    date_range,
    query_reference_key,
    query_token_key,
)
from engine.store.fhir.resources import FhirStore, Row, fhir_index, fhir_resources, fhir_versions

DEFAULT_COUNT = 20
MAX_COUNT = 500
CONTROL_PARAMS = {"_count", "_include", "_cursor", "_format", "_pretty", "_summary", "_elements", "_total",
                  "_since"}


@dataclass
class SearchResult:
    rows: list[tuple[Row, dict[str, Any]]]
    included: list[tuple[Row, dict[str, Any]]]
    total: int
    next_cursor: str | None
    used: list[tuple[str, str]]  # parameters applied, for the self link
    count: int = DEFAULT_COUNT
    ignored: list[str] = field(default_factory=list)


def date_clause(low: Any, high: Any, raw: str) -> ColumnElement[bool]:
    """SQL for one prefixed date value against a [low, high) column pair (FHIR R4 search 3.1.1.4.2)."""
    prefix = raw[:2] if raw[:2] in DATE_PREFIXES else "eq"
    value = raw[2:] if raw[:2] in DATE_PREFIXES else raw
    try:
        pl, ph = date_range(value)
    except ValueError:
        raise FhirError(400, "invalid", f"date search value {value!r} is not a FHIR date") from None
    contained = and_(low >= pl, high <= ph)
    return {
        "eq": contained,
        "ne": not_(contained),
        "gt": high > ph,
        "lt": low < pl,
        "ge": or_(high > ph, contained),
        "le": or_(low < pl, contained),
        "sa": low >= ph,
        "eb": high <= pl,
    }[prefix]


def _param_clause(fs: FhirStore, rtype: str, p: SearchParam, value: str) -> ColumnElement[bool]:
    i = fhir_index
    values = [v for v in value.split(",") if v != ""]
    if not values:
        raise FhirError(400, "invalid", f"search parameter {p.name} has no value")
    base = and_(i.c.type == rtype, i.c.param == p.name)
    if p.type == "date":
        cond: ColumnElement[bool] = or_(*(date_clause(i.c.low, i.c.high, v) for v in values))
    elif p.type == "reference":
        cond = i.c.token.in_([query_reference_key(v, p.target) for v in values])
    else:
        cond = i.c.token.in_([query_token_key(v, fs.hash_key if p.hashed else None) for v in values])
    return fhir_resources.c.rid.in_(select(i.c.rid).where(base, cond))


def where_clauses(fs: FhirStore, rtype: str, params: list[tuple[str, str]], *, strict: bool = False
                  ) -> tuple[list[ColumnElement[bool]], list[tuple[str, str]], list[str]]:
    """Filters for the non-control parameters; unknown ones are ignored unless ``strict``."""
    r = fhir_resources
    spec = SEARCH_PARAMS.get(rtype, {})
    clauses: list[ColumnElement[bool]] = []
    used: list[tuple[str, str]] = []
    ignored: list[str] = []
    for name, value in params:
        if name in CONTROL_PARAMS:
            continue
        base_name, _, modifier = name.partition(":")
        if modifier:
            raise FhirError(400, "not-supported", f"search modifier :{modifier} is not supported")
        if base_name == "_id":
            clauses.append(r.c.id.in_([v for v in value.split(",") if v]))
        elif base_name == "_lastUpdated":
            clauses.append(or_(*(date_clause(r.c.last_updated, r.c.last_updated + 0.001, v)
                                 for v in value.split(",") if v)))
        elif base_name in spec:
            clauses.append(_param_clause(fs, rtype, spec[base_name], value))
        else:
            if strict:
                raise FhirError(400, "not-supported", f"search parameter {name} is not supported on {rtype}")
            ignored.append(name)
            continue
        used.append((name, value))
    return clauses, used, ignored


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


def encode_cursor(after: int, snapshot: int) -> str:
    return base64.urlsafe_b64encode(json.dumps([after, snapshot]).encode()).decode().rstrip("=")


def decode_cursor(raw: str) -> tuple[int, int]:
    try:
        after, snapshot = json.loads(base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4)))
        if not all(type(x) is int and 0 <= x < 2**63 for x in (after, snapshot)):
            raise ValueError("out of range")  # a huge number would be an OverflowError in SQL
        return after, snapshot
    except Exception:
        raise FhirError(400, "invalid", "_cursor is not one this server issued") from None


def find(fs: FhirStore, conn: Connection, rtype: str, query: list[tuple[str, str]]) -> list[Row]:
    """Current, non-deleted resources matching a query: conditional create/update/delete."""
    clauses, used, ignored = where_clauses(fs, rtype, query, strict=True)
    if not used:
        raise FhirError(412, "invalid", "a conditional request needs at least one search parameter")
    r = fhir_resources
    rows = conn.execute(select(r).where(r.c.type == rtype, r.c.deleted == 0, *clauses)
                        .order_by(r.c.rid).limit(3)).mappings().all()
    return [Row(x["rid"], x["type"], x["id"], x["version"], x["last_updated"], False, x["blob_id"])
            for x in rows]


def search(fs: FhirStore, conn: Connection, rtype: str, params: list[tuple[str, str]], *,
           strict: bool = False) -> SearchResult:
    r = fhir_resources
    clauses, used, ignored = where_clauses(fs, rtype, params, strict=strict)
    count = _count(params)
    cursors = [v for k, v in params if k == "_cursor"]
    if cursors:
        after, snapshot = decode_cursor(cursors[-1])
    else:
        after = 0
        snapshot = conn.execute(select(func.coalesce(func.max(r.c.rid), 0))).scalar_one()
    base = and_(r.c.type == rtype, r.c.deleted == 0, r.c.rid <= snapshot, *clauses)
    total = conn.execute(select(func.count()).select_from(r).where(base)).scalar_one()
    page: list[tuple[Row, dict[str, Any]]] = []
    next_cursor = None
    if count > 0:
        found = conn.execute(select(r).where(base, r.c.rid > after).order_by(r.c.rid).limit(count + 1)
                             ).mappings().all()
        if len(found) > count:
            found = found[:count]
            next_cursor = encode_cursor(found[-1]["rid"], snapshot)
        for x in found:
            row = Row(x["rid"], x["type"], x["id"], x["version"], x["last_updated"], False, x["blob_id"])
            page.append((row, fs.body(conn, row.type, row.id, row.version, x["blob_id"])))
    included = _includes(fs, conn, rtype, params, page)
    return SearchResult(page, included, total, next_cursor, used, count, ignored)


def _includes(fs: FhirStore, conn: Connection, rtype: str, params: list[tuple[str, str]],
              page: list[tuple[Row, dict[str, Any]]]) -> list[tuple[Row, dict[str, Any]]]:
    """``_include=Type:param[:Target]`` for reference parameters of the searched type."""
    wanted = [v for k, v in params if k == "_include"]
    if not wanted or not page:
        return []
    spec = SEARCH_PARAMS.get(rtype, {})
    refs: set[str] = set()
    rids = [row.rid for row, _ in page]
    for inc in wanted:
        parts = inc.split(":")
        if len(parts) not in (2, 3) or parts[0] != rtype or parts[1] not in spec \
                or spec[parts[1]].type != "reference":
            raise FhirError(400, "not-supported", f"_include={inc} is not supported on {rtype}")
        target = parts[2] if len(parts) == 3 else None
        i = fhir_index
        tokens = conn.execute(select(i.c.token).where(i.c.rid.in_(rids), i.c.param == parts[1],
                                                      not_(i.c.token.like("*/%")))).scalars().all()
        refs.update(t for t in tokens if target is None or t.startswith(f"{target}/"))
    already = {(row.type, row.id) for row, _ in page}
    out: list[tuple[Row, dict[str, Any]]] = []
    for ref in sorted(refs):
        itype, _, iid = ref.partition("/")
        if (itype, iid) in already:
            continue
        row = fs.current(conn, itype, iid)
        if row is None or row.deleted or row.blob_id is None:
            continue
        out.append((row, fs.body(conn, itype, iid, row.version, row.blob_id)))
    return out


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


__all__ = ["HistoryEntry", "SearchResult", "date_clause", "find", "history", "search"]
