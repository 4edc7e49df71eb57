"""An ASGI app served by uvicorn inside the engine's event loop, plain or over our TLS.

uvicorn runs as a task in the running loop (no extra process, no second loop) with its
signal handling off (SIGTERM belongs to the runtime, which stops listeners in order), on
the guarded h11 protocol of ``engine.http.protocol`` also when httptools is installed, so
the limits never depend on what else is in the venv. With TLS, uvicorn serves plain TCP
and each connection is upgraded by ``engine.security.tls.upgrade`` first: given ``ssl=``,
uvicorn lets asyncio do the handshake and asyncio reports a failed one only at debug
level, so a refused client certificate would leave no audit trail.

Used by the FHIR, DICOMweb and HTTP source listeners (through listeners/http_common.py)
and by the console (engine/console/server.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import Callable, Iterator
from typing import Any

import structlog
import uvicorn

from engine.http.protocol import GuardedH11Protocol, HttpLimits, admit, client_key, protocol_class
from engine.security import proxy_protocol
from engine.security.proxy_protocol import ProxyProtocolConfig
from engine.security.tls import PausedAccept, TLSConfig, server_context, upgrade

log = structlog.get_logger()
TlsFailure = Callable[[Any, BaseException], None]


class InLoopServer(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield  # the engine's runtime owns SIGINT/SIGTERM


def tls_protocol(inner_class: type[GuardedH11Protocol], context: ssl.SSLContext, *, handshake_timeout: float,
                 on_failure: TlsFailure) -> type[asyncio.Protocol]:
    """A uvicorn ``http`` protocol class: ``inner_class`` behind our own TLS upgrade.

    The connection caps apply at accept (connections in their handshake count, through
    ``inner_class.pending``; the client's place under ``max_connections_per_client`` is taken
    here and handed to the inner protocol, or given back if the handshake fails), so
    connections over them cost no handshake; a handshake gets ``handshake_timeout``; the HTTP
    timeouts start when it is done.
    """
    limits: HttpLimits = inner_class.limits
    pending: set[Any] = inner_class.pending

    class TLSHttpProtocol(PausedAccept):
        def __init__(self, config: Any, server_state: Any, app_state: Any, _loop: Any = None) -> None:
            self.inner = inner_class(config=config, server_state=server_state, app_state=app_state,
                                     _loop=_loop, admitted=True)
            self.connections = server_state.connections
            super().__init__(self._upgrade)

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            client = client_key(self.inner.announced, transport)
            if not admit(limits, len(self.connections) + len(pending), inner_class.slots, client,
                         inner_class.refusals):
                transport.abort()
                return
            self.inner.hold(client)
            pending.add(self)
            super().connection_made(transport)

        async def _upgrade(self, transport: asyncio.Transport) -> None:
            loop = asyncio.get_running_loop()

            def failed(peer: Any, error: BaseException) -> None:  # in a thread: the audit row is written here
                loop.call_soon_threadsafe(self.inner.release)  # the place first, not after the row
                on_failure(self.inner.announced or peer, error)  # behind a trusted balancer: its client

            done = None
            try:
                done = await upgrade(transport, self.inner, context, handshake_timeout=handshake_timeout,
                                     on_failure=failed)
            finally:
                pending.discard(self)
                if done is None:
                    self.inner.release()  # no handshake, so no connection_lost: the place comes back here

    return TLSHttpProtocol


def proxied_protocol(inner_class: type[asyncio.Protocol], config: ProxyProtocolConfig, *, kind: str,
                     channel: str, timeout: float) -> type[asyncio.Protocol]:
    """A uvicorn ``http`` protocol class: ``inner_class`` (plain or TLS) after a PROXY header.

    From a trusted balancer, reading is paused at accept and the header read from the socket
    (``proxy_protocol.read_transport``: nothing after it, a ClientHello stays for the TLS
    upgrade); then the transport is handed to the inner protocol, whose requests carry the
    announced client. Missing or malformed: closed, logged, nothing else read. Others: handed
    over at once."""
    trust = proxy_protocol.Trust(config)
    tasks: set[asyncio.Task[None]] = set()

    class ProxiedHttpProtocol(asyncio.Protocol):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            self.inner = inner_class(*args, **kwargs)

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            assert isinstance(transport, asyncio.Transport)
            peer = transport.get_extra_info("peername")
            if not trust.trusted(peer):
                self._hand_over(transport, None)
                return
            transport.pause_reading()
            task = asyncio.get_running_loop().create_task(self._read(transport, peer))
            tasks.add(task)
            task.add_done_callback(tasks.discard)

        async def _read(self, transport: asyncio.Transport, peer: Any) -> None:
            try:
                header = await proxy_protocol.read_transport(transport, timeout)
            except proxy_protocol.ProxyError as e:
                log.warning(f"{kind}.proxy_header_refused", channel=channel, peer=f"{peer[0]}:{peer[1]}",
                            detail=str(e))
                transport.abort()
                return
            if not transport.is_closing():
                self._hand_over(transport, proxy_protocol.peer_of(header, peer))

        def _hand_over(self, transport: asyncio.Transport, announced: tuple[str, int] | None) -> None:
            h11 = getattr(self.inner, "inner", self.inner)  # the TLS wrapper's h11 protocol
            h11.announced = announced
            transport.resume_reading()  # first: a TLS inner pauses it again in connection_made
            transport.set_protocol(self.inner)
            self.inner.connection_made(transport)

        def connection_lost(self, exc: Exception | None) -> None:
            pass  # while the header was read: its reader sees the end and gives up

    return ProxiedHttpProtocol


class HttpServer:
    """``app`` on ``host:port`` until stopped; ``address`` is the bound (host, port).

    ``limits`` bound every connection (``engine.http.protocol``); ``on_tls_failure`` is
    told of each refused handshake (the caller writes the audit row, it knows the actor).
    The TLS context is built here: a bad certificate fails at start, not on a handshake.
    """

    def __init__(self, app: Any, host: str, port: int, limits: HttpLimits, *, tls: TLSConfig | None = None,
                 handshake_timeout: float = 10.0, on_tls_failure: TlsFailure | None = None,
                 label: str = "HTTP", graceful_timeout: int = 5, proxy: ProxyProtocolConfig | None = None) -> None:
        self.label = label
        self.limits = limits
        inner = protocol_class(limits)
        self._lines = inner.refusals  # its throttled lines: the counts still held back are logged at stop
        http: type[asyncio.Protocol] = inner
        if tls is not None:
            http = tls_protocol(inner, server_context(tls), handshake_timeout=handshake_timeout,
                                on_failure=on_tls_failure or (lambda peer, e: None))
        if proxy is not None:
            http = proxied_protocol(http, proxy, kind=limits.kind, channel=limits.channel,
                                    timeout=min(proxy.timeout, handshake_timeout))
        self.config = uvicorn.Config(
            app, host=host, port=port, log_config=None,
            access_log=False,  # request lines carry search values (identifiers): never logged
            lifespan="off", server_header=False, proxy_headers=False, timeout_graceful_shutdown=graceful_timeout,
            http=http, ws="none", timeout_keep_alive=limits.idle_timeout,  # type: ignore[arg-type]
            h11_max_incomplete_event_size=limits.max_header_bytes)
        self._server: InLoopServer | None = None
        self._task: asyncio.Task[None] | None = None

    async def _serve(self) -> None:
        assert self._server is not None
        try:
            await self._server.serve()
        except SystemExit:  # uvicorn exits the process on bind errors; turn that into an error
            raise RuntimeError(f"{self.label} listener could not start") from None

    async def start(self) -> None:
        self._server = InLoopServer(self.config)
        name = f"{self.limits.kind}-{self.limits.channel}" if self.limits.channel else f"{self.limits.kind}-http"
        self._task = asyncio.create_task(self._serve(), name=name)
        while not self._server.started:
            if self._task.done():
                self._task.result()
                raise RuntimeError(f"{self.label} listener stopped during startup")
            await asyncio.sleep(0.01)

    async def stop(self) -> None:
        if self._server is None or self._task is None:
            return
        self._server.should_exit = True
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._task, timeout=10)
        self._task = None
        self._lines.flush()

    @property
    def address(self) -> tuple[str, int]:
        if self._server is None or not self._server.servers:
            return str(self.config.host), int(self.config.port)
        name = self._server.servers[0].sockets[0].getsockname()
        return str(name[0]), int(name[1])
