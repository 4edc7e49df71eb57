"""Prepared INSERTs sent as one statement over arrays on PostgreSQL (``unnest=True``, intake's
messages, deliveries and audit rows): the rows stored are exactly what executemany stores, and
serial ids follow the rows' order (an ordered route's deliveries go out in id order)."""

from __future__ import annotations

import random
import time

from conftest import fresh_pg_url
from sqlalchemy import insert, select

from engine.security.crypto import KeyRing
from engine.store import schema
from engine.store.db import Store
from engine.store.prepared import Prepared

MSG_COLS = ("id", "channel", "kind", "received_at", "peer", "headers", "blob_id", "size", "config_hash", "dedupe_key",
            "response", "parent_id")
DLV_COLS = ("message_id", "channel", "route", "state", "attempts", "next_attempt_at", "lease_until", "last_error",
            "detail", "updated_at", "coalesce_key")


def test_unnest_stores_what_executemany_stores_in_order(tmp_path):
    store = Store(fresh_pg_url(), tmp_path / "blobs", KeyRing(tmp_path / "keys.json"))
    try:
        store.migrate()
        now = time.time()
        msgs = [{"id": f"{k}{i:05}", "channel": "c", "kind": "hl7v2", "received_at": now + i,
                 "peer": "p" if i % 2 else "", "headers": {"MSH-10": f"C{i}", "n": i} if i % 3 else {},
                 "blob_id": f"b{i}", "size": i * 1000, "config_hash": "h", "dedupe_key": None if i % 4 else f"k{i}",
                 "response": None if i % 5 else b"\x00\x0bA", "parent_id": None}
                for k in ("u", "e") for i in range(40)]
        order = [f"m{i}" for i in random.Random(7).sample(range(200), 200)]
        dlv = [{"message_id": m, "channel": "c", "route": "r", "state": "pending", "attempts": 0,
                "next_attempt_at": now, "lease_until": 0.0, "last_error": None, "detail": None if j % 2 else "d",
                "updated_at": now,
                "coalesce_key": None if j % 3 else "ck"} for j, m in enumerate(order)]
        with store.engine.begin() as conn:
            Prepared(insert(schema.messages), MSG_COLS, json_columns=("headers",), unnest=True).run(conn, msgs[:40])
            Prepared(insert(schema.messages), MSG_COLS, json_columns=("headers",)).run(conn, msgs[40:])
            with conn.connection.dbapi_connection.pipeline():  # as intake sends them
                Prepared(insert(schema.deliveries), DLV_COLS, unnest=True).run(conn, dlv)
        m = schema.messages
        with store.engine.connect() as conn:
            rows = {r.id: r._asdict() for r in conn.execute(select(m))}
            ids = conn.execute(select(schema.deliveries.c.message_id).order_by(schema.deliveries.c.id)).scalars().all()
        for i in range(40):
            u, e = rows[f"u{i:05}"], rows[f"e{i:05}"]
            assert {**u, "id": None} == {**e, "id": None}
        assert ids == order  # serial ids in the order of the rows given
    finally:
        store.dispose()
