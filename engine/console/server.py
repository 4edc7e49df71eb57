"""The console's lifecycle inside the engine: HTTP listener, counter sampler, background reindex."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from typing import Any

import structlog
from ruamel.yaml import YAML

from engine.audit.trail import Audit
from engine.console.auth import LoginLimiter, Sessions
from engine.console.config import ConsoleConfig
from engine.http.protocol import HttpLimits, json_error_body
from engine.http.server import HttpServer
from engine.security.tls import report_handshake_failure
from engine.store import message_terms

log = structlog.get_logger()

SAMPLE_EVERY = 10.0  # seconds between counter samples (sparklines)
SAMPLES = 60  # kept per channel and route: ten minutes


class Sampler:
    """Counter totals every ``SAMPLE_EVERY`` seconds, the last ``SAMPLES`` per channel and route
    (bounded: the config's channels and routes times ``SAMPLES``)."""

    def __init__(self) -> None:
        self._series: dict[str, deque[tuple[float, int, int]]] = {}

    def add(self, key: str, at: float, a: int, b: int) -> None:
        self._series.setdefault(key, deque(maxlen=SAMPLES)).append((at, a, b))

    def history(self, key: str) -> list[list[float]]:
        """[[time, a, b], ...]: a channel's (received, rejected), a route's (delivered, failed)."""
        return [list(x) for x in self._series.get(key, ())]


class Console:
    """The console of one running engine (``runtime``: store, settings, routes, listeners, metrics)."""

    def __init__(self, config: ConsoleConfig, runtime: Any) -> None:
        self.config = config
        self.runtime = runtime
        self.audit: Audit = runtime.audit
        self.sessions = Sessions(runtime.store, config)
        self.limiter = LoginLimiter(config.login, runtime.store)
        self.sampler = Sampler()
        self.started_at = time.time()
        self.ldap: Any = None
        if config.ldap is not None:
            from engine.console.ldap import Directory

            self.ldap = Directory(config.ldap)
        self._server: HttpServer | None = None
        self._tasks: list[asyncio.Task[None]] = []

    @property
    def secure(self) -> bool:
        return self.config.tls is not None

    async def start(self) -> None:
        from engine.console.app import build_app

        app = build_app(self)
        c = self.config
        # the same stack as the HTTP listeners: slowloris timeouts, connection cap, head limits;
        # protocol-level answers in the API's own {"error", "detail"} shape
        limits = HttpLimits.of(c, "", kind="console", error_body=json_error_body)
        self._server = HttpServer(app, c.host, c.port, limits, tls=c.tls, handshake_timeout=c.handshake_timeout,
                                  on_tls_failure=self._tls_failed, label="console", graceful_timeout=3,
                                  proxy=c.proxy_protocol)
        await self._server.start()
        self._tasks = [asyncio.create_task(self._sample(), name="console-sampler"),
                       asyncio.create_task(self._reindex(), name="console-reindex")]
        host, port = self.address
        log.info("console.listening", host=host, port=port, tls=self.secure, ldap=self.ldap is not None)

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        if self._server is not None:
            await self._server.stop()
            self._server = None

    @property
    def address(self) -> tuple[str, int]:
        assert self._server is not None
        return self._server.address

    def _tls_failed(self, peer: Any, error: BaseException) -> None:
        report_handshake_failure(self.audit, "console", "", peer, error)

    def wake(self) -> None:
        """Replayed deliveries are due now: wake every route worker (called from a thread)."""
        rt = self.runtime
        loop = self._loop
        if loop is not None:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(rt._wake, set(rt.routes))

    @property
    def _loop(self) -> asyncio.AbstractEventLoop | None:
        t = self._tasks[0] if self._tasks else None
        return t.get_loop() if t is not None else None

    def channel_yaml(self, name: str) -> str:
        """The channel's section of the YAML file as written (secrets there are ${...} references)."""
        import io

        try:
            doc = YAML(typ="rt").load(self.runtime.settings.path.read_text(encoding="utf-8"))
            section = doc["channels"][name]
        except Exception as e:
            return f"# the config file could not be read: {type(e).__name__}"
        buf = io.StringIO()
        YAML(typ="rt").dump({name: section}, buf)
        return buf.getvalue()

    # -- background ----------------------------------------------------------------------
    async def _sample(self) -> None:
        rt = self.runtime
        while True:
            reg = rt.metrics.registry if rt.metrics is not None else None
            if reg is not None:
                now = time.time()

                def value(metric: str, reg: Any = reg, **labels: str) -> int:
                    return int(reg.get_sample_value(metric, labels) or 0)

                for ch in rt.settings.channels:
                    self.sampler.add(ch, now, value("medrelay_messages_received_total", channel=ch),
                                     value("medrelay_messages_rejected_total", channel=ch))
                for ch, r in list(rt.routes):
                    self.sampler.add(f"{ch}/{r}", now,
                                     value("medrelay_deliveries_delivered_total", channel=ch, route=r),
                                     value("medrelay_delivery_failures_total", channel=ch, route=r))
            await asyncio.sleep(SAMPLE_EVERY)

    async def _reindex(self) -> None:
        """Fill in the blind terms of messages stored before the index existed, in small batches
        with pauses (intake shares the database), then stop."""
        total = 0
        while True:
            try:
                n = await asyncio.to_thread(message_terms.reindex, self.runtime.store)
            except Exception as e:  # another engine doing the same batch, the store away: later
                log.warning("console.reindex_failed", error=type(e).__name__)
                n = -1
            if n == 0:
                if total:
                    log.info("console.reindexed", messages=total)
                return
            total += max(n, 0)
            await asyncio.sleep(self.config.reindex_pause if n > 0 else 30.0)
