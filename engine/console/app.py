"""The console's Starlette app: the API under /api, the pages at /, static files, error boundary.

Every request but /static and /login is authenticated (engine/console/auth.py); API errors
are ``{"error": code, "detail": text}`` with the right 4xx, and anything unexpected is a
500 with an incident id that the log carries, never a traceback. Handlers do their work in
a worker thread (store, decryption, transforms), never on the engine's event loop.
"""

from __future__ import annotations

import asyncio
import json
import secrets
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import structlog
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from engine.console import pages
from engine.console.api import Api, ApiError
from engine.console.auth import CSRF_FIELD, Principal, authenticate, csrf_passes

log = structlog.get_logger()

HERE = Path(__file__).resolve().parent
MAX_BODY = 64 * 1024
SECURITY_HEADERS = [
    (b"content-security-policy", b"default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                                 b"object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"),
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
    (b"cache-control", b"no-store"),
]


def error(status: int, code: str, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": code, "detail": detail}, status_code=status, headers=headers)


def peer_of(request: Request) -> str:
    c = request.client
    return f"{c.host}:{c.port}" if c else ""


def host_of(request: Request) -> str:
    return request.client.host if request.client else ""


async def read_json(request: Request) -> dict[str, Any]:
    """The JSON object of a POST body (empty body: {}), at most MAX_BODY bytes."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > MAX_BODY:
        raise ApiError(413, "too_large", f"request body over {MAX_BODY} bytes")
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY:
            raise ApiError(413, "too_large", f"request body over {MAX_BODY} bytes")
    if not body.strip():
        return {}
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise ApiError(400, "bad_request", "the body is not JSON") from None
    if not isinstance(doc, dict):
        raise ApiError(400, "bad_request", "the body must be a JSON object")
    return doc


class ConsoleApp:
    def __init__(self, console: Any) -> None:
        self.console = console
        self.api = Api(console)

    async def principal(self, request: Request) -> Principal | None:
        c = self.console
        return await asyncio.to_thread(authenticate, c.runtime.store, c.sessions, request.headers, request.cookies)

    def endpoint(self, work: Callable[..., Any], *, post: bool = False) -> Callable[[Request], Awaitable[Response]]:
        """An API endpoint: authenticate, CSRF (session POSTs), run ``work`` in a thread, JSON out."""

        async def handle(request: Request) -> Response:
            p: Principal | None = None
            try:
                p = await self.principal(request)
                if p is None:
                    return error(401, "unauthorized", "send Authorization: Bearer <token> or log in",
                                 {"WWW-Authenticate": 'Bearer realm="medrelay"'})
                body: dict[str, Any] = {}
                if post:
                    body = await read_json(request)
                    if not csrf_passes(p, request.headers, body):
                        await self.denied(request, p, "missing or wrong CSRF token")
                        return error(403, "csrf", "a console POST needs the session's CSRF token "
                                     f"(X-CSRF-Token header or a {CSRF_FIELD!r} member of the body)")
                    body.pop(CSRF_FIELD, None)  # the token's place, not a parameter of the work
                return JSONResponse(await asyncio.to_thread(work, p, request, body))
            except ApiError as e:
                if e.status == 403 and p is not None:
                    await self.denied(request, p, e.detail)
                return error(e.status, e.error, e.detail, e.headers)
            except Exception as e:
                return self.incident(request, e)

        return handle

    async def denied(self, request: Request, p: Principal, why: str) -> None:
        await asyncio.to_thread(self.console.audit.record, "console.access_denied", outcome="failure",
                                actor=p.user.name, peer=peer_of(request),
                                detail=f"{request.method} {request.url.path[:200]}: {why}"[:500])

    def incident(self, request: Request, e: BaseException) -> Response:
        incident = secrets.token_hex(6)
        log.error("console.internal_error", incident=incident, path=request.url.path[:200],
                  error=f"{type(e).__name__}: {str(e)[:200]}")
        if request.url.path.startswith("/api"):
            return error(500, "internal", f"internal error, incident {incident} (in the engine's log)")
        return Response(f"internal error, incident {incident}", status_code=500, media_type="text/plain")


def build_app(console: Any) -> Any:
    ca = ConsoleApp(console)
    api = ca.api
    ep = ca.endpoint
    routes = [
        Route("/api/me", ep(lambda p, r, b: api.me(p))),
        Route("/api/channels", ep(lambda p, r, b: api.channels(p))),
        Route("/api/channels/{name}", ep(lambda p, r, b: api.channel(p, r.path_params["name"]))),
        Route("/api/messages", ep(lambda p, r, b: api.messages(p, r.query_params, peer_of(r)))),
        Route("/api/messages/{mid}", ep(lambda p, r, b: api.message(p, r.path_params["mid"]))),
        Route("/api/messages/{mid}/payload", ep(lambda p, r, b: api.payload(p, r.path_params["mid"], peer_of(r)))),
        Route("/api/messages/{mid}/deliveries/{route}/output",
              ep(lambda p, r, b: api.output(p, r.path_params["mid"], r.path_params["route"], peer_of(r)))),
        Route("/api/messages/{mid}/replay", ep(lambda p, r, b: api.replay_one(p, r.path_params["mid"], b, peer_of(r)),
                                               post=True), methods=["POST"]),
        Route("/api/replay", ep(lambda p, r, b: api.replay(p, b, peer_of(r)), post=True), methods=["POST"]),
        Route("/api/audit", ep(lambda p, r, b: api.audit(p, r.query_params))),
        Mount("/static", app=StaticFiles(directory=HERE / "static"), name="static"),
        *pages.routes(ca),
    ]

    async def not_found(request: Request, exc: Exception) -> Response:
        status = getattr(exc, "status_code", 404)
        if request.url.path.startswith("/api"):
            code = {404: "not_found", 405: "method_not_allowed"}.get(status, "bad_request")
            return error(status, code, str(getattr(exc, "detail", "")) or code.replace("_", " "))
        return Response(str(getattr(exc, "detail", "not found")), status_code=status, media_type="text/plain")

    async def crashed(request: Request, exc: Exception) -> Response:
        return ca.incident(request, exc)

    app = Starlette(routes=routes, exception_handlers={HTTPException: not_found, Exception: crashed})
    return SecurityHeaders(app)


class SecurityHeaders:
    """Adds the security headers to every response (pure ASGI: no buffering of bodies)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def with_headers(message: Any) -> None:
            if message["type"] == "http.response.start":
                names = {k.lower() for k, _ in message.get("headers", [])}
                message["headers"] = [*message.get("headers", []),
                                      *((k, v) for k, v in SECURITY_HEADERS if k not in names)]
            await send(message)

        await self.app(scope, receive, with_headers)
