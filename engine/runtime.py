"""Starting and stopping an engine: store, intake, route workers, listeners, metrics.

Order matters for the durability contract: workers and intake start before
listeners accept anything; on stop, listeners close first (no new work), intake
commits what it has, then workers finish the delivery in hand.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import socket
from typing import Any

import structlog

from engine import queue, registry
from engine.audit.trail import Audit
from engine.config import Settings
from engine.context import ComponentContext
from engine.envelope import Envelope
from engine.intake import Intake
from engine.match import matches
from engine.metrics import Metrics
from engine.ops.health import Readiness, readiness
from engine.ops.singleton import Keeper, Settler, Singleton
from engine.pipeline import Route, RouteWorker
from engine.security.crypto import KeyRing
from engine.store import dedupe
from engine.store.db import Store, owner_lock_file

log = structlog.get_logger()

DEDUPE_SWEEP_EVERY = 300.0  # seconds between sweeps of expired duplicate-window keys


class StartError(RuntimeError):
    """The engine cannot start, said in one line an operator can act on (`medrelay run` exits 4)."""


def listen_error(what: str, host: str, port: int, error: BaseException) -> StartError:
    """``channel adt-in: port 2575 on 127.0.0.1 is already in use``, for every kind of listener.

    Listeners report a failed bind differently (asyncio and socketserver raise OSError,
    uvicorn logs it and exits), so the OSError is looked for along the exception chain,
    and if none is there the address is probed once to learn why.
    """
    err: BaseException | None = error
    while err is not None and not isinstance(err, OSError):
        err = err.__cause__ or err.__context__
    if err is None and port:
        try:
            socket.create_server((host, port)).close()
        except OSError as probe:
            err = probe
    code = getattr(err, "errno", None)
    if isinstance(err, socket.gaierror):
        return StartError(f"{what}: cannot resolve host {host!r} to listen on")
    if code == errno.EADDRINUSE:
        return StartError(f"{what}: port {port} on {host} is already in use")
    if code == errno.EACCES:
        return StartError(f"{what}: no permission to listen on port {port} on {host} "
                          "(ports below 1024 need privileges)")
    if code == errno.EADDRNOTAVAIL:
        return StartError(f"{what}: cannot listen on {host}: not an address of this machine")
    reason = str(err or error).strip().splitlines()[0][:200] if str(err or error).strip() else type(error).__name__
    return StartError(f"{what}: cannot listen on {host}:{port}: {reason}")


def open_store(settings: Settings, *, migrate: bool = True, newer_ok: bool = False) -> Store:
    """The store of ``settings``, migrated unless ``migrate`` is False (an offline command decides
    first, engine.cli.main._open_store); ``newer_ok`` as ``Store.migrate``."""
    keyring = KeyRing(settings.resolve(settings.keys.kek_file))
    store = Store(settings.store_url(), settings.blob_files(), keyring,
                  inline_max=settings.store.inline_max_bytes)
    if migrate:
        store.migrate(newer_ok=newer_ok)
    return store


def _single_owner_lock(store: Store) -> Any:
    """One engine per SQLite store: its queue has no leases, so a second owner would double-send."""
    import fcntl

    db = store.url.database or ""
    if not db or db == ":memory:":
        return None
    f = owner_lock_file(db)  # held for the runtime's life
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        raise RuntimeError(f"another medrelay engine is running on {db}") from None
    return f


class Runtime:
    def __init__(self, settings: Settings, *, reloading: bool = False) -> None:
        self.settings = settings
        self.reloading = reloading  # a SIGHUP restart of a running engine: a newer schema does not stop it
        self.store: Store | None = None
        self.intake: Intake | None = None
        self.metrics: Metrics | None = None
        self.audit: Audit | None = None
        self.audit_exporter: Any = None
        self.routes: dict[tuple[str, str], Route] = {}
        self.workers: list[RouteWorker] = []
        self.listeners: dict[str, Any] = {}
        self._by_channel: dict[str, list[Route]] = {}
        self._lock: Any = None
        self.started = False
        self.alerts: Any = None
        self.pruner: Any = None
        self.console: Any = None
        self.keeper: Keeper | None = None  # this process's leases (ordered routes, singletons)
        self.settler: Settler | None = None  # delivery outcomes, group-committed
        self.singletons: list[Singleton] = []

    # -- helpers -------------------------------------------------------
    def _ctx(self, channel: str = "", route: str = "") -> ComponentContext:
        assert self.store is not None and self.audit is not None
        return ComponentContext(settings=self.settings, store=self.store, keyring=self.store.keyring,
                                audit=self.audit, channel=channel, route=route, intake=self.intake)

    def _router(self, env: Envelope) -> list[str]:
        return [r.name for r in self._by_channel.get(env.channel, ()) if matches(r.when, env)]

    def _wake(self, pairs: set[tuple[str, str]]) -> None:
        for key in pairs:
            route = self.routes.get(key)
            if route is not None:
                route.wake.set()

    def listener(self, channel: str) -> Any:
        return self.listeners[channel]

    # -- lifecycle -----------------------------------------------------
    async def start(self) -> None:
        s = self.settings
        registry.load_builtins()
        self.store = await asyncio.to_thread(functools.partial(open_store, s, newer_ok=self.reloading))
        if self.store.is_sqlite:
            self._lock = _single_owner_lock(self.store)
            released = await asyncio.to_thread(queue.release_leases, self.store)
            if released:
                log.info("queue.leases_released", count=released)
        self.keeper = Keeper(self.store)
        self.keeper.start()
        self.settler = Settler(self.store)
        self.settler.start()
        windows = {name: ch.dedupe_window for name, ch in s.channels.items()}
        await asyncio.to_thread(dedupe.backfill, self.store, windows)
        self.audit = Audit(self.store)
        if s.audit.syslog is not None:
            from engine.audit.syslog import SyslogExporter

            self.keeper.want("audit-export")  # one exporter at a time across engines
            self.audit_exporter = SyslogExporter(self.store, s.audit.syslog, source_id=s.audit.source_id,
                                                 site_id=s.audit.site_id,
                                                 held=self._held("audit-export"))
            await self.audit_exporter.start()
        self.metrics = Metrics(self.store)
        if s.metrics.port is not None:
            try:
                port = self.metrics.serve(s.metrics.host, s.metrics.port, readiness=self.readiness)
            except Exception as e:
                raise listen_error("metrics", s.metrics.host, s.metrics.port, e) from e
            log.info("metrics.listening", host=s.metrics.host, port=port)
        quiet = {(name, r.name): (r.debounce.key, r.debounce.seconds)
                 for name, ch in s.channels.items() for r in ch.routes if r.debounce is not None}
        self.intake = Intake(self.store, config_hash=s.config_hash, router=self._router,
                             dedupe_window=lambda ch: windows.get(ch, 0.0), on_commit=self._wake,
                             metrics=self.metrics, debounce=lambda ch, r: quiet.get((ch, r)))
        await self.intake.start()
        for cname, ch in s.channels.items():
            if not ch.enabled:
                continue
            for rc in ch.routes:
                ctx = self._ctx(cname, rc.name)
                transforms = [registry.get("transform", t.type).factory(t, ctx) for t in rc.transforms]
                dest = registry.get("destination", rc.to.type).factory(rc.to, ctx)
                route = Route(channel=cname, name=rc.name, when=dict(rc.when), transforms=transforms,
                              destination=dest, retry=rc.retry, ordered=rc.ordered and rc.debounce is None,
                              to_type=rc.to.type)
                self.routes[(cname, rc.name)] = route
                self._by_channel.setdefault(cname, []).append(route)
        for route in self.routes.values():
            w = RouteWorker(route, self.store, self.metrics, self.audit, keeper=self.keeper, settler=self.settler)
            w.start()
            self.workers.append(w)
        for cname, ch in s.channels.items():
            if not ch.enabled:
                continue
            lst = registry.get("source", ch.source.type).factory(ch.source, self._ctx(cname))
            try:
                await lst.start()
            except StartError:  # the source said why in its own words (a folder, a database)
                raise
            except Exception as e:
                raise listen_error(f"channel {cname}", str(getattr(ch.source, "host", "")),
                                   int(getattr(ch.source, "port", 0) or 0), e) from e
            self.listeners[cname] = lst
            host, port = lst.address
            log.info("channel.listening", channel=cname, type=ch.source.type, host=host, port=port)
        if s.alerts is not None:
            from engine.ops.alerts import AlertMonitor

            self.keeper.want("alerts")  # the store-wide checks: one engine; each watches its own listeners
            self.alerts = AlertMonitor(s.alerts, self.store, routes=lambda: list(self.routes),
                                       down_channels=self._down_channels, attempts=self._attempt_counts,
                                       engine_id=self.keeper.holder, shared=self._held("alerts"))
            self.alerts.start()
        limits = {name: ch.retention for name, ch in s.channels.items() if ch.retention is not None}
        if limits:
            from engine.ops.retention import Pruner

            self.keeper.want("retention")  # one pruner at a time across engines
            self.pruner = Pruner(self.store, limits, s.retention,
                                 held=self._held("retention"))
            self.pruner.start()
        sweep = Singleton(self.keeper, "dedupe-sweep", self._sweep_dedupe, interval=DEDUPE_SWEEP_EVERY)
        sweep.start()
        self.singletons.append(sweep)
        if s.console is not None:
            from engine.console.server import Console

            self.console = Console(s.console, self)
            try:
                await self.console.start()
            except Exception as e:
                raise listen_error("console", s.console.host, s.console.port, e) from e
        self.started = True
        self.audit.record("engine.start", actor="medrelay", detail=f"config {s.config_hash[:12]}")
        log.info("engine.started", channels=len(self.listeners), routes=len(self.routes),
                 config_hash=s.config_hash[:12])

    def _held(self, name: str) -> Any:
        """A callable telling whether this process holds the lease ``name`` now (a singleton's turn)."""
        return lambda: self.keeper is not None and self.keeper.held(name)

    async def _sweep_dedupe(self, held: Any) -> None:
        """Delete expired duplicate-window keys in bounded batches while this process holds the job."""
        assert self.store is not None
        while held() and await asyncio.to_thread(dedupe.sweep, self.store):
            await asyncio.sleep(0.05)

    def _down_channels(self) -> list[str]:
        """Enabled channels whose listener is not serving (never started, or says it stopped)."""
        out = []
        for name, ch in self.settings.channels.items():
            lst = self.listeners.get(name)
            if ch.enabled and (lst is None or not getattr(lst, "serving", True)):
                out.append(name)
        return out

    def _attempt_counts(self) -> dict[tuple[str, str], tuple[int, int]]:
        """(failed, delivered) attempts per route so far, from the Prometheus counters."""
        reg = self.metrics.registry if self.metrics is not None else None
        out: dict[tuple[str, str], tuple[int, int]] = {}
        for ch, name in self.routes:
            labels = {"channel": ch, "route": name}
            failed = reg.get_sample_value("medrelay_delivery_failures_total", labels) if reg else None
            done = reg.get_sample_value("medrelay_deliveries_delivered_total", labels) if reg else None
            out[(ch, name)] = (int(failed or 0), int(done or 0))
        return out

    def readiness(self) -> Readiness:
        """What /readyz answers (engine/ops/health.py); called from the metrics server's thread."""
        s = self.settings
        return readiness(
            started=self.started, store=self.store,
            expected_channels=[name for name, ch in s.channels.items() if ch.enabled],
            listeners=dict(self.listeners),
            workers_alive=lambda: [f"{w.route.channel}/{w.route.name}" for w in list(self.workers) if not w.alive],
            routes=[(r.channel, r.name, r.ordered) for r in list(self.routes.values())],
            stall_after=s.metrics.stall_after)

    async def stop(self) -> None:
        self.started = False  # /readyz fails at once: a load balancer stops sending while we drain
        if self.console is not None:
            await self.console.stop()
            self.console = None
        if self.alerts is not None:
            await self.alerts.stop()
            self.alerts = None
        if self.pruner is not None:
            await self.pruner.stop()
            self.pruner = None
        for cname, lst in list(self.listeners.items()):
            try:
                await lst.stop()
            except Exception as e:
                log.error("channel.stop_failed", channel=cname, error=str(e)[:200])
        self.listeners.clear()
        if self.intake is not None:
            await self.intake.stop()
        await asyncio.gather(*(w.stop() for w in self.workers), return_exceptions=True)
        self.workers.clear()
        if self.settler is not None:
            await asyncio.to_thread(self.settler.stop)
        for job in self.singletons:
            await job.stop()
        self.singletons.clear()
        for route in self.routes.values():
            try:
                await route.destination.close()
            except Exception as e:
                log.error("route.close_failed", route=route.name, error=str(e)[:200])
        self.routes.clear()
        self._by_channel.clear()
        if self.metrics is not None:
            self.metrics.close()
        if self.audit is not None:
            await asyncio.to_thread(self.audit.close)  # the queued rows of reads, before the store closes
            self.audit.record("engine.stop", actor="medrelay")
        if self.audit_exporter is not None:
            await self.audit_exporter.stop()  # flushes briefly; the rest stays queued in the store
            self.audit_exporter = None
        if self.keeper is not None:
            await asyncio.to_thread(self.keeper.stop)  # leases released: the other engines take over now
            self.keeper = None
        if self.store is not None:
            self.store.dispose()
        if self._lock is not None:
            self._lock.close()
            self._lock = None
        log.info("engine.stopped")
