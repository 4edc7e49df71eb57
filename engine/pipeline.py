"""Route workers: claim deliveries, run the route's transforms, send, record the result.

One worker per (channel, route). It wakes when intake commits work for its route,
or when the earliest retry falls due, so an idle engine does not poll the store hot.
"""

from __future__ import annotations

import asyncio
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import structlog

from engine import queue
from engine.components import DeliveryError
from engine.envelope import Drop, Envelope

log = structlog.get_logger()

BATCH = 64
IDLE_POLL = 1.0


@dataclass
class Route:
    channel: str
    name: str
    when: dict[str, Any]
    transforms: Sequence[Callable[[Envelope], Any]]
    destination: Any
    retry: Any
    ordered: bool = True
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    to_type: str = ""  # the destination's `type:`, for the audit trail


def apply_transforms(transforms: Sequence[Callable[[Envelope], Any]], env: Envelope) -> list[Envelope]:
    """Run the chain; a transform may fan out to several envelopes. Drop propagates."""
    current = [env]
    for t in transforms:
        nxt: list[Envelope] = []
        for e in current:
            out = t(e)
            if out is None:
                raise Drop("transform returned nothing")
            nxt.extend(out if isinstance(out, list) else [out])
        current = nxt
    return current


class RouteWorker:
    def __init__(self, route: Route, store: Any, metrics: Any = None, audit: Any = None) -> None:
        self.route = route
        self.store = store
        self.metrics = metrics
        self.audit = audit
        self._stopping = False
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"route-{self.route.channel}-{self.route.name}")

    @property
    def alive(self) -> bool:
        """The worker's task is running (readiness: a worker that died takes the engine out of service)."""
        return self._task is not None and not self._task.done()

    async def stop(self) -> None:
        """Finish the delivery in hand, then stop; leases of unsent claims are released."""
        self._stopping = True
        self.route.wake.set()
        if self._task is not None:
            try:
                await asyncio.wait_for(self._task, timeout=30)
            except (TimeoutError, asyncio.CancelledError):
                self._task.cancel()

    async def _run(self) -> None:
        r = self.route
        while not self._stopping:
            r.wake.clear()
            try:
                claimed = await asyncio.to_thread(queue.claim, self.store, r.channel, r.name, BATCH,
                                                  ordered=r.ordered)
            except Exception as e:
                log.error("route.claim_failed", channel=r.channel, route=r.name, error=str(e)[:200])
                claimed = []
            if claimed:
                try:
                    await self._process(claimed)
                except Exception as e:  # the worker must outlive a store hiccup
                    log.error("route.process_failed", channel=r.channel, route=r.name, error=str(e)[:300])
                    await asyncio.sleep(IDLE_POLL)
                continue
            try:
                due = await asyncio.to_thread(queue.next_due, self.store, r.channel, r.name)
            except Exception:
                due = None
            wait = IDLE_POLL if due is None else min(max(due - time.time(), 0.01), IDLE_POLL)
            try:
                await asyncio.wait_for(r.wake.wait(), timeout=wait)
            except TimeoutError:
                pass

    async def _process(self, claimed: list[queue.Claimed]) -> None:
        r = self.route
        done: list[tuple[int, str, str | None]] = []
        release: list[int] = []
        blocked = False
        for i, c in enumerate(claimed):
            if self._stopping or blocked:
                release.extend(x.delivery_id for x in claimed[i:])
                break
            ok = await self._deliver_one(c, done)
            if not ok and r.ordered:
                blocked = True
        by_id = {c.delivery_id: c for c in claimed}
        sent = [_send_audit(r, by_id[did], detail) for did, state, detail in done if state == "done"]
        await asyncio.to_thread(queue.complete, self.store, done, sent)
        if release:
            await asyncio.to_thread(_release, self.store, release)

    async def _deliver_one(self, c: queue.Claimed, done: list[tuple[int, str, str | None]]) -> bool:
        r = self.route
        env = Envelope(channel=c.channel, kind=c.kind, payload=c.payload, headers=c.headers,  # type: ignore[arg-type]
                       peer=c.peer, id=c.message_id,
                       received_at=datetime.fromtimestamp(c.received_at, UTC),
                       lineage=(c.parent_id,) if c.parent_id else ())
        try:
            outs = await asyncio.to_thread(apply_transforms, r.transforms, env) if r.transforms else [env]
        except Drop as d:
            done.append((c.delivery_id, d.state, d.reason or "dropped"))
            if self.metrics:
                self.metrics.filtered.labels(r.channel, r.name).inc()
            log.info(f"route.{d.state}", channel=r.channel, route=r.name, message_id=c.message_id,
                     reason=d.reason)
            return True
        except Exception as e:
            # A transform is deterministic: retrying the same input cannot help. Dead-letter it
            # so a fixed config can be replayed, and say why.
            await self._failed(c, f"transform failed: {type(e).__name__}: {e}", permanent=True,
                               trace=traceback.format_exc())
            return False
        details = []
        try:
            for out in outs:
                details.append(await r.destination.send(out))
        except DeliveryError as e:
            await self._failed(c, str(e), permanent=e.permanent)
            return False
        except Exception as e:
            await self._failed(c, f"{type(e).__name__}: {e}", permanent=False, trace=traceback.format_exc())
            return False
        done.append((c.delivery_id, "done", "; ".join(d for d in details if d) or None))
        if self.metrics:
            self.metrics.delivered.labels(r.channel, r.name).inc()
        log.debug("route.delivered", channel=r.channel, route=r.name, message_id=c.message_id)
        return True

    async def _failed(self, c: queue.Claimed, error: str, *, permanent: bool, trace: str | None = None) -> None:
        r = self.route
        attempts = c.attempts + 1
        dead = permanent or attempts >= r.retry.max_attempts
        delay = queue.backoff(attempts, r.retry.initial_delay, r.retry.multiplier, r.retry.max_delay)
        await asyncio.to_thread(queue.fail, self.store, c.delivery_id, attempts, error, dead=dead, delay=delay)
        if self.metrics:
            self.metrics.failed.labels(r.channel, r.name).inc()
            if dead:
                self.metrics.dead.labels(r.channel, r.name).inc()
        event = "route.dead_lettered" if dead else "route.retry"
        log.warning(event, channel=r.channel, route=r.name, message_id=c.message_id, attempts=attempts,
                    error=error[:300], retry_in=None if dead else round(delay, 2))
        if trace:
            log.debug("route.failure_trace", message_id=c.message_id, trace=trace)
        if dead and self.audit is not None:
            self.audit.record("delivery.dead_letter", outcome="failure", channel=r.channel,
                              message_id=c.message_id, detail=error[:500])


def _send_audit(route: Route, c: queue.Claimed, detail: str | None) -> dict[str, Any]:
    """The audit row of one delivered message; written with the completion, same transaction."""
    dest = route.destination
    peer = getattr(dest, "peer", None) or ""
    if not peer:
        cfg = getattr(dest, "config", None)
        host, port = getattr(cfg, "host", None), getattr(cfg, "port", None)
        peer = f"{host}:{port}" if host else str(getattr(cfg, "base_url", "") or "")
    return {"at": time.time(), "action": "message.send", "outcome": "success", "actor": "medrelay",
            "peer": peer, "channel": c.channel, "message_id": c.message_id,
            "entity": {"kind": c.kind, "route": route.name, "to": route.to_type or type(dest).__name__},
            "detail": (detail or "")[:500] or None, "exported": 0}


def _release(store: Any, ids: list[int]) -> None:
    from sqlalchemy import update

    from engine.store import schema

    d = schema.deliveries
    with store.engine.begin() as conn:
        conn.execute(update(d).where(d.c.id.in_(ids)).values(lease_until=0.0))
