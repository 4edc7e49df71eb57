"""Key rotation: re-wrap every data key under a new KEK, in small committed batches.

Each batch commits on its own, so the engine keeps running and a kill -9 at any
point leaves every blob wrapped by a KEK that is still in the key file. Old KEKs
are removed from the file only after no blob refers to them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sqlalchemy import Connection, func, select, update

from engine.store import schema

BATCH = 500
RETIRE_ROUNDS = 20


def key_usage(store: Any) -> dict[str, int]:
    b = schema.blobs
    with store.engine.connect() as conn:
        return {k: n for k, n in conn.execute(select(b.c.kek_id, func.count()).group_by(b.c.kek_id))}


def rewrap_all(store: Any, progress: Callable[[int], Any] | None = None) -> int:
    """Re-wrap blobs not under the active KEK; safe to run again after a crash."""
    b = schema.blobs
    ring = store.keyring
    total = 0
    while True:
        with store.engine.begin() as conn:
            rows = conn.execute(select(b.c.id, b.c.kek_id, b.c.wrapped_key)
                                .where(b.c.kek_id != ring.active_id).limit(BATCH)).all()
            if not rows:
                return total
            for r in rows:
                kid, wrapped = ring.rewrap(r.kek_id, r.wrapped_key)
                conn.execute(update(b).where(b.c.id == r.id).values(kek_id=kid, wrapped_key=wrapped))
        total += len(rows)
        if progress is not None:
            progress(len(rows))


def _lock_blobs(store: Any, conn: Connection) -> None:
    """Block blob inserts until this transaction ends (see ``Store._fence_rotation``)."""
    b = schema.blobs
    if store.is_sqlite:
        # any write statement takes SQLite's single write lock, even one that matches nothing
        conn.execute(update(b).where(b.c.id == "").values(kek_id=b.c.kek_id))
    else:
        conn.exec_driver_sql("LOCK TABLE blobs IN SHARE ROW EXCLUSIVE MODE")


def retire_unused(store: Any) -> tuple[list[str], list[str]]:
    """Retire every non-active KEK no blob uses; returns (retired, still used).

    Counting and removing happen while blob inserts are blocked, so a running engine
    cannot commit a blob under a key between our count and its removal; a blob it
    sealed before and commits after is re-wrapped by the engine itself.
    """
    ring = store.keyring
    retired: list[str] = []
    with store.engine.begin() as conn:
        _lock_blobs(store, conn)
        b = schema.blobs
        used = {k: n for k, n in conn.execute(select(b.c.kek_id, func.count()).group_by(b.c.kek_id))}
        busy = [k for k in ring.kek_ids() if k != ring.active_id and used.get(k)]
        for kid in ring.kek_ids():
            if kid != ring.active_id and not used.get(kid):
                ring.retire_kek(kid)  # the file is written (fsync, rename) before we unlock
                retired.append(kid)
    return retired, busy


def rotate(store: Any, *, retire: bool = True,
           progress: Callable[[int], Any] | None = None) -> tuple[str, int, list[str]]:
    """Add a KEK, re-wrap every data key under it, then retire the old KEKs.

    A running engine may still seal a few blobs under the old key until it notices
    the new file, so re-wrap and retire repeat until nothing uses an old key.
    """
    new = store.keyring.add_kek()
    n = rewrap_all(store, progress)
    retired: list[str] = []
    if retire:
        for _ in range(RETIRE_ROUNDS):
            done, busy = retire_unused(store)
            retired.extend(done)
            if not busy:
                break
            n += rewrap_all(store, progress)
    return new, n, retired
