"""The delivery queue in the store: claim, complete, retry with backoff, dead letter.

A claim takes a lease (``lease_until``) rather than a lock held across the send, so
a worker that dies mid-send leaves the row to be claimed again once the lease ends:
at-least-once. On PostgreSQL the claim uses ``FOR UPDATE SKIP LOCKED`` so several
engine processes can share one queue.

What a worker learned from one claim (delivered, failed, not sent) is written back by
``settle`` in one transaction. When that write fails (the database is away) the worker
keeps the ``Outcome`` and writes it again once the store answers, so its leases end
within seconds of the store's return instead of at ``LEASE_SECONDS``. The lease value a
claim wrote (``Lease.until``) doubles as the claim's token: releasing unsent rows only
touches rows that still carry it, never a row another process has leased since.
"""

from __future__ import annotations

import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import structlog
from sqlalchemy import and_, bindparam, insert, select, update

from engine.security.crypto import IntegrityError
from engine.store import attempts, schema
from engine.store.db import open_blob

log = structlog.get_logger()

LEASE_SECONDS = 120.0


@dataclass(frozen=True, slots=True)
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
    payload: bytes


@dataclass
class Lease:
    """What a claim leased: filled in before the lease is written, so a caller whose claim
    failed half-way (the commit's answer lost) still knows which rows may carry its lease."""

    ids: list[int] = field(default_factory=list)
    until: float = 0.0  # the lease_until value written; 0.0 where no lease is written (SQLite)


@dataclass(frozen=True, slots=True)
class Failure:
    delivery_id: int
    attempts: int
    error: str
    dead: bool
    delay: float


@dataclass
class Outcome:
    """The results of one claim, written back together by ``settle``."""

    lease: Lease
    done: list[tuple[int, str, str | None]] = field(default_factory=list)  # (id, state, detail)
    failed: list[Failure] = field(default_factory=list)
    release: list[int] = field(default_factory=list)  # claimed, not attempted: lease dropped
    audit_rows: list[dict[str, Any]] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.done or self.failed or self.release or self.audit_rows)


def claim(store: Any, channel: str, route: str, limit: int, *, ordered: bool = True,
          lease: Lease | None = None) -> list[Claimed]:
    """Lease up to ``limit`` due deliveries of one route, oldest first, with payloads.

    One query reads the oldest pending deliveries with their message and blob rows.
    ``ordered``: while the oldest pending delivery waits for its retry, nothing behind
    it is sent (head-of-line blocking, as an HL7 feed expects); dead letters do not block.
    ``lease`` receives the leased ids and the lease value (see ``Lease``).
    """
    d, m, b = schema.deliveries, schema.messages, schema.blobs
    now = time.time()
    q = (select(d.c.id, d.c.attempts, d.c.next_attempt_at, d.c.lease_until, m.c.id.label("mid"), m.c.channel,
                m.c.kind, m.c.headers, m.c.peer, m.c.received_at, m.c.parent_id, m.c.blob_id,
                b.c.aad, b.c.kek_id, b.c.wrapped_key, b.c.nonce, b.c.data, b.c.in_file)
         .join(m, m.c.id == d.c.message_id).join(b, b.c.id == m.c.blob_id)
         .where(and_(d.c.channel == channel, d.c.route == route, d.c.state == "pending"))
         .order_by(d.c.id).limit(limit))
    if not ordered:
        q = q.where(and_(d.c.next_attempt_at <= now, d.c.lease_until <= now))
    if not store.is_sqlite:
        q = q.with_for_update(skip_locked=True, of=d)
    with store.queue_tx() as conn:
        rows = conn.execute(q).mappings().all()
        due = []
        for r in rows:
            if r["next_attempt_at"] > now or r["lease_until"] > now:
                if ordered:
                    break
                continue
            due.append(r)
        if not due:
            return []
        if not store.is_sqlite:
            # Shared queue: lease the rows so other engine processes skip them. SQLite has a
            # single owner (the runtime holds a lock file), so no lease write is needed.
            until = now + LEASE_SECONDS
            if lease is not None:
                lease.ids, lease.until = [r["id"] for r in due], until
            conn.execute(update(d).where(d.c.id.in_([r["id"] for r in due])).values(lease_until=until))
        out = []
        for i, r in enumerate(due):
            try:
                payload = open_blob(store.keyring, r["blob_id"], r, r["mid"], store.blob_path(r["blob_id"]))
            except IntegrityError as e:
                _quarantine(conn, r, str(e), now)  # one bad blob must not stop the route
                if ordered:  # keep the order: what follows goes in the next claim, unleased
                    rest = [x["id"] for x in due[i + 1:]]
                    if rest and not store.is_sqlite:
                        conn.execute(update(d).where(d.c.id.in_(rest)).values(lease_until=0.0))
                    break
                continue
            out.append(Claimed(r["id"], r["mid"], r["attempts"], r["channel"], r["kind"], dict(r["headers"] or {}),
                               r["peer"], r["received_at"], r["parent_id"], payload))
    return out


def _quarantine(conn: Any, r: Any, error: str, now: float) -> None:
    """Dead-letter a delivery whose payload fails authentication, with a security audit event.

    Tampering, a swapped or torn blob, or a missing key: retrying cannot help, and
    failing the whole claim would block every message behind it and spin. The row
    stays replayable once the blob or key file is restored from backup.
    """
    conn.execute(update(schema.deliveries).where(schema.deliveries.c.id == r["id"]).values(
        state="dead", last_error=f"integrity: {error}"[:2000], lease_until=0.0, updated_at=now))
    conn.execute(insert(schema.audit_events), [{
        "at": now, "action": "security.integrity_failure", "outcome": "error", "actor": "medrelay", "peer": "",
        "channel": r["channel"], "message_id": r["mid"], "entity": {"blob_id": r["blob_id"]},
        "detail": error[:500], "exported": 0}])
    log.error("queue.integrity_failure", channel=r["channel"], message_id=r["mid"], error=error[:200])


def settle(store: Any, outcome: Outcome) -> None:
    """Write one claim's results in one transaction; safe to repeat after a failed attempt.

    Finished rows (id, state, detail) end their lease; the ``audit_rows`` (``message.send``,
    ``delivery.dead_letter``) go in the same transaction, so a delivery is marked done if and
    only if its audit event exists. Failed rows get their attempt count and next try, but only
    while still pending (a row finished meanwhile, e.g. by a replay, is not put back).
    Unsent rows lose the lease only while it is still this claim's.
    """
    if not outcome:
        return
    d = schema.deliveries
    now = time.time()
    with store.queue_tx() as conn:
        if outcome.done:
            conn.execute(
                update(d).where(d.c.id == bindparam("did")).values(
                    state=bindparam("st"), detail=bindparam("dt"), lease_until=0.0, updated_at=now),
                [{"did": did, "st": state, "dt": (detail or "")[:256] or None} for did, state, detail in outcome.done])
        if outcome.failed:
            conn.execute(
                update(d).where(and_(d.c.id == bindparam("did"), d.c.state == "pending")).values(
                    state=bindparam("st"), attempts=bindparam("att"), last_error=bindparam("err"),
                    next_attempt_at=bindparam("nxt"), lease_until=0.0, updated_at=now),
                [{"did": f.delivery_id, "st": "dead" if f.dead else "pending", "att": f.attempts,
                  "err": f.error[:2000], "nxt": now + f.delay} for f in outcome.failed])
        if outcome.release and outcome.lease.until:
            conn.execute(update(d).where(and_(d.c.id.in_(outcome.release),
                                              d.c.lease_until == outcome.lease.until)).values(lease_until=0.0))
        if outcome.audit_rows:
            conn.execute(insert(schema.audit_events), list(outcome.audit_rows))
        attempts.record(conn, outcome, now)  # the per-try history the console shows


def complete(store: Any, done: Sequence[tuple[int, str, str | None]],
             audit_rows: Sequence[dict[str, Any]] = ()) -> None:
    """Mark deliveries finished in one transaction: (id, state, detail); see ``settle``."""
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
                state="pending", attempts=0, next_attempt_at=now, lease_until=0.0, updated_at=now))
    return ids


def release_leases(store: Any) -> int:
    """At start on SQLite: leases of a killed process are void (one owner, lock held)."""
    d = schema.deliveries
    with store.engine.begin() as conn:
        return conn.execute(update(d).where(d.c.lease_until > 0).values(lease_until=0.0)).rowcount or 0


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


__all__ = ["Claimed", "Failure", "Lease", "Outcome", "backoff", "claim", "complete", "fail", "next_due", "requeue",
           "settle", "states_of"]
