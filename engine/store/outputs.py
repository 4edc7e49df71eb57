"""What a stored message produced downstream: resources written, and their Provenance.

A delivery row says a route delivered; it does not say what came of it. Destinations
that create things someone may look for later (FHIR resources in medrelay's own store
or on a FHIR server) record each one here, keyed by the stored message they came from,
so `medrelay messages show` and the console can list a message's outputs and a
resource can be traced back to its message (and its Provenance).

Only references are kept (``Patient/8f3c.../_history/1``: resource type, a server id and
version), never content; the destination's base URL is the route's, not stored per row.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

from sqlalchemy import Column, Connection, Float, Index, Integer, String, Table, insert, select

from engine.store.schema import metadata

MAX_LISTED = 200  # outputs listed for one message (a huge transaction Bundle is summarised)

message_outputs = Table(
    "message_outputs",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("message_id", String(32), nullable=False),
    Column("channel", String(128), nullable=False),
    Column("route", String(128), nullable=False),
    Column("kind", String(16), nullable=False),  # "fhir"
    Column("target", String(512), nullable=False),  # Type/id/_history/version, relative to where
    Column("place", String(32), nullable=False),  # "store" (medrelay's own) or "remote" (the route's server)
    Column("provenance", String(512), nullable=True),  # the Provenance written with it, same form
    Column("at", Float, nullable=False),
    Index("ix_message_outputs_message", "message_id"),
    Index("ix_message_outputs_target", "target"),
)


def record(conn: Connection, *, message_id: str, channel: str, route: str, targets: Iterable[str],
           where: str, provenance: str | None = None, kind: str = "fhir") -> int:
    now = time.time()
    rows = [{"message_id": message_id, "channel": channel, "route": route, "kind": kind, "target": t[:512],
             "place": where, "provenance": (provenance or None) and provenance[:512], "at": now}
            for t in targets if t]
    if rows:
        conn.execute(insert(message_outputs), rows)
    return len(rows)


def of_message(conn: Connection, message_id: str, limit: int = MAX_LISTED) -> list[dict[str, Any]]:
    """The outputs of one message, oldest first."""
    o = message_outputs
    rows = conn.execute(select(o.c.route, o.c.kind, o.c.target, o.c.place, o.c.provenance, o.c.at)
                        .where(o.c.message_id == message_id).order_by(o.c.id).limit(limit))
    return [dict(r._mapping) for r in rows]


def producer_of(conn: Connection, target: str) -> list[dict[str, Any]]:
    """Which message(s) wrote a resource (``Type/id`` matches every version of it)."""
    o = message_outputs
    cond = o.c.target == target if "/_history/" in target else o.c.target.like(
        target.replace("%", "").replace("_", "\\_") + "/\\_history/%", escape="\\")
    rows = conn.execute(select(o.c.message_id, o.c.channel, o.c.route, o.c.target, o.c.provenance, o.c.at)
                        .where(cond).order_by(o.c.id).limit(MAX_LISTED))
    return [dict(r._mapping) for r in rows]
