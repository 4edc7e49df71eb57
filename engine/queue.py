"""The delivery queue in the store: claim, complete, retry with backoff, dead letter.

A claim takes a lease (``lease_until``, ``lease_owner``) rather than a lock held across the
send, so a worker that dies mid-send leaves the row to be claimed again once the lease ends:
at-least-once. The lease is short (``LEASE_SECONDS``) and renewed every second by its
process (``engine.ops.singleton.Keeper``) for as long as the delivery is in hand, so a long
send keeps its rows and a killed process's rows are free again within seconds. Lease times
are the database's clock on PostgreSQL (``engine.store.leases.db_now``), so hosts whose
clocks differ agree on when a lease ended.

Unordered routes are claimed with ``FOR UPDATE SKIP LOCKED`` by whichever process is free,
in parallel. An ordered route has one claimer at a time, the process holding its route lease
(``route_lease_name``); its claim waits for locked rows rather than skipping them, and stops at
the first row it may not send yet (head-of-line), so order holds across processes.

A claim reads ids, headers and the blob rows, not payloads: ``open_payload`` decrypts one just
before it is sent, so a retry at the head of a route, or the rows a failed send leaves
behind, never load (and decrypt) what is not sent.

What a worker learned from one delivery (delivered, failed, not sent) is an ``Outcome``,
written by ``settle_all`` together with whatever other outcomes are waiting (the process's
``Settler`` group-commits them): deliveries are marked done one by one as they complete.
When that write fails (the database is away) the outcomes are kept and written once the
store answers. Releasing unsent rows only touches rows that still carry this process's
lease, never a row another process has leased since.
"""

from __future__ import annotations

import random
import re
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import structlog
from sqlalchemy import Float, and_, bindparam, case, insert, literal_column, select, update

from engine.security.crypto import IntegrityError
from engine.store import attempts, leases, prepared, schema
from engine.store.db import is_chunked, open_blob, open_blob_chunks

log = structlog.get_logger()

LEASE_SECONDS = 5.0  # a claimed delivery's lease on PostgreSQL; renewed while it is in hand
_BLOB_FIELDS = ("aad", "kek_id", "wrapped_key", "nonce", "data", "in_file")


ROUTE_LEASE_PREFIX = "route:"  # ordered routes' leases: spread over the engines (engine.ops.singleton.Keeper)


def route_lease_name(channel: str, route: str) -> str:
    """The named lease an ordered route's claimer holds (engine.store.leases)."""
    return f"{ROUTE_LEASE_PREFIX}{channel}/{route}"


@dataclass(slots=True)
class Claimed:
    delivery_id: int
    message_id: str
    attempts: int
    channel: str
    kind: str
    headers: dict[str, Any]
    peer: str
    received_at: float
    parent_id: str | None
    blob_id: str
    blob: dict[str, Any]  # the blobs row (sealed; inline ciphertext or in_file): see open_payload
    size: int = 0

    @property
    def in_file(self) -> bool:
        return bool(self.blob.get("in_file"))


def open_payload(store: Any, c: Claimed) -> bytes:
    """Check and decrypt one claimed delivery's payload (reads its file when it has one).

    IntegrityError when the blob fails authentication or its file is gone: the caller
    dead-letters the delivery (``quarantine``), retrying cannot help.
    """
    try:
        return open_blob(store.keyring, c.blob_id, c.blob, c.message_id, store.files)
    except FileNotFoundError:
        raise IntegrityError(f"blob {c.blob_id}: file missing") from None


def payload_chunks(store: Any, c: Claimed) -> Callable[[], Iterator[bytes]] | None:
    """For a chunk-sealed payload: a function giving its plaintext chunks (read and checked by
    range, one chunk in memory), else None. IntegrityError comes from the iteration."""
    if not is_chunked(c.blob):
        return None
    return lambda: open_blob_chunks(store.keyring, c.blob_id, c.blob, c.message_id, store.files)


@dataclass
class Lease:
    """What a claim leased: filled in before the lease is written, so a caller whose claim
    failed half-way (the commit's answer lost) still knows which rows may carry its lease."""

    ids: list[int] = field(default_factory=list)
    owner: str = ""  # the lease_owner written; "" where no lease is written (SQLite)


@dataclass(frozen=True, slots=True)
class Failure:
    delivery_id: int
    attempts: int
    error: str
    dead: bool
    delay: float


@dataclass
class Outcome:
    """Results to write back together (``settle_all``): of one delivery, or of a claim's rest."""

    lease: Lease
    done: list[tuple[int, str, str | None]] = field(default_factory=list)  # (id, state, detail)
    failed: list[Failure] = field(default_factory=list)
    release: list[int] = field(default_factory=list)  # claimed, not attempted: lease dropped
    audit_rows: list[dict[str, Any]] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.done or self.failed or self.release or self.audit_rows)


def claim(store: Any, channel: str, route: str, limit: int, *, ordered: bool = True,
          lease: Lease | None = None, owner: str = "") -> list[Claimed]:
    """Take up to ``limit`` due deliveries of one route, oldest first, without their payloads.

    ``ordered``: while the oldest pending delivery waits for its retry (or is leased by
    another process), nothing behind it is taken (head-of-line blocking, as an HL7 feed
    expects); dead letters do not block. With several processes the caller of an ordered
    claim holds the route's lease (``route_lease_name``): that lease is the fence, so the rows
    get no lease of their own (it would end with the route lease anyway, both being renewed by
    the same keeper tick) and the claim is one SELECT. Unordered claims lease their rows
    (``lease`` receives the ids; ``owner`` is this process's holder id) and skip rows other
    processes are claiming. SQLite (one engine per store) writes no lease.
    """
    now = time.time()
    shared = not store.is_sqlite
    with store.queue_tx() as conn:
        pg = conn.dialect.name == "postgresql"
        params = {"ch": channel, "rt": route, "lim": limit, "now": now}
        q = _claim_query(pg, ordered, shared)
        rows: Sequence[Any] = q.all(conn, params) if pg else conn.execute(q.statement, params).mappings().all()
        due = []
        for r in rows:
            leased_until = r["lease_now"] if pg else now
            if r["next_attempt_at"] > now or r["lease_until"] > leased_until:
                if ordered:
                    break
                continue
            due.append(r)
        if not due:
            return []
        if shared and not ordered:
            # Shared queue: lease the rows so other engine processes skip them.
            ids = [r["id"] for r in due]
            if lease is not None:
                lease.ids, lease.owner = ids, owner
            conn.execute(_LEASE_ROWS, {"ids": ids, "owner": owner or None, "secs": LEASE_SECONDS})
    return [Claimed(r["id"], r["mid"], r["attempts"], r["channel"], r["kind"], dict(r["headers"] or {}), r["peer"],
                    r["received_at"], r["parent_id"], r["blob_id"], {k: r[k] for k in _BLOB_FIELDS}, r["size"] or 0)
            for r in due]


_CLAIMS: dict[tuple[bool, bool, bool], prepared.Prepared] = {}


def _claim_query(pg: bool, ordered: bool, shared: bool) -> prepared.Prepared:
    """The claim's SELECT, built once per variant (a claim per delivery is common when a route keeps
    up); on PostgreSQL run on the DBAPI cursor (``Prepared.all``: no SQLAlchemy result processing)."""
    key = (pg, ordered, shared)
    q = _CLAIMS.get(key)
    if q is None:
        d, m, b = schema.deliveries, schema.messages, schema.blobs
        clock = literal_column("(extract(epoch from now())::float8)", Float) if pg else bindparam("now")
        cols = [d.c.id, d.c.attempts, d.c.next_attempt_at, d.c.lease_until, m.c.id.label("mid"), m.c.channel,
                m.c.kind, m.c.headers, m.c.peer, m.c.received_at, m.c.parent_id, m.c.blob_id, m.c.size,
                b.c.aad, b.c.kek_id, b.c.wrapped_key, b.c.nonce, b.c.data, b.c.in_file]
        if pg:
            cols.append(clock.label("lease_now"))
        q = (select(*cols).join(m, m.c.id == d.c.message_id).join(b, b.c.id == m.c.blob_id)
             .where(and_(d.c.channel == bindparam("ch"), d.c.route == bindparam("rt"), d.c.state == "pending"))
             .order_by(d.c.id).limit(bindparam("lim")))
        if not ordered:
            q = q.where(and_(d.c.next_attempt_at <= bindparam("now"), d.c.lease_until <= clock))
            if shared:
                q = q.with_for_update(skip_locked=True, of=d)  # skip rows another process is claiming
        q = _CLAIMS[key] = prepared.Prepared(q)
    return q


_LEASE_ROWS = (update(schema.deliveries)
               .where(schema.deliveries.c.id.in_(bindparam("ids", expanding=True)))
               .values(lease_until=literal_column("(extract(epoch from now())::float8)", Float) + bindparam("secs"),
                       lease_owner=bindparam("owner")))


def renew_rows(conn: Any, owner: str, ids: Sequence[int]) -> int:
    """Extend the leases ``owner`` holds on ``ids`` (deliveries in hand) by ``LEASE_SECONDS``."""
    if not ids:
        return 0
    d = schema.deliveries
    return conn.execute(update(d).where(and_(d.c.id.in_(sorted(ids)), d.c.lease_owner == owner,
                                             d.c.state == "pending"))
                        .values(lease_until=leases.db_now(conn) + LEASE_SECONDS)).rowcount or 0


def quarantine(c: Claimed, error: str, out: Outcome) -> None:
    """Dead-letter a delivery whose payload fails authentication, with a security audit event.

    Tampering, a swapped or torn blob, or a missing key: retrying cannot help, and
    failing the whole claim would block every message behind it and spin. The row
    stays replayable once the blob or key file is restored from backup.
    """
    out.failed.append(Failure(c.delivery_id, c.attempts, f"integrity: {error}", True, 0.0))
    out.audit_rows.append({
        "at": time.time(), "action": "security.integrity_failure", "outcome": "error", "actor": "medrelay",
        "peer": "", "channel": c.channel, "message_id": c.message_id, "entity": {"blob_id": c.blob_id},
        "detail": error[:500], "exported": 0})
    log.error("queue.integrity_failure", channel=c.channel, message_id=c.message_id, error=error[:200])


def settle(store: Any, outcome: Outcome) -> None:
    """Write one outcome (see ``settle_all``)."""
    settle_all(store, [outcome])


def settle_all(store: Any, outcomes: Sequence[Outcome]) -> None:
    """Write outcomes in one transaction; safe to repeat after a failed attempt.

    Finished rows (id, state, detail) end their lease; the ``audit_rows`` (``message.send``,
    ``delivery.dead_letter``) go in the same transaction, so a delivery is marked done if and
    only if its audit event exists. Failed rows get their attempt count and next try, but only
    while still pending (a row finished meanwhile, e.g. by a replay, is not put back).
    Unsent rows lose the lease only while it is still this process's.
    """
    outcomes = [o for o in outcomes if o]
    if not outcomes:
        return
    d = schema.deliveries
    now = time.time()
    done = sorted((x for o in outcomes for x in o.done), key=lambda x: x[0])
    failed = sorted((f for o in outcomes for f in o.failed), key=lambda f: f.delivery_id)
    with store.queue_tx() as conn:
        if conn.dialect.name == "postgresql":
            _settle_pg(conn, outcomes, done, failed, now)
            return
        if done:
            conn.execute(
                update(d).where(d.c.id == bindparam("did")).values(
                    state=bindparam("st"), detail=bindparam("dt"), lease_until=0.0, lease_owner=None, updated_at=now,
                    # delivered: an error from before (a replayed dead letter) is history, kept in the tries
                    last_error=case((bindparam("st") == "done", None), else_=d.c.last_error)),
                [{"did": did, "st": state, "dt": (detail or "")[:256] or None} for did, state, detail in done])
        if failed:
            conn.execute(
                update(d).where(and_(d.c.id == bindparam("did"), d.c.state == "pending")).values(
                    state=bindparam("st"), attempts=bindparam("att"), last_error=bindparam("err"),
                    next_attempt_at=bindparam("nxt"), lease_until=0.0, lease_owner=None, updated_at=now),
                [{"did": f.delivery_id, "st": "dead" if f.dead else "pending", "att": f.attempts,
                  "err": f.error[:2000], "nxt": now + f.delay} for f in failed])
        for o in outcomes:
            if o.release and o.lease.owner:
                conn.execute(update(d).where(and_(d.c.id.in_(sorted(o.release)), d.c.lease_owner == o.lease.owner,
                                                  d.c.state == "pending"))
                             .values(lease_until=0.0, lease_owner=None))
        audit_rows = [a for o in outcomes for a in o.audit_rows]
        if audit_rows:
            conn.execute(insert(schema.audit_events), audit_rows)
        tries = [row for o in outcomes for row in attempts.rows_of(o, now)]
        if tries:  # the per-try history the console shows: one executemany for all outcomes
            conn.execute(_INSERT_ATTEMPTS, tries)


_INSERT_ATTEMPTS = insert(attempts.delivery_attempts)

# PostgreSQL: each of settle's writes is one statement over arrays (unnest), whatever the number
# of outcomes, sent together in pipeline mode: a row each through the driver cost more CPU than
# the delivery it records. They run on the DBAPI cursor, server-prepared (``prepared.pg_run``).


def _pg_sql(sql: str) -> str:
    """``:name`` placeholders written as psycopg's ``%(name)s``."""
    return re.sub(r"(?<![:\w]):(\w+)", r"%(\1)s", sql)


_PG_DONE = _pg_sql(
    "UPDATE deliveries AS d SET state = v.st, detail = v.dt, lease_until = 0, lease_owner = NULL, updated_at = :now, "
    "last_error = CASE WHEN v.st = 'done' THEN NULL ELSE d.last_error END "
    "FROM unnest(CAST(:ids AS integer[]), CAST(:st AS varchar[]), CAST(:dt AS varchar[])) AS v(id, st, dt) "
    "WHERE d.id = v.id")
_PG_FAILED = _pg_sql(
    "UPDATE deliveries AS d SET state = v.st, attempts = v.att, last_error = v.err, next_attempt_at = v.nxt, "
    "lease_until = 0, lease_owner = NULL, updated_at = :now "
    "FROM unnest(CAST(:ids AS integer[]), CAST(:st AS varchar[]), CAST(:att AS integer[]), CAST(:err AS text[]), "
    "CAST(:nxt AS float8[])) AS v(id, st, att, err, nxt) "
    "WHERE d.id = v.id AND d.state = 'pending'")
_PG_RELEASE = _pg_sql(
    "UPDATE deliveries SET lease_until = 0, lease_owner = NULL "
    "WHERE id = ANY(CAST(:ids AS integer[])) AND lease_owner = :owner AND state = 'pending'")
_PG_AUDIT = _pg_sql(
    "INSERT INTO audit_events (at, action, outcome, actor, peer, channel, message_id, entity, detail, exported) "
    "SELECT at, action, outcome, actor, peer, channel, message_id, CAST(entity AS json), detail, exported "
    "FROM unnest(CAST(:at AS float8[]), CAST(:action AS varchar[]), CAST(:outcome AS varchar[]), "
    "CAST(:actor AS varchar[]), CAST(:peer AS varchar[]), CAST(:channel AS varchar[]), CAST(:mid AS varchar[]), "
    "CAST(:entity AS text[]), CAST(:detail AS text[]), CAST(:exported AS integer[])) "
    "AS v(at, action, outcome, actor, peer, channel, message_id, entity, detail, exported)")
_PG_ATTEMPTS = _pg_sql(
    "INSERT INTO delivery_attempts (delivery_id, at, outcome, error, detail) "
    "SELECT * FROM unnest(CAST(:ids AS integer[]), CAST(:at AS float8[]), CAST(:outcome AS varchar[]), "
    "CAST(:error AS text[]), CAST(:detail AS varchar[]))")


def _settle_pg(conn: Any, outcomes: Sequence[Outcome], done: list[tuple[int, str, str | None]],
               failed: list[Failure], now: float) -> None:
    import json

    with conn.connection.dbapi_connection.pipeline():
        if done:
            prepared.pg_run(conn, _PG_DONE, {
                "now": now, "ids": [x[0] for x in done], "st": [x[1] for x in done],
                "dt": [(x[2] or "")[:256] or None for x in done]})
        if failed:
            prepared.pg_run(conn, _PG_FAILED, {
                "now": now, "ids": [f.delivery_id for f in failed],
                "st": ["dead" if f.dead else "pending" for f in failed],
                "att": [f.attempts for f in failed], "err": [f.error[:2000] for f in failed],
                "nxt": [now + f.delay for f in failed]})
        for o in outcomes:
            if o.release and o.lease.owner:
                prepared.pg_run(conn, _PG_RELEASE, {"ids": sorted(o.release), "owner": o.lease.owner})
        audit_rows = [a for o in outcomes for a in o.audit_rows]
        if audit_rows:
            prepared.pg_run(conn, _PG_AUDIT, {
                "at": [a["at"] for a in audit_rows], "action": [a["action"] for a in audit_rows],
                "outcome": [a["outcome"] for a in audit_rows], "actor": [a["actor"] for a in audit_rows],
                "peer": [a["peer"] for a in audit_rows], "channel": [a["channel"] for a in audit_rows],
                "mid": [a["message_id"] for a in audit_rows],
                "entity": [None if a["entity"] is None else json.dumps(a["entity"]) for a in audit_rows],
                "detail": [a["detail"] for a in audit_rows], "exported": [a["exported"] for a in audit_rows]})
        tries = [row for o in outcomes for row in attempts.rows_of(o, now)]
        if tries:
            prepared.pg_run(conn, _PG_ATTEMPTS, {
                "ids": [t["delivery_id"] for t in tries], "at": [t["at"] for t in tries],
                "outcome": [t["outcome"] for t in tries], "error": [t["error"] for t in tries],
                "detail": [t["detail"] for t in tries]})


def complete(store: Any, done: Sequence[tuple[int, str, str | None]],
             audit_rows: Sequence[dict[str, Any]] = ()) -> None:
    """Mark deliveries finished in one transaction: (id, state, detail); see ``settle_all``."""
    settle(store, Outcome(Lease(), done=list(done), audit_rows=list(audit_rows)))


def backoff(attempts: int, initial: float, multiplier: float, maximum: float) -> float:
    """Exponential backoff with +-20 % jitter so retries of many routes do not align."""
    base = min(initial * (multiplier ** max(attempts - 1, 0)), maximum)
    return base * random.uniform(0.8, 1.2)


def fail(store: Any, delivery_id: int, attempts: int, error: str, *, dead: bool, delay: float) -> None:
    """Record one failed attempt (see ``settle``)."""
    settle(store, Outcome(Lease(), failed=[Failure(delivery_id, attempts, error, dead, delay)]))


def requeue(store: Any, *, message_ids: Sequence[str] | None = None, channel: str | None = None,
            route: str | None = None, states: Sequence[str] = ("dead",), since: float | None = None,
            until: float | None = None) -> list[int]:
    """Put matching deliveries back to pending, attempts reset; returns their ids."""
    d, m = schema.deliveries, schema.messages
    conds = [d.c.state.in_(list(states))]
    if message_ids:
        conds.append(d.c.message_id.in_(list(message_ids)))
    if channel:
        conds.append(d.c.channel == channel)
    if route:
        conds.append(d.c.route == route)
    q = select(d.c.id).join(m, m.c.id == d.c.message_id).where(and_(*conds))
    if since is not None:
        q = q.where(m.c.received_at >= since)
    if until is not None:
        q = q.where(m.c.received_at < until)
    now = time.time()
    with store.engine.begin() as conn:
        ids = list(conn.execute(q.order_by(d.c.id)).scalars().all())
        for i in range(0, len(ids), 500):
            conn.execute(update(d).where(d.c.id.in_(ids[i:i + 500])).values(
                state="pending", attempts=0, next_attempt_at=now, lease_until=0.0, lease_owner=None, updated_at=now))
    return ids


def release_leases(store: Any) -> int:
    """At start on SQLite: leases of a killed process are void (one owner, lock held)."""
    d = schema.deliveries
    with store.engine.begin() as conn:
        return conn.execute(update(d).where(d.c.lease_until > 0)
                            .values(lease_until=0.0, lease_owner=None)).rowcount or 0


def next_due(store: Any, channel: str, route: str) -> float | None:
    d = schema.deliveries
    with store.queue_engine.connect() as conn:
        v = conn.execute(select(d.c.next_attempt_at, d.c.lease_until).where(and_(
            d.c.channel == channel, d.c.route == route, d.c.state == "pending"))
            .order_by(d.c.next_attempt_at).limit(1)).first()
    if v is None:
        return None
    return max(v[0], v[1])


def states_of(store: Any, ids: Sequence[int]) -> dict[str, int]:
    d = schema.deliveries
    counts: dict[str, int] = {}
    with store.engine.connect() as conn:
        for i in range(0, len(ids), 500):
            for (state,) in conn.execute(select(d.c.state).where(d.c.id.in_(list(ids[i:i + 500])))):
                counts[state] = counts.get(state, 0) + 1
    return counts


__all__ = ["LEASE_SECONDS", "ROUTE_LEASE_PREFIX", "Claimed", "Failure", "Lease", "Outcome", "backoff", "claim",
           "complete", "fail", "next_due", "open_payload", "quarantine", "renew_rows", "requeue", "route_lease_name",
           "settle", "settle_all", "states_of"]
