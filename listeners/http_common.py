"""Listener-side glue of the HTTP stack (FHIR, DICOMweb, HTTP sources).

The stack itself is in the engine (engine/http/: uvicorn in the engine's loop, the
guarded h11 protocol, medrelay's audited TLS upgrade, bearer tokens), shared with the
console. This module ties it to a source's config and ``ComponentContext``: the limits
from the config, the log name (``kind``), the body of protocol-level errors
(``error_body``) and the audit row of a refused TLS handshake.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
import socket
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


# -- the base URL of links a response carries -------------------------------------------------

HOST_RE = re.compile(r"^(?:([A-Za-z0-9.-]{1,253})|\[([0-9A-Fa-f:.]{2,45})\])(?::([0-9]{1,5}))?$")
_HOSTNAME = socket.gethostname().lower()  # no DNS: the name this machine gives itself


def _is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address.split("%")[0]).is_loopback
    except ValueError:
        return False


def link_base(request: Any, *, public_url: str | None, host: str, port: int, prefix: str) -> str:
    """The base URL of the links a response carries (FHIR Location, fullUrl and paging links;
    DICOMweb RetrieveURL and BulkDataURI): ``public_url``, else built from what the client
    cannot forge.

    A Host header goes into a link only when it names this server (the address the connection
    came in on, the configured host, the machine's own name, ``localhost`` on loopback) and,
    if it has a port, the bound one; any other is replaced by the address the connection came in
    on. Otherwise a request with ``Host: evil.example`` puts that name into every link, and a
    caching proxy serves them to others (probe 5b, finding 5). A Host without a port (some
    clients send the name alone) gets the bound port. X-Forwarded-* are never read: behind a
    proxy, set ``public_url``.
    """
    if public_url:
        return public_url.rstrip("/")
    scheme = request.url.scheme
    server = request.scope.get("server") or (host, port)
    local, bound = str(server[0]), int(server[1])
    default = 443 if scheme == "https" else 80
    suffix = "" if bound == default else f":{bound}"
    m = HOST_RE.match(request.headers.get("host", ""))
    if m is not None:
        name = (m.group(1) or m.group(2)).lower()
        given = int(m.group(3)) if m.group(3) else bound
        names = {local.lower(), _HOSTNAME}
        if host not in ("0.0.0.0", "::", ""):
            names.add(host.lower())
        if _is_loopback(local):
            names.add("localhost")
        if given == bound and name in names:
            shown = f"[{m.group(2)}]" if m.group(2) else m.group(1)
            return f"{scheme}://{shown}{suffix}{prefix}"
    shown = f"[{local}]" if ":" in local else local
    return f"{scheme}://{shown}{suffix}{prefix}"
