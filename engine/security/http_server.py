"""An ASGI app served by uvicorn inside the engine's event loop, plain or over our TLS.

For HTTP listeners of the engine itself (the console and admin API; the FHIR listener
does the same in listeners/fhir.py with its own stricter h11 protocol, and can move onto
``tls_protocol``). uvicorn runs as a task in the running loop with its signal handling
off (SIGTERM belongs to the runtime). With TLS, uvicorn serves plain TCP and each
connection is upgraded by ``engine.security.tls.upgrade`` first: given ``ssl=``, uvicorn
lets asyncio do the handshake and asyncio reports a failed one only at debug level, so a
refused client certificate would leave no audit trail. Connections over the cap are
closed at accept, before any handshake (where the CPU goes).
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import Callable, Iterator
from typing import Any

import structlog
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from engine.security.tls import PausedAccept, TLSConfig, server_context, upgrade

log = structlog.get_logger()


class InLoopServer(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield  # the engine's runtime owns SIGINT/SIGTERM


def tls_protocol(inner_class: type[asyncio.Protocol], context: ssl.SSLContext, *, handshake_timeout: float,
                 max_connections: int, on_failure: Callable[[Any, BaseException], None],
                 name: str = "http") -> type[asyncio.Protocol]:
    """A uvicorn ``http`` protocol class: ``inner_class`` behind our own TLS upgrade."""
    pending: set[Any] = set()

    class TLSHttpProtocol(PausedAccept):
        def __init__(self, config: Any, server_state: Any, app_state: Any, _loop: Any = None) -> None:
            self.inner = inner_class(config=config, server_state=server_state, app_state=app_state,  # type: ignore[call-arg]
                                     _loop=_loop)
            self.connections = server_state.connections
            super().__init__(self._upgrade)

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            if len(self.connections) + len(pending) >= max_connections:
                log.warning(f"{name}.connection_refused", reason="max_connections", limit=max_connections)
                transport.abort()
                return
            pending.add(self)
            super().connection_made(transport)

        async def _upgrade(self, transport: asyncio.Transport) -> None:
            try:
                await upgrade(transport, self.inner, context, handshake_timeout=handshake_timeout,
                              on_failure=on_failure)
            finally:
                pending.discard(self)

    return TLSHttpProtocol


class AppServer:
    """``app`` on ``host:port`` until stopped; ``address`` is the bound (host, port)."""

    def __init__(self, app: Any, host: str, port: int, *, tls: TLSConfig | None = None, name: str = "http",
                 max_connections: int = 100, handshake_timeout: float = 10.0, idle_timeout: float = 15.0,
                 max_header_bytes: int = 16 * 1024,
                 on_tls_failure: Callable[[Any, BaseException], None] | None = None) -> None:
        self.name = name
        http: type[asyncio.Protocol] = H11Protocol
        if tls is not None:  # the context is built now: fail at start, not on the first handshake
            http = tls_protocol(H11Protocol, server_context(tls), handshake_timeout=handshake_timeout,
                                max_connections=max_connections, name=name,
                                on_failure=on_tls_failure or (lambda peer, e: None))
        self.config = uvicorn.Config(
            app, host=host, port=port, log_config=None, access_log=False,  # URLs carry search values: never logged
            lifespan="off", server_header=False, proxy_headers=False, timeout_graceful_shutdown=3,
            http=http, ws="none", timeout_keep_alive=int(max(1, idle_timeout)),  # type: ignore[arg-type]
            limit_concurrency=max_connections, h11_max_incomplete_event_size=max_header_bytes)
        self._server: InLoopServer | None = None
        self._task: asyncio.Task[None] | None = None

    async def _serve(self) -> None:
        assert self._server is not None
        try:
            await self._server.serve()
        except SystemExit:  # uvicorn exits the process on bind errors; turn that into an error
            raise RuntimeError(f"{self.name} listener could not start") from None

    async def start(self) -> None:
        self._server = InLoopServer(self.config)
        self._task = asyncio.create_task(self._serve(), name=f"{self.name}-http")
        while not self._server.started:
            if self._task.done():
                self._task.result()
                raise RuntimeError(f"{self.name} listener stopped during startup")
            await asyncio.sleep(0.01)

    async def stop(self) -> None:
        if self._server is None or self._task is None:
            return
        self._server.should_exit = True
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._task, timeout=10)
        self._task = None

    @property
    def address(self) -> tuple[str, int]:
        if self._server is None or not self._server.servers:
            return str(self.config.host), int(self.config.port)
        name = self._server.servers[0].sockets[0].getsockname()
        return str(name[0]), int(name[1])
