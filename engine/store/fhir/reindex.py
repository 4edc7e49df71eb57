"""Rebuilding the FHIR search index when what it should hold has changed.

``fhir_index`` rows are derived data: ``params.index_entries`` of each current resource. When
the parameters (``SEARCH_PARAMS``), the term format (``FORMAT``) or the HMAC key change, the rows
already stored no longer answer searches correctly: an old store would hold clear identifier
hashes and no name terms, and ``Patient?family=`` would find nobody who was stored before the
upgrade. So ``Store.migrate`` (through ``engine.store.db.MIGRATION_HOOKS``, registered when this
module is imported, which engine.store.fhir.search does) compares a signature of all three with
the one recorded in ``fhir_index_state`` and, when they differ, recomputes every current
resource's rows from its decrypted body, in the migration's transaction: a crash mid-way leaves
the old index, and the next start does it again; several engines starting together wait on the
migration lock and the later ones find it done.

Cost: one decryption per current resource, once per change (progress logged every ``CHUNK``).
A resource whose body cannot be decrypted keeps no rows (it is logged, and cannot be found by
search until it is written again) rather than stopping the engine from starting.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from typing import Any

import structlog
from sqlalchemy import Connection, delete, insert, select, update

from engine.security.crypto import IntegrityError
from engine.store.db import MIGRATION_HOOKS
from engine.store.fhir.params import SEARCH_PARAMS, index_entries
from engine.store.fhir.resources import HMAC_KEY_NAME, blob_aad
from engine.store.fhir.tables import fhir_index, fhir_index_state, fhir_resources

log = structlog.get_logger()

NAME = "fhir.index"
FORMAT = 2  # 1: clear tokens, identifier HMACs (before issue 9); 2: blind terms (engine.store.fhir.terms)
CHUNK = 500


def signature(hash_key: bytes) -> str:
    """What the index is built from: term format, parameter table, and a check value of the key."""
    spec = repr(sorted((t, sorted(ps.items())) for t, ps in SEARCH_PARAMS.items()))
    key_check = hmac.new(hash_key, b"medrelay fhir index key check", hashlib.sha256).hexdigest()[:16]
    return f"{FORMAT}:{hashlib.sha256(spec.encode()).hexdigest()[:16]}:{key_check}"


def ensure_index(conn: Connection, store: Any) -> int:
    """Rebuild the index if its signature changed; returns how many resources were re-indexed."""
    key = store.keyring.hmac_key(HMAC_KEY_NAME)
    want = signature(key)
    s = fhir_index_state
    have = conn.execute(select(s.c.value).where(s.c.name == NAME)).scalar_one_or_none()
    if have == want:
        return 0
    done = rebuild(conn, store, key)
    if have is None:
        conn.execute(insert(s).values(name=NAME, value=want, applied_at=time.time()))
    else:
        conn.execute(update(s).where(s.c.name == NAME).values(value=want, applied_at=time.time()))
    return done


def rebuild(conn: Connection, store: Any, key: bytes) -> int:
    """Recompute the rows of every current resource (deleted ones have none)."""
    r = fhir_resources
    conn.execute(delete(fhir_index))
    after, done, skipped = 0, 0, 0
    started = time.monotonic()
    while True:
        rows = conn.execute(select(r.c.rid, r.c.type, r.c.id, r.c.version, r.c.blob_id)
                            .where(r.c.rid > after, r.c.deleted == 0, r.c.blob_id.isnot(None))
                            .order_by(r.c.rid).limit(CHUNK)).all()
        if not rows:
            break
        batch: list[dict[str, Any]] = []
        for rid, rtype, res_id, version, blob_id in rows:
            try:
                body = json.loads(store.get_blob(conn, blob_id, aad=blob_aad(rtype, res_id, version)))
            except (IntegrityError, ValueError, KeyError, OSError) as e:
                skipped += 1
                log.error("fhir.reindex_unreadable", rid=rid, type=rtype, error=type(e).__name__)
                continue
            batch += [{"rid": rid, "type": rtype, **e} for e in index_entries(body, key)]
        if batch:
            conn.execute(insert(fhir_index), batch)
        done += len(rows)
        after = rows[-1][0]
        log.info("fhir.reindex_progress", resources=done)
    if done:
        log.info("fhir.reindexed", resources=done, unreadable=skipped,
                 seconds=round(time.monotonic() - started, 2))
    return done


if ensure_index not in MIGRATION_HOOKS:
    MIGRATION_HOOKS.append(ensure_index)
