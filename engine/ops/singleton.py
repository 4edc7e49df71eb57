"""One doer at a time across engine processes, and the queue bookkeeping each process shares.

``Keeper`` (one per process) holds the process's named leases (engine/store/leases.py): an
ordered route's claimer, the audit export, the retention pruner, the store-wide alerts, the
dedupe-key sweep. Every ``TICK`` seconds one transaction renews what it holds, takes what it
wants that has run out, and extends the row leases of the deliveries its workers have in
hand. ``held(name)`` is judged by the local monotonic clock: a lease counts as held until
``LEASE`` seconds after the renewal that was *sent* (minus a margin), so a process cut off
from the database stops acting before the row's ``until`` (database clock) lets another
process take over. Killed, its leases run out and move within ``LEASE + TICK`` seconds.

``Settler`` (one per process) writes delivery outcomes as they come (each delivery is marked
done when it completes, not after its batch), group-committing whatever the route workers
produce within ``SETTLE_LINGER`` of the first one in one transaction (a transaction per
delivery cost more CPU than the delivery); while the store fails it keeps them, in order,
and tries again with a bounded backoff.

``Singleton`` runs an async job only while this process holds its lease.

Ordered routes' leases are spread over the engines: every engine with ordered routes holds a
presence lease (``engine:<holder>``), so each knows how many such engines run; one that holds
more than its share of the route leases it wants (``ceil(routes / engines)``) gives the
surplus up. Not at once: the
route's worker first finishes and settles what it has in hand (``held`` says no to a yielding
lease, so it claims nothing more) and then calls ``yielded``, which releases the lease; the
next holder's claims see every outcome written, so the order holds and nothing is sent twice.
An engine that has its share takes a free route lease only once it has been free for a
while (``tick``'s ``patient``), leaving it to engines with less; so the yielded lease goes
elsewhere, yet a route nobody else wants (other engines without it in their configuration)
is still taken, after that grace (a pause of a few seconds); having seen that, the engine
gives nothing up for ``KEEP_FOR`` (the engines' routes differ; each try would pause a route).

On SQLite there is one engine per store (lock file): every lease is held at once and no
thread runs; the settler is the same.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue as stdqueue
import random
import threading
import time
from collections.abc import Awaitable, Callable, Iterable
from concurrent.futures import Future
from typing import Any

import structlog
from sqlalchemy.exc import OperationalError

from engine import queue
from engine.store import leases

log = structlog.get_logger()

LEASE = 5.0  # seconds a named lease lasts without renewal
TICK = 1.0  # seconds between renewals
MARGIN = 1.0  # held() says no this long before the lease could run out
SETTLE_RETRY = (0.25, 2.0)  # seconds between settle attempts while the store fails: first, most
SETTLE_LINGER = 0.01  # seconds the settler waits for more outcomes after the first (group commit)
SETTLE_MAX = 256  # outcomes per transaction at most
LOG_EVERY = 30.0
FORGET_EVERY = 60  # ticks between sweeps of presence leases of engines gone long ago
FORGET_AFTER = 3600.0  # seconds a dead engine's presence row is kept
TAKEN_BACK = 60.0  # a yielded route lease this process takes again within this long: nobody else wanted it
KEEP_FOR = 600.0  # ... and it is not yielded again for this long (each try stalls the route for the grace)


def _share(routes: int, engines: int) -> int:
    """The route leases one engine should hold: an even split, rounded up."""
    return -(-routes // max(engines, 1))


class Keeper:
    """This process's named leases and its row-lease renewals (see the module docstring)."""

    def __init__(self, store: Any, *, holder: str | None = None, lease: float = LEASE, tick: float = TICK) -> None:
        self.store = store
        self.shared = not store.is_sqlite
        self.holder = holder or leases.holder_id()
        self.lease, self.every = lease, tick
        self._wanted: set[str] = set()
        self._deadline: dict[str, float] = {}
        self._rows: dict[int, int] = {}  # delivery id -> number of claims holding it (normally 1)
        self._known: set[str] = set()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._failing_since: float | None = None
        self._logged = 0.0
        self.ticks = 0
        self._yielding: set[str] = set()  # route leases being given up once their worker is idle
        self._given: dict[str, float] = {}  # route lease -> when this process yielded it (monotonic)
        self._keep: dict[str, float] = {}  # route lease -> until when not to yield it (nobody else took it)
        self.engines = 1  # engine processes on the store, as of the last tick (route lease balancing)
        self.presence = f"{leases.ENGINE_PREFIX}{self.holder}"

    # -- what workers ask ---------------------------------------------------------
    def want(self, name: str) -> None:
        """Ask for a lease; taken at the next tick when free (at once on SQLite)."""
        with self._lock:
            new = name not in self._wanted
            self._wanted.add(name)
        if new:
            self._wake.set()

    def unwant(self, name: str) -> None:
        with self._lock:
            self._wanted.discard(name)
            had = self._deadline.pop(name, None) is not None
        if had and self.shared:
            with contextlib.suppress(Exception), self.store.queue_tx() as conn:
                leases.release(conn, self.holder, [name])

    def held(self, name: str) -> bool:
        if not self.shared:
            return name in self._wanted
        return time.monotonic() < self._deadline.get(name, 0.0) and name not in self._yielding

    def yielding(self, name: str) -> bool:
        """This process is giving ``name`` up (balancing): its worker should finish and call ``yielded``."""
        return name in self._yielding

    def yielded(self, name: str) -> None:
        """The worker of a yielding lease has nothing in hand (all settled): release it now."""
        with self._lock:
            if name not in self._yielding:
                return
            self._yielding.discard(name)
            self._deadline.pop(name, None)
            self._given[name] = time.monotonic()
        try:
            with self.store.queue_tx() as conn:
                leases.release(conn, self.holder, [name])
        except Exception as e:  # not renewed any more either way: it runs out within LEASE
            log.warning("lease.release_failed", lease=name, error=_db_error(e))
        log.info("lease.yielded", lease=name, holder=self.holder, engines=self.engines)

    def held_names(self) -> set[str]:
        now = time.monotonic()
        return {n for n, t in self._deadline.items() if t > now} if self.shared else set(self._wanted)

    def hold_rows(self, ids: Iterable[int]) -> None:
        """Deliveries claimed by this process: their leases are renewed until ``drop_rows``."""
        with self._lock:
            for i in ids:
                self._rows[i] = self._rows.get(i, 0) + 1

    def drop_rows(self, ids: Iterable[int]) -> None:
        with self._lock:
            for i in ids:
                n = self._rows.get(i, 0) - 1
                if n > 0:
                    self._rows[i] = n
                else:
                    self._rows.pop(i, None)

    async def wait_changed(self, timeout: float) -> None:
        """Sleep until roughly the next tick (a worker waiting for its route lease)."""
        await asyncio.sleep(min(timeout, self.every))

    # -- lifecycle ----------------------------------------------------------------
    def start(self) -> None:
        if not self.shared or self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="lease-keeper", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop renewing and give every lease up, so other processes take over at once."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(10)
            self._thread = None
        if self.shared:
            names = list(self._deadline)
            self._deadline.clear()
            with contextlib.suppress(Exception), self.store.queue_tx() as conn:
                leases.release(conn, self.holder, names)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.tick_once()
            self._wake.wait(self.every)
            self._wake.clear()

    def tick_once(self) -> None:
        """Renew and take leases, extend row leases, balance route leases: one transaction."""
        with self._lock:
            wanted = set(self._wanted)
            rows = list(self._rows)
            routes = sorted(n for n in wanted if n.startswith(queue.ROUTE_LEASE_PREFIX))
            if routes:  # counted by the other engines with ordered routes (balancing)
                wanted.add(self.presence)
            now = time.monotonic()
            mine = [n for n in routes if self._deadline.get(n, 0.0) > now]
        # with its share already, this engine leaves free route leases to the others for a while
        patient = [n for n in routes if n not in mine] if len(mine) >= _share(len(routes), self.engines) else []
        sent = time.monotonic()
        try:
            with self.store.queue_tx() as conn:
                got = leases.tick(conn, self.holder, wanted, self.lease, self._known, patient=patient,
                                  grace=self.lease + 2 * self.every)
                if rows:
                    queue.renew_rows(conn, self.holder, rows)
                if routes:
                    self.engines = max(1, leases.live_engines(conn))
                if self.ticks % FORGET_EVERY == 0:
                    leases.forget_engines(conn, FORGET_AFTER)
        except Exception as e:
            self._known.clear()  # the rows may be gone (a restored database): create them again
            now = time.monotonic()
            if self._failing_since is None or now - self._logged >= LOG_EVERY:
                self._failing_since = self._failing_since or now
                self._logged = now
                log.warning("lease.renew_failed", error=_db_error(e), holding=sorted(self.held_names()))
            return
        if self._failing_since is not None:
            log.info("lease.renew_recovered", seconds=round(time.monotonic() - self._failing_since, 1))
            self._failing_since = None
        self.ticks += 1
        until = sent + self.lease - MARGIN
        with self._lock:
            before = {n for n, t in self._deadline.items() if t > sent}
            for n in wanted:
                if n in got:
                    self._deadline[n] = until
                else:
                    self._deadline.pop(n, None)
        for n in sorted(set(got) - before):
            log.info("lease.acquired", lease=n, holder=self.holder)
            given = self._given.pop(n, None)
            if given is not None and sent - given < TAKEN_BACK:
                # yielded and nobody took it (the other engines do not have this route): keep it
                self._keep[n] = sent + KEEP_FOR
        for n in sorted(before - set(got)):
            log.warning("lease.lost", lease=n, holder=self.holder)
        if routes:
            self._balance(sorted(n for n in got if n in routes), _share(len(routes), self.engines))

    def _balance(self, held_routes: list[str], share: int) -> None:
        """Mark route leases beyond this engine's share as yielding (or take marks back when the
        share grew, e.g. another engine stopped)."""
        now = time.monotonic()
        with self._lock:
            self._yielding &= set(held_routes)  # released or lost meanwhile
            self._keep = {n: t for n, t in self._keep.items() if t > now}
            keep = [n for n in held_routes if n not in self._yielding]
            if len(keep) > share and not self._keep:  # (a lease nobody took: the others' routes differ)
                give = keep[share:]
                self._yielding.update(give)
            elif len(keep) < share and self._yielding:
                give = []
                self._yielding -= set(sorted(self._yielding)[:share - len(keep)])
            else:
                give = []
        for n in give:
            log.info("lease.yielding", lease=n, holder=self.holder, engines=self.engines, share=share)


class Settler:
    """Writes delivery outcomes as they come, group-committed (see the module docstring)."""

    def __init__(self, store: Any) -> None:
        self.store = store
        self._q: stdqueue.SimpleQueue[tuple[queue.Outcome, Future[None]] | None] = stdqueue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.commits = 0

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="queue-settler", daemon=True)
            self._thread.start()

    def put(self, outcome: queue.Outcome) -> Future[None]:
        f: Future[None] = Future()
        if not outcome:
            f.set_result(None)
            return f
        if self._thread is None:
            self.start()
        self._q.put((outcome, f))
        return f

    def stop(self, timeout: float = 10.0) -> None:
        """Write what is queued (for up to ``timeout`` seconds while the store fails), then stop."""
        self._stopping = True
        if self._thread is not None:
            self._q.put(None)
            self._thread.join(timeout)
            self._thread = None

    def _run(self) -> None:
        pending: list[tuple[queue.Outcome, Future[None]]] = []
        failures, down_since, logged = 0, 0.0, 0.0
        stop_at: float | None = None
        while True:
            if not pending:
                if stop_at is not None:
                    return
                item = self._q.get()
                if item is None:
                    return
                pending.append(item)
                linger_until = time.monotonic() + SETTLE_LINGER
            else:
                linger_until = 0.0  # retrying after a failure: take what is there, no wait
            while len(pending) < SETTLE_MAX:
                try:
                    left = linger_until - time.monotonic()
                    item = self._q.get(timeout=left) if left > 0 else self._q.get_nowait()
                except stdqueue.Empty:
                    break
                if item is None:
                    stop_at = time.monotonic() + 10.0
                    linger_until = 0.0
                else:
                    pending.append(item)
            try:
                queue.settle_all(self.store, [o for o, _ in pending])
            except Exception as e:
                if _transient(e):  # the store is away: keep everything, try again
                    error = _db_error(e)
                else:  # one outcome the database refuses must not hold the others
                    log.error("queue.settle_failed", error=_db_error(e), outcomes=len(pending))
                    pending = self._one_by_one(pending)
                    error = "see queue.settle_failed"
            else:
                for _, f in pending:
                    f.set_result(None)
                pending = []
                self.commits += 1
            if not pending:
                if failures:
                    log.info("queue.settle_recovered", seconds=round(time.monotonic() - down_since, 1),
                             failures=failures)
                failures = 0
                continue
            now = time.monotonic()
            if failures == 0:
                down_since = logged = now
                log.error("queue.settle_unavailable", outcomes=len(pending), error=error)
            elif now - logged >= LOG_EVERY:
                logged = now
                log.warning("queue.settle_still_unavailable", outcomes=len(pending), error=error,
                            seconds=round(now - down_since, 1))
            failures += 1
            if stop_at is not None and now >= stop_at:
                log.warning("queue.unsettled_at_stop", outcomes=len(pending))
                for _, f in pending:
                    f.set_exception(RuntimeError("store unavailable at stop"))
                return
            first, most = SETTLE_RETRY
            time.sleep(min(first * 2 ** (failures - 1), most) * random.uniform(0.8, 1.2))

    def _one_by_one(self, pending: list[tuple[queue.Outcome, Future[None]]]
                    ) -> list[tuple[queue.Outcome, Future[None]]]:
        keep = []
        for o, f in pending:
            try:
                queue.settle_all(self.store, [o])
            except Exception as e:
                if _transient(e):
                    keep.append((o, f))
                    continue
                # refused for good: the rows' leases run out, the deliveries are tried again
                log.error("queue.outcome_refused", error=_db_error(e),
                          deliveries=[x[0] for x in o.done] + [x.delivery_id for x in o.failed])
                f.set_result(None)
            else:
                f.set_result(None)
        return keep


class Singleton:
    """Run ``job`` every ``interval`` seconds, only while this process holds ``name``.

    ``job`` gets a callable telling whether the lease is still held, to stop between bounded
    steps when it is lost. Errors are logged and the job runs again at its next turn.
    """

    def __init__(self, keeper: Keeper, name: str, job: Callable[[Callable[[], bool]], Awaitable[Any]],
                 interval: float) -> None:
        self.keeper, self.name, self.job, self.interval = keeper, name, job, interval
        self._task: asyncio.Task[None] | None = None
        self.runs = 0

    def start(self) -> None:
        self.keeper.want(self.name)
        self._task = asyncio.create_task(self._run(), name=f"singleton-{self.name}")

    async def _run(self) -> None:
        while True:
            if not self.keeper.held(self.name):
                await asyncio.sleep(min(self.keeper.every, self.interval))
                continue
            try:
                await self.job(lambda: self.keeper.held(self.name))
                self.runs += 1
            except Exception as e:
                log.warning("singleton.failed", job=self.name, error=type(e).__name__)
            await asyncio.sleep(self.interval)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        self.keeper.unwant(self.name)


def _transient(e: BaseException) -> bool:
    """The store is unreachable or failing (try again later), not refusing this data: SQLAlchemy's
    OperationalError, or the driver's own (psycopg raises it directly at a pipeline's end)."""
    if isinstance(e, OperationalError):
        return True
    orig = getattr(e, "orig", None) or e
    return any(c.__name__ in ("OperationalError", "InterfaceError") for c in type(orig).__mro__)


def _db_error(e: Exception) -> str:
    """The driver's first line, not SQLAlchemy's statement and parameters."""
    orig = getattr(e, "orig", None) or e
    text = str(orig).strip().splitlines()
    return f"{type(orig).__name__}: {text[0][:200] if text else ''}"


__all__ = ["LEASE", "TICK", "Keeper", "Settler", "Singleton"]
