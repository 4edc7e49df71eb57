"""`source: {type: fhir}`: the FHIR R4 REST server (uvicorn inside the engine's loop).

The HTTP handlers live in listeners/fhir_app.py; this module owns the config and
the server's lifecycle, on the uvicorn service and bearer-token auth it shares with
the DICOMweb listener (listeners/http_common.py): uvicorn runs as a task in the
engine's event loop with its signal handling switched off (SIGTERM belongs to the
runtime, which stops listeners in order).
"""

from __future__ import annotations

from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import Field, field_validator

from engine.components import ComponentConfig, field_of
from engine.context import ComponentContext
from engine.http.limits import HttpBodyLimitsConfig
from engine.registry import component
from engine.security.tls import TLSConfig
from listeners.dicomweb import DicomWebSourceConfig
from listeners.fhir_app import FhirApi
from listeners.fhir_http import outcome_error_body
from listeners.http_common import BearerAuth, UvicornService


class FhirAuth(BearerAuth):
    """Either bearer tokens or an explicit `open: true`; there is no silent default."""


class FhirSourceConfig(ComponentConfig, HttpBodyLimitsConfig):
    """FHIR R4 REST server: clients create, update, delete, read and search resources."""

    type: Literal["fhir"]
    host: str = Field("127.0.0.1", description="address to bind; loopback unless told otherwise")
    port: int = Field(8080, ge=0, le=65535, description="TCP port (0: pick a free one, for tests)")
    base_path: str = Field("/fhir", pattern=r"^(/[A-Za-z0-9._~-]+)*$",
                           description="path prefix of the FHIR base URL, e.g. /fhir")
    public_url: str | None = field_of(DicomWebSourceConfig, "public_url", description=(
        "the base URL clients reach the server at, e.g. https://fhir.example/fhir (behind a proxy, or when host "
        "is 0.0.0.0); used for Location, fullUrl and paging links. Default: the request's Host when it names "
        "this server (the address the connection came in on, the configured host, localhost on loopback, the "
        "machine's host name) with the bound port, else that address: a forged Host never reaches a link"))
    auth: FhirAuth = Field(description="`{bearer_tokens: [\"${API_TOKEN}\"]}` or `{open: true}`; required")
    tls: TLSConfig | None = Field(None, description="serve HTTPS with these cert/key (BCP 195 settings)")
    max_body_bytes: int = field_of(HttpBodyLimitsConfig, "max_body_bytes", description=(
        "largest request body; a larger declared Content-Length gets 413 before any byte is read, a "
        "streamed body gets 413 as soon as it passes the limit; a body whose JSON would parse into "
        "more than 16x this in memory (e.g. [{},{},...]) gets 413 before parsing"))
    max_binary_bytes: int = Field(64 * 1024 * 1024, gt=0, description=(
        "largest raw Binary body (POST /Binary, PUT /Binary/{id} with the content's own Content-Type); "
        "read in pieces and sealed into a blob of its own, 413 OperationOutcome past it. FHIR JSON "
        "bodies (a Binary with base64 data included) stay within max_body_bytes"))
    max_json_depth: int = Field(64, ge=4, le=150, description=(
        "deepest nesting of JSON objects/arrays in a body, checked before parsing; deeper gets 400"))


    @field_validator("public_url")
    @classmethod
    def _absolute_http_url(cls, v: str | None) -> str | None:
        if v is None:
            return v
        u = urlsplit(v)
        if u.scheme not in ("http", "https") or not u.netloc or u.query or u.fragment or v != v.strip():
            raise ValueError("public_url must be an http(s) URL without query or fragment")
        return v.rstrip("/")


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
