"""`source: {type: http}`: HL7 v2, DICOM and FHIR JSON POSTed to a channel URL, answered after commit.

    POST {path}  Content-Type: application/hl7-v2 | text/plain | x-application/hl7-v2+er7
                               application/dicom
                               application/fhir+json | application/json

The answer comes only once the message (and its deliveries) are committed:

- HL7 v2: the ACK is the body (``application/hl7-v2``, or ``text/plain`` when that was
  sent), built by listeners/hl7_receive.py exactly as the MLLP listener builds it; an
  FHS/BHS batch gets a batch ACK. 200 with AA/CA; 422 with AE/AR (CE/CR) when the message
  was refused for its content (resending it cannot help); 503 + Retry-After with AE when
  it could not be stored (resend later). A body that is not HL7 at all gets an AR.
- DICOM Part 10: through the DICOM listener's Storage SCP (the same checks and index as
  C-STORE); 200 with a small JSON body, or a JSON error with the PS3.4 status (400 for
  the instance, 503 for the store).
- FHIR JSON: a resource is created (updated when it has an id) in medrelay's FHIR store
  and routed, a transaction/batch Bundle applied, as the FHIR listener would (201/200
  with the resource or a transaction-response); or only routed (``fhir: route``).
  Errors are OperationOutcomes.

Authentication (bearer tokens or an explicit ``open``), TLS and the HTTP limits and
timeouts are the FHIR listener's, from the module they share (listeners/http_common.py,
engine/http/); request bodies are bounded per request and in total
(listeners/fhir_body.py). What a body is comes from its Content-Type and is checked
against its bytes.
"""

from __future__ import annotations

import asyncio
import traceback
import uuid
from pathlib import Path
from typing import Any, Literal

import structlog
from pydantic import Field
from sqlalchemy import exc as sa_exc
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from engine.components import field_of
from engine.context import ComponentContext
from engine.envelope import Kind
from engine.hl7.ack import build_ack
from engine.hl7.message import APPLICATION_INTERNAL_ERROR, HL7Error
from engine.http.limits import HttpBodyLimitsConfig
from engine.registry import component
from engine.security.tls import TLSConfig
from engine.store.fhir.params import FhirError
from listeners.fhir_body import BodyBudget, read_body, release_body
from listeners.fhir_bundles import fhir_response, response_bundle, version_headers
from listeners.hl7_receive import Hl7Receiver
from listeners.http_common import BearerAuth, BearerTokens, UvicornService
from listeners.ingest import DicomIngest, FhirIngest, IngestConfig, detect

log = structlog.get_logger()
RETRY_AFTER = "5"
HL7_TYPES = ("application/hl7-v2", "x-application/hl7-v2+er7", "text/plain", "application/edi-hl7")
FHIR_TYPES = ("application/fhir+json", "application/json", "application/json+fhir")
DICOM_TYPES = ("application/dicom",)
UNAVAILABLE = (sa_exc.OperationalError, sa_exc.InterfaceError, sa_exc.TimeoutError, sa_exc.DisconnectionError,
               OSError)


class HttpSourceConfig(IngestConfig, HttpBodyLimitsConfig):
    """Receive HL7 v2, DICOM or FHIR JSON by HTTP POST to one URL; answered once committed."""

    type: Literal["http"]
    host: str = Field("127.0.0.1", description="address to bind; loopback unless told otherwise")
    port: int = Field(8081, ge=0, le=65535, description="TCP port (0: pick a free one, for tests)")
    path: str = Field("/", pattern=r"^(/[A-Za-z0-9._~-]+)*/?$", description="the channel's URL path, e.g. /hl7")
    auth: BearerAuth = Field(description="`{bearer_tokens: [\"${API_TOKEN}\"]}` or `{open: true}`; required")
    tls: TLSConfig | None = Field(None, description="serve HTTPS with these cert/key (BCP 195 settings)")
    accept: list[Kind] = field_of(IngestConfig, "accept",
                                  description="kinds taken (hl7v2, dicom, fhir); others get 415")
    calling_ae_title: str = field_of(IngestConfig, "calling_ae_title", default="HTTP")


class _Refused(Exception):
    """An answer decided before the body was handled (auth, type, size), in the kind's own form."""

    def __init__(self, status: int, text: str, kind: Kind | None, headers: dict[str, str] | None = None,
                 code: str = "processing") -> None:
        super().__init__(text)
        self.status, self.text, self.kind, self.headers, self.code = status, text, kind, headers or {}, code


def _kind_of(content_type: str) -> Kind | None:
    ctype = content_type.split(";")[0].strip().lower()
    if ctype in HL7_TYPES:
        return "hl7v2"
    if ctype in DICOM_TYPES:
        return "dicom"
    if ctype in FHIR_TYPES:
        return "fhir"
    return None


class HttpApi:
    """The one endpoint of a channel and its error boundary."""

    def __init__(self, config: HttpSourceConfig, ctx: ComponentContext) -> None:
        self.config = config
        self.ctx = ctx
        self.tokens = BearerTokens(config.auth)
        self.budget = BodyBudget(config.body_budget_bytes)
        self.hl7 = Hl7Receiver(ctx, accept_versions=config.accept_versions,
                               accept_processing_ids=config.accept_processing_ids)
        self.fhir = FhirIngest(ctx, mode=config.fhir, max_bytes=config.max_body_bytes)
        self.dicom = DicomIngest(ctx, ae_title=config.ae_title, calling_aet=config.calling_ae_title)

    def app(self) -> Starlette:
        path = self.config.path.rstrip("/") or "/"
        routes = [Route(path, self.endpoint, methods=["POST"])]
        if path != "/":
            routes.append(Route(path + "/", self.endpoint, methods=["POST"]))
        return Starlette(routes=routes, exception_handlers={HTTPException: self._http_error,
                                                            Exception: self._unexpected})

    async def _http_error(self, request: Request, exc: Exception) -> Response:
        status = getattr(exc, "status_code", 500)
        text = {404: "no such endpoint", 405: "only POST is served here"}.get(status, "request failed")
        return JSONResponse({"error": text}, status_code=status, headers=dict(getattr(exc, "headers", None) or {}))

    async def _unexpected(self, request: Request, exc: Exception) -> Response:
        return self._internal_error(exc, None)

    def _internal_error(self, e: BaseException, kind: Kind | None) -> Response:
        """500 with an incident id for the log; the type and place, never the text (may quote PHI)."""
        incident = uuid.uuid4().hex[:12]
        frames = traceback.extract_tb(e.__traceback__)
        where = f"{Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else "?"
        log.error("http.internal_error", channel=self.ctx.channel, incident=incident, error=type(e).__name__,
                  where=where)
        log.debug("http.internal_error_detail", incident=incident, exc_info=e)
        return self._error(_Refused(500, f"internal error (incident {incident}); the server log has the details",
                                    kind, code="exception"))

    @staticmethod
    def _peer(request: Request) -> str:
        return f"{request.client.host}:{request.client.port}" if request.client else ""

    # -- the endpoint ---------------------------------------------------------------
    async def endpoint(self, request: Request) -> Response:
        kind = _kind_of(request.headers.get("content-type", ""))
        try:
            await self._authenticate(request, kind)
            if kind is None or kind not in self.config.accept:
                raise _Refused(415, "send " + " or ".join(self._types()), None, code="not-supported")
            try:
                body = await read_body(request, limit=self.config.max_body_bytes, budget=self.budget,
                                       wait=self.config.body_timeout / 2)
            except FhirError as e:
                raise _Refused(e.status, e.diagnostics, kind,
                               dict(e.headers or {}), code=e.code) from None
            if not body.strip(b" \t\r\n"):
                raise _Refused(400, "the body is empty", kind, code="required")
            seen = detect(body)
            if seen != kind:
                raise _Refused(400, f"the body is not {kind} as Content-Type says"
                               + (f" (it looks like {seen})" if seen else ""), kind, code="invalid")
            peer = self._peer(request)
            if kind == "hl7v2":
                return await self._hl7(request, body, peer)
            if kind == "dicom":
                return await self._dicom(body, peer)
            return await self._fhir(request, body, peer)
        except _Refused as e:
            return self._error(e)
        except ClientDisconnect:
            log.info("http.client_disconnected", channel=self.ctx.channel)
            return Response(status_code=400)
        except UNAVAILABLE as e:
            log.warning("http.store_unavailable", channel=self.ctx.channel, error=type(e).__name__)
            return self._error(_Refused(503, "the store is unavailable; retry later", kind,
                                        {"Retry-After": RETRY_AFTER}, code="transient"))
        except Exception as e:
            return self._internal_error(e, kind)
        finally:
            await release_body(request, self.budget)

    def _types(self) -> list[str]:
        names = {"hl7v2": "application/hl7-v2", "dicom": "application/dicom", "fhir": "application/fhir+json"}
        return [names[k] for k in self.config.accept]

    async def _authenticate(self, request: Request, kind: Kind | None) -> str:
        actor, reason = self.tokens.check(request.headers.get("authorization", ""))
        if actor is not None:
            return actor
        assert reason is not None
        await run_in_threadpool(self.ctx.audit.record, "login.failure", outcome="failure",
                                peer=self._peer(request), channel=self.ctx.channel, detail=reason)
        log.info("http.auth_failed", channel=self.ctx.channel, reason=reason)
        raise _Refused(401, reason, kind, {"WWW-Authenticate": BearerTokens.challenge(reason)}, code="login")

    def _error(self, e: _Refused) -> Response:
        """Each kind refused in its own form: an AR ACK, an OperationOutcome, a JSON error."""
        if e.kind == "hl7v2":
            ack = build_ack(None, "AR", error=HL7Error(APPLICATION_INTERNAL_ERROR, e.text[:200]))
            return Response(ack, status_code=e.status, media_type="application/hl7-v2", headers=e.headers)
        if e.kind == "fhir":
            severity = "error" if e.status < 500 else "fatal"
            return fhir_response({"resourceType": "OperationOutcome", "issue": [
                {"severity": severity, "code": e.code, "diagnostics": e.text}]}, e.status, e.headers)
        return JSONResponse({"error": e.text}, status_code=e.status, headers=e.headers)

    # -- the kinds ------------------------------------------------------------------------
    async def _hl7(self, request: Request, body: bytes, peer: str) -> Response:
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        media = "text/plain" if ctype == "text/plain" else "application/hl7-v2"
        msgs, batch = self.hl7.messages(body)
        if batch is None and len(msgs) > 1:
            ack = build_ack(None, "AR", error=HL7Error(APPLICATION_INTERNAL_ERROR,
                            "one message per request, or an FHS/BHS batch"))
            return Response(ack, status_code=400, media_type=media)
        result = await self.hl7.receive_all(body, peer)
        if batch is not None:
            answer = self.hl7.batch_ack(result)
        else:
            answer = result.answers[0].ack
        status = 200 if result.ok else 503 if result.retryable else 422
        headers = {"Retry-After": RETRY_AFTER} if status == 503 else {}
        return Response(answer, status_code=status, media_type=media, headers=headers)

    async def _dicom(self, body: bytes, peer: str) -> Response:
        a = await asyncio.to_thread(self.dicom.store, body, peer)
        status_hex = f"0x{a.status:04X}"
        if a.ok:
            return JSONResponse({"status": status_hex, "stored": True})
        code = 503 if a.retryable else 400
        headers = {"Retry-After": RETRY_AFTER} if a.retryable else {}
        return JSONResponse({"status": status_hex, "stored": False, "error": a.comment or "refused"},
                            status_code=code, headers=headers)

    async def _fhir(self, request: Request, body: bytes, peer: str) -> Response:
        f = await self.fhir.submit(body, peer)
        if not f.ok:
            return fhir_response(f.outcome, f.status, f.headers)
        base = str(request.base_url).rstrip("/")
        if f.bundle_type:
            return fhir_response(response_bundle(f.bundle_type, base, f.results, representation=False), 200)
        if not f.results:  # only routed (fhir: route), or a duplicate
            return fhir_response({"resourceType": "OperationOutcome", "issue": [
                {"severity": "information", "code": "informational",
                 "diagnostics": f"stored as message {f.message_id}"}]}, 202 if not f.duplicate else 200)
        r = f.results[0]
        headers: dict[str, str] = {}
        w = r.written
        if w is not None:
            headers = version_headers(w.version, w.last_updated)
            if r.status == 201 and r.location:
                headers["Location"] = r.location
        return fhir_response(r.resource, r.status, headers)


class HttpListener(UvicornService):
    kind = "http"
    label = "HTTP"

    def __init__(self, config: HttpSourceConfig, ctx: ComponentContext) -> None:
        super().__init__(config, ctx)
        self.config: HttpSourceConfig = config
        self.api = HttpApi(config, ctx)

    def app(self) -> Any:
        return self.api.app()

    async def start(self) -> None:
        await self.start_serving()
        host, port = self.address
        log.info("http.listening", channel=self.ctx.channel, host=host, port=port, path=self.config.path,
                 tls=self.config.tls is not None, auth="open" if self.config.auth.open else "bearer",
                 accept=",".join(self.config.accept))


@component("source", "http", config=HttpSourceConfig)
def build(config: HttpSourceConfig, ctx: ComponentContext) -> HttpListener:
    """HTTP POST of HL7 v2 (ACK in the answer), DICOM Part 10 or FHIR JSON; answered after commit."""
    return HttpListener(config, ctx)


__all__ = ["HttpListener", "HttpSourceConfig", "build"]
