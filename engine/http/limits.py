"""The config keys of the HTTP stack's limits, written once for every server that runs it.

The FHIR, DICOMweb and HTTP sources and the console serve through the same protocol
(engine/http/protocol.py) with the same ``HttpLimits``; their configs inherit these keys
instead of each restating them. A server whose default differs (DICOMweb's body_timeout,
the console's idle_timeout and max_connections) overrides only the default, with
``engine.components.field_of``, so the checks and descriptions stay these.
"""

from __future__ import annotations

from typing import Self

from pydantic import BaseModel, ConfigDict, Field, model_validator

from engine.http.protocol import HttpLimits
from engine.security.proxy_protocol import ProxyProtocolConfig


class HttpLimitsConfig(BaseModel):
    """Request head, connection and timeout limits of one HTTP server."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_header_bytes: int = Field(16 * 1024, ge=1024, description=(
        "largest request head (request line and header fields); larger gets 431"))
    max_header_count: int = Field(100, ge=8, description="most header fields in a request; more gets 431")
    max_url_bytes: int = Field(8 * 1024, ge=256, description=(
        "longest request target (path and query string); longer gets 414 (or 431 past max_header_bytes)"))
    max_connections: int = Field(200, ge=1, description=(
        "open connections at once (TLS ones counted from accept); more are answered 503 with "
        "Retry-After (TLS: closed before the handshake)"))
    max_connections_per_client: int | None = Field(50, ge=1, description=(
        "open connections at once from one client address (the one a trusted balancer's PROXY header "
        "announces, else the connecting peer's); more are refused like those over max_connections. "
        "Behind a balancer without the PROXY protocol every client is the balancer's address: raise it "
        "to max_connections or null (no per-client cap), or turn on proxy_protocol"))
    idle_timeout: float = Field(5.0, gt=0, description=(
        "seconds a connection may stay open with no request in progress (after accept, the TLS "
        "handshake or a response) before it is closed"))
    header_timeout: float = Field(10.0, gt=0, description=(
        "seconds from the first byte of a request to the end of its head; slower gets 408 and is closed"))
    body_timeout: float = Field(60.0, gt=0, description=(
        "seconds from the end of the head to the end of the body; slower gets 408 and is closed"))
    proxy_protocol: ProxyProtocolConfig | None = Field(None, description=(
        "behind a TCP load balancer (HAProxy send-proxy / send-proxy-v2): trusted = the balancers' "
        "addresses/CIDRs, timeout = seconds for the header; their connections must start with a PROXY "
        "header (v1/v2, before TLS), whose client address is the request's client in logs and audit; "
        "others are served as usual"))
    handshake_timeout: float = Field(10.0, gt=0, description="seconds a TLS handshake may take (HTTPS only)")

    def http_limits(self, channel: str) -> HttpLimits:
        """The protocol's limits from these keys; ``channel`` names the server in log events."""
        return HttpLimits.of(self, channel)


class HttpBodyLimitsConfig(HttpLimitsConfig):
    """And the request bodies a source reads into memory: one at most, and all at once."""

    max_body_bytes: int = Field(16 * 1024 * 1024, gt=0, description=(
        "largest request body; a larger declared Content-Length gets 413 before any byte is read, a streamed "
        "body as soon as it passes the limit"))
    body_budget_bytes: int = Field(64 * 1024 * 1024, gt=0, description=(
        "request bodies held in memory at once, all connections together (each reserves its "
        "Content-Length, or max_body_bytes when chunked); a request that does not fit waits up to "
        "body_timeout/2, then gets 503 with Retry-After. At least max_body_bytes"))

    @model_validator(mode="after")
    def _budget_fits_a_body(self) -> Self:
        if self.body_budget_bytes < self.max_body_bytes:
            raise ValueError("body_budget_bytes must be at least max_body_bytes")
        return self
