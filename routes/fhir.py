"""`to: {type: fhir}`: deliver FHIR resources and Bundles to a FHIR R4 server.

transaction/batch Bundles are POSTed to the base; a single resource is PUT to
``Type/id`` when it has an id (idempotent on retry) and POSTed to ``Type`` when it
has none; an envelope whose ``interaction`` header is ``delete`` becomes a DELETE.
Failure classes follow HTTP: 408/429/5xx and network errors are retried, any other
4xx is permanent (the same request would fail again). For a transaction or batch
the per-entry statuses are checked too, since a batch answers 200 even when some
entries failed.

``timeout`` bounds the whole request (connect, TLS, sending the body, the complete
answer): httpx's own timeouts apply to each read or write separately, so a server that
answers a byte at a time would never trip them. A request cut short closes its
connection (httpx does not return a half-used connection to its pool).
"""

from __future__ import annotations

import asyncio
import json
from typing import Any, Literal
from urllib.parse import urlparse

import httpx
import structlog
from pydantic import BaseModel, ConfigDict, Field

from engine.components import ComponentConfig, DeliveryError, secret_field
from engine.context import ComponentContext
from engine.envelope import Envelope
from engine.registry import component
from engine.security.tls import TLSConfig, client_context
from routes import fhir_lineage

log = structlog.get_logger()
FHIR_JSON = "application/fhir+json"
RETRYABLE_4XX = (408, 429)


class FhirDestinationAuth(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    token: str = secret_field(description="bearer token sent as `Authorization: Bearer`, e.g. \"${FHIR_TOKEN}\"")


class FhirDestinationConfig(ComponentConfig):
    """Send FHIR resources / transaction Bundles to a FHIR R4 server over HTTP(S)."""

    type: Literal["fhir"]
    base_url: str = Field(description="FHIR base URL, e.g. https://fhir.example/R4",
                          pattern=r"^https?://")
    auth: FhirDestinationAuth | None = Field(None, description="`{token: \"${FHIR_TOKEN}\"}`; none: no header")
    tls: TLSConfig | None = Field(None, description="CA / client certificate for https base URLs")
    timeout: float = Field(30.0, gt=0, description="seconds one request may take in all (connect, TLS, send, "
                           "the whole answer); then the connection is closed and the delivery retried")
    provenance: bool = Field(False, description="send a Provenance with the resources (target, recorded, agents "
                             "medrelay and the source system, entity the source message, channel, route, transforms "
                             "and config hash): one transaction Bundle (a batch: the Provenance follows it)")


def _issue_codes(resp: httpx.Response) -> str:
    """Issue codes of an OperationOutcome: useful in last_error and never PHI (unlike diagnostics)."""
    try:
        body = resp.json()
    except ValueError:
        return ""
    issues = body.get("issue") if isinstance(body, dict) else None
    codes = sorted({str(i.get("code")) for i in issues or [] if isinstance(i, dict)})
    return f" ({','.join(codes)})" if codes else ""


def _status_code(status: str) -> int:
    try:
        return int(str(status).split()[0])
    except (ValueError, IndexError):
        return 0


class FhirDestination:
    def __init__(self, config: FhirDestinationConfig, ctx: ComponentContext) -> None:
        self.config = config
        self.ctx = ctx
        self.base = config.base_url.rstrip("/")
        headers = {"Accept": FHIR_JSON, "Content-Type": FHIR_JSON}
        if config.auth is not None:
            headers["Authorization"] = f"Bearer {config.auth.token}"
        verify: Any = client_context(config.tls) if config.tls is not None else True
        host = urlparse(self.base).hostname or ""
        if self.base.startswith("http://") and host not in ("127.0.0.1", "localhost", "::1"):
            log.warning("fhir.insecure_destination", channel=ctx.channel, route=ctx.route, host=host)
        self.client = httpx.AsyncClient(headers=headers, verify=verify, timeout=config.timeout,
                                        follow_redirects=False)

    @property
    def deadline(self) -> float:
        """Seconds one ``send`` may take (engine.pipeline enforces it as a backstop)."""
        return self.config.timeout

    def _request(self, envelope: Envelope) -> tuple[str, str, bytes | None, str | None]:
        """(method, url, body, bundle type) for one envelope."""
        h = envelope.headers
        if h.get("interaction") == "delete":
            if not h.get("resourceType") or not h.get("id"):
                raise DeliveryError("delete without resourceType/id headers", permanent=True)
            return "DELETE", f"{self.base}/{h['resourceType']}/{h['id']}", None, None
        try:
            doc = json.loads(envelope.payload)
        except ValueError:
            raise DeliveryError("payload is not JSON", permanent=True) from None
        rtype = doc.get("resourceType") if isinstance(doc, dict) else None
        if not isinstance(rtype, str):
            raise DeliveryError("payload is not a FHIR resource", permanent=True)
        if rtype == "Bundle" and doc.get("type") in ("transaction", "batch"):
            return "POST", self.base, envelope.payload, doc["type"]
        if doc.get("id"):
            return "PUT", f"{self.base}/{rtype}/{doc['id']}", envelope.payload, None
        return "POST", f"{self.base}/{rtype}", envelope.payload, None

    async def send(self, envelope: Envelope) -> str | None:
        if self.config.provenance and envelope.headers.get("interaction") != "delete":
            envelope = await fhir_lineage.traced(self, envelope)  # resources + Provenance in one transaction
        method, url, body, btype = self._request(envelope)
        headers = {"X-Request-ID": envelope.id}
        if btype is None and method != "DELETE":
            headers["Prefer"] = "return=minimal"
        try:
            async with asyncio.timeout(self.config.timeout):
                resp = await self.client.request(method, url, content=body, headers=headers)
        except TimeoutError:
            raise DeliveryError(f"FHIR {method}: no complete answer within {self.config.timeout:g}s") from None
        except httpx.HTTPError as e:  # connect, timeout, protocol: the server may be back later
            raise DeliveryError(f"FHIR {method} failed: {type(e).__name__}") from None
        status = resp.status_code
        if status >= 500 or status in RETRYABLE_4XX:
            raise DeliveryError(f"FHIR {method} HTTP {status}{_issue_codes(resp)}")
        if status >= 400:
            raise DeliveryError(f"FHIR {method} HTTP {status}{_issue_codes(resp)}", permanent=True)
        if status >= 300:
            raise DeliveryError(f"FHIR {method} HTTP {status}: redirects are not followed", permanent=True)
        if btype is not None:
            self._check_entries(resp, btype)
        if method != "DELETE":
            await fhir_lineage.after(self, envelope, resp, btype is not None)  # outputs (a batch's Provenance)
        log.info("fhir.delivered", channel=self.ctx.channel, route=self.ctx.route, method=method,
                 status=status, message_id=envelope.id)
        return f"HTTP {status}"

    @staticmethod
    def _check_entries(resp: httpx.Response, btype: str) -> None:
        try:
            bundle = resp.json()
        except ValueError:
            raise DeliveryError(f"{btype} answer is not JSON", permanent=True) from None
        if not isinstance(bundle, dict) or bundle.get("type") != f"{btype}-response":
            raise DeliveryError(f"{btype} answer is not a {btype}-response Bundle", permanent=True)
        codes = [_status_code((e.get("response") or {}).get("status", "")) for e in bundle.get("entry") or []]
        bad = [c for c in codes if not 200 <= c < 300]
        if bad:
            retry = all(c >= 500 or c in RETRYABLE_4XX for c in bad)
            raise DeliveryError(f"{btype}: {len(bad)} of {len(codes)} entries failed ({sorted(set(bad))})",
                                permanent=not retry)

    async def close(self) -> None:
        await self.client.aclose()


@component("destination", "fhir", config=FhirDestinationConfig, kinds=("fhir",))
def build(config: FhirDestinationConfig, ctx: ComponentContext) -> FhirDestination:
    """POST transaction Bundles / PUT or POST resources to a FHIR R4 server (httpx)."""
    return FhirDestination(config, ctx)
