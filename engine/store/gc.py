"""Blob files no row refers to: what a crash between a file write and its commit leaves.

A large payload's file is written (and fsynced) before the transaction that names it;
if the process dies in between, or the commit fails, the file is never referenced. It
is harmless (encrypted, never read) but takes disk space, so `medrelay store gc`
removes such files once they are older than any commit could still be in flight. The
files are reached through ``store.files`` (engine/store/blobfiles.py): a folder or an
S3 bucket, listed the same way.

Several engines (and hosts) share one blob folder on PostgreSQL: a `store gc` holds the
``store-gc`` lease (engine/store/leases.py) while it runs, so two at once refuse rather than
race each other (``leases.LeaseHeld``).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from sqlalchemy import select

from engine.store import leases, schema

CHUNK = 500


def _candidates(store: Any, older_than: float) -> Iterator[tuple[str, int]]:
    """(blob id, size) of every blob file (folder or object store) older than ``older_than`` s."""
    yield from store.files.iterate(older_than)


def orphan_files(store: Any, *, older_than: float = 3600.0) -> list[tuple[str, int]]:
    """(blob id, size) of blob files no ``blobs`` row names, older than ``older_than`` seconds."""
    b = schema.blobs
    out: list[tuple[str, int]] = []
    batch: list[tuple[str, int]] = []

    def check(found: list[tuple[str, int]]) -> None:
        with store.engine.connect() as conn:
            known = set(conn.execute(select(b.c.id).where(b.c.id.in_([i for i, _ in found]))).scalars())
        out.extend(f for f in found if f[0] not in known)

    for f in _candidates(store, older_than):
        batch.append(f)
        if len(batch) >= CHUNK:
            check(batch)
            batch = []
    if batch:
        check(batch)
    return out


def collect(store: Any, *, older_than: float = 3600.0, dry_run: bool = False) -> tuple[int, int]:
    """Remove unreferenced blob files older than ``older_than`` seconds; returns (files, bytes).

    One at a time per store (LeaseHeld when another `store gc` runs)."""
    with leases.hold(store, "store-gc", seconds=120.0):
        return _collect(store, older_than=older_than, dry_run=dry_run)


def _collect(store: Any, *, older_than: float, dry_run: bool) -> tuple[int, int]:
    files = orphan_files(store, older_than=older_than)
    size = 0
    for blob_id, n in files:
        size += n
        if not dry_run:
            store.files.delete(blob_id)
    return len(files), size
