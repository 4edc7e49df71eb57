"""Reading the message store for people: listings without PHI, one message in full."""

from __future__ import annotations

from typing import Any

from sqlalchemy import and_, select

from engine.store import schema

_SUMMARY_KEYS = ("MSH-9", "MSH-9.1", "MSH-9.2", "MSH-10", "Modality", "SOPInstanceUID", "resourceType",
                 "interaction")


def _summary(kind: str, h: dict[str, Any]) -> str:
    if kind == "hl7v2":
        mt = "^".join(x for x in (h.get("MSH-9.1"), h.get("MSH-9.2")) if x)
        return f"{mt} {h.get('MSH-10', '')}".strip()
    if kind == "dicom":
        return f"{h.get('Modality', '')} {h.get('SOPInstanceUID', '')}".strip()
    return f"{h.get('interaction', '')} {h.get('resourceType', '')}".strip()


def list_messages(store: Any, *, channel: str | None = None, route: str | None = None,
                  state: str | None = None, since: float | None = None, until: float | None = None,
                  limit: int = 50) -> list[dict[str, Any]]:
    m, d = schema.messages, schema.deliveries
    q = select(m.c.id, m.c.channel, m.c.kind, m.c.received_at, m.c.headers, m.c.size, m.c.peer)
    conds = []
    if channel:
        conds.append(m.c.channel == channel)
    if since is not None:
        conds.append(m.c.received_at >= since)
    if until is not None:
        conds.append(m.c.received_at < until)
    if route or state:
        sub = select(d.c.message_id)
        if route:
            sub = sub.where(d.c.route == route)
        if state:
            sub = sub.where(d.c.state == state)
        conds.append(m.c.id.in_(sub))
    if conds:
        q = q.where(and_(*conds))
    q = q.order_by(m.c.received_at.desc()).limit(limit)
    out: list[dict[str, Any]] = []
    with store.engine.connect() as conn:
        rows = conn.execute(q).all()
        ids = [r.id for r in rows]
        dl: dict[str, list[dict[str, Any]]] = {}
        if ids:
            for x in conn.execute(select(d.c.message_id, d.c.route, d.c.state, d.c.attempts)
                                  .where(d.c.message_id.in_(ids)).order_by(d.c.id)):
                dl.setdefault(x.message_id, []).append(
                    {"route": x.route, "state": x.state, "attempts": x.attempts})
    for r in rows:
        h = dict(r.headers or {})
        out.append({"id": r.id, "channel": r.channel, "kind": r.kind, "received_at": r.received_at,
                    "size": r.size, "peer": r.peer, "summary": _summary(r.kind, h),
                    "headers": {k: h[k] for k in _SUMMARY_KEYS if k in h}, "deliveries": dl.get(r.id, [])})
    return out


def show_message(store: Any, message_id: str, *, with_payload: bool = False) -> dict[str, Any] | None:
    m, d = schema.messages, schema.deliveries
    with store.engine.connect() as conn:
        r = conn.execute(select(m).where(m.c.id == message_id)).mappings().first()
        if r is None:
            return None
        dls = conn.execute(select(d).where(d.c.message_id == message_id).order_by(d.c.id)).mappings().all()
        info: dict[str, Any] = {
            "id": r["id"], "channel": r["channel"], "kind": r["kind"], "received_at": r["received_at"],
            "peer": r["peer"], "size": r["size"], "headers": r["headers"], "config_hash": r["config_hash"],
            "parent_id": r["parent_id"],
            "deliveries": [{"route": x["route"], "state": x["state"], "attempts": x["attempts"],
                            "last_error": x["last_error"], "detail": x["detail"],
                            "next_attempt_at": x["next_attempt_at"]} for x in dls],
        }
        if with_payload:
            info["payload"] = store.get_blob(conn, r["blob_id"], aad=message_id)
    return info
