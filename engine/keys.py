"""Key rotation: re-wrap every data key under a new KEK, in small committed batches.

Each batch commits on its own, so the engine keeps running and a kill -9 at any
point leaves every blob wrapped by a KEK that is still in the key file. Old KEKs
are removed from the file only after no blob refers to them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sqlalchemy import func, select, update

from engine.store import schema

BATCH = 500


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


def rotate(store: Any, *, retire: bool = True,
           progress: Callable[[int], Any] | None = None) -> tuple[str, int, list[str]]:
    new = store.keyring.add_kek()
    n = rewrap_all(store, progress)
    retired: list[str] = []
    if retire:
        used = key_usage(store)
        for kid in store.keyring.kek_ids():
            if kid != new and not used.get(kid):
                store.keyring.retire_kek(kid)
                retired.append(kid)
    return new, n, retired
