"""Tables of the durable store (SQLAlchemy Core: the intake path inserts in batches).

One MetaData for the whole engine. Feature modules (DICOM index, FHIR store,
worklist) define their tables on this same ``metadata`` in their own module under
engine/store/ and are imported by ``engine.store.db`` so that migrations see them.
"""

from __future__ import annotations

from sqlalchemy import (
    JSON,
    BigInteger,
    Column,
    Float,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
)

metadata = MetaData()

schema_version = Table(
    "schema_version",
    metadata,
    Column("version", Integer, primary_key=True),
    Column("applied_at", Float, nullable=False),
)

# Encrypted payloads. id = SHA-256 of nonce + GCM tag (db.blob_address; older rows:
# of the whole ciphertext), checked on read; small
# payloads live inline in `data`, large ones in a file named after the id.
blobs = Table(
    "blobs",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("aad", String(64), nullable=False),
    Column("kek_id", String(32), nullable=False, index=True),
    Column("wrapped_key", LargeBinary, nullable=False),
    Column("nonce", LargeBinary, nullable=False),
    Column("size", BigInteger, nullable=False),
    Column("data", LargeBinary, nullable=True),
    Column("in_file", Integer, nullable=False, default=0),
)

messages = Table(
    "messages",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("channel", String(128), nullable=False),
    Column("kind", String(16), nullable=False),
    Column("received_at", Float, nullable=False),
    Column("peer", String(256), nullable=False, default=""),
    Column("headers", JSON, nullable=False),
    Column("blob_id", String(64), nullable=False),
    Column("size", BigInteger, nullable=False),
    Column("config_hash", String(64), nullable=False),
    Column("dedupe_key", String(256), nullable=True),
    Column("response", LargeBinary, nullable=True),
    Column("parent_id", String(32), nullable=True),
    Index("ix_messages_channel_received", "channel", "received_at"),
    Index("ix_messages_dedupe", "channel", "dedupe_key"),
)

# One row per (message, route). States: pending -> done | dead | filtered | quarantined | superseded.
# A failed attempt keeps state pending, bumps attempts and moves next_attempt_at.
deliveries = Table(
    "deliveries",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("message_id", String(32), nullable=False, index=True),
    Column("channel", String(128), nullable=False),
    Column("route", String(128), nullable=False),
    Column("state", String(16), nullable=False),
    Column("attempts", Integer, nullable=False, default=0),
    Column("next_attempt_at", Float, nullable=False),
    Column("lease_until", Float, nullable=False, default=0.0),
    Column("last_error", Text, nullable=True),
    Column("detail", String(256), nullable=True),
    Column("updated_at", Float, nullable=False),
    # debounced routes: the value of the route's `debounce.key` header (e.g. a StudyInstanceUID)
    Column("coalesce_key", String(256), nullable=True),
    # PostgreSQL: which engine process holds the lease (engine.store.leases.holder_id), so a
    # lease is renewed and released by its holder only; NULL when not leased (and on SQLite)
    Column("lease_owner", String(80), nullable=True),
    Index("ix_deliveries_queue", "channel", "route", "state", "id"),
    Index("ix_deliveries_coalesce", "channel", "route", "coalesce_key", "state"),
)

audit_events = Table(
    "audit_events",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("at", Float, nullable=False, index=True),
    Column("action", String(64), nullable=False),
    Column("outcome", String(16), nullable=False),
    Column("actor", String(256), nullable=False, default=""),
    Column("peer", String(256), nullable=False, default=""),
    Column("channel", String(128), nullable=True),
    Column("message_id", String(32), nullable=True),
    Column("entity", JSON, nullable=True),
    Column("detail", Text, nullable=True),
    Column("exported", Integer, nullable=False, default=0, index=True),
)
