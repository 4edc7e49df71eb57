"""Listener-side glue of the HTTP stack (FHIR, DICOMweb, HTTP sources).

The stack itself is in the engine (engine/http/: uvicorn in the engine's loop, the
guarded h11 protocol, medrelay's audited TLS upgrade, bearer tokens), shared with the
console. This module ties it to a source's config and ``ComponentContext``: the limits
from the config, the log name (``kind``), the body of protocol-level errors
(``error_body``) and the audit row of a refused TLS handshake.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol

import structlog

from engine.context import ComponentContext
from engine.http.bearer import BearerAuth, BearerTokens, fingerprint
from engine.http.protocol import ErrorBody, HttpLimits, json_error_body
from engine.http.server import HttpServer
from engine.security.tls import TLSConfig, report_handshake_failure

__all__ = ["BearerAuth", "BearerTokens", "HttpServiceConfig", "UvicornService", "fingerprint"]
log = structlog.get_logger()


class HttpServiceConfig(Protocol):
    """The fields of a source config that ``UvicornService`` reads."""

    host: str
    port: int
    tls: TLSConfig | None
    idle_timeout: float
    max_header_bytes: int
    handshake_timeout: float

    def http_limits(self, channel: str) -> HttpLimits: ...


class UvicornService:
    """Serves ``app()`` until stopped; ``address`` is the bound (host, port).

    ``kind`` names the listener in log events and audit rows ("fhir", "dicomweb");
    ``error_body`` gives the body of answers made outside a request cycle (408, 431, 503).
    """

    kind = "http"
    label = "HTTP"  # in error messages
    error_body: ErrorBody = staticmethod(json_error_body)

    def __init__(self, config: HttpServiceConfig, ctx: ComponentContext) -> None:
        self.config = config
        self.ctx = ctx
        self._http: HttpServer | None = None

    def app(self) -> Any:
        raise NotImplementedError

    def http_server(self) -> HttpServer:
        limits = dataclasses.replace(self.config.http_limits(self.ctx.channel), kind=self.kind,
                                     error_body=type(self).error_body)
        return HttpServer(self.app(), self.config.host, self.config.port, limits, tls=self.config.tls,
                          handshake_timeout=self.config.handshake_timeout, on_tls_failure=self._tls_failed,
                          label=self.label, proxy=getattr(self.config, "proxy_protocol", None))

    def _tls_failed(self, peername: Any, error: BaseException) -> None:
        report_handshake_failure(self.ctx.audit, self.kind, self.ctx.channel, peername, error)

    async def start_serving(self) -> None:
        self._http = self.http_server()
        await self._http.start()

    async def start(self) -> None:
        """Serve, then log ``<kind>.listening`` with the address, TLS, auth mode and base path."""
        await self.start_serving()
        host, port = self.address
        auth = getattr(self.config, "auth", None)
        log.info(f"{self.kind}.listening", channel=self.ctx.channel, host=host, port=port,
                 base_path=getattr(self.config, "base_path", None), tls=self.config.tls is not None,
                 auth="open" if auth is None or auth.open else "bearer")

    async def stop(self) -> None:
        if self._http is not None:
            await self._http.stop()

    @property
    def address(self) -> tuple[str, int]:
        if self._http is None:
            return self.config.host, self.config.port
        return self._http.address
