"""Route workers: claim deliveries, run the route's transforms, send, record the result.

One worker per (channel, route) in each engine process. It wakes when intake commits work
for its route, or when the earliest retry falls due, so an idle engine does not poll the
store hot. With several processes on one PostgreSQL store, an unordered route is worked by
every process at once (claims skip each other's rows); an ordered route only by the process
holding its route lease (``queue.route_lease_name``, kept by ``engine.ops.singleton.Keeper``),
so its order holds, and the lease moves within seconds when that process dies.

Two things bound a worker against the outside world. Every send is bounded by the
destination's ``deadline`` (see ``RouteWorker._send``): a peer that never reads or never
answers costs one failed attempt, retried with the route's backoff. And the store may
fail at any step: each delivery's result goes to the process's ``Settler`` as soon as it is
known (marked done one by one, group-committed with other routes' results), which keeps it
until written; the worker claims nothing new until its results are written, so a database
outage neither loses an outcome nor leaves leases to run out after it.
"""

from __future__ import annotations

import asyncio
import random
import time
import traceback
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import structlog

from engine import queue
from engine.components import DeliveryError
from engine.envelope import Drop, Envelope
from engine.ops.singleton import Keeper, Settler
from engine.security.crypto import IntegrityError

log = structlog.get_logger()

BATCH = 64  # deliveries per claim (payloads are loaded one at a time, when sent)
SHARED_BATCH = 16  # on a shared store, for unordered routes: leave work for the other processes
IDLE_POLL = 1.0
DECRYPT_INLINE = 64 * 1024  # payloads up to this are decrypted on the loop; larger ones in a thread
STORE_RETRY = (0.25, 2.0)  # seconds between store attempts while the store fails: first, most
STORE_LOG_EVERY = 30.0  # seconds between "still unavailable" lines during one outage
RETRY_AFTER_MAX = 3600.0  # the longest a peer's Retry-After defers a delivery (a broken or hostile
# value such as a date next year would otherwise park the route's queue)
DEADLINE_GRACE = (1.0, 0.1)  # on top of a destination's deadline (at least, fraction), so its own
# (more precise) timeout fires first and this one only catches what it missed


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
    def __init__(self, route: Route, store: Any, metrics: Any = None, audit: Any = None, *,
                 keeper: Keeper | None = None, settler: Settler | None = None) -> None:
        self.route = route
        self.store = store
        self.metrics = metrics
        self.audit = audit
        self.keeper = keeper if keeper is not None else Keeper(store)
        self.settler = settler if settler is not None else Settler(store)
        self.lease_name = queue.route_lease_name(route.channel, route.name) if route.ordered else None
        self._stopping = False
        self._task: asyncio.Task[None] | None = None
        self._unsettled: list[Future[None]] = []  # results handed to the settler, not yet written
        self._store_down_since: float | None = None
        self._store_logged = 0.0
        self._store_failures = 0
        self._retrying = False  # the last send failed: claim one delivery at a time until one succeeds

    def start(self) -> None:
        if self.lease_name is not None:
            self.keeper.want(self.lease_name)
        self._task = asyncio.create_task(self._run(), name=f"route-{self.route.channel}-{self.route.name}")

    @property
    def alive(self) -> bool:
        """The worker's task is running (readiness: a worker that died takes the engine out of service)."""
        return self._task is not None and not self._task.done()

    @property
    def owns_route(self) -> bool:
        """May this process claim the route now (always for unordered routes and on SQLite)."""
        return self.lease_name is None or self.keeper.held(self.lease_name)

    async def stop(self) -> None:
        """Finish the delivery in hand, then stop; leases of unsent claims are released."""
        self._stopping = True
        self.route.wake.set()
        if self._task is not None:
            try:
                await asyncio.wait_for(self._task, timeout=30)
            except (TimeoutError, asyncio.CancelledError):
                self._task.cancel()
        if self.lease_name is not None:
            self.keeper.unwant(self.lease_name)

    async def _run(self) -> None:
        """Claim, deliver, settle, until stopped. Survives every error: a store error backs off
        (bounded, never a busy loop), a bug in one delivery fails that delivery, never the worker."""
        r = self.route
        while True:
            try:
                if self._stopping:
                    return
                if not self.owns_route:  # another process has this ordered route: wait for its lease
                    if self.lease_name is not None and self.keeper.yielding(self.lease_name):
                        # balancing gives it to another engine: everything in hand is settled, so
                        # the next holder sees every outcome (order kept, nothing sent twice)
                        await asyncio.to_thread(self.keeper.yielded, self.lease_name)
                    r.wake.clear()
                    await self.keeper.wait_changed(IDLE_POLL)
                    continue
                r.wake.clear()
                lease = queue.Lease()
                limit = 1 if self._retrying else (SHARED_BATCH if self.keeper.shared and not r.ordered else BATCH)
                try:
                    claimed = await asyncio.to_thread(queue.claim, self.store, r.channel, r.name, limit,
                                                      ordered=r.ordered, lease=lease, owner=self.keeper.holder)
                except Exception as e:
                    if lease.ids:  # the lease may have been committed even though the claim failed
                        await self._wait_settled([self.settler.put(queue.Outcome(lease, release=list(lease.ids)))])
                    self._store_error("claim", e)
                    await self._store_pause()
                    continue
                self._store_ok()
                if claimed:
                    ids = list(lease.ids)  # rows leased by this claim: renewed while in hand (unordered)
                    self.keeper.hold_rows(ids)
                    try:
                        await self._process(claimed, lease)
                        await self._wait_settled(self._unsettled)
                    finally:
                        self._unsettled = []
                        self.keeper.drop_rows(ids)
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
            except Exception as e:  # a bug: log it, pause, go on delivering
                log.error("route.worker_error", channel=r.channel, route=r.name, error=f"{type(e).__name__}: {e}"[:300],
                          trace=traceback.format_exc()[-2000:])
                await asyncio.sleep(IDLE_POLL)

    async def _wait_settled(self, futures: list[Future[None]]) -> None:
        """Until the settler has written these results (it retries while the store fails).

        Nothing new is claimed meanwhile: a claim would see these rows still pending. At stop
        the settler gives up after its own bound and the rows' leases run out instead.
        """
        for f in futures:
            try:
                await asyncio.wrap_future(f)
            except Exception as e:
                log.warning("route.unsettled_at_stop", channel=self.route.channel, route=self.route.name,
                            error=str(e)[:200])
                return

    def _store_error(self, op: str, e: Exception) -> None:
        r = self.route
        now = time.monotonic()
        self._store_failures += 1
        if self._store_down_since is None:
            self._store_down_since = self._store_logged = now
            log.error("route.store_unavailable", channel=r.channel, route=r.name, op=op, error=_db_error(e))
        elif now - self._store_logged >= STORE_LOG_EVERY:
            self._store_logged = now
            log.warning("route.store_still_unavailable", channel=r.channel, route=r.name, op=op,
                        error=_db_error(e), seconds=round(now - self._store_down_since, 1))

    def _store_ok(self) -> None:
        if self._store_down_since is not None:
            log.info("route.store_recovered", channel=self.route.channel, route=self.route.name,
                     seconds=round(time.monotonic() - self._store_down_since, 1), failures=self._store_failures)
        self._store_down_since = None
        self._store_failures = 0

    async def _store_pause(self) -> None:
        """Wait before the next store attempt: doubling from STORE_RETRY[0] to STORE_RETRY[1] seconds.

        Cut short by the route's wake event (intake committed: the store is back) or by stop.
        """
        first, most = STORE_RETRY
        delay = min(first * 2 ** max(self._store_failures - 1, 0), most) * random.uniform(0.8, 1.2)
        self.route.wake.clear()
        if self._stopping:
            return
        try:
            await asyncio.wait_for(self.route.wake.wait(), timeout=delay)
        except TimeoutError:
            pass

    def _settle(self, out: queue.Outcome) -> None:
        if out:
            self._unsettled.append(self.settler.put(out))

    async def _process(self, claimed: list[queue.Claimed], lease: queue.Lease) -> None:
        """Deliver one claim, each result handed to the settler as soon as it is known."""
        r = self.route
        for i, c in enumerate(claimed):
            if self._stopping or not self.owns_route:  # stopping, or the route lease was lost: leave the rest
                self._settle(queue.Outcome(lease, release=[x.delivery_id for x in claimed[i:]]))
                return
            out = queue.Outcome(lease)
            try:
                ok = await self._deliver_one(c, out)
            except Exception as e:  # a bug around the delivery: fail this one (backoff), never spin on it
                self._failed(c, f"internal error: {type(e).__name__}", out, permanent=False,
                             trace=traceback.format_exc())
                ok = False
            out.audit_rows.extend(_send_audit(r, c, detail) for _, state, detail in out.done if state == "done")
            if not ok and r.ordered:
                out.release.extend(x.delivery_id for x in claimed[i + 1:])
            self._settle(out)
            if not ok and r.ordered:
                return

    async def _payload(self, c: queue.Claimed) -> bytes:
        """Decrypt one payload just before it is sent: small ones here, large ones (files) in a thread."""
        if not c.in_file and c.size <= DECRYPT_INLINE:
            return queue.open_payload(self.store, c)
        return await asyncio.to_thread(queue.open_payload, self.store, c)

    async def _send(self, env: Envelope) -> str | None:
        """``destination.send`` within the destination's deadline (its ``deadline`` attribute).

        Each destination bounds its own waits; this is the backstop that holds for any
        destination, so no peer can stop a route for longer than its deadline. On expiry the
        send is cancelled (the destination closes its connection) and counted as a failure.
        """
        dest = self.route.destination
        limit = getattr(dest, "deadline", None)
        if not limit:
            return await dest.send(env)
        try:
            async with asyncio.timeout(limit + max(DEADLINE_GRACE[0], limit * DEADLINE_GRACE[1])) as cm:
                return await dest.send(env)
        except TimeoutError:
            if cm.expired():
                raise DeliveryError(f"no result within {limit:g}s (the destination's deadline)") from None
            raise

    async def _deliver_one(self, c: queue.Claimed, out: queue.Outcome) -> bool:
        r = self.route
        # A large chunk-sealed payload goes to a destination that can send it piece by piece
        # as it is decrypted (routes/dicom.py); transforms need the whole message, so not then.
        lazy = None if r.transforms or not getattr(r.destination, "streams_payload", False) else \
            queue.payload_chunks(self.store, c)
        try:
            payload = b"" if lazy is not None else await self._payload(c)
        except IntegrityError as e:  # dead-lettered with a security event; the route goes on
            queue.quarantine(c, str(e), out)
            return True
        env = Envelope(channel=c.channel, kind=c.kind, payload=payload, headers=c.headers,  # type: ignore[arg-type]
                       peer=c.peer, id=c.message_id,
                       received_at=datetime.fromtimestamp(c.received_at, UTC),
                       lineage=(c.parent_id,) if c.parent_id else (), payload_chunks=lazy)
        try:
            outs = await asyncio.to_thread(apply_transforms, r.transforms, env) if r.transforms else [env]
        except Drop as d:
            out.done.append((c.delivery_id, d.state, d.reason or "dropped"))
            if self.metrics:
                self.metrics.filtered.labels(r.channel, r.name).inc()
            log.info(f"route.{d.state}", channel=r.channel, route=r.name, message_id=c.message_id,
                     reason=d.reason)
            return True
        except Exception as e:
            # A transform is deterministic: retrying the same input cannot help. Dead-letter it
            # so a fixed config can be replayed, and say why.
            self._failed(c, f"transform failed: {type(e).__name__}: {e}", out, permanent=True,
                         trace=traceback.format_exc())
            return False
        details = []
        try:
            for o in outs:
                details.append(await self._send(o))
        except DeliveryError as e:
            self._failed(c, str(e), out, permanent=e.permanent, retry_after=e.retry_after, counted=e.counted)
            return False
        except IntegrityError as e:  # a streamed payload's damaged chunk, found while sending
            queue.quarantine(c, str(e), out)
            return True
        except Exception as e:
            self._failed(c, f"{type(e).__name__}: {e}", out, permanent=False, trace=traceback.format_exc())
            return False
        out.done.append((c.delivery_id, "done", "; ".join(d for d in details if d) or None))
        self._retrying = False
        if self.metrics:
            self.metrics.delivered.labels(r.channel, r.name).inc()
        log.debug("route.delivered", channel=r.channel, route=r.name, message_id=c.message_id)
        return True

    def _failed(self, c: queue.Claimed, error: str, out: queue.Outcome, *, permanent: bool,
                trace: str | None = None, retry_after: float | None = None, counted: bool = True) -> None:
        """Record a failed try: retried after the backoff, or dead-lettered.

        ``retry_after`` (a peer's Retry-After) puts the next try no earlier than that, up to
        RETRY_AFTER_MAX, even past ``max_delay``: the backoff bounds how long *we* wait, the
        peer said how long *it* needs. ``counted=False`` leaves ``attempts`` as it was.
        """
        r = self.route
        attempts = c.attempts + 1 if counted else c.attempts
        dead = permanent or attempts >= r.retry.max_attempts
        delay = queue.backoff(attempts, r.retry.initial_delay, r.retry.multiplier, r.retry.max_delay)
        if retry_after is not None:
            delay = max(delay, min(retry_after, RETRY_AFTER_MAX))
        out.failed.append(queue.Failure(c.delivery_id, attempts, error, dead, delay))
        self._retrying = not dead
        if self.metrics:
            self.metrics.failed.labels(r.channel, r.name).inc()
            if dead:
                self.metrics.dead.labels(r.channel, r.name).inc()
        event = "route.dead_lettered" if dead else "route.retry"
        log.warning(event, channel=r.channel, route=r.name, message_id=c.message_id, attempts=attempts,
                    error=error[:300], retry_in=None if dead else round(delay, 2),
                    **({} if retry_after is None else {"retry_after": retry_after, "counted": counted}))
        if trace:
            log.debug("route.failure_trace", message_id=c.message_id, trace=trace)
        if dead:  # audited in the same transaction that dead-letters the row
            out.audit_rows.append({"at": time.time(), "action": "delivery.dead_letter", "outcome": "failure",
                                   "actor": "", "peer": "", "channel": r.channel, "message_id": c.message_id,
                                   "entity": None, "detail": error[:500], "exported": 0})


def _db_error(e: Exception) -> str:
    """The driver's first line (``connection refused``...), not SQLAlchemy's statement and parameters."""
    orig = getattr(e, "orig", None) or e
    text = str(orig).strip().splitlines()
    return f"{type(orig).__name__}: {text[0][:200] if text else ''}"


def _send_audit(route: Route, c: queue.Claimed, detail: str | None) -> dict[str, Any]:
    """The audit row of one delivered message; written with the completion, same transaction."""
    dest = route.destination
    peer = getattr(dest, "peer", None) or ""
    if not peer:
        cfg = getattr(dest, "config", None)
        host, port = getattr(cfg, "host", None), getattr(cfg, "port", None)
        peer = f"{host}:{port}" if host else str(getattr(cfg, "base_url", "") or "")
    return {"at": time.time(), "action": "message.send", "outcome": "success", "actor": "medrelay",
            "peer": peer[:256], "channel": c.channel, "message_id": c.message_id,
            "entity": {"kind": c.kind, "route": route.name, "to": route.to_type or type(dest).__name__},
            "detail": (detail or "")[:500] or None, "exported": 0}
