"""Duplicate windows that hold across engine processes: one row per (channel, key), unique.

A sender that resends MSH-3/4/10 (its ACK was lost) must get the original answer and no
second delivery. Looking the key up among committed messages is enough for one engine, whose
single committer sees its own batches; two engines receiving the same message at the same
instant each see nothing committed and both store it (issue 10: 46 of 50). So intake claims
each key in ``dedupe_keys`` inside its transaction with ``INSERT .. ON CONFLICT``: the primary
key makes the second transaction wait for the first and then find the row, so exactly one
stores the message and the other answers as a duplicate of it. A row whose window has passed
(``expires_at``) is taken over by the next message with that key (control ids wrap).

Keys are claimed in sorted order, so two batches with overlapping keys cannot deadlock.
Rows are swept once expired (``sweep``, run by one process under a lease). ``backfill``
fills the table from the messages of the current window the first time an engine of this
version starts on a store that had none.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Sequence
from typing import Any

from sqlalchemy import (
    Column,
    Connection,
    Float,
    Index,
    String,
    Table,
    and_,
    delete,
    func,
    select,
    text,
    tuple_,
)

from engine.store import schema

dedupe_keys = Table(
    "dedupe_keys", schema.metadata,
    Column("channel", String(128), primary_key=True),
    Column("key", String(256), primary_key=True),
    Column("message_id", String(32), nullable=False),
    Column("expires_at", Float, nullable=False),
    Index("ix_dedupe_keys_expires", "expires_at"),
)


def _insert(conn: Connection) -> Any:
    if conn.dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as pg_insert

        return pg_insert(dedupe_keys)
    from sqlalchemy.dialects.sqlite import insert as sqlite_insert

    return sqlite_insert(dedupe_keys)


def claim(conn: Connection, rows: Sequence[tuple[str, str, str, float]], now: float) -> set[tuple[str, str]]:
    """Claim (channel, key, message_id, expires_at) rows; returns the (channel, key) pairs won.

    A key is won when no row holds it or its row has expired; it is lost while another
    message holds it, including one committed a moment ago by another process (the insert
    waited for that transaction). Each (channel, key) must appear once.
    """
    if not rows:
        return set()
    ordered = sorted(rows, key=lambda r: (r[0], r[1]))
    if conn.dialect.name == "postgresql":
        # One fixed statement whatever the batch size (arrays, not N VALUES rows): compiled and
        # prepared once, where a VALUES list of each new length cost a compile (~5 ms) per batch.
        cols = list(zip(*ordered, strict=True))
        got = conn.execute(_PG_CLAIM, {"ch": list(cols[0]), "k": list(cols[1]), "m": list(cols[2]),
                                       "e": list(cols[3]), "now": now}).all()
        return {(c, k) for c, k in got}
    return _claim_sqlite(conn, ordered, now)


# The claim on PostgreSQL: rows in key order (the insert takes the unique index entries in that
# order, so two batches with overlapping keys wait on each other instead of deadlocking).
_PG_CLAIM = text(
    "INSERT INTO dedupe_keys (channel, key, message_id, expires_at) "
    "SELECT * FROM unnest(CAST(:ch AS varchar[]), CAST(:k AS varchar[]), CAST(:m AS varchar[]), "
    "CAST(:e AS float8[])) "
    "ON CONFLICT (channel, key) DO UPDATE SET message_id = excluded.message_id, expires_at = excluded.expires_at "
    "WHERE dedupe_keys.expires_at <= :now "
    "RETURNING channel, key")
# SQLite: driver-level SQL, one look-up per channel with the keys as one JSON array (json_each),
# so neither statement is compiled per batch.
_SQLITE_HELD = ("SELECT key FROM dedupe_keys WHERE channel = ? AND expires_at > ? "
                "AND key IN (SELECT value FROM json_each(?))")
_SQLITE_UPSERT = ("INSERT INTO dedupe_keys (channel, key, message_id, expires_at) VALUES (?, ?, ?, ?) "
                  "ON CONFLICT (channel, key) DO UPDATE SET message_id = excluded.message_id, "
                  "expires_at = excluded.expires_at")


def _claim_sqlite(conn: Connection, rows: list[tuple[str, str, str, float]], now: float) -> set[tuple[str, str]]:
    """SQLite has one writer at a time (the committer holds the write lock), so a look-up and an
    upsert of what is free cannot race."""
    by_channel: dict[str, list[str]] = {}
    for c, k, _, _ in rows:
        by_channel.setdefault(c, []).append(k)
    held = set()
    for channel, keys in by_channel.items():
        held.update((channel, k) for (k,) in conn.exec_driver_sql(_SQLITE_HELD, (channel, now, json.dumps(keys))))
    free = [r for r in rows if (r[0], r[1]) not in held]
    if free:
        conn.exec_driver_sql(_SQLITE_UPSERT, [tuple(r) for r in free])
    return {(r[0], r[1]) for r in free}


def originals(conn: Connection, pairs: Iterable[tuple[str, str]]) -> dict[tuple[str, str], tuple[str, bytes | None]]:
    """(channel, key) -> (message id, stored response) of the messages holding these keys."""
    pairs = sorted(set(pairs))
    if not pairs:
        return {}
    d, m = dedupe_keys, schema.messages
    q = (select(d.c.channel, d.c.key, d.c.message_id, m.c.response)
         .outerjoin(m, m.c.id == d.c.message_id)
         .where(tuple_(d.c.channel, d.c.key).in_(pairs)))
    return {(r.channel, r.key): (r.message_id, r.response) for r in conn.execute(q)}


def unclaim(conn: Connection, rows: Iterable[tuple[str, str, str]]) -> None:
    """Drop keys claimed for messages that were not stored after all (a tx_hook said duplicate)."""
    d = dedupe_keys
    for channel, key, message_id in rows:
        conn.execute(delete(d).where(and_(d.c.channel == channel, d.c.key == key, d.c.message_id == message_id)))


def sweep(store: Any, now: float | None = None, batch: int = 2000) -> int:
    """Delete one batch of expired keys; returns how many (call until 0)."""
    now = time.time() if now is None else now
    d = dedupe_keys
    with store.engine.begin() as conn:
        victims = conn.execute(select(d.c.channel, d.c.key).where(d.c.expires_at < now).limit(batch)).all()
        if not victims:
            return 0
        conn.execute(delete(d).where(tuple_(d.c.channel, d.c.key).in_([tuple(v) for v in victims])))
    return len(victims)


def backfill(store: Any, windows: dict[str, float], now: float | None = None) -> int:
    """Copy the keys of messages still inside their channel's window into ``dedupe_keys``.

    Needed once, when a store written by an engine that predates this table is opened: a
    repeat of a message received just before the upgrade is still recognised. Only channels
    with no row yet are filled (a cheap check), so later starts do nothing.
    """
    now = time.time() if now is None else now
    d, m = dedupe_keys, schema.messages
    total = 0
    for channel, window in sorted(windows.items()):
        if window <= 0:
            continue
        with store.engine.begin() as conn:
            if conn.execute(select(d.c.key).where(d.c.channel == channel).limit(1)).first() is not None:
                continue
            newest = (select(m.c.dedupe_key, func.max(m.c.received_at).label("at"))
                      .where(and_(m.c.channel == channel, m.c.dedupe_key.is_not(None),
                                  m.c.received_at >= now - window))
                      .group_by(m.c.dedupe_key).subquery())
            rows = conn.execute(select(m.c.dedupe_key, m.c.id, m.c.received_at).join(
                newest, and_(m.c.dedupe_key == newest.c.dedupe_key, m.c.received_at == newest.c.at))
                .where(m.c.channel == channel)).all()
            seen: dict[str, tuple[str, float]] = {}
            for key, mid, at in rows:
                seen.setdefault(key, (mid, at))
            if seen:
                ins = _insert(conn)
                items = sorted(seen.items())
                for i in range(0, len(items), 500):
                    conn.execute(ins.values([{"channel": channel, "key": k, "message_id": mid,
                                              "expires_at": at + window} for k, (mid, at) in items[i:i + 500]])
                                 .on_conflict_do_nothing(index_elements=["channel", "key"]))
                total += len(seen)
    return total


__all__ = ["backfill", "claim", "dedupe_keys", "originals", "sweep", "unclaim"]
