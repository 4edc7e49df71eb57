"""The audit trail (engine.audit.trail rows) served as read-only FHIR AuditEvent resources.

The rows stay the source of truth; this module only maps them (after DICOM PS3.15
A.5 / FHIR AuditEvent), so the audit log cannot be written or altered through the
REST API. Search: ``_id``, ``date`` (recorded), ``subtype`` (the medrelay action).
"""

from __future__ import annotations

import re
from typing import Any

from sqlalchemy import Connection, and_, func, or_, select

from engine.audit.ps3_15 import Code, classify
from engine.store import schema
from engine.store.fhir.params import FhirError
from engine.store.fhir.resources import iso_instant
from engine.store.fhir.search import DEFAULT_COUNT, MAX_COUNT, date_clause

ACTION_SYSTEM = "https://medrelay.dev/fhir/CodeSystem/audit-action"
DCM = "http://dicom.nema.org/resources/ontology/DCM"
AUDIT_PARAMS = {"_id": "token", "date": "date", "subtype": "token"}
_ROW_ID = re.compile(r"^[0-9]{1,18}$")  # ASCII digits that fit the 64-bit id column ("²".isdigit() is true)


def _row_id(value: str) -> int | None:
    """An audit row id, or None for anything that cannot be one (never an OverflowError in SQL)."""
    return int(value) if _ROW_ID.match(value) else None


def _coding(code: Code) -> dict[str, str]:
    return {"system": DCM, "code": code.code, "display": code.text}


def _classified(row: Any) -> tuple[dict[str, str], list[dict[str, str]], str]:
    """type, subtypes and action, coded like the DICOM PS3.15 export (engine.audit.ps3_15.classify),
    so the syslog view and the FHIR view of one event agree; FHIR REST calls keep the FHIR
    `rest` type, as the AuditEvent guidance asks."""
    action = row["action"]
    entity = row["entity"] if isinstance(row["entity"], dict) else {}
    event = classify(action, entity.get("kind"))
    if action.startswith("fhir."):
        type_ = {"system": "http://terminology.hl7.org/CodeSystem/audit-event-type", "code": "rest",
                 "display": "RESTful Operation"}
    else:
        type_ = _coding(event.event_id)
    return type_, [_coding(t) for t in event.types], event.action_code


def to_resource(row: Any) -> dict[str, Any]:
    outcome = "0" if row["outcome"] == "success" else "4"
    agent: dict[str, Any] = {"requestor": True, "who": {"display": row["actor"] or "unknown"}}
    if row["peer"]:
        agent["network"] = {"address": row["peer"], "type": "2"}
    type_, subtypes, action_code = _classified(row)
    res: dict[str, Any] = {
        "resourceType": "AuditEvent",
        "id": str(row["id"]),
        "type": type_,
        "subtype": [{"system": ACTION_SYSTEM, "code": row["action"]}, *subtypes],
        "action": action_code,
        "recorded": iso_instant(row["at"]),
        "outcome": outcome,
        "agent": [agent],
        "source": {"site": row["channel"] or "medrelay", "observer": {"display": "medrelay"}},
    }
    if row["detail"]:
        res["outcomeDesc"] = str(row["detail"])[:1000]
    entity = row["entity"] or {}
    ent: dict[str, Any] = {}
    what = entity.get("what") if isinstance(entity, dict) else None
    if isinstance(what, str):
        ent["what"] = {"reference": what}
    details = [{"type": str(k), "valueString": str(v)} for k, v in (entity.items() if isinstance(entity, dict)
                                                                    else []) if k != "what"]
    if row["message_id"]:
        details.append({"type": "message_id", "valueString": row["message_id"]})
    if details:
        ent["detail"] = details
    if ent:
        res["entity"] = [ent]
    return res


def read(conn: Connection, rid: str) -> dict[str, Any]:
    a = schema.audit_events
    row_id = _row_id(rid)
    row = conn.execute(select(a).where(a.c.id == row_id)).mappings().first() if row_id is not None else None
    if row is None:
        raise FhirError(404, "not-found", f"AuditEvent/{rid} is not known")
    return to_resource(row)


def search(conn: Connection, params: list[tuple[str, str]], *, strict: bool = False
           ) -> tuple[list[dict[str, Any]], int, list[tuple[str, str]], int | None, int]:
    """Newest first; returns (resources, total, used params, next 'before' id, count)."""
    a = schema.audit_events
    cond = []
    used = []
    count, before = DEFAULT_COUNT, None
    for name, value in params:
        if name == "_count":
            n = _row_id(value)
            if n is None:
                raise FhirError(400, "invalid", "_count must be a non-negative integer")
            count = min(n, MAX_COUNT)
        elif name == "_cursor":
            before = _row_id(value)
            if before is None:
                raise FhirError(400, "invalid", "_cursor is not one this server issued")
        elif name == "_id":
            ids = [_row_id(v) for v in value.split(",") if v]
            cond.append(a.c.id.in_([i for i in ids if i is not None]))
        elif name == "date":
            cond.append(or_(*(date_clause(a.c.at, a.c.at + 0.001, v) for v in value.split(",") if v)))
        elif name == "subtype":
            cond.append(a.c.action.in_([v.rpartition("|")[2] for v in value.split(",") if v]))
        elif strict and name not in ("_format", "_pretty"):  # _sort, _include, date:missing...: refused too
            raise FhirError(400, "not-supported", f"search parameter {name} is not supported on AuditEvent")
        else:
            continue
        if name not in ("_count", "_cursor"):
            used.append((name, value))
    base = and_(*cond) if cond else a.c.id.isnot(None)
    total = conn.execute(select(func.count()).select_from(a).where(base)).scalar_one()
    q = select(a).where(base, *([a.c.id < before] if before is not None else []))
    rows = conn.execute(q.order_by(a.c.id.desc()).limit(count + 1)).mappings().all()
    next_before = None
    if len(rows) > count:
        rows = rows[:count]
        next_before = rows[-1]["id"] if rows else None
    return [to_resource(r) for r in rows], total, used, next_before, count
