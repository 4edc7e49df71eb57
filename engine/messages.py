"""Reading the message store for people: listings without PHI, one message in full, replay.

The one query code behind `medrelay messages list/show`, `medrelay replay` and the admin
API (engine/console), so a filter means the same everywhere:

- ``channel``, ``route``, ``state`` (a delivery in that state), ``since``/``until``
  (received at or after / before) are clear columns;
- ``patient_id``, ``accession``, ``control_id``, ``study_uid`` match the blind terms of
  engine/store/message_terms.py: keyed HMACs, no payload decrypted;
- ``q`` is content search: the payloads of the rows the other filters select are
  decrypted and searched (case-insensitive substring), newest first, bounded by
  ``SearchBounds`` (rows and seconds); the page says how far it got and the cursor goes
  on from there. The caller audits it (``message.search``, never the text searched for).

Listings are newest first (received_at, then id) and cursor-paged: the cursor is the
position of the last row returned (or, with ``q``, scanned), so paging is stable while
new messages arrive.
"""

from __future__ import annotations

import base64
import binascii
import math
import time
from dataclasses import dataclass, fields
from datetime import UTC, datetime
from typing import Any

import structlog
from sqlalchemy import and_, or_, select

from engine import queue
from engine.store import attempts, message_terms, outputs, schema

_SUMMARY_KEYS = ("MSH-9", "MSH-9.1", "MSH-9.2", "MSH-10", "Modality", "SOPInstanceUID", "resourceType",
                 "interaction")
STATES = ("pending", "done", "dead", "filtered", "superseded", "quarantined")
BLIND = message_terms.FIELDS
MAX_LIMIT = 500
MAX_SELECTION = 10000  # messages one replay by filter may select
MAX_LINEAGE = 20
_MAX_EPOCH = 253402300799.0  # 9999-12-31T23:59:59Z
log = structlog.get_logger()


class QueryError(ValueError):
    """A filter or cursor that cannot be used (the API answers 400 with this text)."""


def _summary(kind: str, h: dict[str, Any]) -> str:
    if kind == "hl7v2":
        mt = "^".join(x for x in (h.get("MSH-9.1"), h.get("MSH-9.2")) if x)
        return f"{mt} {h.get('MSH-10', '')}".strip()
    if kind == "dicom":
        return f"{h.get('Modality', '')} {h.get('SOPInstanceUID', '')}".strip()
    return f"{h.get('interaction', '')} {h.get('resourceType', '')}".strip()


def parse_time(s: str | None, *, now: float | None = None) -> float | None:
    """An ISO time (UTC when it has no zone), seconds since the epoch, or an age like 15m, 2h, 7d."""
    if s is None or not str(s).strip():
        return None
    s = str(s).strip()
    bad = QueryError(f"{s[:40]!r}: expected an ISO time (2026-11-22T10:15), epoch seconds or an age "
                     "like 15m, 2h, 7d")
    # Every reading ends as a finite float within datetime's years: a peer's "nan", "1e400" or a
    # 400-digit age is a 400, never an OverflowError (500) or a filter that silently matches nothing.
    try:
        if s[-1:] in ("s", "m", "h", "d") and s[:-1].isascii() and s[:-1].isdigit():
            mult = {"s": 1, "m": 60, "h": 3600, "d": 86400}[s[-1]]
            at = (time.time() if now is None else now) - float(int(s[:-1]) * mult)
        else:
            try:
                at = float(s) if s.isascii() else math.nan
            except ValueError:
                dt = datetime.fromisoformat(s.replace("Z", "+00:00"))
                at = (dt if dt.tzinfo is not None else dt.replace(tzinfo=UTC)).timestamp()
    except (ValueError, OverflowError):
        raise bad from None
    if not -_MAX_EPOCH <= at <= _MAX_EPOCH:  # also refuses NaN
        raise bad
    return at


@dataclass(frozen=True)
class MessageFilter:
    """What a listing, a count or a replay selects (see the module text)."""

    channel: str | None = None
    route: str | None = None
    state: str | None = None
    since: float | None = None
    until: float | None = None
    control_id: str | None = None
    patient_id: str | None = None
    accession: str | None = None
    study_uid: str | None = None
    q: str | None = None

    @classmethod
    def from_params(cls, params: Any) -> MessageFilter:
        """From query or JSON parameters (strings); raises QueryError on a bad value."""
        def get(name: str) -> str | None:
            v = params.get(name)
            if v is None:
                return None
            v = str(v).strip()
            if len(v) > 512:
                raise QueryError(f"{name}: longer than 512 characters")
            return v or None

        state = get("state")
        if state is not None and state not in STATES:
            raise QueryError(f"state must be one of {', '.join(STATES)}")
        return cls(channel=get("channel"), route=get("route"), state=state, since=parse_time(get("since")),
                   until=parse_time(get("until")), control_id=get("control_id"), patient_id=get("patient_id"),
                   accession=get("accession"), study_uid=get("study_uid"), q=get("q"))

    def blind(self) -> dict[str, str]:
        return {f: getattr(self, f) for f in BLIND if getattr(self, f)}

    def used(self) -> list[str]:
        """Names of the filters given (for an audit line: names, never the values)."""
        return [f.name for f in fields(self) if getattr(self, f.name) not in (None, "")]


@dataclass(frozen=True)
class SearchBounds:
    """How much content search (``q``) may decrypt for one page."""

    max_rows: int = 5000
    max_seconds: float = 5.0


@dataclass
class Page:
    rows: list[dict[str, Any]]
    next_cursor: str | None
    search: dict[str, Any] | None = None  # with q: scanned, matched, complete, stopped


def encode_cursor(received_at: float, message_id: str) -> str:
    return base64.urlsafe_b64encode(f"{received_at!r}|{message_id}".encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[float, str]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        at, mid = raw.split("|", 1)
        if math.isfinite(float(at)):
            return float(at), mid
    except (ValueError, binascii.Error, UnicodeDecodeError):
        pass
    raise QueryError("cursor: not one this API gave out")


def _conditions(store: Any, f: MessageFilter) -> list[Any]:
    m, d, t = schema.messages, schema.deliveries, message_terms.message_terms
    conds: list[Any] = []
    if f.channel:
        conds.append(m.c.channel == f.channel)
    if f.since is not None:
        conds.append(m.c.received_at >= f.since)
    if f.until is not None:
        conds.append(m.c.received_at < f.until)
    if f.route or f.state:
        sub = select(d.c.message_id)
        if f.route:
            sub = sub.where(d.c.route == f.route)
        if f.state:
            sub = sub.where(d.c.state == f.state)
        conds.append(m.c.id.in_(sub))
    blind = f.blind()
    if blind:
        key = store.keyring.hmac_key(message_terms.HMAC_KEY_NAME)
        for name, value in blind.items():
            term = message_terms.value_term(key, name, value)
            conds.append(m.c.id.in_(select(t.c.message_id).where(t.c.term == term)))
    return conds


def _select(store: Any, f: MessageFilter, cursor: str | None) -> Any:
    m = schema.messages
    q = select(m.c.id, m.c.channel, m.c.kind, m.c.received_at, m.c.headers, m.c.size, m.c.peer, m.c.parent_id,
               m.c.blob_id)
    conds = _conditions(store, f)
    if cursor:
        at, mid = decode_cursor(cursor)
        conds.append(or_(m.c.received_at < at, and_(m.c.received_at == at, m.c.id < mid)))
    if conds:
        q = q.where(and_(*conds))
    return q.order_by(m.c.received_at.desc(), m.c.id.desc())


def _deliveries_of(conn: Any, ids: list[str]) -> dict[str, list[dict[str, Any]]]:
    d = schema.deliveries
    out: dict[str, list[dict[str, Any]]] = {}
    for i in range(0, len(ids), 500):
        for x in conn.execute(select(d.c.message_id, d.c.route, d.c.state, d.c.attempts)
                              .where(d.c.message_id.in_(ids[i:i + 500])).order_by(d.c.id)):
            out.setdefault(x.message_id, []).append({"route": x.route, "state": x.state, "attempts": x.attempts})
    return out


def _row(r: Any, dl: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    h = dict(r.headers or {})
    return {"id": r.id, "channel": r.channel, "kind": r.kind, "received_at": r.received_at,
            "size": r.size, "peer": r.peer, "parent_id": r.parent_id, "summary": _summary(r.kind, h),
            "headers": {k: h[k] for k in _SUMMARY_KEYS if k in h}, "deliveries": dl.get(r.id, [])}


def search_text(kind: str, payload: bytes) -> str:
    """The text content search looks in: HL7 decoded per MSH-18, FHIR JSON, DICOM's data set
    before its pixel data (as Latin-1, enough for IDs and names in the common charsets)."""
    if kind == "hl7v2":
        from engine.hl7.message import decode

        try:
            return decode(payload)
        except Exception:
            return payload.decode("latin-1")
    if kind == "dicom":
        cut = payload.find(b"\xe0\x7f\x10\x00")
        return (payload if cut < 0 else payload[:cut]).decode("latin-1")
    return payload.decode("utf-8", errors="replace")


def query_messages(store: Any, f: MessageFilter, *, limit: int = 50, cursor: str | None = None,
                   bounds: SearchBounds | None = None) -> Page:
    """One page of messages, newest first (headers only: no PHI), with the cursor of the next."""
    limit = max(1, min(int(limit), MAX_LIMIT))
    if not f.q:
        with store.engine.connect() as conn:
            rows = conn.execute(_select(store, f, cursor).limit(limit + 1)).all()
            more = len(rows) > limit
            rows = rows[:limit]
            dl = _deliveries_of(conn, [r.id for r in rows])
        nxt = encode_cursor(rows[-1].received_at, rows[-1].id) if more and rows else None
        return Page([_row(r, dl) for r in rows], nxt)
    return _content_search(store, f, limit, cursor, bounds or SearchBounds())


def _content_search(store: Any, f: MessageFilter, limit: int, cursor: str | None, bounds: SearchBounds) -> Page:
    needle = (f.q or "").casefold()
    started = time.monotonic()
    found: list[Any] = []
    scanned = 0
    stopped: str | None = None
    last: Any = None
    at_end = False
    with store.engine.connect() as conn:
        while True:
            chunk = conn.execute(_select(store, f, encode_cursor(last.received_at, last.id) if last else cursor)
                                 .limit(100)).all()
            if not chunk:
                at_end = True
                break
            for r in chunk:
                if len(found) >= limit:
                    stopped = "limit"
                    break
                if scanned >= bounds.max_rows:
                    stopped = "rows"
                    break
                if time.monotonic() - started > bounds.max_seconds:
                    stopped = "time"
                    break
                scanned += 1
                last = r
                try:
                    payload = store.get_blob(conn, r.blob_id, aad=r.id)
                except Exception as e:  # a blob that does not open is not a match (and is visible elsewhere)
                    log.warning("messages.search_unreadable", message_id=r.id, error=type(e).__name__)
                    continue
                if needle in search_text(r.kind, payload).casefold():
                    found.append(r)
            if stopped:
                break
        dl = _deliveries_of(conn, [r.id for r in found])
    nxt = encode_cursor(last.received_at, last.id) if (stopped and last is not None) else None
    return Page([_row(r, dl) for r in found], nxt,
                {"scanned": scanned, "matched": len(found), "complete": at_end and not stopped, "stopped": stopped})


def list_messages(store: Any, *, channel: str | None = None, route: str | None = None,
                  state: str | None = None, since: float | None = None, until: float | None = None,
                  limit: int = 50, **blind: str | None) -> list[dict[str, Any]]:
    """The first page of ``query_messages`` as a list (older callers)."""
    f = MessageFilter(channel=channel, route=route, state=state, since=since, until=until,
                      **{k: v for k, v in blind.items() if k in BLIND})
    return query_messages(store, f, limit=limit).rows


def select_ids(store: Any, f: MessageFilter, *, cap: int = MAX_SELECTION) -> list[str]:
    """Every message id the filter selects (without ``q``), at most ``cap``; QueryError beyond."""
    if f.q:
        raise QueryError("q (content search) cannot select messages for an action; narrow by the other filters")
    m = schema.messages
    with store.engine.connect() as conn:
        q = select(m.c.id)
        conds = _conditions(store, f)
        if conds:
            q = q.where(and_(*conds))
        ids = list(conn.execute(q.limit(cap + 1)).scalars())
    if len(ids) > cap:
        raise QueryError(f"the filters select more than {cap} messages; narrow them (since/until, channel)")
    return ids


# -- one message ---------------------------------------------------------------------
def show_message(store: Any, message_id: str, *, with_payload: bool = False) -> dict[str, Any] | None:
    """Headers, config hash, lineage, every delivery with its attempts; the payload if asked."""
    m, d = schema.messages, schema.deliveries
    with store.engine.connect() as conn:
        r = conn.execute(select(m).where(m.c.id == message_id)).mappings().first()
        if r is None:
            return None
        dls = conn.execute(select(d).where(d.c.message_id == message_id).order_by(d.c.id)).mappings().all()
        tries = attempts.of_deliveries(conn, [x["id"] for x in dls])
        info: dict[str, Any] = {
            "id": r["id"], "channel": r["channel"], "kind": r["kind"], "received_at": r["received_at"],
            "peer": r["peer"], "size": r["size"], "headers": r["headers"], "config_hash": r["config_hash"],
            "parent_id": r["parent_id"],
            "deliveries": [{"route": x["route"], "state": x["state"], "attempts": x["attempts"],
                            "last_error": x["last_error"], "detail": x["detail"],
                            "next_attempt_at": x["next_attempt_at"], "updated_at": x["updated_at"],
                            "tries": tries.get(x["id"], [])} for x in dls],
            "lineage": _lineage(conn, r["parent_id"]),
            "children": [dict(c._mapping) for c in conn.execute(
                select(m.c.id, m.c.channel, m.c.kind, m.c.received_at).where(m.c.parent_id == message_id)
                .order_by(m.c.received_at).limit(100))],
            # what its deliveries produced: FHIR resources written (medrelay's store or a server), Provenance
            "outputs": outputs.of_message(conn, message_id),
        }
        if with_payload:
            info["payload"] = store.get_blob(conn, r["blob_id"], aad=message_id)
    return info


def _lineage(conn: Any, parent_id: str | None) -> list[dict[str, Any]]:
    """The messages this one was derived from, nearest first (bounded: a loop cannot hang it)."""
    m = schema.messages
    out: list[dict[str, Any]] = []
    seen: set[str] = set()
    while parent_id and parent_id not in seen and len(out) < MAX_LINEAGE:
        seen.add(parent_id)
        p = conn.execute(select(m.c.id, m.c.channel, m.c.kind, m.c.received_at, m.c.parent_id)
                         .where(m.c.id == parent_id)).first()
        if p is None:
            out.append({"id": parent_id, "missing": True})
            break
        out.append({"id": p.id, "channel": p.channel, "kind": p.kind, "received_at": p.received_at})
        parent_id = p.parent_id
    return out


# -- replay ------------------------------------------------------------------------------
def replay(store: Any, audit: Any, *, actor: str, peer: str = "", message_ids: list[str] | None = None,
           selection: MessageFilter | None = None, route: str | None = None,
           states: tuple[str, ...] = ("dead",)) -> list[int]:
    """Put deliveries back in the queue (attempts reset, history kept) and audit it; the
    running engine sends them. ``selection`` filters like a listing (blind filters resolve to
    message ids, at most ``MAX_SELECTION``); ``route`` and ``states`` pick the deliveries."""
    f = selection or MessageFilter()
    ids = list(message_ids or [])
    channel, since, until = f.channel, f.since, f.until
    route = route or f.route
    if f.blind() or f.q or f.state:  # resolved to message ids here (requeue filters clear columns only)
        chosen = select_ids(store, f)
        ids = [i for i in ids if i in set(chosen)] if ids else chosen
        if not ids:
            return []
    done = queue.requeue(store, message_ids=ids or None, channel=channel, route=route, states=states,
                         since=since, until=until)
    audit.record("message.replay", actor=actor, peer=peer, channel=channel,
                 message_id=ids[0] if len(ids) == 1 else None,
                 detail=f"{len(done)} deliveries requeued ({'/'.join(states)}"
                        f"{', route ' + route if route else ''}"
                        f"{', filters ' + ','.join(f.used()) if f.used() else ''})")
    return done


# -- rendering for people ------------------------------------------------------------------
def render_lines(kind: str, payload: bytes) -> list[str]:
    """Lines to read or diff: HL7 a segment a line, FHIR pretty JSON, DICOM the data set dump
    without pixel data (`medrelay map`, `replay --diff` and the console show the same)."""
    if kind == "hl7v2":
        from engine.mapping.reader import document_of

        return document_of("hl7v2", payload).text().replace("\r\n", "\r").replace("\n", "\r").strip().split("\r")
    if kind == "fhir":
        import json

        return json.dumps(json.loads(payload), indent=2, ensure_ascii=False).splitlines()
    from io import BytesIO

    from pydicom import dcmread

    ds = dcmread(BytesIO(payload), force=True, stop_before_pixels=True)
    return str(ds).splitlines()
