"""The FHIR store's tables: one row per resource, one per version, and the search index.

Apart from ``resources`` (the code that writes them) so that the store layer can create the whole
schema without importing the FHIR code above it.

  fhir_resources  one row per logical resource (current version; ``rid`` orders search pages)
  fhir_versions   one row per version (history, vread), DELETE versions without a body
  fhir_index      search keys of the current version (see engine.store.fhir.params): clear keys
                  (status, codes, clinical dates, references) or keyed HMAC terms (names,
                  identifiers, telecoms, addresses, birth date) in ``token``
  fhir_binary_data  the bytes of a Binary version (and its contentType): an encrypted blob of their
                  own, never inside the resource JSON, so a 50 MiB PDF is streamed back chunk by chunk
  fhir_index_state  what the index was built with (engine.store.fhir.reindex rebuilds it on start
                  when the parameters, the term format or the HMAC key changed)
"""

from __future__ import annotations

from sqlalchemy import (  # noqa: F401
    BigInteger,
    Column,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Table,
    Text,
    UniqueConstraint,
)

from engine.store.schema import metadata

fhir_resources = Table(
    "fhir_resources",
    metadata,
    Column("rid", Integer, primary_key=True, autoincrement=True),
    Column("type", String(64), nullable=False),
    Column("id", String(64), nullable=False),
    Column("version", Integer, nullable=False),
    Column("last_updated", Float, nullable=False),
    Column("deleted", Integer, nullable=False, default=0),
    Column("blob_id", String(64), nullable=True),
    UniqueConstraint("type", "id", name="uq_fhir_resources_type_id"),
    Index("ix_fhir_resources_type_rid", "type", "deleted", "rid"),
)

fhir_versions = Table(
    "fhir_versions",
    metadata,
    Column("seq", Integer, primary_key=True, autoincrement=True),
    Column("rid", Integer, nullable=False),
    Column("type", String(64), nullable=False),
    Column("id", String(64), nullable=False),
    Column("version", Integer, nullable=False),
    Column("last_updated", Float, nullable=False),
    Column("method", String(8), nullable=False),
    Column("blob_id", String(64), nullable=True),
    Column("message_id", String(32), nullable=True),
    UniqueConstraint("type", "id", "version", name="uq_fhir_versions_type_id_version"),
    Index("ix_fhir_versions_type_seq", "type", "seq"),
    Index("ix_fhir_versions_rid", "rid", "version"),
)

fhir_index = Table(
    "fhir_index",
    metadata,
    Column("rid", Integer, nullable=False, index=True),
    Column("type", String(64), nullable=False),
    Column("param", String(64), nullable=False),
    Column("token", String(320), nullable=True),
    Column("low", Float, nullable=True),
    Column("high", Float, nullable=True),
    Index("ix_fhir_index_token", "type", "param", "token"),
    Index("ix_fhir_index_date", "type", "param", "low", "high"),
)

fhir_index_state = Table(
    "fhir_index_state",
    metadata,
    Column("name", String(32), primary_key=True),
    Column("value", String(128), nullable=False),
    Column("applied_at", Float, nullable=False),
)

fhir_binary_data = Table(
    "fhir_binary_data",
    metadata,
    Column("seq", Integer, primary_key=True, autoincrement=True),
    Column("type", String(64), nullable=False),
    Column("id", String(64), nullable=False),
    Column("version", Integer, nullable=False),
    Column("blob_id", String(64), nullable=False),
    Column("aad", String(64), nullable=False),
    Column("content_type", String(255), nullable=False),
    Column("size", BigInteger, nullable=False),
    Column("digest", String(64), nullable=False),  # keyed HMAC of the bytes: no-op updates, never the content
    UniqueConstraint("type", "id", "version", name="uq_fhir_binary_data_version"),
)
