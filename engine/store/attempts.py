"""Delivery attempts: one row per try of a delivery, for the console's message detail.

A delivery row holds only its latest state (attempt count, last error): enough for the
queue, not for an operator asking "what did the RIS answer the first time, and when was
it retried?". ``queue.settle`` writes one row here per delivered, filtered or failed try,
in the transaction that records the outcome, so the history is exactly what happened. A
replay resets the delivery's count but not this history: the second delivery shows as a
second row. Rows hold what the delivery row already held (error text, the peer's answer
summary such as ``AA``), never payload.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from sqlalchemy import Column, Connection, Float, Index, Integer, String, Table, Text, delete, insert, select

from engine.store import schema

delivery_attempts = Table(
    "delivery_attempts", schema.metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("delivery_id", Integer, nullable=False),
    Column("at", Float, nullable=False),
    Column("outcome", String(16), nullable=False),  # done | filtered | superseded | failed | dead
    Column("error", Text, nullable=True),
    Column("detail", String(256), nullable=True),  # the peer's answer (e.g. "AA"), the filter's reason
    Index("ix_delivery_attempts_delivery", "delivery_id", "id"),
)


def rows_of(outcome: Any, now: float | None = None) -> list[dict[str, Any]]:
    """The attempt rows of one ``queue.Outcome`` (unsent, released rows were not tried)."""
    at = time.time() if now is None else now
    out = [{"delivery_id": did, "at": at, "outcome": state, "error": None, "detail": (detail or "")[:256] or None}
           for did, state, detail in outcome.done]
    out += [{"delivery_id": f.delivery_id, "at": at, "outcome": "dead" if f.dead else "failed",
             "error": f.error[:2000], "detail": None} for f in outcome.failed]
    return out


def record(conn: Connection, outcome: Any, now: float | None = None) -> None:
    rows = rows_of(outcome, now)
    if rows:
        conn.execute(insert(delivery_attempts), rows)


def of_deliveries(conn: Connection, delivery_ids: Sequence[int]) -> dict[int, list[dict[str, Any]]]:
    """delivery id -> its attempts, oldest first."""
    a = delivery_attempts
    out: dict[int, list[dict[str, Any]]] = {}
    for i in range(0, len(delivery_ids), 500):
        q = (select(a.c.delivery_id, a.c.at, a.c.outcome, a.c.error, a.c.detail)
             .where(a.c.delivery_id.in_(list(delivery_ids[i:i + 500]))).order_by(a.c.id))
        for r in conn.execute(q):
            out.setdefault(r.delivery_id, []).append(
                {"at": r.at, "outcome": r.outcome, "error": r.error, "detail": r.detail})
    return out


def delete_for(conn: Connection, delivery_ids: Sequence[int]) -> int:
    n = 0
    for i in range(0, len(delivery_ids), 500):
        n += conn.execute(delete(delivery_attempts).where(
            delivery_attempts.c.delivery_id.in_(list(delivery_ids[i:i + 500])))).rowcount or 0
    return n
