"""The admin API's endpoints: plain functions of (principal, parameters) -> JSON-able dict.

They run in a worker thread (engine/console/app.py wraps each with authentication, the role
check, CSRF and the JSON error boundary), so store queries, decryption and transforms never
hold the engine's event loop. The console's pages call the same functions.

Roles (engine/auth): ``viewer`` sees counters, listings and headers; ``operator`` also
payloads, route outputs, the blind filters and content search (they reveal whether a
patient has messages), replay and the audit trail. Every payload or output shown, and
every content search, is audited with the user and client address (``message.read``,
``message.search``); never the searched text or an identifier.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import and_, func, select

from engine import messages as msgs
from engine.console.auth import Principal
from engine.envelope import Drop, Envelope
from engine.pipeline import apply_transforms
from engine.store import schema

FINAL_STATES = ("dead", "done", "filtered", "quarantined", "superseded")
AUDIT_MAX = 500


def int_param(params: Any, name: str, default: int | None, top: int, *, what: str | None = None) -> int | None:
    """A whole-number parameter from 1 to ``top`` (ASCII digits only), else ValueError with a plain text.

    Bounded before it reaches the database: a 30-digit audit cursor was an integer overflow in
    the driver (a 500), and int()'s own message ("invalid literal for int()") is Python's, not ours.
    """
    v = params.get(name)
    if v is None or str(v).strip() == "":
        return default
    v = str(v).strip()
    if not (v.isascii() and v.isdigit() and len(v) <= 19 and 1 <= int(v) <= top):
        raise ValueError(what or f"{name} must be 1 to {top}")
    return int(v)


class ApiError(Exception):
    """An answer other than 200: ``{"error": code, "detail": text}`` with ``status``."""

    def __init__(self, status: int, error: str, detail: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.status, self.error, self.detail, self.headers = status, error, detail, headers or {}


def need(principal: Principal, role: str, what: str) -> None:
    if not principal.user.can(role):
        raise ApiError(403, "forbidden", f"{what} needs the {role} role (you are {principal.user.role})")


def iso(ts: float | None) -> str | None:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z") if ts else None


class Api:
    """Bound to one running console (``console``: store, runtime, audit, config, sampler)."""

    def __init__(self, console: Any) -> None:
        self.c = console
        self._overview: tuple[float, dict[str, Any]] = (0.0, {})

    @property
    def store(self) -> Any:
        return self.c.runtime.store

    # -- who am I ------------------------------------------------------------------------
    def me(self, p: Principal) -> dict[str, Any]:
        return {"user": p.user.name, "role": p.user.role, "source": p.user.source, "via": p.via,
                **({"csrf": p.csrf} if p.csrf else {})}

    # -- channels ------------------------------------------------------------------------
    def channels(self, p: Principal) -> dict[str, Any]:
        """Every channel and route with live counters (cached one second: dashboards poll)."""
        at, cached = self._overview
        if time.monotonic() - at < 1.0 and cached:
            return cached
        out = self._channels()
        self._overview = (time.monotonic(), out)
        return out

    def _channels(self) -> dict[str, Any]:
        rt = self.c.runtime
        d = schema.deliveries
        with self.store.engine.connect() as conn:
            queued = conn.execute(select(d.c.channel, d.c.route, d.c.state, func.count())
                                  .where(d.c.state.in_(("pending", "dead")))
                                  .group_by(d.c.channel, d.c.route, d.c.state)).all()
            errors: dict[tuple[str, str], dict[str, Any]] = {}
            for (ch, rname) in list(rt.routes):
                r = conn.execute(select(d.c.last_error, d.c.updated_at, d.c.message_id)
                                 .where(and_(d.c.channel == ch, d.c.route == rname, d.c.state.in_(("pending", "dead")),
                                             d.c.last_error.is_not(None)))
                                 .order_by(d.c.id.desc()).limit(1)).first()
                if r is not None:
                    errors[(ch, rname)] = {"error": r.last_error[:500], "at": iso(r.updated_at),
                                           "message_id": r.message_id}
        depth: dict[tuple[str, str], dict[str, int]] = {}
        for ch, rname, state, n in queued:
            depth.setdefault((ch, rname), {})[state] = n
        reg = rt.metrics.registry if rt.metrics is not None else None

        def sample(name: str, **labels: str) -> int:
            v = reg.get_sample_value(name, labels) if reg is not None else None
            return int(v or 0)

        channels = []
        for name, ch in rt.settings.channels.items():
            lst = rt.listeners.get(name)
            up = bool(ch.enabled and lst is not None and getattr(lst, "serving", True))
            address = list(lst.address) if lst is not None else None
            routes = []
            for rc in ch.routes:
                q = depth.get((name, rc.name), {})
                routes.append({
                    "name": rc.name, "to": rc.to.type,
                    "delivered": sample("medrelay_deliveries_delivered_total", channel=name, route=rc.name),
                    "filtered": sample("medrelay_deliveries_filtered_total", channel=name, route=rc.name),
                    "failed": sample("medrelay_delivery_failures_total", channel=name, route=rc.name),
                    "dead_lettered": sample("medrelay_deliveries_dead_lettered_total", channel=name, route=rc.name),
                    "queue_depth": q.get("pending", 0), "dead": q.get("dead", 0),
                    "last_error": errors.get((name, rc.name)),
                    "history": self.c.sampler.history(f"{name}/{rc.name}"),
                })
            channels.append({
                "name": name, "type": ch.source.type, "enabled": ch.enabled, "listening": up,
                "address": address,
                "received": sample("medrelay_messages_received_total", channel=name),
                "acked": sample("medrelay_messages_acked_total", channel=name),
                "rejected": sample("medrelay_messages_rejected_total", channel=name),
                "queue_depth": sum(r["queue_depth"] for r in routes), "dead": sum(r["dead"] for r in routes),
                "routes": routes, "history": self.c.sampler.history(name),
            })
        return {"at": iso(time.time()), "config_hash": rt.settings.config_hash[:12],
                "counters_since": iso(self.c.started_at), "channels": channels}

    def channel(self, p: Principal, name: str) -> dict[str, Any]:
        """One channel: its config as written (secrets are ${...} references), and per route how
        many of its messages each route took (deliveries by state)."""
        rt = self.c.runtime
        if name not in rt.settings.channels:
            raise ApiError(404, "not_found", f"no channel {name!r} in the running config")
        d = schema.deliveries
        with self.store.engine.connect() as conn:
            rows = conn.execute(select(d.c.route, d.c.state, func.count()).where(d.c.channel == name)
                                .group_by(d.c.route, d.c.state)).all()
            total = conn.execute(select(func.count()).select_from(schema.messages)
                                 .where(schema.messages.c.channel == name)).scalar_one()
        matched: dict[str, dict[str, int]] = {}
        for route, state, n in rows:
            matched.setdefault(route, {})[state] = n
        overview = next(c for c in self.channels(p)["channels"] if c["name"] == name)
        return {"name": name, "config_yaml": self.c.channel_yaml(name), "config_file": str(rt.settings.path),
                "config_hash": rt.settings.config_hash[:12], "messages": total, "routes_matched": matched,
                "overview": overview}

    # -- messages ------------------------------------------------------------------------
    def messages(self, p: Principal, params: Any, peer: str) -> dict[str, Any]:
        try:
            f = msgs.MessageFilter.from_params(params)
            limit = int_param(params, "limit", 50, msgs.MAX_LIMIT)
        except ValueError as e:
            raise ApiError(400, "bad_request", str(e)) from None
        if not 1 <= limit <= msgs.MAX_LIMIT:
            raise ApiError(400, "bad_request", f"limit must be 1 to {msgs.MAX_LIMIT}")
        if f.blind():
            need(p, "operator", "searching by " + ", ".join(f.blind()))
        if f.q:
            need(p, "operator", "content search (q)")
        s = self.c.config.search
        try:
            page = msgs.query_messages(self.store, f, limit=limit, cursor=params.get("cursor") or None,
                                       bounds=msgs.SearchBounds(s.max_rows, s.max_seconds))
        except msgs.QueryError as e:
            raise ApiError(400, "bad_request", str(e)) from None
        if f.q:
            st = page.search or {}
            self.c.audit.record("message.search", actor=p.user.name, peer=peer, channel=f.channel,
                                detail=f"content search: {st.get('scanned', 0)} scanned, {st.get('matched', 0)} "
                                       f"matched; filters {','.join(f.used())}")
        for r in page.rows:
            r["received"] = iso(r["received_at"])
        return {"messages": page.rows, "next_cursor": page.next_cursor, "search": page.search}

    def message(self, p: Principal, mid: str) -> dict[str, Any]:
        info = msgs.show_message(self.store, mid)
        if info is None:
            raise ApiError(404, "not_found", f"no message {mid}")
        info["received"] = iso(info["received_at"])
        for dl in info["deliveries"]:
            for t in dl["tries"]:
                t["when"] = iso(t["at"])
        info["routes_running"] = [r for (ch, r) in self.c.runtime.routes if ch == info["channel"]]
        return info

    def _stored(self, mid: str) -> tuple[dict[str, Any], bytes]:
        info = msgs.show_message(self.store, mid, with_payload=True)
        if info is None:
            raise ApiError(404, "not_found", f"no message {mid}")
        return info, info.pop("payload")

    def payload(self, p: Principal, mid: str, peer: str) -> dict[str, Any]:
        need(p, "operator", "the payload (PHI)")
        info, payload = self._stored(mid)
        self.c.audit.record("message.read", actor=p.user.name, peer=peer, channel=info["channel"], message_id=mid,
                            entity={"kind": info["kind"]}, detail="payload shown in the console")
        return {"id": mid, "kind": info["kind"], "size": len(payload), "text": _render(info["kind"], payload)}

    def output(self, p: Principal, mid: str, route: str, peer: str) -> dict[str, Any]:
        """What the running route's transforms make of the stored payload now (nothing sent)."""
        need(p, "operator", "a route's output (PHI)")
        info, payload = self._stored(mid)
        r = self.c.runtime.routes.get((info["channel"], route))
        if r is None:
            raise ApiError(404, "not_found", f"route {route!r} of channel {info['channel']!r} is not running")
        self.c.audit.record("message.read", actor=p.user.name, peer=peer, channel=info["channel"], message_id=mid,
                            entity={"kind": info["kind"], "route": route}, detail=f"output of route {route} shown")
        env = Envelope(channel=info["channel"], kind=info["kind"], payload=payload, headers=info["headers"] or {},
                       peer=info["peer"], id=mid, received_at=datetime.fromtimestamp(info["received_at"], UTC),
                       lineage=(info["parent_id"],) if info["parent_id"] else ())
        base = {"id": mid, "route": route, "config_hash": self.c.runtime.settings.config_hash[:12],
                "same_config": info["config_hash"] == self.c.runtime.settings.config_hash}
        try:
            outs = apply_transforms(r.transforms, env) if r.transforms else [env]
        except Drop as d:
            return {**base, "outcome": d.state, "reason": d.reason, "outputs": []}
        except Exception as e:  # what would be a dead letter: say why, never a traceback
            return {**base, "outcome": "fails", "reason": f"{type(e).__name__}: {str(e)[:300]}", "outputs": []}
        return {**base, "outcome": "routed",
                "outputs": [{"kind": o.kind, "size": len(o.payload), "text": _render(o.kind, o.payload)}
                            for o in outs]}

    # -- replay --------------------------------------------------------------------------
    def replay_one(self, p: Principal, mid: str, body: dict[str, Any], peer: str) -> dict[str, Any]:
        need(p, "operator", "replay")
        route = body.get("route")
        if route is not None and not isinstance(route, str):
            raise ApiError(400, "bad_request", "route must be a route name")
        states = _states(body.get("states"), FINAL_STATES)
        info = msgs.show_message(self.store, mid)
        if info is None:
            raise ApiError(404, "not_found", f"no message {mid}")
        if route is not None and route not in {d["route"] for d in info["deliveries"]}:
            raise ApiError(404, "not_found", f"message {mid} has no delivery on route {route!r}")
        ids = msgs.replay(self.store, self.c.audit, actor=p.user.name, peer=peer, message_ids=[mid], route=route,
                          states=states)
        self.c.wake()
        return {"requeued": len(ids), "delivery_ids": ids}

    def replay(self, p: Principal, body: dict[str, Any], peer: str) -> dict[str, Any]:
        """By ids (``ids``) and/or the listing's filters; ``states`` picks the deliveries (dead)."""
        need(p, "operator", "replay")
        ids = body.get("ids")
        if ids is not None and (not isinstance(ids, list) or not all(isinstance(i, str) for i in ids)
                                or len(ids) > msgs.MAX_SELECTION):
            raise ApiError(400, "bad_request", f"ids must be a list of at most {msgs.MAX_SELECTION} message ids")
        states = _states(body.get("states"), ("dead",))
        try:
            f = msgs.MessageFilter.from_params({k: v for k, v in body.items() if k not in ("ids", "states")})
        except ValueError as e:
            raise ApiError(400, "bad_request", str(e)) from None
        if f.q:
            raise ApiError(400, "bad_request", "q (content search) cannot select a replay; use ids or the filters")
        if not ids and not f.used() and body.get("all") is not True:
            raise ApiError(400, "bad_request", "name ids or a filter, or send \"all\": true to replay every "
                           f"{'/'.join(states)} delivery")
        try:
            done = msgs.replay(self.store, self.c.audit, actor=p.user.name, peer=peer, message_ids=ids or None,
                               selection=f, states=states)
        except msgs.QueryError as e:
            raise ApiError(400, "bad_request", str(e)) from None
        self.c.wake()
        return {"requeued": len(done), "delivery_ids": done[:1000]}

    # -- audit ---------------------------------------------------------------------------
    def audit(self, p: Principal, params: Any) -> dict[str, Any]:
        need(p, "operator", "the audit trail")
        a = schema.audit_events
        conds = []
        try:
            for name in ("action", "outcome", "actor", "channel", "message_id", "peer"):
                v = params.get(name)
                if v:
                    col = getattr(a.c, name)
                    conds.append(col.like(v[:-1] + "%") if name == "action" and v.endswith("*") else col == v)
            since, until = msgs.parse_time(params.get("since")), msgs.parse_time(params.get("until"))
            limit = int_param(params, "limit", 100, AUDIT_MAX)
            cursor = int_param(params, "cursor", None, 2**62, what="cursor: not one this API gave out")
        except ValueError as e:
            raise ApiError(400, "bad_request", str(e) or "bad parameter") from None
        if not 1 <= limit <= AUDIT_MAX:
            raise ApiError(400, "bad_request", f"limit must be 1 to {AUDIT_MAX}")
        if since is not None:
            conds.append(a.c.at >= since)
        if until is not None:
            conds.append(a.c.at < until)
        if cursor is not None:
            conds.append(a.c.id < cursor)
        q = select(a.c.id, a.c.at, a.c.action, a.c.outcome, a.c.actor, a.c.peer, a.c.channel, a.c.message_id,
                   a.c.entity, a.c.detail)
        if conds:
            q = q.where(and_(*conds))
        with self.store.engine.connect() as conn:
            rows = conn.execute(q.order_by(a.c.id.desc()).limit(limit + 1)).all()
        more = len(rows) > limit
        events = [{**dict(r._mapping), "when": iso(r.at)} for r in rows[:limit]]
        return {"events": events, "next_cursor": str(events[-1]["id"]) if more and events else None}


def _states(value: Any, default: tuple[str, ...]) -> tuple[str, ...]:
    if value is None:
        return default
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value or any(v not in FINAL_STATES for v in value):
        raise ApiError(400, "bad_request", f"states must be a list of {', '.join(FINAL_STATES)}")
    return tuple(value)


MAX_TEXT = 1_000_000  # characters of one rendered payload sent to a browser


def _render(kind: str, payload: bytes) -> str:
    try:
        text_ = "\n".join(msgs.render_lines(kind, payload))
    except Exception as e:  # bytes that do not parse are shown as they are, never a 500
        text_ = f"(not readable as {kind}: {type(e).__name__})\n" + payload[:MAX_TEXT].decode("latin-1")
    if len(text_) > MAX_TEXT:
        text_ = text_[:MAX_TEXT] + f"\n... ({len(text_) - MAX_TEXT} more characters not shown)"
    return text_
