"""`source: {type: fhir}`: the FHIR R4 REST server (uvicorn inside the engine's loop).

The HTTP handlers live in listeners/fhir_app.py; this module owns the config and
the server's lifecycle. uvicorn runs as a task in the engine's event loop (no
extra process, no second loop) with its signal handling switched off: SIGTERM
belongs to the runtime, which stops listeners in order.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import Iterator
from typing import Any, Literal

import structlog
import uvicorn
from pydantic import Field, model_validator

from engine.components import ComponentConfig, secret_field
from engine.context import ComponentContext
from engine.registry import component
from engine.security.tls import PausedAccept, TLSConfig, report_handshake_failure, server_context, upgrade
from listeners.fhir_app import FhirApi
from listeners.fhir_http import HttpLimits, protocol_class

log = structlog.get_logger()


class FhirAuth(ComponentConfig):
    """Either bearer tokens or an explicit `open: true`; there is no silent default."""

    bearer_tokens: list[str] = secret_field(
        default_factory=list, description="accepted `Authorization: Bearer` tokens, e.g. [\"${API_TOKEN}\"]")
    open: bool = Field(False, description="serve without authentication (only for closed test networks)")

    @model_validator(mode="after")
    def _one_mode(self) -> FhirAuth:
        if self.open and self.bearer_tokens:
            raise ValueError("auth: choose bearer_tokens or open: true, not both")
        if not self.open and not self.bearer_tokens:
            raise ValueError("auth needs bearer_tokens (or open: true to serve without authentication)")
        if any(not t for t in self.bearer_tokens):
            raise ValueError("auth.bearer_tokens: empty token")
        return self


class FhirSourceConfig(ComponentConfig):
    """FHIR R4 REST server: clients create, update, delete, read and search resources."""

    type: Literal["fhir"]
    host: str = Field("127.0.0.1", description="address to bind; loopback unless told otherwise")
    port: int = Field(8080, ge=0, le=65535, description="TCP port (0: pick a free one, for tests)")
    base_path: str = Field("/fhir", pattern=r"^(/[A-Za-z0-9._~-]+)*$",
                           description="path prefix of the FHIR base URL, e.g. /fhir")
    auth: FhirAuth = Field(description="`{bearer_tokens: [\"${API_TOKEN}\"]}` or `{open: true}`; required")
    tls: TLSConfig | None = Field(None, description="serve HTTPS with these cert/key (BCP 195 settings)")
    max_body_bytes: int = Field(16 * 1024 * 1024, gt=0, description=(
        "largest request body; a larger declared Content-Length gets 413 before any byte is read, a "
        "streamed body gets 413 as soon as it passes the limit; a body whose JSON would parse into "
        "more than 16x this in memory (e.g. [{},{},...]) gets 413 before parsing"))
    body_budget_bytes: int = Field(64 * 1024 * 1024, gt=0, description=(
        "request bodies held in memory at once, all connections together (each reserves its "
        "Content-Length, or max_body_bytes when chunked); a request that does not fit waits up to "
        "body_timeout/2, then gets 503 with Retry-After. At least max_body_bytes"))
    max_json_depth: int = Field(64, ge=4, le=150, description=(
        "deepest nesting of JSON objects/arrays in a body, checked before parsing; deeper gets 400"))
    max_header_bytes: int = Field(16 * 1024, ge=1024, description=(
        "largest request head (request line and header fields); larger gets 431"))
    max_header_count: int = Field(100, ge=8, description="most header fields in a request; more gets 431")
    max_url_bytes: int = Field(8 * 1024, ge=256, description=(
        "longest request target (path and query string); longer gets 414 (or 431 past max_header_bytes)"))
    max_connections: int = Field(200, ge=1, description=(
        "open connections at once (TLS ones counted from accept); more are answered 503 with "
        "Retry-After (TLS: closed before the handshake)"))
    idle_timeout: float = Field(5.0, gt=0, description=(
        "seconds a connection may stay open with no request in progress (after accept, the TLS "
        "handshake or a response) before it is closed"))
    header_timeout: float = Field(10.0, gt=0, description=(
        "seconds from the first byte of a request to the end of its head; slower gets 408 and is closed"))
    body_timeout: float = Field(60.0, gt=0, description=(
        "seconds from the end of the head to the end of the body; slower gets 408 and is closed"))
    handshake_timeout: float = Field(10.0, gt=0, description="seconds a TLS handshake may take (HTTPS only)")

    @model_validator(mode="after")
    def _budget_fits_a_body(self) -> FhirSourceConfig:
        if self.body_budget_bytes < self.max_body_bytes:
            raise ValueError("body_budget_bytes must be at least max_body_bytes")
        return self

    def http_limits(self, channel: str) -> HttpLimits:
        return HttpLimits(max_header_bytes=self.max_header_bytes, max_header_count=self.max_header_count,
                          max_url_bytes=self.max_url_bytes, idle_timeout=self.idle_timeout,
                          header_timeout=self.header_timeout, body_timeout=self.body_timeout,
                          max_connections=self.max_connections, channel=channel)


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield  # the engine's runtime owns SIGINT/SIGTERM


class FhirListener:
    """Serves the FHIR API until stopped; ``address`` is the bound (host, port)."""

    def __init__(self, config: FhirSourceConfig, ctx: ComponentContext) -> None:
        self.config = config
        self.ctx = ctx
        self.api = FhirApi(config, ctx)
        self._server: _Server | None = None
        self._task: asyncio.Task[None] | None = None

    def _uvicorn_config(self) -> uvicorn.Config:
        """uvicorn on our h11 protocol subclass (listeners.fhir_http: limits and timeouts), also
        when httptools is installed, so the limits never depend on what else is in the venv."""
        tls = self.config.tls
        http: type[asyncio.Protocol] = protocol_class(self.config.http_limits(self.ctx.channel))
        if tls is not None:  # the context is built now: fail at start, not on the first handshake
            http = self._tls_http_protocol(server_context(tls), http)
        return uvicorn.Config(
            self.api.app(), host=self.config.host, port=self.config.port, log_config=None,
            access_log=False,  # request lines carry search values (identifiers): never logged
            lifespan="off", server_header=False, proxy_headers=False, timeout_graceful_shutdown=5,
            http=http, ws="none", timeout_keep_alive=self.config.idle_timeout,  # type: ignore[arg-type]
            h11_max_incomplete_event_size=self.config.max_header_bytes,
        )

    def _tls_http_protocol(self, context: ssl.SSLContext, inner_class: Any) -> type[asyncio.Protocol]:
        """Our HTTP protocol behind our own TLS upgrade (``engine.security.tls.upgrade``).

        Given ``ssl=``, uvicorn lets asyncio do the handshake, and asyncio reports a
        failed one only at debug level; a refused client certificate would leave no audit
        trail. So uvicorn serves plain TCP and each connection is upgraded here first;
        its HTTP protocol sees an ordinary TLS transport (scheme https). The connection
        cap applies at accept, so connections over it cost no handshake; a handshake gets
        ``handshake_timeout``; the HTTP timeouts start when it is done.
        """
        on_failure = self._tls_failed
        limits: HttpLimits = inner_class.limits
        pending: set[Any] = inner_class.pending
        handshake_timeout = self.config.handshake_timeout

        class TLSHttpProtocol(PausedAccept):
            def __init__(self, config: Any, server_state: Any, app_state: Any, _loop: Any = None) -> None:
                self.inner = inner_class(config=config, server_state=server_state, app_state=app_state,
                                         _loop=_loop, admitted=True)
                self.connections = server_state.connections
                super().__init__(self._upgrade)

            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                if len(self.connections) + len(pending) >= limits.max_connections:
                    log.warning("fhir.connection_refused", channel=limits.channel, reason="max_connections",
                                limit=limits.max_connections)
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

    def _tls_failed(self, peername: Any, error: BaseException) -> None:
        report_handshake_failure(self.ctx.audit, "fhir", self.ctx.channel, peername, error)

    async def _serve(self) -> None:
        assert self._server is not None
        try:
            await self._server.serve()
        except SystemExit:  # uvicorn exits the process on bind errors; turn that into an error
            raise RuntimeError("FHIR listener could not start") from None

    async def start(self) -> None:
        self._server = _Server(self._uvicorn_config())
        self._task = asyncio.create_task(self._serve(), name=f"fhir-{self.ctx.channel}")
        while not self._server.started:
            if self._task.done():
                self._task.result()
                raise RuntimeError("FHIR listener stopped during startup")
            await asyncio.sleep(0.01)
        host, port = self.address
        log.info("fhir.listening", channel=self.ctx.channel, host=host, port=port,
                 base_path=self.config.base_path, tls=self.config.tls is not None,
                 auth="open" if self.config.auth.open else "bearer")

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
            return self.config.host, self.config.port
        name = self._server.servers[0].sockets[0].getsockname()
        return str(name[0]), int(name[1])


@component("source", "fhir", config=FhirSourceConfig, kinds=("fhir",))
def build(config: FhirSourceConfig, ctx: ComponentContext) -> FhirListener:
    """FHIR R4 REST server (CRUD, history, search, transaction/batch) over medrelay's store."""
    return FhirListener(config, ctx)
