"""What the HTTP listeners (FHIR, DICOMweb) share: bearer-token auth and the uvicorn service.

Both serve a Starlette app with uvicorn inside the engine's event loop (no extra
process, no second loop), with uvicorn's signal handling switched off (SIGTERM belongs
to the runtime, which stops listeners in order), on the guarded h11 protocol of
``listeners.fhir_http`` (limits and timeouts), and behind medrelay's own TLS upgrade
so that a refused client certificate leaves an audit row. Kept in one place so the
two listeners cannot drift apart in how they authenticate or bound a connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import ssl
from collections.abc import Iterator
from typing import Any, Protocol

import structlog
import uvicorn
from pydantic import Field, model_validator

from engine.components import ComponentConfig, secret_field
from engine.context import ComponentContext
from engine.security.tls import PausedAccept, TLSConfig, report_handshake_failure, server_context, upgrade
from listeners.fhir_http import HttpLimits, protocol_class

log = structlog.get_logger()


class BearerAuth(ComponentConfig):
    """Either bearer tokens or an explicit `open: true`; there is no silent default."""

    bearer_tokens: list[str] = secret_field(
        default_factory=list, description="accepted `Authorization: Bearer` tokens, e.g. [\"${API_TOKEN}\"]")
    open: bool = Field(False, description="serve without authentication (only for closed test networks)")

    @model_validator(mode="after")
    def _one_mode(self) -> BearerAuth:
        if self.open and self.bearer_tokens:
            raise ValueError("auth: choose bearer_tokens or open: true, not both")
        if not self.open and not self.bearer_tokens:
            raise ValueError("auth needs bearer_tokens (or open: true to serve without authentication)")
        if any(not t for t in self.bearer_tokens):
            raise ValueError("auth.bearer_tokens: empty token")
        return self


def fingerprint(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class BearerTokens:
    """The accepted tokens, kept only as SHA-256 fingerprints and compared in constant time."""

    def __init__(self, auth: BearerAuth) -> None:
        self.open = auth.open
        self._fps = [fingerprint(t) for t in auth.bearer_tokens]

    def check(self, authorization: str) -> tuple[str | None, str | None]:
        """(actor, None) when the Authorization header is accepted, else (None, reason);
        the actor names a token by the start of its fingerprint, never by the token."""
        if self.open:
            return "anonymous", None
        scheme, _, token = authorization.partition(" ")
        fp = fingerprint(token.strip()) if scheme.lower() == "bearer" and token.strip() else None
        if fp is not None and any(hmac.compare_digest(fp, t) for t in self._fps):
            return f"bearer:{fp[:12]}", None
        return None, "bearer token missing" if fp is None else "bearer token not accepted"

    @staticmethod
    def challenge(reason: str) -> str:
        return 'Bearer realm="medrelay"' + ("" if reason == "bearer token missing" else ', error="invalid_token"')


class HttpServiceConfig(Protocol):
    """The fields of a source config that ``UvicornService`` reads."""

    host: str
    port: int
    tls: TLSConfig | None
    idle_timeout: float
    max_header_bytes: int
    handshake_timeout: float

    def http_limits(self, channel: str) -> HttpLimits: ...


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield  # the engine's runtime owns SIGINT/SIGTERM


class UvicornService:
    """Serves ``app()`` until stopped; ``address`` is the bound (host, port).

    ``kind`` names the listener in log events and audit rows ("fhir", "dicomweb").
    """

    kind = "http"
    label = "HTTP"  # in error messages

    def __init__(self, config: HttpServiceConfig, ctx: ComponentContext) -> None:
        self.config = config
        self.ctx = ctx
        self._server: _Server | None = None
        self._task: asyncio.Task[None] | None = None

    def app(self) -> Any:
        raise NotImplementedError

    def _uvicorn_config(self) -> uvicorn.Config:
        """uvicorn on our h11 protocol subclass (listeners.fhir_http: limits and timeouts), also
        when httptools is installed, so the limits never depend on what else is in the venv."""
        tls = self.config.tls
        http: type[asyncio.Protocol] = protocol_class(self.config.http_limits(self.ctx.channel))
        if tls is not None:  # the context is built now: fail at start, not on the first handshake
            http = self._tls_http_protocol(server_context(tls), http)
        return uvicorn.Config(
            self.app(), host=self.config.host, port=self.config.port, log_config=None,
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
        kind = self.kind

        class TLSHttpProtocol(PausedAccept):
            def __init__(self, config: Any, server_state: Any, app_state: Any, _loop: Any = None) -> None:
                self.inner = inner_class(config=config, server_state=server_state, app_state=app_state,
                                         _loop=_loop, admitted=True)
                self.connections = server_state.connections
                super().__init__(self._upgrade)

            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                if len(self.connections) + len(pending) >= limits.max_connections:
                    log.warning(f"{kind}.connection_refused", channel=limits.channel, reason="max_connections",
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
        report_handshake_failure(self.ctx.audit, self.kind, self.ctx.channel, peername, error)

    async def _serve(self) -> None:
        assert self._server is not None
        try:
            await self._server.serve()
        except SystemExit:  # uvicorn exits the process on bind errors; turn that into an error
            raise RuntimeError(f"{self.label} listener could not start") from None

    async def start_serving(self) -> None:
        self._server = _Server(self._uvicorn_config())
        self._task = asyncio.create_task(self._serve(), name=f"{self.kind}-{self.ctx.channel}")
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

    @property
    def address(self) -> tuple[str, int]:
        if self._server is None or not self._server.servers:
            return self.config.host, self.config.port
        name = self._server.servers[0].sockets[0].getsockname()
        return str(name[0]), int(name[1])
