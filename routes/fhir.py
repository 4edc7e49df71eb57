"""`to: {type: fhir}`: deliver FHIR resources and Bundles to a FHIR R4 server.

transaction/batch Bundles are POSTed to the base; a single resource is PUT to
``Type/id`` when it has an id (idempotent on retry) and POSTed to ``Type`` when it
has none; an envelope whose ``interaction`` header is ``delete`` becomes a DELETE.
Failure classes follow HTTP: 408/429/5xx and network errors are retried, any other
4xx is permanent (the same request would fail again). A 429 or 503 with ``Retry-After``
is not tried again before it (engine/http/retry_after.py), and a 429 that says when to
come back does not count towards ``retry.max_attempts``. For a transaction or batch
the per-entry statuses are checked too, since a batch answers 200 even when some
entries failed.

A ``Binary`` with ``data`` (e.g. the PDF hl7_to_fhir takes from an ORU's OBX ED value) goes
first, on its own, as its raw bytes with its contentType (``PUT Binary/{id}``, or ``POST
Binary`` whose Location then replaces the entry's fullUrl wherever the rest refers to it),
and the rest of the Bundle follows without it: HAPI and most servers expect attachments that
way, and the JSON request stays small (a 20 MiB PDF is 27 MiB of base64 inside a Bundle).
``max_request_bytes`` is the largest body one request may carry (set it to what the server
takes): a larger one fails permanently before anything is sent, instead of a 413 after the
upload.

``timeout`` bounds the whole request (connect, TLS, sending the body, the complete
answer): httpx's own timeouts apply to each read or write separately, so a server that
answers a byte at a time would never trip them. A request cut short closes its
connection (httpx does not return a half-used connection to its pool).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
from dataclasses import replace
from typing import Any, Literal
from urllib.parse import urlparse

import httpx
import structlog
from pydantic import BaseModel, ConfigDict, Field

from engine.components import ComponentConfig, DeliveryError, secret_field
from engine.context import ComponentContext
from engine.envelope import Envelope
from engine.http.retry_after import THROTTLED, UNAVAILABLE, retry_after_seconds
from engine.registry import component
from engine.security.tls import TLSConfig, client_context
from engine.store.fhir import binary
from engine.store.fhir.binary import HELD_DATA_HEADER
from engine.store.fhir.params import FhirError
from engine.store.fhir.resources import FhirStore
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
    max_request_bytes: int = Field(64 * 1024 * 1024, gt=0, description=(
        "largest body one request may carry (a JSON request, or one Binary's raw bytes); a larger one "
        "fails permanently without being sent. Set it to the server's own limit"))
    binaries: Literal["separate", "inline"] = Field("separate", description=(
        "separate: a Binary with data is sent first as its raw bytes (PUT Binary/{id}, or POST Binary and "
        "its new id replaces the entry's fullUrl in the rest), then the Bundle without it; "
        "inline: sent inside the Bundle as base64"))
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
        if envelope.headers.get(HELD_DATA_HEADER) and envelope.headers.get("interaction") != "delete":
            return await self._forward_held_binary(envelope)
        if self.config.binaries == "separate" and envelope.headers.get("interaction") != "delete":
            envelope = await self._send_binaries(envelope)
            if envelope.payload == b"":
                return "HTTP 2xx (Binary only)"
        if self.config.provenance and envelope.headers.get("interaction") != "delete":
            envelope = await fhir_lineage.traced(self, envelope)  # resources + Provenance in one transaction
        method, url, body, btype = self._request(envelope)
        self._check_size(body)
        headers = {"X-Request-ID": envelope.id}
        if btype is None and method != "DELETE":
            headers["Prefer"] = "return=minimal"
        resp = await self._exchange(method, url, body, headers, f"FHIR {method}")
        status = resp.status_code
        if btype is not None:
            self._check_entries(resp, btype)
        if method != "DELETE":
            await fhir_lineage.after(self, envelope, resp, btype is not None)  # outputs (a batch's Provenance)
        log.info("fhir.delivered", channel=self.ctx.channel, route=self.ctx.route, method=method,
                 status=status, message_id=envelope.id)
        return f"HTTP {status}"

    def _check_size(self, body: bytes | None) -> None:
        if body is not None and len(body) > self.config.max_request_bytes:
            raise DeliveryError(f"request of {len(body)} bytes is over max_request_bytes "
                                f"({self.config.max_request_bytes})", permanent=True)

    async def _send_binaries(self, envelope: Envelope) -> Envelope:
        """Send each Binary with data on its own as raw bytes; the envelope to send after them
        (its payload empty when nothing is left)."""
        if b'"Binary"' not in envelope.payload:  # cheap test: most payloads have none
            return envelope
        try:
            doc = json.loads(envelope.payload)
        except ValueError:
            return envelope  # _request refuses it
        if not isinstance(doc, dict):
            return envelope
        if doc.get("resourceType") == "Binary" and "data" in doc:
            await self._put_binary(envelope, doc, None)
            return replace(envelope, payload=b"")
        entries = doc.get("entry") if doc.get("resourceType") == "Bundle" else None
        if not isinstance(entries, list):
            return envelope
        kept, renamed = [], {}
        for entry in entries:
            res = entry.get("resource") if isinstance(entry, dict) else None
            if not (isinstance(res, dict) and res.get("resourceType") == "Binary" and "data" in res):
                kept.append(entry)
                continue
            request = entry.get("request") or {}
            url = str(request.get("url") or "")
            rid = url.split("/", 1)[1] if str(request.get("method")).upper() == "PUT" and \
                url.startswith("Binary/") else None
            ref = await self._put_binary(envelope, res, rid)
            if entry.get("fullUrl"):
                renamed[str(entry["fullUrl"])] = ref
        if not kept:
            return replace(envelope, payload=b"")
        doc["entry"] = [_renamed(e, renamed) for e in kept] if renamed else kept
        return replace(envelope, payload=json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode())

    async def _forward_held_binary(self, envelope: Envelope) -> str:
        """A raw Binary our FHIR listener took: its bytes are streamed from our FHIR store, chunk by
        chunk, as ``PUT Binary/{id}`` (the same id: a retry replaces, never duplicates)."""
        rid = str(envelope.headers.get("id") or "")
        if not rid:
            raise DeliveryError("Binary message without id header", permanent=True)
        try:
            content_type, size, chunks = await asyncio.to_thread(self._held_binary, rid)
        except FhirError as e:
            raise DeliveryError(f"Binary is not readable in the FHIR store ({e.status})", permanent=True) from None
        if size > self.config.max_request_bytes:
            raise DeliveryError(f"request of {size} bytes is over max_request_bytes "
                                f"({self.config.max_request_bytes})", permanent=True)

        async def body() -> Any:
            while (piece := await asyncio.to_thread(next, chunks, None)) is not None:
                yield piece

        headers = {"X-Request-ID": envelope.id, "Content-Type": content_type, "Content-Length": str(size),
                   "Prefer": "return=minimal"}
        await self._binary_request(envelope, "PUT", f"{self.base}/Binary/{rid}", body(), headers, size)
        return "HTTP 2xx (Binary streamed)"

    def _held_binary(self, rid: str) -> tuple[str, int, Any]:
        """(contentType, size, chunk iterator) of the current version of Binary/{rid} in our store."""
        fs = FhirStore(self.ctx.store, self.ctx.keyring)
        with self.ctx.store.engine.connect() as conn:
            row, doc = fs.read(conn, "Binary", rid)
            data = fs.data_of(conn, "Binary", rid, row.version)
            ctype = str(doc.get("contentType") or "application/octet-stream")
            if data is None:
                return ctype, 0, iter(())
            return ctype, data.size, binary.chunks(conn, self.ctx.store, data)

    async def _put_binary(self, envelope: Envelope, res: dict[str, Any], rid: str | None) -> str:
        """PUT (with an id) or POST one Binary's bytes; returns its ``Binary/{id}``."""
        try:
            data = base64.b64decode(str(res.get("data") or ""), validate=True)
        except (binascii.Error, ValueError):
            raise DeliveryError("a Binary's data is not base64", permanent=True) from None
        self._check_size(data)
        rid = rid or (str(res["id"]) if res.get("id") else None)
        method, url = ("PUT", f"{self.base}/Binary/{rid}") if rid else ("POST", f"{self.base}/Binary")
        headers = {"X-Request-ID": envelope.id, "Content-Type": str(res.get("contentType") or
                                                                    "application/octet-stream"),
                   "Prefer": "return=minimal"}
        resp = await self._binary_request(envelope, method, url, data, headers, len(data))
        if rid is None:
            parts = urlparse(resp.headers.get("location", "")).path.split("/")
            if "Binary" not in parts or parts.index("Binary") + 1 >= len(parts):
                raise DeliveryError("POST Binary: the answer has no Location", permanent=True)
            rid = parts[parts.index("Binary") + 1]
        return f"Binary/{rid}"

    async def _binary_request(self, envelope: Envelope, method: str, url: str, content: Any,
                              headers: dict[str, str], size: int) -> httpx.Response:
        """Send one Binary's bytes; the answer when 2xx, else the DeliveryError HTTP says."""
        resp = await self._exchange(method, url, content, headers, f"FHIR {method} Binary")
        log.info("fhir.binary_delivered", channel=self.ctx.channel, route=self.ctx.route, method=method,
                 status=resp.status_code, size=size, message_id=envelope.id)
        return resp

    async def _exchange(self, method: str, url: str, content: Any, headers: dict[str, str],
                        what: str) -> httpx.Response:
        """One request within the route's timeout; a 2xx answer, else the DeliveryError its status
        says (5xx and RETRYABLE_4XX retried, other 4xx and 3xx permanent: redirects are not followed)."""
        try:
            async with asyncio.timeout(self.config.timeout):
                resp = await self.client.request(method, url, content=content, headers=headers)
        except TimeoutError:
            raise DeliveryError(f"{what}: no complete answer within {self.config.timeout:g}s") from None
        except httpx.HTTPError as e:  # connect, timeout, protocol: the server may be back later
            raise DeliveryError(f"{what} failed: {type(e).__name__}") from None
        status = resp.status_code
        if status >= 500 or status in RETRYABLE_4XX:
            wait = retry_after_seconds(resp.headers.get("Retry-After")) if status in (THROTTLED, UNAVAILABLE) else None
            asked = f" (Retry-After {wait:.0f}s)" if wait is not None else ""
            # A 429 that says when to come back is a throttle, not a failure of the server: that
            # try does not count towards max_attempts (docs/architecture.md, pipeline).
            raise DeliveryError(f"{what} HTTP {status}{_issue_codes(resp)}{asked}", retry_after=wait,
                                counted=not (status == THROTTLED and wait is not None))
        if status >= 400:
            raise DeliveryError(f"{what} HTTP {status}{_issue_codes(resp)}", permanent=True)
        if status >= 300:
            raise DeliveryError(f"{what} HTTP {status}: redirects are not followed", permanent=True)
        return resp

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


def _renamed(node: Any, names: dict[str, str]) -> Any:
    """``node`` with every string equal to a sent Binary's fullUrl replaced by its ``Binary/{id}``
    (references and Attachment.url alike)."""
    if isinstance(node, dict):
        return {k: _renamed(v, names) for k, v in node.items()}
    if isinstance(node, list):
        return [_renamed(v, names) for v in node]
    if isinstance(node, str):
        return names.get(node, node)
    return node


@component("destination", "fhir", config=FhirDestinationConfig, kinds=("fhir",))
def build(config: FhirDestinationConfig, ctx: ComponentContext) -> FhirDestination:
    """POST transaction Bundles / PUT or POST resources to a FHIR R4 server (httpx)."""
    return FhirDestination(config, ctx)
