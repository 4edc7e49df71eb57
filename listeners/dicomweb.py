"""`source: {type: dicomweb}`: QIDO-RS, WADO-RS, STOW-RS and WADO-URI over the DICOM archive.

The same archive the DICOM listener serves (index and encrypted blobs), the same
matching as C-FIND / C-MOVE, the same intake as C-STORE: this module owns the config,
the routes, authentication, CORS, auditing and the one error boundary; the services
are listeners/dicomweb_qido.py, dicomweb_wado.py, dicomweb_stow.py (with
dicomweb_json.py, dicomweb_media.py, dicomweb_render.py). The HTTP server is the one
the FHIR listener runs (listeners/http_common.py: uvicorn in the engine's loop, the
guarded h11 protocol, medrelay's TLS upgrade).

Blocking work (index queries, blob reads, decoding, the intake) runs on worker threads,
never on the event loop that serves every connection.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import traceback
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal, TypeVar
from urllib.parse import parse_qsl

import structlog
from pydantic import Field
from pydicom.dataset import Dataset
from sqlalchemy import exc as sa_exc
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from engine.components import ComponentConfig, field_of
from engine.context import ComponentContext
from engine.dimse.stream_send import give_back_memory
from engine.http.limits import HttpBodyLimitsConfig
from engine.http.protocol import text_error_body
from engine.registry import component
from engine.security.tls import TLSConfig
from engine.store.dicom import index as idx
from engine.store.fhir.params import FhirError
from listeners import dicomweb_anonymize as anon
from listeners import dicomweb_media as media
from listeners import dicomweb_qido as qido
from listeners import dicomweb_stow as stow
from listeners import dicomweb_wado as wado
from listeners.dicom_dimse import valid_uid
from listeners.dicom_qr import BadIdentifier, QueryRetrieve
from listeners.dicom_store import StoreSCP
from listeners.dicomweb_json import DICOM_JSON
from listeners.dicomweb_render import THUMBNAIL, RenderError, parse_region, parse_viewport, parse_window, render
from listeners.fhir_body import BodyBudget
from listeners.http_common import BearerAuth, BearerTokens, UvicornService, link_base
from transforms.dicom_codec import TranscodeError

log = structlog.get_logger()
Handler = Callable[[Request, str], Awaitable[Response]]
UNAVAILABLE = (sa_exc.OperationalError, sa_exc.InterfaceError, sa_exc.TimeoutError, sa_exc.DisconnectionError,
               OSError)
RETRY_AFTER = "5"
IMAGE_TYPES = ("image/jpeg", "image/png")
# WADO-URI parameters that ask for a changed object we do not make (PS3.18 9.4.2): 400, not ignored
WADO_URI_UNSUPPORTED = ("presentationUID", "presentationSeriesUID")
# Query parameters no WADO-RS / QIDO-RS resource takes whose silent omission would mislead: anonymize
# is WADO-URI's (an identified instance must never pass for a de-identified one)
RS_REFUSED = ("anonymize",)
WORKERS = 16  # threads per listener: STOW-RS keeps up to 8 parts in the intake at once, reads the rest
T = TypeVar("T")


class DicomWebError(Exception):
    def __init__(self, status: int, text: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(text)
        self.status, self.text, self.headers = status, text, headers or {}


class CorsConfig(ComponentConfig):
    """Cross-origin access for browser viewers (OHIF, Weasis web) served from another origin."""

    allow_origins: list[str] = Field(default_factory=list, description=(
        "origins allowed to call the service from a browser, e.g. [\"https://viewer.example\"]; [\"*\"] for any"))
    max_age: int = Field(600, ge=0, description="seconds a browser may cache a preflight answer")


class DicomWebSourceConfig(ComponentConfig, HttpBodyLimitsConfig):
    """DICOMweb server (QIDO-RS, WADO-RS, STOW-RS, WADO-URI) over medrelay's DICOM archive."""

    type: Literal["dicomweb"]
    host: str = Field("127.0.0.1", description="address to bind; loopback unless told otherwise")
    port: int = Field(8042, ge=0, le=65535, description="TCP port (0: pick a free one, for tests)")
    base_path: str = Field("/dicom-web", pattern=r"^(/[A-Za-z0-9._~-]+)*$",
                           description="path prefix of the DICOMweb base URL, e.g. /dicom-web")
    public_url: str | None = Field(None, description=(
        "the base URL clients reach the service at (behind a proxy, or when host is 0.0.0.0); used for "
        "RetrieveURL / BulkDataURI and by dicom_to_fhir's Endpoint. Default: the request's Host when it names "
        "this server with the bound port, else the address the connection came in on (as the fhir source)"))
    auth: BearerAuth = Field(description="`{bearer_tokens: [\"${API_TOKEN}\"]}` or `{open: true}`; required")
    tls: TLSConfig | None = Field(None, description="serve HTTPS with these cert/key (BCP 195 settings)")
    cors: CorsConfig | None = Field(None, description="CORS for browser viewers; none: no CORS headers")
    ae_title: str = Field("MEDRELAY", description=(
        "the AE title recorded as Called AE Title of STOW-RS instances and given as RetrieveAETitle"))
    duplicates: Literal["keep_first", "replace"] = Field("keep_first", description=(
        "a re-sent SOP Instance UID: keep the stored instance (answered as stored) or replace it, as the DICOM "
        "listener's option of the same name"))
    case_insensitive_pn: bool = Field(True, description="match Person Names case-insensitively (as C-FIND)")
    max_results: int = Field(1000, ge=1, le=65535, description=(
        "most QIDO-RS results in one response; more are announced with a Warning header (use offset)"))
    max_body_bytes: int = field_of(HttpBodyLimitsConfig, "max_body_bytes", default=256 * 1024 * 1024,
                                   description=(
        "largest STOW-RS request body held in memory (its parts under 16 MiB; all of it when the blob store "
        "cannot stream); a larger declared Content-Length gets 413 before any byte is read"))
    body_budget_bytes: int = field_of(HttpBodyLimitsConfig, "body_budget_bytes", default=512 * 1024 * 1024,
                                      description=(
        "STOW-RS bodies held in memory at once, all connections together; at least max_body_bytes"))
    max_stream_bytes: int = Field(16 * 1024 * 1024 * 1024, gt=0, description=(
        "largest STOW-RS request body when parts of 16 MiB and more are streamed to the blob store (any "
        "local or S3 blob store); max_body_bytes then bounds only the smaller parts held in memory"))
    body_timeout: float = field_of(HttpBodyLimitsConfig, "body_timeout", default=300.0)

    def base_url(self) -> str:
        """The service's base URL as configured (public_url, else scheme://host:port/base_path)."""
        if self.public_url:
            return self.public_url.rstrip("/")
        scheme = "https" if self.tls else "http"
        return f"{scheme}://{self.host}:{self.port}{self.base_path}"


def _allows(ranges: list[media.MediaRange], single: str) -> bool:
    """Whether Accept allows the single-part ``single`` at all (e.g. ``*/*``)."""
    try:
        media.single(ranges, (single,))
    except media.NotAcceptable:
        return False
    return True


def _text(status: int, text: str, headers: dict[str, str] | None = None) -> Response:
    return Response(text + "\n", status_code=status, media_type="text/plain", headers=headers)


class DicomWebApi:
    """Request handlers of one listener."""

    def __init__(self, config: DicomWebSourceConfig, ctx: ComponentContext) -> None:
        self.config = config
        self.ctx = ctx
        self.prefix = config.base_path.rstrip("/")
        self.tokens = BearerTokens(config.auth)
        self.qr = QueryRetrieve(ctx, ae_title=config.ae_title, fold_pn=config.case_insensitive_pn,
                                move_destinations={})
        self.scp = StoreSCP(ctx, ae_title=config.ae_title, replace=config.duplicates == "replace")
        self.budget = BodyBudget(config.body_budget_bytes)
        self.anonymizer: anon.Anonymizer | None = None  # WADO-URI anonymize=yes, built on first use
        # Blocking work (index, blobs, codecs, the intake) on threads of this listener's own: a hop
        # through asyncio's executor costs about half of anyio's (starlette's run_in_threadpool), and
        # a small WADO-RS request is little more than its hop (measured: 1.2 vs 2.3 ms of CPU).
        self.pool = ThreadPoolExecutor(max_workers=WORKERS, thread_name_prefix=f"dicomweb-{ctx.channel}")

    async def _run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """``fn(*args, **kwargs)`` on a worker thread, in a copy of the caller's context (log bindings)."""
        call = functools.partial(contextvars.copy_context().run, fn, *args, **kwargs)
        return await asyncio.get_running_loop().run_in_executor(self.pool, call)

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)

    # -- plumbing -----------------------------------------------------------
    def app(self) -> Starlette:
        p, w = self.prefix, self._wrap
        st, se, sop = "/studies/{study}", "/series/{series}", "/instances/{instance}"
        routes = [
            Route(p + "/studies", w(self.studies), methods=["GET", "POST"]),
            Route(p + st, w(self.study), methods=["GET", "POST"]),
            Route(p + st + "/metadata", w(self.metadata), methods=["GET"]),
            Route(p + st + "/rendered", w(self.rendered), methods=["GET"]),
            Route(p + st + "/thumbnail", w(self.thumbnail), methods=["GET"]),
            Route(p + st + "/series", w(self.search), methods=["GET"]),
            Route(p + st + "/instances", w(self.search), methods=["GET"]),
            Route(p + st + se, w(self.retrieve), methods=["GET"]),
            Route(p + st + se + "/metadata", w(self.metadata), methods=["GET"]),
            Route(p + st + se + "/rendered", w(self.rendered), methods=["GET"]),
            Route(p + st + se + "/thumbnail", w(self.thumbnail), methods=["GET"]),
            Route(p + st + se + "/instances", w(self.search), methods=["GET"]),
            Route(p + st + se + sop, w(self.retrieve), methods=["GET"]),
            Route(p + st + se + sop + "/metadata", w(self.metadata), methods=["GET"]),
            Route(p + st + se + sop + "/rendered", w(self.rendered), methods=["GET"]),
            Route(p + st + se + sop + "/thumbnail", w(self.thumbnail), methods=["GET"]),
            Route(p + st + se + sop + "/bulkdata/{tag:path}", w(self.bulkdata), methods=["GET"]),
            Route(p + st + se + sop + "/frames/{frames}", w(self.frames), methods=["GET"]),
            Route(p + st + se + sop + "/frames/{frames}/rendered", w(self.rendered), methods=["GET"]),
            Route(p + st + se + sop + "/frames/{frames}/thumbnail", w(self.thumbnail), methods=["GET"]),
            Route(p + "/series", w(self.search), methods=["GET"]),
            Route(p + "/instances", w(self.search), methods=["GET"]),
            Route(p + "/wado", w(self.wado_uri), methods=["GET"]),
            Route(p or "/", w(self.wado_uri), methods=["GET"]),
        ]
        middleware = []
        cors = self.config.cors
        if cors is not None and cors.allow_origins:
            middleware.append(Middleware(
                CORSMiddleware, allow_origins=cors.allow_origins, allow_methods=["GET", "POST", "OPTIONS"],
                allow_headers=["Authorization", "Accept", "Content-Type", "Range"], max_age=cors.max_age,
                expose_headers=["Content-Location", "Warning", "Content-Range"]))
        return Starlette(routes=routes, middleware=middleware,
                         exception_handlers={HTTPException: self._http_error, Exception: self._unexpected})

    async def _http_error(self, request: Request, exc: Exception) -> Response:
        status = getattr(exc, "status_code", 500)
        return _text(status, {404: "no such resource", 405: "method not allowed here"}.get(status, "request failed"),
                     dict(getattr(exc, "headers", None) or {}))

    async def _unexpected(self, request: Request, exc: Exception) -> Response:
        return self._internal_error(exc)

    def _internal_error(self, e: BaseException) -> Response:
        """500 with an incident id for the log; the type and place, never the text (may quote PHI)."""
        incident = uuid.uuid4().hex[:12]
        frames = traceback.extract_tb(e.__traceback__)
        where = f"{Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else "?"
        log.error("dicomweb.internal_error", channel=self.ctx.channel, incident=incident, error=type(e).__name__,
                  where=where)
        log.debug("dicomweb.internal_error_detail", incident=incident, exc_info=e)
        return _text(500, f"internal error (incident {incident}); the server log has the details")

    def _wrap(self, fn: Handler) -> Callable[[Request], Awaitable[Response]]:
        """The one error boundary: known errors -> their status, the store unreachable -> 503,
        anything else -> 500 with an incident id, never a traceback."""

        wado_uri = fn == self.wado_uri

        async def endpoint(request: Request) -> Response:
            try:
                actor = await self._authenticate(request)
                if not wado_uri and any(key in request.query_params for key in RS_REFUSED):
                    raise DicomWebError(400, "anonymize is a WADO-URI parameter (requestType=WADO); the RESTful "
                                             "services do not de-identify")
                return await fn(request, actor)
            except DicomWebError as e:
                return _text(e.status, e.text, e.headers)
            except FhirError as e:  # the shared body budget's 503
                return _text(e.status, "the server is busy receiving other requests; retry later",
                             {"Retry-After": RETRY_AFTER})
            except (qido.QueryError, BadIdentifier) as e:
                return _text(400, str(e) or "invalid query")
            except media.NotAcceptable as e:
                return _text(406, str(e))
            except ClientDisconnect:
                log.info("dicomweb.client_disconnected", channel=self.ctx.channel)
                return Response(status_code=400)
            except UNAVAILABLE as e:
                log.warning("dicomweb.store_unavailable", channel=self.ctx.channel, error=type(e).__name__)
                return _text(503, "the store is unavailable; retry later", {"Retry-After": RETRY_AFTER})
            except Exception as e:
                return self._internal_error(e)
            finally:
                reserved = getattr(request.state, "body_reserved", 0)
                if reserved:
                    request.state.body_reserved = 0
                    await self.budget.release(reserved)

        return endpoint

    async def _authenticate(self, request: Request) -> str:
        actor, reason = self.tokens.check(request.headers.get("authorization", ""))
        if actor is not None:
            return actor
        assert reason is not None
        self.ctx.audit.record_soon("login.failure", outcome="failure", peer=self._peer(request),
                                   channel=self.ctx.channel, detail=reason)
        log.info("dicomweb.auth_failed", channel=self.ctx.channel, reason=reason)
        raise DicomWebError(401, reason, {"WWW-Authenticate": BearerTokens.challenge(reason)})

    @staticmethod
    def _peer(request: Request) -> str:
        return f"{request.client.host}:{request.client.port}" if request.client else ""

    def base(self, request: Request) -> str:
        """The base URL for RetrieveURL / BulkDataURI (``listeners.http_common.link_base``)."""
        return link_base(request, public_url=self.config.public_url, host=self.config.host,
                         port=self.config.port, prefix=self.prefix)

    def _audit(self, action: str, request: Request, actor: str, entity: dict[str, Any],
               outcome: str = "success") -> None:
        """Query and retrieve rows like C-FIND / C-MOVE (PS3.15 A.5 Query, Instances Transferred):
        who, from where, what level and how much; UIDs and PHI are not recorded. Group-committed
        off the request path (``Audit.record_soon``): committed just after the response."""
        self.ctx.audit.record_soon(action, outcome=outcome, actor=actor, peer=self._peer(request),
                              channel=self.ctx.channel, entity=entity)

    # -- QIDO-RS ---------------------------------------------------------------
    def _level_of(self, request: Request) -> tuple[str, dict[str, str]]:
        path = request.scope["path"]
        pp = request.path_params
        uids = {}
        if "study" in pp:
            uids["StudyInstanceUID"] = self._uid(pp["study"])
        if "series" in pp:
            uids["SeriesInstanceUID"] = self._uid(pp["series"])
        if path.endswith("/studies"):
            return "STUDY", uids
        if path.endswith("/series"):
            return "SERIES", uids
        return "IMAGE", uids

    @staticmethod
    def _uid(value: str) -> str:
        if not valid_uid(value):  # PS3.5 9.1 (no empty component): a malformed UID is 400, not "no such study"
            raise DicomWebError(400, "a UID is numbers separated by dots, at most 64 characters")
        return value

    async def studies(self, request: Request, actor: str) -> Response:
        if request.method == "POST":
            return await self.store(request, actor, None)
        return await self.search(request, actor)

    async def search(self, request: Request, actor: str) -> Response:
        level, uids = self._level_of(request)
        self._accept_json(request)
        q = qido.parse(parse_qsl(request.scope["query_string"].decode("latin-1"), keep_blank_values=True), level,
                       uids)  # what Starlette's query_params parses, without its multidict
        cap = self.config.max_results
        if q.limit is None or q.limit > cap:
            q.limit = cap
        base = self.base(request)

        def work() -> tuple[list[dict[str, Any]], int]:
            responses = self.qr.find_responses(q.identifier, "study")
            return qido.results_json(responses, q, base), len(responses)

        results, total = await self._run(work)
        self._audit("dicomweb.query", request, actor,
                    {"level": level, "matches": len(results)})
        log.info("dicomweb.query", channel=self.ctx.channel, level=level, matches=len(results))
        headers = {}
        if total > q.offset + len(results):
            q.warnings.append("299 medrelay: There are additional results that can be requested")
        if q.warnings:
            headers["Warning"] = ", ".join(q.warnings)
        if not results:
            return Response(status_code=204, headers=headers)
        return JSONResponse(results, media_type=DICOM_JSON, headers=headers)

    @staticmethod
    def _accept_json(request: Request, why: str | None = None) -> None:
        """406 unless Accept allows DICOM JSON (the only response encoding: no application/dicom+xml)."""
        ranges = media.parse_accept(request.headers.get("accept"))
        try:
            media.single(ranges, (DICOM_JSON, "application/json"))
        except media.NotAcceptable:
            raise media.NotAcceptable(why or "the response is application/dicom+json") from None

    # -- WADO-RS -----------------------------------------------------------------
    def _identifier(self, request: Request) -> tuple[Dataset, str]:
        pp = request.path_params
        ds = Dataset()
        ds.StudyInstanceUID = self._uid(pp["study"])
        level = "STUDY"
        if "series" in pp:
            ds.SeriesInstanceUID = self._uid(pp["series"])
            level = "SERIES"
        if "instance" in pp:
            ds.SOPInstanceUID = self._uid(pp["instance"])
            level = "IMAGE"
        ds.QueryRetrieveLevel = level
        return ds, level

    async def _refs(self, request: Request) -> tuple[list[idx.InstanceRef], str]:
        ident, level = self._identifier(request)
        refs = await self._run(self.qr.instances, ident, "study")
        if not refs:
            raise DicomWebError(404, {"STUDY": "no such study", "SERIES": "no such series"}.get(level,
                                                                                              "no such instance"))
        return refs, level

    def _instance_url(self, base: str, study: str, series: str | None, ref: idx.InstanceRef) -> str:
        return f"{base}/studies/{study}/series/{series}/instances/{ref.sop_uid}"

    async def study(self, request: Request, actor: str) -> Response:
        if request.method == "POST":
            return await self.store(request, actor, self._uid(request.path_params["study"]))
        return await self.retrieve(request, actor)

    async def retrieve(self, request: Request, actor: str) -> Response:
        ranges = media.parse_accept(request.headers.get("accept"))
        single = media.single_syntaxes(ranges, "application/dicom") if "instance" in request.path_params else None
        if single is not None:
            return await self._retrieve_single(request, actor, single)
        accepted = wado.accepted_syntaxes(media.wanted_parts(ranges, "application/dicom"))
        boundary = media.new_boundary()
        ctype = media.multipart_type(boundary, "application/dicom")
        if "instance" in request.path_params:  # one instance: converted before answering, so a failure is a status
            got = await self._fetch(request, accepted)
            if got.chunks is not None:  # large, as stored or converted frame by frame: part by part from the blob
                return StreamingResponse(self._stream_one(request, actor, got, boundary), media_type=ctype)
            assert got.whole is not None
            try:  # as stored: nothing to do, no hop to a worker thread
                data, ts = wado.as_part10(got.whole, accepted) if wado.as_stored(got.ref, accepted) else \
                    await self._run(wado.as_part10, got.whole, accepted)
            except TranscodeError as e:
                self._transcode_failed(got.ref, str(e))
                self._audit("dicomweb.retrieve", request, actor,
                            {"level": "IMAGE", "instances": 0, "failed": 1}, "failure")
                raise DicomWebError(406, "the instance cannot be given in any transfer syntax of Accept") from None
            self._audit("dicomweb.retrieve", request, actor,
                        {"level": "IMAGE", "instances": 1})
            body = media.part_head(boundary, f"application/dicom; transfer-syntax={ts}") + data + b"\r\n" + \
                media.closing(boundary)
            return Response(body, media_type=ctype)
        refs, level = await self._refs(request)
        tally = {"started": 0, "failed": 0}
        parts = self._stream(request, actor, refs, level, accepted, boundary, tally)
        first = await anext(parts)  # the first instance that converts, or the end when none did
        if not tally["started"]:  # the status line is still ours to choose: not an empty 200
            await parts.aclose()
            if tally["failed"]:
                raise DicomWebError(406, "no instance can be given in any transfer syntax of Accept")
            raise DicomWebError(404, {"STUDY": "no such study"}.get(level, "no such series"))

        async def body() -> AsyncIterator[bytes]:
            yield first
            async for chunk in parts:
                yield chunk

        return StreamingResponse(body(), media_type=ctype)

    async def _retrieve_single(self, request: Request, actor: str, accepted: list[str]) -> Response:
        """One instance as a single-part application/dicom body (Accept preferred it to multipart)."""
        got = await self._fetch(request, accepted)
        if got.chunks is not None:  # large, as stored: chunk by chunk from the blob
            ctype = f"application/dicom; transfer-syntax={got.transfer_syntax}"
            return StreamingResponse(self._stream_uri(request, actor, got.chunks, "instance"), media_type=ctype)
        assert got.whole is not None
        try:
            data, ts = wado.as_part10(got.whole, accepted) if wado.as_stored(got.ref, accepted) else \
                await self._run(wado.as_part10, got.whole, accepted)
        except TranscodeError as e:
            self._transcode_failed(got.ref, str(e))
            self._audit("dicomweb.retrieve", request, actor, {"level": "IMAGE", "instances": 0, "failed": 1},
                        "failure")
            raise DicomWebError(406, "the instance cannot be given in any transfer syntax of Accept") from None
        self._audit("dicomweb.retrieve", request, actor, {"level": "IMAGE", "instances": 1})
        return Response(data, headers={"Content-Type": f"application/dicom; transfer-syntax={ts}"})

    async def _fetch(self, request: Request, accepted: list[str]) -> wado.Fetched:
        """The instance of the path (study, series, instance), streamed or whole (``wado.fetch``)."""
        pp = request.path_params
        study, series, sop = self._uid(pp["study"]), self._uid(pp["series"]), self._uid(pp["instance"])
        got = await self._run(wado.fetch, self.ctx, sop, accepted, study_uid=study, series_uid=series)
        if got is None:
            raise DicomWebError(404, "no such instance")
        return got

    async def _chunks(self, chunks: Iterator[bytes]) -> AsyncIterator[bytes]:
        """Decrypt and authenticate each chunk on a worker thread; the event loop only writes them
        (uvicorn waits for the socket to drain, so a slow client holds about a chunk, not the instance)."""
        while (chunk := await self._run(next, chunks, None)) is not None:
            yield chunk
        await self._run(give_back_memory)  # a large instance's freed pages (frames decoded) back to the system

    async def _stream_one(self, request: Request, actor: str, got: wado.Fetched,
                          boundary: str) -> AsyncIterator[bytes]:
        assert got.chunks is not None
        done = False
        try:
            yield media.part_head(boundary, f"application/dicom; transfer-syntax={got.transfer_syntax}")
            async for chunk in self._chunks(got.chunks):
                yield chunk
            yield b"\r\n" + media.closing(boundary)
            done = True
        finally:  # not done: the client went away, or a chunk failed its check (the connection is cut)
            self._audit("dicomweb.retrieve", request, actor,
                        {"level": "IMAGE", "instances": int(done), "failed": int(not done)},
                        "success" if done else "failure")

    async def _stream(self, request: Request, actor: str, refs: list[idx.InstanceRef], level: str,
                      accepted: list[str], boundary: str, tally: dict[str, int]) -> AsyncIterator[bytes]:
        """The parts of a study/series; ``tally`` counts instances started and failed before each is
        yielded, so the caller sees at the first chunk whether any instance could be given at all."""
        sent = failed = 0
        try:
            for ref in refs:
                got = await self._run(wado.fetch, self.ctx, ref.sop_uid, accepted)
                if got is None:  # removed (IOCM) since the look-up
                    continue
                if got.chunks is not None:
                    tally["started"] += 1
                    yield media.part_head(boundary, f"application/dicom; transfer-syntax={got.transfer_syntax}")
                    async for chunk in self._chunks(got.chunks):
                        yield chunk
                    yield b"\r\n"
                    sent += 1
                    continue
                assert got.whole is not None
                try:
                    data, ts = wado.as_part10(got.whole, accepted) if wado.as_stored(ref, accepted) else \
                        await self._run(wado.as_part10, got.whole, accepted)
                except TranscodeError as e:
                    failed += 1
                    tally["failed"] += 1
                    self._transcode_failed(ref, str(e))
                    continue
                tally["started"] += 1
                yield media.part_head(boundary, f"application/dicom; transfer-syntax={ts}") + data + b"\r\n"
                sent += 1
            yield media.closing(boundary)
        finally:
            log.info("dicomweb.retrieve", channel=self.ctx.channel, level=level, instances=sent, failed=failed)
            self._audit("dicomweb.retrieve", request, actor,
                        {"level": level, "instances": sent, "failed": failed},
                        "success" if not failed else "failure")

    def _transcode_failed(self, ref: idx.InstanceRef, reason: str) -> None:
        log.warning("dicomweb.transcode_failed", channel=self.ctx.channel, stored=ref.transfer_syntax,
                    reason=reason[:200], status="not sent")

    async def metadata(self, request: Request, actor: str) -> Response:
        self._accept_json(request)
        refs, level = await self._refs(request)
        base = self.base(request)
        series_of = await self._run(self._series_uids, refs)

        def work() -> list[dict[str, Any]]:
            out = []
            for ref in refs:
                inst = wado.read_part10(self.ctx, ref)
                url = self._instance_url(base, request.path_params["study"], series_of.get(ref.sop_uid), ref)
                out.append(wado.metadata_json(inst, url))
            return out

        body = await self._run(work)
        self._audit("dicomweb.retrieve", request, actor,
                    {"level": level, "what": "metadata", "instances": len(body)})
        return JSONResponse(body, media_type=DICOM_JSON)

    def _series_uids(self, refs: list[idx.InstanceRef]) -> dict[str, str]:
        from sqlalchemy import select

        i, s = idx.instances, idx.series
        with self.ctx.store.engine.connect() as conn:
            out: dict[str, str] = {}
            uids = [r.sop_uid for r in refs]
            for start in range(0, len(uids), 500):
                q = select(i.c.sop_uid, s.c.series_uid).select_from(i.join(s, i.c.series_pk == s.c.pk)).where(
                    i.c.sop_uid.in_(uids[start:start + 500]))
                out.update({a: b for a, b in conn.execute(q)})
            return out

    async def _one(self, request: Request) -> wado.Stored:
        got = await self._fetch(request, [])  # nothing "as stored": read whole, for the data set
        assert got.whole is not None
        return got.whole

    async def bulkdata(self, request: Request, actor: str) -> Response:
        try:
            path = wado.parse_bulk_path(request.path_params["tag"])
        except ValueError as e:
            raise DicomWebError(404, str(e)) from None
        ranges = media.parse_accept(request.headers.get("accept"))
        if path == [wado.PIXEL_DATA]:
            pp = request.path_params
            rng = request.headers.get("range") if _allows(ranges, wado.OCTET) else None  # as the whole path
            try:
                streamed = await self._run(wado.streamed_pixels, self.ctx, self._uid(pp["instance"]), ranges,
                                           study_uid=self._uid(pp["study"]), series_uid=self._uid(pp["series"]),
                                           range_header=rng)
            except wado.RangeNotSatisfiable as e:
                return Response(status_code=416, headers={"Content-Range": f"bytes */{e.size}"})
            if streamed is not None:  # large and encapsulated, asked for decoded (a byte range of it): frame by frame
                return await self._stream_bulk(request, actor, streamed)
        inst = await self._one(request)
        try:
            got = await self._run(wado.bulk, inst, path, ranges)  # encapsulated Pixel Data: as /frames
        except KeyError:
            raise DicomWebError(404, "the instance has no such bulk data") from None
        except TranscodeError as e:
            self._transcode_failed(inst.ref, str(e))
            raise DicomWebError(406, "the pixel data cannot be decoded for the media type asked") from None
        self._audit("dicomweb.retrieve", request, actor,
                    {"level": "IMAGE", "what": "bulkdata", "instances": 1})
        one = got.media_type == wado.OCTET and len(got.parts) == 1
        if one and (got.single or "range" in request.headers and _allows(ranges, wado.OCTET)):
            return self._single_octets(request, got.parts[0])  # byte ranges: of the single part
        boundary = media.new_boundary()
        head = media.part_head(boundary, got.media_type if got.transfer_syntax is None
                               else f"{got.media_type}; transfer-syntax={got.transfer_syntax}")
        body = b"".join(head + p + b"\r\n" for p in got.parts) + media.closing(boundary)
        return Response(body, media_type=media.multipart_type(boundary, got.media_type))

    async def _stream_bulk(self, request: Request, actor: str, got: wado.StreamedBulk) -> Response:
        """Decoded Pixel Data sent as it is decoded; the first frame before the status line, so a
        frame that cannot be decoded is 406, a later one cuts the connection (audited as failed)."""
        try:
            first = await self._run(next, got.chunks, b"")
        except TranscodeError as e:
            self._transcode_failed(got.ref, str(e))
            raise DicomWebError(406, "the pixel data cannot be decoded for the media type asked") from None
        boundary = media.new_boundary()

        async def body() -> AsyncIterator[bytes]:
            done = False
            try:
                if not got.single:
                    yield media.part_head(boundary, f"{wado.OCTET}; transfer-syntax={wado.EXPLICIT_LE}")
                yield first
                async for chunk in self._chunks(got.chunks):
                    yield chunk
                if not got.single:
                    yield b"\r\n" + media.closing(boundary)
                done = True
            finally:
                self._audit("dicomweb.retrieve", request, actor,
                            {"level": "IMAGE", "what": "bulkdata", "instances": int(done), "failed": int(not done)},
                            "success" if done else "failure")

        if got.span is not None:
            start, end = got.span
            return StreamingResponse(body(), status_code=206, media_type=wado.OCTET, headers={
                "Content-Length": str(end + 1 - start), "Content-Range": f"bytes {start}-{end}/{got.length}",
                "Accept-Ranges": "bytes"})
        if got.single:
            return StreamingResponse(body(), media_type=wado.OCTET, headers={"Content-Length": str(got.length)})
        return StreamingResponse(body(), media_type=media.multipart_type(boundary, wado.OCTET))

    def _single_octets(self, request: Request, value: bytes) -> Response:
        """application/octet-stream, with a byte range when asked (PS3.18 8.3.5.2, RFC 9110 14)."""
        try:
            rng = wado.byte_range(request.headers.get("range"), len(value))
        except ValueError:
            return Response(status_code=416, headers={"Content-Range": f"bytes */{len(value)}"})
        if rng is None:
            return Response(value, media_type=wado.OCTET, headers={"Accept-Ranges": "bytes"})
        start, end = rng
        return Response(value[start:end + 1], status_code=206, media_type=wado.OCTET,
                        headers={"Content-Range": f"bytes {start}-{end}/{len(value)}", "Accept-Ranges": "bytes"})

    async def frames(self, request: Request, actor: str) -> Response:
        try:
            numbers = wado.parse_frame_list(request.path_params["frames"])
        except ValueError as e:
            raise DicomWebError(400, str(e)) from None
        ranges = media.parse_accept(request.headers.get("accept"))
        wanted = media.wanted_parts(ranges, wado.OCTET)
        inst = await self._one(request)
        try:
            got, part_type, ts = await self._run(wado.frames, inst, numbers, wanted)
        except KeyError:
            raise DicomWebError(404, "no such frame (or the instance has no pixel data)") from None
        except TranscodeError as e:
            self._transcode_failed(inst.ref, str(e))
            raise DicomWebError(406, "the frames cannot be decoded for the media type asked") from None
        self._audit("dicomweb.retrieve", request, actor,
                    {"level": "IMAGE", "what": "frames", "instances": 1, "frames": len(got)})
        boundary = media.new_boundary()
        head = media.part_head(boundary, f"{part_type}; transfer-syntax={ts}")
        body = b"".join(head + f + b"\r\n" for f in got) + media.closing(boundary)
        return Response(body, media_type=media.multipart_type(boundary, part_type))

    async def rendered(self, request: Request, actor: str, *, thumbnail: bool = False) -> Response:
        ranges = media.parse_accept(request.headers.get("accept"))
        out_type = media.single(ranges, IMAGE_TYPES)
        qp = request.query_params
        try:
            window = parse_window(qp.get("window"))
            viewport = parse_viewport(qp.get("viewport"), (THUMBNAIL, THUMBNAIL) if thumbnail else None)
            quality = int(qp.get("quality", "90"))
            if not 1 <= quality <= 100:
                raise ValueError("quality is 1-100")
            numbers = wado.parse_frame_list(request.path_params["frames"]) if "frames" in request.path_params \
                else [1]
        except ValueError as e:
            raise DicomWebError(400, str(e)) from None
        refs, level = await self._refs(request)
        ref = refs[len(refs) // 2] if level != "IMAGE" else refs[0]  # a study/series shows a middle image
        inst = await self._run(wado.read_part10, self.ctx, ref)
        try:
            image = await self._run(lambda: render(inst.part10, frame=numbers[0], media_type=out_type,
                                                           window=window, viewport=viewport, quality=quality))
        except RenderError as e:
            raise DicomWebError(e.status, str(e)) from None
        self._audit("dicomweb.retrieve", request, actor,
                    {"level": level, "what": "thumbnail" if thumbnail else "rendered", "instances": 1})
        return Response(image, media_type=out_type)

    async def thumbnail(self, request: Request, actor: str) -> Response:
        return await self.rendered(request, actor, thumbnail=True)

    # -- WADO-URI ------------------------------------------------------------------
    async def wado_uri(self, request: Request, actor: str) -> Response:
        qp = request.query_params
        if qp.get("requestType") != "WADO":
            raise DicomWebError(400, "WADO-URI needs requestType=WADO")
        for key in ("studyUID", "seriesUID", "objectUID"):
            if not qp.get(key):
                raise DicomWebError(400, f"WADO-URI needs {key}")
        request.scope["path_params"] = {"study": qp["studyUID"], "series": qp["seriesUID"],
                                        "instance": qp["objectUID"]}
        content = [c.strip().split(";")[0] for c in qp.get("contentType", "image/jpeg").split(",")]
        for key in WADO_URI_UNSUPPORTED:  # asked-for changes we do not make: refused, never silently skipped
            if key in qp:
                raise DicomWebError(400, f"{key} is not supported here")
        anonymize = "anonymize" in qp
        if anonymize and qp["anonymize"] != "yes":
            raise DicomWebError(400, "anonymize must be yes (PS3.18 9.4.2.3)")
        if anonymize and "application/dicom" not in content:
            raise DicomWebError(400, "anonymize needs contentType=application/dicom (PS3.18 9.4.2.3)")
        if anonymize:
            return await self._wado_uri_anonymized(request, actor, qp.get("transferSyntax") or wado.EXPLICIT_LE)
        if "application/dicom" in content:
            ts = qp.get("transferSyntax") or wado.EXPLICIT_LE
            got = await self._fetch(request, [ts])
            if got.chunks is not None:  # large, in its stored syntax: streamed
                return StreamingResponse(self._stream_uri(request, actor, got.chunks), media_type="application/dicom")
            assert got.whole is not None
            inst = got.whole
            try:
                data, _ts = await self._run(wado.as_part10, inst, [ts])
            except TranscodeError as e:
                self._transcode_failed(inst.ref, str(e))
                raise DicomWebError(406, "the instance cannot be given in that transfer syntax") from None
            self._audit("dicomweb.retrieve", request, actor,
                        {"level": "IMAGE", "what": "wado-uri", "instances": 1})
            return Response(data, media_type="application/dicom")
        image_type = next((c for c in content if c in IMAGE_TYPES), None)
        if image_type is None:
            raise DicomWebError(406, "contentType is application/dicom, image/jpeg or image/png")
        try:
            window = None
            if qp.get("windowCenter") and qp.get("windowWidth"):
                window = parse_window(f"{qp['windowCenter']},{qp['windowWidth']}")
            rows, cols = qp.get("rows"), qp.get("columns")
            viewport = parse_viewport(f"{cols or rows},{rows or cols}", None) if rows or cols else None
            region = parse_region(qp.get("region"))
            frame = int(qp.get("frameNumber", "1"))
            quality = int(qp.get("imageQuality", "90"))
        except ValueError as e:
            raise DicomWebError(400, str(e)) from None
        inst = await self._one(request)
        try:
            image = await self._run(lambda: render(inst.part10, frame=frame, media_type=image_type,
                                                           window=window, viewport=viewport, region=region,
                                                           quality=max(1, min(quality, 100))))
        except RenderError as e:
            raise DicomWebError(e.status, str(e)) from None
        self._audit("dicomweb.retrieve", request, actor,
                    {"level": "IMAGE", "what": "wado-uri", "instances": 1})
        return Response(image, media_type=image_type)

    async def _wado_uri_anonymized(self, request: Request, actor: str, ts: str) -> Response:
        """The instance in ``ts``, then de-identified (dicomweb_anonymize: the Basic Profile, stable new
        UIDs); read whole, never streamed as stored. 403 when it may carry burned-in text."""
        inst = await self._one(request)

        def work() -> bytes:
            if self.anonymizer is None:  # here, on a worker: the key ring may read or write its file
                self.anonymizer = anon.Anonymizer(self.ctx)
            data, _ts = wado.as_part10(inst, [ts])
            return self.anonymizer.apply(data)

        try:
            data = await self._run(work)
        except TranscodeError as e:
            self._transcode_failed(inst.ref, str(e))
            raise DicomWebError(406, "the instance cannot be given in that transfer syntax") from None
        except anon.Refused as e:
            self._audit("dicomweb.retrieve", request, actor,
                        {"level": "IMAGE", "what": "wado-uri", "anonymize": True, "instances": 0, "failed": 1},
                        "failure")
            raise DicomWebError(403, str(e)) from None
        self._audit("dicomweb.retrieve", request, actor,
                    {"level": "IMAGE", "what": "wado-uri", "anonymize": True, "instances": 1})
        return Response(data, media_type="application/dicom")

    async def _stream_uri(self, request: Request, actor: str, chunks: Iterator[bytes],
                          what: str = "wado-uri") -> AsyncIterator[bytes]:
        done = False
        try:
            async for chunk in self._chunks(chunks):
                yield chunk
            done = True
        finally:
            self._audit("dicomweb.retrieve", request, actor,
                        {"level": "IMAGE", "what": what, "instances": int(done), "failed": int(not done)},
                        "success" if done else "failure")

    # -- STOW-RS ---------------------------------------------------------------------
    async def store(self, request: Request, actor: str, study: str | None) -> Response:
        if self.ctx.intake is None:
            raise DicomWebError(503, "no intake", {"Retry-After": RETRY_AFTER})
        try:
            boundary, declared = stow.boundary_of(request.headers.get("content-type", ""))
        except stow.StowError as e:
            raise DicomWebError(e.status, e.text) from None
        self._accept_json(request, "the STOW-RS response is application/dicom+json")  # 406 before the body
        limit = self.config.max_body_bytes  # held in memory; large parts stream (dicomweb_stow)
        client = request.client
        peer = f"{actor}@{client.host}:{client.port}" if client else actor
        streaming = stow.streaming_for(self.scp, peer, study, self.config.max_stream_bytes, self._run) \
            if declared == stow.DICOM_TYPE else None  # a metadata body is held in memory
        total = limit if streaming is None else max(limit, streaming.limit)
        length = request.headers.get("content-length", "").strip()
        if length and not (length.isascii() and length.isdigit()):
            raise DicomWebError(400, "Content-Length is not a number")
        if length and int(length) > total:
            stow.refuse_body(self.scp, peer, 413, f"body larger than {total} bytes")  # audited, as each below
            raise DicomWebError(413, f"body larger than {total} bytes")
        want = min(int(length), limit) if length else limit
        await self.budget.reserve(want, self.config.body_timeout / 2)
        request.state.body_reserved = want
        try:
            parts = await stow.read_parts(request.stream(), boundary, limit, streaming, declared)
        except stow.StowError as e:
            stow.refuse_body(self.scp, peer, e.status, e.text)
            raise DicomWebError(e.status, e.text) from None
        if not parts:
            stow.refuse_body(self.scp, peer, 400, "the body has no parts")
            raise DicomWebError(400, "the body has no parts")

        def run(part: stow.Part) -> Awaitable[stow.Result]:
            return self._run(stow.store_one, self.scp, part, peer, study)

        results = await stow.store_all(parts, run)
        status, body = stow.response(results, self.base(request), study)
        failed = sum(1 for r in results if r.status)
        log.info("dicomweb.stored", channel=self.ctx.channel, instances=len(results) - failed, failed=failed,
                 status=status)
        return JSONResponse(body, status_code=status, media_type=DICOM_JSON)


class DicomWebListener(UvicornService):
    """Serves DICOMweb until stopped; ``address`` is the bound (host, port)."""

    kind = "dicomweb"
    label = "DICOMweb"
    error_body = staticmethod(text_error_body)  # 408/431/503 outside a request: plain text, as its handlers

    def __init__(self, config: DicomWebSourceConfig, ctx: ComponentContext) -> None:
        super().__init__(config, ctx)
        self.config: DicomWebSourceConfig = config
        self.api = DicomWebApi(config, ctx)

    def app(self) -> Any:
        return self.api.app()

    async def stop(self) -> None:
        await super().stop()
        self.api.close()


@component("source", "dicomweb", config=DicomWebSourceConfig, kinds=("dicom",))
def build(config: DicomWebSourceConfig, ctx: ComponentContext) -> DicomWebListener:
    """DICOMweb (QIDO-RS, WADO-RS, STOW-RS, WADO-URI) over the archive the DICOM listener fills."""
    return DicomWebListener(config, ctx)
