"""`source: {type: fhir}`: the FHIR R4 REST server (uvicorn inside the engine's loop).

The HTTP handlers live in listeners/fhir_app.py; this module owns the config and
the server's lifecycle, on the uvicorn service and bearer-token auth it shares with
the DICOMweb listener (listeners/http_common.py): uvicorn runs as a task in the
engine's event loop with its signal handling switched off (SIGTERM belongs to the
runtime, which stops listeners in order).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from engine.components import ComponentConfig
from engine.context import ComponentContext
from engine.registry import component
from engine.security.tls import TLSConfig
from listeners.fhir_app import FhirApi
from listeners.fhir_http import HttpLimits, outcome_error_body
from listeners.http_common import BearerAuth, UvicornService


class FhirAuth(BearerAuth):
    """Either bearer tokens or an explicit `open: true`; there is no silent default."""


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
    max_binary_bytes: int = Field(64 * 1024 * 1024, gt=0, description=(
        "largest raw Binary body (POST /Binary, PUT /Binary/{id} with the content's own Content-Type); "
        "read in pieces and sealed into a blob of its own, 413 OperationOutcome past it. FHIR JSON "
        "bodies (a Binary with base64 data included) stay within max_body_bytes"))
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
        return HttpLimits.of(self, channel)


class FhirListener(UvicornService):
    """Serves the FHIR API until stopped; ``address`` is the bound (host, port)."""

    kind = "fhir"
    label = "FHIR"
    error_body = staticmethod(outcome_error_body)  # 408/431/503 outside a request: OperationOutcome too

    def __init__(self, config: FhirSourceConfig, ctx: ComponentContext) -> None:
        super().__init__(config, ctx)
        self.config: FhirSourceConfig = config
        self.api = FhirApi(config, ctx)

    def app(self) -> Any:
        return self.api.app()


@component("source", "fhir", config=FhirSourceConfig, kinds=("fhir",))
def build(config: FhirSourceConfig, ctx: ComponentContext) -> FhirListener:
    """FHIR R4 REST server (CRUD, history, search, transaction/batch) over medrelay's store."""
    return FhirListener(config, ctx)
