"""Blob files no row refers to: what a crash between a file write and its commit leaves.

A large payload's file is written (and fsynced) before the transaction that names it;
if the process dies in between, or the commit fails, the file is never referenced. It
is harmless (encrypted, never read) but takes disk space, so `medrelay store gc`
removes such files once they are older than any commit could still be in flight.

Several engines (and hosts) share one blob folder on PostgreSQL: a `store gc` holds the
``store-gc`` lease (engine/store/leases.py) while it runs, so two at once refuse rather than
race each other (``leases.LeaseHeld``).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sqlalchemy import select

from engine.store import leases, schema

CHUNK = 500


def _candidates(store: Any, older_than: float) -> Iterator[Path]:
    cutoff = time.time() - older_than
    for folder in sorted(store.blob_dir.iterdir()):
        if not folder.is_dir() or len(folder.name) != 2:
            continue
        for f in folder.iterdir():
            if len(f.name) == 64 and f.stat().st_mtime < cutoff:
                yield f


def orphan_files(store: Any, *, older_than: float = 3600.0) -> list[Path]:
    b = schema.blobs
    out: list[Path] = []
    batch: list[Path] = []

    def check(paths: list[Path]) -> None:
        with store.engine.connect() as conn:
            known = set(conn.execute(select(b.c.id).where(b.c.id.in_([p.name for p in paths]))).scalars())
        out.extend(p for p in paths if p.name not in known)

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
    for f in files:
        size += f.stat().st_size
        if not dry_run:
            f.unlink(missing_ok=True)
    return len(files), size
