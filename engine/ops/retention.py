"""Retention: pruning messages, their payloads and index rows once a channel's limit has passed.

A hospital keeps an interface engine's message log for a set time (often 30 to 90 days),
not forever: the store holds PHI, and every month kept is more to protect. Per channel,
``retention: {days: N, keep_dead: true}`` lets a pruner delete messages older than N days.

What is never pruned:
- a message with a delivery that is not final (pending, or dead while ``keep_dead``), so
  nothing acknowledged and not yet delivered is lost;
- a DICOM message whose instance is in the archive (``archived``): the archive's lifetime
  is the archive's business, not the message log's. An instance that was only indexed at
  intake and never archived goes with its message.

Worklist items completed, discontinued or cancelled more than ``retention.worklist_days``
ago are pruned too.

Work is done in batches of ``retention.batch`` messages, each in its own short transaction
with a pause between, so intake (which shares the database) is never held up for long.
Every batch is audited (``store.prune``, counts only). Blob files are deleted after their
rows' deletion has committed; a crash in between leaves files that ``store gc`` removes.
With several engines on one store, one prunes at a time: the holder of the ``retention``
lease (engine/ops/singleton.py), checked between batches; another engine takes over
within seconds if it dies.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import structlog
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import and_, delete, exists, not_, select

from engine.audit.trail import Audit
from engine.store import attempts, message_terms, schema
from engine.store.dicom.tables import instances, worklist_items

log = structlog.get_logger()

FINAL = ("done", "filtered", "superseded")
WORKLIST_FINAL = ("COMPLETED", "DISCONTINUED", "CANCELED", "CANCELLED")


class ChannelRetention(BaseModel):
    """`retention:` on a channel."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    days: float = Field(..., gt=0, description="prune messages received more than this many days ago")
    keep_dead: bool = Field(True, description="keep messages with dead-letter deliveries until they are "
                            "replayed or resolved")


class RetentionConfig(BaseModel):
    """Top-level `retention:` how the pruner runs (each channel sets its own limit)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    interval: float = Field(3600.0, gt=0, description="seconds between pruning runs")
    batch: int = Field(500, ge=1, le=10000, description="messages per transaction")
    pause: float = Field(0.05, ge=0, description="seconds between batches, to leave room for intake")
    worklist_days: float | None = Field(30.0, gt=0, description="prune worklist items completed, "
                                        "discontinued or cancelled this many days ago; unset = keep")


@dataclass
class Pruned:
    messages: int = 0
    deliveries: int = 0
    instances: int = 0
    blobs: int = 0
    worklist: int = 0

    def add(self, other: Pruned) -> None:
        for k in vars(self):
            setattr(self, k, getattr(self, k) + getattr(other, k))


def _candidates(conn: Any, channel: str, cutoff: float, keep_dead: bool, limit: int) -> list[tuple[str, str]]:
    m, d = schema.messages, schema.deliveries
    allowed = FINAL if keep_dead else (*FINAL, "dead")
    unfinished = exists().where(and_(d.c.message_id == m.c.id, not_(d.c.state.in_(allowed))))
    archived = exists().where(and_(instances.c.message_id == m.c.id, instances.c.archived == 1))
    q = (select(m.c.id, m.c.blob_id).where(m.c.channel == channel, m.c.received_at < cutoff,
                                           ~unfinished, ~archived)
         .order_by(m.c.received_at).limit(limit))
    return [(r.id, r.blob_id) for r in conn.execute(q)]


def prune_channel_batch(store: Any, channel: str, days: float, keep_dead: bool, batch: int,
                        now: float | None = None) -> tuple[Pruned, list[str]]:
    """Delete one batch of ``channel``'s expired messages; returns counts and blob ids whose files to remove."""
    now = time.time() if now is None else now
    cutoff = now - days * 86400.0
    m, d, b = schema.messages, schema.deliveries, schema.blobs
    out = Pruned()
    files: list[str] = []
    with store.engine.begin() as conn:
        rows = _candidates(conn, channel, cutoff, keep_dead, batch)
        if not rows:
            return out, files
        ids = [r[0] for r in rows]
        blob_ids = [r[1] for r in rows]
        attempts.delete_for(conn, list(conn.execute(select(d.c.id).where(d.c.message_id.in_(ids))).scalars()))
        message_terms.delete_for(conn, ids)
        out.deliveries = conn.execute(delete(d).where(d.c.message_id.in_(ids))).rowcount
        out.instances = conn.execute(delete(instances).where(instances.c.message_id.in_(ids),
                                                             instances.c.archived == 0)).rowcount
        out.messages = conn.execute(delete(m).where(m.c.id.in_(ids))).rowcount
        in_file = set(conn.execute(select(b.c.id).where(b.c.id.in_(blob_ids), b.c.in_file == 1)).scalars())
        out.blobs = conn.execute(delete(b).where(b.c.id.in_(blob_ids))).rowcount
        files = sorted(in_file)
        Audit(store).record("store.prune", actor="medrelay", channel=channel, conn=conn,
                            detail=f"messages {out.messages}, deliveries {out.deliveries}, "
                                   f"index rows {out.instances}, blobs {out.blobs}")
    return out, files


def prune_worklist(store: Any, days: float, now: float | None = None) -> tuple[int, list[str]]:
    """Delete final worklist items older than ``days`` with their sealed attributes; (count, blob files)."""
    now = time.time() if now is None else now
    w, b = worklist_items, schema.blobs
    with store.engine.begin() as conn:
        rows = conn.execute(select(w.c.item_key, w.c.blob_id).where(
            w.c.status.in_(WORKLIST_FINAL), w.c.updated_at < now - days * 86400.0)).all()
        if not rows:
            return 0, []
        blob_ids = [r.blob_id for r in rows]
        n = conn.execute(delete(w).where(w.c.item_key.in_([r.item_key for r in rows]))).rowcount
        files = sorted(conn.execute(select(b.c.id).where(b.c.id.in_(blob_ids), b.c.in_file == 1)).scalars())
        conn.execute(delete(b).where(b.c.id.in_(blob_ids)))
        Audit(store).record("store.prune", actor="medrelay", conn=conn, detail=f"worklist items {n}")
    return n, files


def _remove_files(store: Any, blob_ids: list[str]) -> None:
    store.delete_blob_files(blob_ids)


def prune_once(store: Any, channels: dict[str, ChannelRetention], config: RetentionConfig,
               now: float | None = None, sleep: Any = time.sleep, held: Callable[[], bool] | None = None) -> Pruned:
    """One full pruning run over every channel with a limit (blocking; the runtime calls it in a thread).

    ``held``: checked before each batch; the run stops when this engine no longer holds the job.
    """
    total = Pruned()
    for channel, limit in channels.items():
        while held is None or held():
            got, files = prune_channel_batch(store, channel, limit.days, limit.keep_dead, config.batch, now)
            _remove_files(store, files)
            total.add(got)
            if got.messages < config.batch:
                break
            sleep(config.pause)
    if config.worklist_days is not None:
        total.worklist, files = prune_worklist(store, config.worklist_days, now)
        _remove_files(store, files)
    if total.messages or total.worklist:
        log.info("store.pruned", **vars(total))
    return total


class Pruner:
    """Runs ``prune_once`` every ``interval`` seconds in a thread; store errors wait for the next run."""

    def __init__(self, store: Any, channels: dict[str, ChannelRetention], config: RetentionConfig,
                 held: Callable[[], bool] | None = None) -> None:
        self.store, self.channels, self.config = store, channels, config
        self.held = held or (lambda: True)  # this engine's turn (a lease, with several engines)
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        while True:
            if not self.held():
                await asyncio.sleep(1.0)
                continue
            try:
                await asyncio.to_thread(prune_once, self.store, self.channels, self.config, held=self.held)
            except Exception as e:
                log.warning("store.prune_failed", error=type(e).__name__)
            await asyncio.sleep(self.config.interval)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="retention")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
