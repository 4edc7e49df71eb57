"""The FHIR R4 REST API as a Starlette app: auth, error boundary, reads and writes.

Writes never touch the store directly: each is an envelope submitted to the intake
with a tx_hook that applies it to the FHIR store, so the resource, the message and
its deliveries commit together, and the client hears 201/200 only after that commit.
Reads run in a worker thread on their own connection and are audited.
"""

from __future__ import annotations

import json
import re
import traceback
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl

import structlog
from sqlalchemy import exc as sa_exc
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route

from engine.envelope import Envelope
from engine.store.fhir import binary, jsontext
from engine.store.fhir.binary import HELD_DATA_HEADER
from engine.store.fhir.bundle import (
    Op,
    check_op,
    op_from_entry,
    parse_batch,
    parse_bundle,
    precheck,
    prepare,
    run_batch,
    run_transaction,
)
from engine.store.fhir.params import ID_RE, READ_ONLY_TYPES, STORED_TYPES, FhirError
from engine.store.fhir.resources import FhirStore
from engine.store.fhir.search import history, search
from listeners import fhir_audit, fhir_binary
from listeners.fhir_body import (
    RETRY_AFTER,
    BodyBudget,
    HeavyGate,
    check_content_type,
    read_body,
    release_body,
)
from listeners.fhir_bundles import (
    FHIR_JSON,
    error_response,
    fhir_response,
    history_bundle,
    plain_searchset,
    response_bundle,
    searchset,
    version_headers,
)
from listeners.fhir_capability import capability_statement
from listeners.http_common import BearerTokens, link_base

if TYPE_CHECKING:
    from engine.context import ComponentContext
    from listeners.fhir import FhirSourceConfig

log = structlog.get_logger()
Handler = Callable[[Request, str], Awaitable[Response]]
JSON_TYPES = ("application/fhir+json", "application/json", "application/json+fhir", "text/json")
FORM = ("application/x-www-form-urlencoded",)  # POST _search
# A body may parse into at most this many bytes of objects per byte of max_body_bytes
# (real FHIR JSON takes ~8, an array of empty objects ~25; see engine.store.fhir.jsontext).
PARSE_COST_PER_BODY_BYTE = 16
VERSION_RE = re.compile(r"^[0-9]{1,18}$")  # fits a 64-bit column: a longer one is simply not there
# A Host field: a name or IPv4 address, or a bracketed IPv6 address; then an optional port.
# The store cannot be reached (database down, locked, pool exhausted; blob storage gone):
# the client should retry, so 503 with Retry-After, not 500.
UNAVAILABLE = (sa_exc.OperationalError, sa_exc.InterfaceError, sa_exc.TimeoutError, sa_exc.DisconnectionError,
               OSError)


class FhirApi:
    """Request handlers bound to one listener's config and engine context."""

    def __init__(self, config: FhirSourceConfig, ctx: ComponentContext) -> None:
        self.config = config
        self.ctx = ctx
        self.fs = FhirStore(ctx.store, ctx.keyring)
        self.prefix = config.base_path.rstrip("/")
        self._tokens = BearerTokens(config.auth)
        self.capability = capability_statement(auth_open=config.auth.open)
        self.budget = BodyBudget(config.body_budget_bytes)
        self.heavy = HeavyGate()

    # -- plumbing ----------------------------------------------------------
    def app(self) -> Starlette:
        p = self.prefix
        routes = [
            Route(p + "/metadata", self._wrap(self.metadata, public=True), methods=["GET"]),
            Route(p + "/", self._wrap(self.system), methods=["POST"]),
            Route(p + "/{type}/_search", self._wrap(self.search_post), methods=["POST"]),
            Route(p + "/{type}/_history", self._wrap(self.type_history), methods=["GET"]),
            Route(p + "/{type}/{id}/_history/{vid}", self._wrap(self.vread), methods=["GET"]),
            Route(p + "/{type}/{id}/_history", self._wrap(self.instance_history), methods=["GET"]),
            Route(p + "/{type}/{id}", self._wrap(self.instance), methods=["GET", "PUT", "DELETE"]),
            Route(p + "/{type}", self._wrap(self.type_level), methods=["GET", "POST", "PUT", "DELETE"]),
        ]
        if p:
            routes.insert(1, Route(p, self._wrap(self.system), methods=["POST"]))
        return Starlette(routes=routes, exception_handlers={HTTPException: self._http_error,
                                                            Exception: self._unexpected})

    async def _http_error(self, request: Request, exc: Exception) -> Response:
        status = getattr(exc, "status_code", 500)
        code = {404: "not-found", 405: "not-supported"}.get(status, "processing")
        text = {404: "no such endpoint", 405: "method not allowed here"}.get(status, "request failed")
        headers = dict(getattr(exc, "headers", None) or {})
        return error_response(FhirError(status, code, text, headers=headers))

    async def _unexpected(self, request: Request, exc: Exception) -> Response:
        """Starlette's last resort (outside any endpoint): still an OperationOutcome."""
        return self._internal_error(exc)

    def _internal_error(self, e: BaseException) -> Response:
        """500 with an incident id the operator finds in the log; the client learns nothing else.

        The log names the exception type and where it was raised, not its text (which may
        quote client data); the traceback is logged at debug level.
        """
        incident = uuid.uuid4().hex[:12]
        frames = traceback.extract_tb(e.__traceback__)
        where = f"{Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else "?"
        log.error("fhir.internal_error", channel=self.ctx.channel, incident=incident, error=type(e).__name__,
                  where=where)
        log.debug("fhir.internal_error_detail", incident=incident, exc_info=e)
        return error_response(FhirError(500, "exception", f"internal error (incident {incident}); "
                                                          "the server log has the details"))

    def _wrap(self, fn: Handler, *, public: bool = False) -> Callable[[Request], Awaitable[Response]]:
        """The one error boundary: FhirError -> its OperationOutcome, the store unreachable -> 503
        with Retry-After, anything else -> 500 with an incident id, never a traceback."""

        async def endpoint(request: Request) -> Response:
            try:
                actor = "anonymous" if public else await self._authenticate(request)
                self._check_accept(request)
                return await fn(request, actor)
            except FhirError as e:
                return error_response(e)
            except ClientDisconnect:  # gone (or timed out by engine.http.protocol): nobody to answer
                log.info("fhir.client_disconnected", channel=self.ctx.channel)
                return Response(status_code=400)
            except UNAVAILABLE as e:
                log.warning("fhir.store_unavailable", channel=self.ctx.channel, error=type(e).__name__)
                return error_response(FhirError(503, "transient", "the store is unavailable; retry later",
                                                headers={"Retry-After": RETRY_AFTER}))
            except Exception as e:
                return self._internal_error(e)
            finally:
                self.heavy.leave(request)
                await release_body(request, self.budget)

        return endpoint

    async def _authenticate(self, request: Request) -> str:
        actor, reason = self._tokens.check(request.headers.get("authorization", ""))
        if actor is not None:
            return actor
        assert reason is not None
        await run_in_threadpool(self.ctx.audit.record, "login.failure", outcome="failure",
                                peer=self._peer(request), channel=self.ctx.channel, detail=reason)
        log.info("fhir.auth_failed", channel=self.ctx.channel, reason=reason)
        raise FhirError(401, "login", reason, headers={"WWW-Authenticate": BearerTokens.challenge(reason)})

    @staticmethod
    def _check_accept(request: Request) -> None:
        if fhir_binary.is_data_type(request.path_params.get("type", "")):
            return  # a Binary is served as its own contentType too (listeners.fhir_binary)
        fmt = request.query_params.get("_format")
        accept = request.headers.get("accept", "")
        if fmt and "json" not in fmt:
            raise FhirError(406, "not-supported", "only JSON is supported")
        if accept and "json" not in accept and "*/*" not in accept:
            raise FhirError(406, "not-supported", "only application/fhir+json is supported")

    @staticmethod
    def _peer(request: Request) -> str:
        return f"{request.client.host}:{request.client.port}" if request.client else ""

    def _base(self, request: Request) -> str:
        """The base URL of Location, fullUrl and paging links (``listeners.http_common.link_base``)."""
        return link_base(request, public_url=self.config.public_url, host=self.config.host,
                         port=self.config.port, prefix=self.prefix)

    @staticmethod
    def _type(request: Request, *, write: bool = False) -> str:
        rtype = request.path_params["type"]
        if rtype in READ_ONLY_TYPES and write:
            raise FhirError(405, "not-supported", f"{rtype} is read-only")
        if rtype not in STORED_TYPES and rtype not in READ_ONLY_TYPES:
            raise FhirError(404, "not-supported", f"resource type {rtype} is not supported")
        return rtype

    @staticmethod
    def _id(request: Request) -> str:
        rid = request.path_params["id"]
        if not ID_RE.match(rid):
            raise FhirError(400, "invalid", "id must match [A-Za-z0-9-.]{1,64}")
        return rid

    async def _json(self, request: Request) -> tuple[bytes, Any]:
        """The body parsed (listeners.fhir_body: bounded, off the loop; engine.store.fhir.jsontext:
        UTF-8, nesting depth, surrogates)."""
        check_content_type(request, JSON_TYPES)
        body = await self._body(request)
        check_content_type(request, JSON_TYPES, body)  # a chunked body, or none declared
        await self.heavy.enter(request, len(body), self.config.body_timeout / 2)
        depth, cost = self.config.max_json_depth, PARSE_COST_PER_BODY_BYTE * self.config.max_body_bytes
        return body, await run_in_threadpool(jsontext.loads, body, max_depth=depth, max_cost=cost)

    async def _body(self, request: Request) -> bytes:
        return await read_body(request, limit=self.config.max_body_bytes, budget=self.budget,
                               wait=self.config.body_timeout / 2)

    @staticmethod
    def _if_match(request: Request) -> str | None:
        """If-Match as one list (RFC 9110 5.3: repeated field lines are one comma-separated list);
        None when absent. Parsed and compared by engine.store.fhir.resources.check_if_match."""
        values = request.headers.getlist("if-match")
        return ", ".join(values) if values else None

    @staticmethod
    def _prefer(request: Request, key: str) -> str | None:
        for part in request.headers.get("prefer", "").split(";"):
            for item in part.split(","):
                k, _, v = item.strip().partition("=")
                if k.strip().lower() == key:
                    return v.strip().strip('"').lower()
        return None

    def _audit(self, action: str, request: Request, actor: str, entity: dict[str, Any],
               outcome: str = "success") -> None:
        self.ctx.audit.record(action, outcome=outcome, actor=actor, peer=self._peer(request),
                              channel=self.ctx.channel, entity=entity)

    # -- reads -------------------------------------------------------------
    async def metadata(self, request: Request, actor: str) -> Response:
        return fhir_response(self.capability)

    async def instance(self, request: Request, actor: str) -> Response:
        # Starlette routes HEAD wherever GET is allowed: HEAD is a read (it must never fall through
        # to DELETE); the server sends the read's headers without its body.
        if request.method in ("GET", "HEAD"):
            return await self.read(request, actor)
        if request.method == "PUT":
            return await self.update(request, actor)
        if request.method == "DELETE":
            return await self.delete(request, actor)
        raise FhirError(405, "not-supported", "method not allowed here")

    async def read(self, request: Request, actor: str) -> Response:
        rtype, rid = self._type(request), self._id(request)

        def work() -> Response:
            what = {"what": f"{rtype}/{rid}"}
            try:
                with self.ctx.store.engine.connect() as conn:
                    if rtype == "AuditEvent":
                        body, headers = fhir_audit.read(conn, rid), {}
                    else:
                        row, body = self.fs.read(conn, rtype, rid)
                        headers = version_headers(row.version, row.last_updated)
                    if headers and request.headers.get("if-none-match") == headers["ETag"]:
                        response = Response(status_code=304, headers=headers)
                    elif fhir_binary.is_data_type(rtype):
                        response = fhir_binary.read_response(self.fs, conn, request, rtype, rid, row.version, body,
                                                             headers)
                    else:
                        response = fhir_response(body, 200, headers)
            except FhirError:
                self._audit("fhir.read", request, actor, what, outcome="failure")
                raise
            self._audit("fhir.read", request, actor, what)
            return response

        return await run_in_threadpool(work)

    async def vread(self, request: Request, actor: str) -> Response:
        rtype, rid, vid = self._type(request), self._id(request), request.path_params["vid"]
        if rtype == "AuditEvent":
            raise FhirError(405, "not-supported", "AuditEvent has no versions")
        if not VERSION_RE.match(vid):
            raise FhirError(404, "not-found", f"{rtype}/{rid} has no such version (version ids are numbers)")

        def work() -> Response:
            with self.ctx.store.engine.connect() as conn:
                body, last_updated = self.fs.vread(conn, rtype, rid, int(vid))
                headers = version_headers(int(vid), last_updated)
                if fhir_binary.is_data_type(rtype):
                    response = fhir_binary.read_response(self.fs, conn, request, rtype, rid, int(vid), body, headers)
                else:
                    response = fhir_response(body, 200, headers)
            self._audit("fhir.read", request, actor, {"what": f"{rtype}/{rid}/_history/{vid}"})
            return response

        return await run_in_threadpool(work)

    async def search_post(self, request: Request, actor: str) -> Response:
        check_content_type(request, FORM)
        body = await self._body(request)
        check_content_type(request, FORM, body)
        await self.heavy.enter(request, len(body), self.config.body_timeout / 2)
        form = await run_in_threadpool(parse_qsl, body.decode("utf-8", "replace"), keep_blank_values=True)
        params = [*request.query_params.multi_items(), *form]
        return await self._search(request, actor, params)

    async def _search(self, request: Request, actor: str, params: list[tuple[str, str]]) -> Response:
        rtype = self._type(request)
        strict = self._prefer(request, "handling") != "lenient"  # strict unless asked (R4 http.html)
        base = self._base(request)

        def work() -> Response:
            with self.ctx.store.engine.connect() as conn:
                if rtype == "AuditEvent":
                    resources, total, used, before, count = fhir_audit.search(conn, params, strict=strict)
                    link = [*used, ("_count", str(count))]
                    nxt = [*link, ("_cursor", str(before))] if before is not None else None
                    bundle = plain_searchset(base, rtype, resources, total, link, nxt)
                else:
                    result = search(self.fs, conn, rtype, params, strict=strict)
                    total = result.total
                    bundle = searchset(base, rtype, result, [v for k, v in params if k == "_include"])
            names = sorted({k for k, _ in params})  # names only: values may be identifiers
            self._audit("fhir.search", request, actor, {"type": rtype, "params": ",".join(names),
                                                        "total": total})
            return fhir_response(bundle)

        return await run_in_threadpool(work)

    async def _history(self, request: Request, actor: str, rid: str | None) -> Response:
        rtype = self._type(request)
        if rtype == "AuditEvent":
            raise FhirError(405, "not-supported", "AuditEvent has no history")
        params = list(request.query_params.multi_items())
        base = self._base(request)
        path = f"{rtype}/{rid}/_history" if rid else f"{rtype}/_history"

        def work() -> Response:
            with self.ctx.store.engine.connect() as conn:
                entries, total, cursor = history(self.fs, conn, rtype, rid, params)
            self._audit("fhir.read", request, actor, {"what": path, "total": total})
            return fhir_response(history_bundle(base, path, entries, total, cursor, params))

        return await run_in_threadpool(work)

    async def type_history(self, request: Request, actor: str) -> Response:
        return await self._history(request, actor, None)

    async def instance_history(self, request: Request, actor: str) -> Response:
        return await self._history(request, actor, self._id(request))

    # -- writes --------------------------------------------------------------
    async def type_level(self, request: Request, actor: str) -> Response:
        if request.method in ("GET", "HEAD"):  # HEAD: see ``instance``
            return await self._search(request, actor, list(request.query_params.multi_items()))
        if request.method not in ("POST", "PUT", "DELETE"):
            raise FhirError(405, "not-supported", "method not allowed here")
        rtype = self._type(request, write=True)
        query = list(request.query_params.multi_items())
        query = [(k, v) for k, v in query if k not in ("_format", "_pretty")]
        if request.method == "POST":
            ctype = fhir_binary.raw_content_type(request) if fhir_binary.is_data_type(rtype) else None
            if ctype is not None:
                return await self._raw_write(request, actor, "POST", rtype, self.fs.new_id(), ctype)
            raw, resource = await self._json(request)
            op = Op("POST", rtype, resource=resource, if_none_exist=request.headers.get("if-none-exist"))
            op.assigned_id = self.fs.new_id()
            return await self._write(request, actor, op, raw)
        if not query:
            raise FhirError(405, "not-supported", f"{request.method} on a type needs search parameters")
        if request.method == "PUT":
            raw, resource = await self._json(request)
            op = Op("PUT", rtype, query=query, resource=resource, if_match=self._if_match(request))
            return await self._write(request, actor, op, raw)
        op = Op("DELETE", rtype, query=query, if_match=self._if_match(request))
        return await self._write(request, actor, op, b"")

    async def update(self, request: Request, actor: str) -> Response:
        rtype, rid = self._type(request, write=True), self._id(request)
        ctype = fhir_binary.raw_content_type(request) if fhir_binary.is_data_type(rtype) else None
        if ctype is not None:
            return await self._raw_write(request, actor, "PUT", rtype, rid, ctype)
        raw, resource = await self._json(request)
        op = Op("PUT", rtype, rid, resource=resource, if_match=self._if_match(request))
        return await self._write(request, actor, op, raw)

    async def delete(self, request: Request, actor: str) -> Response:
        rtype, rid = self._type(request, write=True), self._id(request)
        return await self._write(request, actor, Op("DELETE", rtype, rid, if_match=self._if_match(request)), b"")

    async def _raw_write(self, request: Request, actor: str, method: str, rtype: str, rid: str,
                         content_type: str) -> Response:
        """Create/update a Binary from a body that is the content itself (listeners.fhir_binary).

        The bytes are sealed into their own blob before the write is submitted; the message the
        intake stores is the Binary resource without ``data`` (the FHIR store keeps the bytes)."""
        sealer = binary.PieceSealer(self.ctx.store, binary.data_aad(rtype, rid), self.fs.hash_key)
        sealed = await fhir_binary.receive(request, sealer, limit=self.config.max_binary_bytes, budget=self.budget,
                                           wait=self.config.body_timeout / 2)
        resource = {"resourceType": rtype, "contentType": content_type}
        if method == "PUT":
            resource["id"] = rid
        op = Op(method, rtype, rid if method == "PUT" else None, resource=resource, data=sealed,
                if_match=self._if_match(request))
        if method == "POST":
            op.assigned_id = rid
        raw = json.dumps(resource, separators=(",", ":")).encode()
        try:
            return await self._write(request, actor, op, raw)
        except BaseException:
            if sealed.file_written:  # not referenced by any committed row: remove now, not at the next gc
                await run_in_threadpool(self.ctx.store.delete_blob_files, [sealed.blob_id])
            raise

    async def _write(self, request: Request, actor: str, op: Op, raw: bytes) -> Response:
        def pre() -> Any:
            check_op(op)  # validation: CPU, so off the loop like the database check
            with self.ctx.store.engine.connect() as conn:
                return precheck(self.fs, conn, op)

        done = await run_in_threadpool(pre)
        if done is None:
            interaction = {"POST": "create", "PUT": "update", "DELETE": "delete"}[op.method]
            headers = {"resourceType": op.type, "interaction": interaction}
            if op.id or op.assigned_id:
                headers["id"] = op.id or op.assigned_id
            if op.data is not None:  # the message is the Binary without its bytes: they are in the FHIR store
                headers[HELD_DATA_HEADER] = "fhir-store"
            results = await self._submit(request, actor, raw, headers,
                                         lambda conn, mid: run_transaction(self.fs, conn, [op], message_id=mid))
            done = results[0]
        w = done.written
        headers = {}
        if w is not None and w.resource is not None:
            headers = version_headers(w.version, w.last_updated)
            if done.status == 201:
                headers["Location"] = f"{self._base(request)}/{done.location}"
        if op.method == "DELETE":
            return Response(status_code=204)
        prefer = self._prefer(request, "return")
        if prefer == "minimal":
            return Response(status_code=done.status, headers=headers)
        if prefer == "operationoutcome":
            return fhir_response({"resourceType": "OperationOutcome", "issue": [
                {"severity": "information", "code": "informational", "diagnostics": done.status_line}]},
                done.status, headers)
        return fhir_response(done.resource, done.status, headers)

    async def system(self, request: Request, actor: str) -> Response:
        raw, bundle = await self._json(request)
        btype, entries = parse_bundle(bundle)
        if btype == "transaction":
            ops: list[Op] = []

            def dry_run() -> None:
                ops.extend(op_from_entry(e, i) for i, e in enumerate(entries))
                with self.ctx.store.engine.connect() as conn:
                    prepare(self.fs, conn, ops)

            await run_in_threadpool(dry_run)

            def apply(conn: Any, mid: str) -> Any:
                return run_transaction(self.fs, conn, ops, message_id=mid)
        else:
            parsed = await run_in_threadpool(parse_batch, entries)

            def apply(conn: Any, mid: str) -> Any:
                return run_batch(self.fs, conn, parsed, message_id=mid)

        results = await self._submit(request, actor, raw, {"resourceType": "Bundle", "interaction": btype},
                                     apply)
        representation = self._prefer(request, "return") == "representation"
        return fhir_response(response_bundle(btype, self._base(request), results,
                                             representation=representation))

    async def _submit(self, request: Request, actor: str, raw: bytes, headers: dict[str, str],
                      apply: Callable[[Any, str], Any]) -> Any:
        """Hand the write to the intake; the store change commits with the message or not at all."""
        intake = self.ctx.intake
        if intake is None:
            raise FhirError(503, "transient", "this listener has no intake", headers={"Retry-After": RETRY_AFTER})
        failure: dict[str, FhirError] = {}
        peer = self._peer(request)
        action = f"fhir.{headers['interaction']}"

        def tx_hook(conn: Any, env: Envelope) -> Any:
            failure.clear()
            try:
                result = apply(conn, env.id)
            except FhirError as e:
                failure["error"] = e
                raise
            self.ctx.audit.record(action, actor=actor, peer=peer, channel=self.ctx.channel, message_id=env.id,
                                  entity={"type": headers["resourceType"], "id": headers.get("id", "")},
                                  conn=conn)
            return result

        env = Envelope(channel=self.ctx.channel, kind="fhir", payload=raw, headers=headers, peer=peer)
        outcome = await intake.submit(env, tx_hook=tx_hook)
        if outcome.ok:
            log.info("fhir.accepted", channel=self.ctx.channel, message_id=outcome.message_id,
                     resource_type=headers["resourceType"], interaction=headers["interaction"])
            return outcome.result
        if "error" in failure:
            raise failure["error"]
        log.error("fhir.not_stored", channel=self.ctx.channel, message_id=env.id, status=outcome.status,
                  error=outcome.error)
        raise FhirError(503, "transient", "the request could not be stored; retry later",
                        headers={"Retry-After": RETRY_AFTER})


__all__ = ["FHIR_JSON", "FhirApi"]
