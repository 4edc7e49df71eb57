"""The console's pages: server-rendered templates over the same Api functions as /api.

Plain HTML forms (GET for filters, POST with the session's CSRF token for actions) so
every page works without JavaScript and with a screen reader; static/console.js adds the
dashboard's live counters and sparklines (polling /api/channels), shows times in the
browser's zone and asks before a bulk replay. Nothing is loaded from another origin.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode

from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Route
from starlette.templating import Jinja2Templates

from engine.console.api import ApiError
from engine.console.auth import LOGIN_CSRF_COOKIE, SESSION_COOKIE, Principal, check_password, csrf_passes

HERE = Path(__file__).resolve().parent
MAX_FORM = 64 * 1024
templates = Jinja2Templates(directory=str(HERE / "templates"))


def _iso(ts: float | None) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds").replace("+00:00", "Z") if ts else ""


templates.env.filters["iso"] = _iso


class Form:
    """A urlencoded form body: ``get`` the first value, ``getlist`` all of a name."""

    def __init__(self, pairs: list[tuple[str, str]]) -> None:
        self.pairs = pairs

    def get(self, name: str, default: str | None = None) -> str | None:
        return next((v for k, v in self.pairs if k == name), default)

    def getlist(self, name: str) -> list[str]:
        return [v for k, v in self.pairs if k == name]


async def read_form(request: Request) -> Form:
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_FORM:
            raise ApiError(413, "too_large", "form too large")
    try:
        return Form(parse_qsl(body.decode("utf-8"), keep_blank_values=True, max_num_fields=2000))
    except (UnicodeDecodeError, ValueError):
        raise ApiError(400, "bad_request", "not a form") from None


def _safe_next(target: str | None) -> str:
    """Only a path of this console (no //host, no scheme): an open redirect is a phishing aid."""
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return "/"
    return target


def routes(ca: Any) -> list[Route]:
    c = ca.console
    api = ca.api

    def render(request: Request, name: str, p: Principal | None, status: int = 200, **ctx: Any) -> Response:
        return templates.TemplateResponse(request, name, {"me": p, "csrf": p.csrf if p else "", **ctx},
                                          status_code=status)

    def page(work: Callable[[Request, Principal], Any], *,
             post: bool = False) -> Callable[[Request], Awaitable[Response]]:
        """A page: the session or a redirect to /login; POSTs need the CSRF token (header or field)."""

        async def handle(request: Request) -> Response:
            p: Principal | None = None
            try:
                p = await ca.principal(request)
                if p is None or p.via != "session":
                    nxt = request.url.path + (f"?{request.url.query}" if request.url.query else "")
                    return RedirectResponse("/login?" + urlencode({"next": nxt}), status_code=303)
                if post:
                    form = await read_form(request)
                    if not csrf_passes(p, request.headers, form):
                        await ca.denied(request, p, "missing or wrong CSRF token")
                        return render(request, "error.html", p, 403, message="This form has expired or did not "
                                      "come from the console (CSRF check). Go back, reload and try again.")
                    request.state.form = form
                result = await asyncio.to_thread(work, request, p)
                if isinstance(result, Response):
                    return result
                name, ctx = result
                return render(request, name, p, **ctx)
            except ApiError as e:
                if e.status == 403 and p is not None:
                    await ca.denied(request, p, e.detail)
                return render(request, "error.html", p, e.status, message=e.detail)
            except Exception as e:
                return ca.incident(request, e)

        return handle

    # -- login ---------------------------------------------------------------------------
    async def login_form(request: Request) -> Response:
        token = secrets.token_urlsafe(24)
        resp = render(request, "login.html", None, login_csrf=token, next=_safe_next(request.query_params.get("next")),
                      failed=request.query_params.get("failed"), ldap=c.ldap is not None)
        resp.set_cookie(LOGIN_CSRF_COOKIE, token, httponly=True, samesite="strict", secure=c.secure, path="/login")
        return resp

    async def login(request: Request) -> Response:
        try:
            form = await read_form(request)
        except ApiError as e:
            return Response(e.detail, status_code=e.status, media_type="text/plain")
        name = (form.get("username") or "").strip()
        password = form.get("password") or ""
        nxt = _safe_next(form.get("next"))
        cookie = request.cookies.get(LOGIN_CSRF_COOKIE, "")
        if not cookie or not secrets.compare_digest(cookie, form.get("csrf") or ""):
            return RedirectResponse("/login?" + urlencode({"next": nxt, "failed": "expired"}), status_code=303)
        addr = request.client.host if request.client else ""
        peer = f"{addr}:{request.client.port}" if request.client else ""
        wait = await asyncio.to_thread(c.limiter.admit, name, addr)  # the store's failed-login counts
        if wait is not None:
            await asyncio.to_thread(c.audit.record, "console.login", outcome="failure", actor=name[:128], peer=peer,
                                    detail="refused: too many failed logins (rate limited)")
            resp = render(request, "login.html", None, 429, login_csrf=cookie, next=nxt, failed="limited",
                          ldap=c.ldap is not None)
            resp.headers["Retry-After"] = str(int(wait) + 1)
            return resp
        user = await asyncio.to_thread(check_password, c.runtime.store, c.ldap, name, password)
        if user is None:
            await asyncio.to_thread(c.limiter.failed, name, addr)
            await asyncio.to_thread(c.audit.record, "console.login", outcome="failure", actor=name[:128], peer=peer,
                                    detail="wrong user name or password")
            return RedirectResponse("/login?" + urlencode({"next": nxt, "failed": "1"}), status_code=303)
        await asyncio.to_thread(c.limiter.succeeded, name)
        token = await asyncio.to_thread(c.sessions.create, user, peer)
        await asyncio.to_thread(c.audit.record, "console.login", actor=user.name, peer=peer,
                                detail=f"session started ({user.source} user, role {user.role})")
        resp = RedirectResponse(nxt, status_code=303)
        resp.set_cookie(SESSION_COOKIE, token, httponly=True, samesite="strict", secure=c.secure, path="/")
        resp.delete_cookie(LOGIN_CSRF_COOKIE, path="/login")
        return resp

    def logout(request: Request, p: Principal) -> Response:
        token = request.cookies.get(SESSION_COOKIE)
        if token:
            c.sessions.end(token)
        c.audit.record("console.logout", actor=p.user.name, peer=_peer(request), detail="session ended")
        resp = RedirectResponse("/login", status_code=303)
        resp.delete_cookie(SESSION_COOKIE, path="/")
        return resp

    # -- pages ---------------------------------------------------------------------------
    def dashboard(request: Request, p: Principal) -> Any:
        return "dashboard.html", {"overview": api.channels(p), "title": "Dashboard"}

    def browser(request: Request, p: Principal) -> Any:
        params = {k: v for k, v in request.query_params.items() if v}
        result, problem = None, None
        try:
            result = api.messages(p, {"limit": "50", **params}, _peer(request))
        except ApiError as e:
            if e.status not in (400, 403):
                raise
            problem = e.detail
        more = None
        if result and result["next_cursor"]:
            more = "/messages?" + urlencode({**params, "cursor": result["next_cursor"]})
        return "messages.html", {"title": "Messages", "f": params, "result": result, "problem": problem,
                                 "more": more, "channels": list(c.runtime.settings.channels),
                                 "operator": p.user.can("operator")}

    def detail(request: Request, p: Principal) -> Any:
        mid = request.path_params["mid"]
        info = api.message(p, mid)
        raw, outputs = None, []
        if p.user.can("operator"):
            raw = api.payload(p, mid, _peer(request))
            for d in info["deliveries"]:
                if d["route"] in info["routes_running"]:
                    outputs.append(api.output(p, mid, d["route"], _peer(request)))
        return "message.html", {"title": f"Message {mid}", "m": info, "raw": raw, "outputs": outputs,
                                "replayed": request.query_params.get("replayed"),
                                "operator": p.user.can("operator")}

    def replay_one(request: Request, p: Principal) -> Any:
        mid = request.path_params["mid"]
        route = request.state.form.get("route") or None
        got = api.replay_one(p, mid, {"route": route} if route else {}, _peer(request))
        return RedirectResponse(f"/messages/{mid}?replayed={got['requeued']}", status_code=303)

    def dead_letters(request: Request, p: Principal) -> Any:
        params = {k: v for k, v in request.query_params.items() if v and k in ("channel", "route", "cursor")}
        result = api.messages(p, {"limit": "100", **params, "state": "dead"}, _peer(request))
        more = None
        if result["next_cursor"]:
            more = "/dead-letters?" + urlencode({**params, "cursor": result["next_cursor"]})
        return "dead_letters.html", {"title": "Dead letters", "f": params, "result": result, "more": more,
                                     "channels": list(c.runtime.settings.channels),
                                     "replayed": request.query_params.get("replayed"),
                                     "operator": p.user.can("operator")}

    def dead_replay(request: Request, p: Principal) -> Any:
        form = request.state.form
        ids = form.getlist("id")
        body: dict[str, Any] = {"states": ["dead"]}
        if ids:
            body["ids"] = ids
        elif form.get("scope") == "filter":
            for k in ("channel", "route"):
                if form.get(k):
                    body[k] = form.get(k)
            if "channel" not in body and "route" not in body:
                body["all"] = True
        else:
            raise ApiError(400, "bad_request", "select dead letters, or choose to replay all that the filter shows")
        got = api.replay(p, body, _peer(request))
        keep = {k: form.get(k) for k in ("channel", "route") if form.get(k)}
        return RedirectResponse("/dead-letters?" + urlencode({**keep, "replayed": got["requeued"]}), status_code=303)

    def audit(request: Request, p: Principal) -> Any:
        params = {k: v for k, v in request.query_params.items() if v}
        result, problem = None, None
        try:
            result = api.audit(p, {"limit": "100", **params})
        except ApiError as e:
            if e.status != 400:
                raise
            problem = e.detail
        more = "/audit?" + urlencode({**params, "cursor": result["next_cursor"]}) if result and \
            result["next_cursor"] else None
        return "audit.html", {"title": "Audit trail", "f": params, "result": result, "problem": problem, "more": more}

    def channel(request: Request, p: Principal) -> Any:
        info = api.channel(p, request.path_params["name"])
        return "channel.html", {"title": f"Channel {info['name']}", "ch": info}

    return [
        Route("/login", login_form, methods=["GET"]),
        Route("/login", login, methods=["POST"]),
        Route("/logout", page(logout, post=True), methods=["POST"]),
        Route("/", page(dashboard)),
        Route("/messages", page(browser)),
        Route("/messages/{mid}", page(detail)),
        Route("/messages/{mid}/replay", page(replay_one, post=True), methods=["POST"]),
        Route("/dead-letters", page(dead_letters)),
        Route("/dead-letters/replay", page(dead_replay, post=True), methods=["POST"]),
        Route("/audit", page(audit)),
        Route("/channels/{name}", page(channel)),
    ]


def _peer(request: Request) -> str:
    cl = request.client
    return f"{cl.host}:{cl.port}" if cl else ""
