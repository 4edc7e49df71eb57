"""Alerts: thresholds on the queue and the listeners, sent to a webhook and logged.

An interface engine fails quietly: a receiver that is down fills a queue, a dead letter
waits for someone to look. So the engine watches itself every ``interval`` seconds and
tells a webhook (a chat channel, an on-call system, Alertmanager's generic receiver) when a
threshold is crossed, again every ``repeat_after`` seconds while it stays crossed (repeat
suppression), and once more when it is resolved. What is watched:

- ``queue_depth``: pending deliveries of a route;
- ``oldest_pending_seconds``: age of a route's oldest pending delivery;
- ``dead_letters``: dead deliveries of a route;
- ``error_rate``: failed attempts / all attempts of a route since the last evaluation
  (evaluated only with at least ``min_attempts`` attempts, so one failure is not 100 %).
  Once firing, intervals with too few attempts add up: the alert is judged again on their
  sum once it reaches ``min_attempts``, and before that it resolves at the first interval in
  which the route delivered without a failure (a quiet route that works again must not stay
  firing, nor be re-sent every ``repeat_after``); intervals with failures, or with no attempt
  at all (a receiver down, retries backing off), keep it firing;
- ``listener_down``: an enabled channel whose listener is not serving.

Payloads carry channel and route names, counts and thresholds, never message content; a
``resolved`` payload's ``value`` is the figure now (what resolved it), not the one it fired with.
A webhook that is down loses nothing: what could not be sent is tried again at the next
evaluation. With several engines on one store, the queue checks (depth, age, dead letters)
are made by one engine at a time, the holder of the ``alerts`` lease (``shared``); each
engine still watches its own listeners and its own error rate, and says which it is:
``engine`` is its host name, ``engine_id`` the id it holds its leases under (host:pid:random),
which tells two engines on one host apart.

The store-wide alerts' state (what is firing, when it was last sent, a resolve not yet
delivered) is kept in the store (``engine.store.leases.lease_state`` under the ``alerts``
lease), read by the holder before each evaluation and written after it. So when the lease
moves (an engine stopped or died) the new holder knows what was already sent: an alert still
over its threshold is not sent again before ``repeat_after``, and one that resolved during the
handover is sent as resolved. With one engine (SQLite) the same holds across a restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx
import structlog
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import func, select

from engine.security.tls import TLSConfig, client_context
from engine.store import leases, schema

log = structlog.get_logger()


class WebhookConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    url: str = Field(..., description="POST alerts here as JSON (http or https; a token in it as ${ENV})")
    headers: dict[str, str] = Field(default_factory=dict, description="extra headers, e.g. Authorization: "
                                    "\"Bearer ${ALERT_TOKEN}\"")
    timeout: float = Field(10.0, gt=0, description="seconds for one POST")
    tls: TLSConfig | None = Field(None, description="CA / client certificate for an https webhook")


class Thresholds(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    queue_depth: int | None = Field(1000, ge=1, description="pending deliveries of one route; unset = off")
    oldest_pending_seconds: float | None = Field(900.0, gt=0, description="age of a route's oldest pending "
                                                 "delivery; unset = off")
    dead_letters: int | None = Field(1, ge=1, description="dead deliveries of one route; unset = off")
    error_rate: float | None = Field(0.5, gt=0, le=1, description="failed / all attempts of a route per "
                                     "interval; unset = off")
    min_attempts: int = Field(10, ge=1, description="attempts in an interval before error_rate is judged")
    listener_down: bool = Field(True, description="alert when an enabled channel's listener is not serving")


class AlertsConfig(BaseModel):
    """`alerts:` thresholds on the queue and listeners, and where to send alerts."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    webhook: WebhookConfig | None = Field(None, description="where alerts go; without it they are only logged")
    interval: float = Field(30.0, gt=0, description="seconds between evaluations")
    repeat_after: float = Field(3600.0, gt=0, description="send a still-firing alert again after this many "
                                "seconds (repeat suppression)")
    thresholds: Thresholds = Field(default_factory=Thresholds, description="defaults for every route")
    routes: dict[str, Thresholds] = Field(default_factory=dict, description="per route, as `channel/route`: "
                                          "thresholds replacing the defaults")


STORE_WIDE = ("queue_depth", "oldest_pending_seconds", "dead_letters")  # one engine checks these
LEASE = "alerts"  # the lease of the store-wide checks (taken by the runtime's keeper)


@dataclass
class _Firing:
    since: float
    sent_at: float | None  # None: not yet delivered to the webhook
    value: float
    threshold: float


def queue_figures(store: Any, now: float | None = None) -> dict[tuple[str, str], dict[str, float]]:
    """Per (channel, route): pending count, oldest pending age in seconds, dead count."""
    now = time.time() if now is None else now
    d, m = schema.deliveries, schema.messages
    out: dict[tuple[str, str], dict[str, float]] = {}
    with store.engine.connect() as conn:
        rows = conn.execute(
            select(d.c.channel, d.c.route, d.c.state, func.count(), func.min(m.c.received_at))
            .join(m, m.c.id == d.c.message_id)
            .where(d.c.state.in_(("pending", "dead")))
            .group_by(d.c.channel, d.c.route, d.c.state)).all()
    for channel, route, state, n, oldest in rows:
        f = out.setdefault((channel, route), {"pending": 0, "oldest_pending_seconds": 0.0, "dead": 0})
        if state == "pending":
            f["pending"] = n
            f["oldest_pending_seconds"] = max(0.0, now - (oldest or now))
        else:
            f["dead"] = n
    return out


class AlertMonitor:
    """Evaluates the thresholds on a timer and keeps the firing set between evaluations."""

    def __init__(self, config: AlertsConfig, store: Any, *, routes: Callable[[], list[tuple[str, str]]],
                 down_channels: Callable[[], list[str]], attempts: Callable[[], dict[tuple[str, str], tuple[int, int]]],
                 engine_id: str | None = None, shared: Callable[[], bool] | None = None) -> None:
        self.config = config
        self.shared = shared or (lambda: True)  # this engine makes the store-wide checks now
        self.store = store
        self.routes = routes
        self.down_channels = down_channels
        self.attempts = attempts  # (failed, delivered) counters per route, cumulative
        # "engine" stays the host name (what it was); "engine_id" tells two engines on one host (or
        # containers sharing a hostname) apart: the id this process holds its leases under
        # (``leases.holder_id()``, host:pid:random, as ``medrelay`` logs it in lease.acquired)
        self.host = socket.gethostname()
        self.engine_id = engine_id or leases.holder_id()
        self.firing: dict[tuple[str, str, str], _Firing] = {}
        self._unsent_resolved: dict[tuple[str, str, str], dict[str, Any]] = {}
        self._last_attempts: dict[tuple[str, str], tuple[int, int]] = {}
        self._unjudged: dict[tuple[str, str], tuple[int, int]] = {}  # firing error_rate: (failed, all) not judged yet
        self.current: dict[tuple[str, str, str], float] = {}  # every watched figure at the last evaluation
        self._saved: dict[str, Any] | None = None  # the store-wide state as last read or written
        self._task: asyncio.Task[None] | None = None
        self._client: httpx.AsyncClient | None = None

    def _limits(self, channel: str, route: str) -> Thresholds:
        return self.config.routes.get(f"{channel}/{route}", self.config.thresholds)

    def evaluate(self, now: float | None = None) -> dict[tuple[str, str, str], tuple[float, float]]:
        """The alerts over their threshold now: (kind, channel, route) -> (value, threshold)."""
        now = time.time() if now is None else now
        over: dict[tuple[str, str, str], tuple[float, float]] = {}
        current: dict[tuple[str, str, str], float] = {}
        shared = self.shared()
        figures = queue_figures(self.store, now) if shared else {}
        counters = self.attempts()
        for channel, route in self.routes():
            t = self._limits(channel, route)
            f = figures.get((channel, route), {"pending": 0, "oldest_pending_seconds": 0.0, "dead": 0})
            checks = (("queue_depth", f["pending"], t.queue_depth),
                      ("oldest_pending_seconds", f["oldest_pending_seconds"], t.oldest_pending_seconds),
                      ("dead_letters", f["dead"], t.dead_letters))
            for kind, value, limit in checks if shared else ():
                current[(kind, channel, route)] = float(value)
                if limit is not None and value >= limit:
                    over[(kind, channel, route)] = (float(value), float(limit))
            failed, delivered = counters.get((channel, route), (0, 0))
            pf, pd = self._last_attempts.get((channel, route), (0, 0))
            n_failed, n_all = failed - pf, (failed - pf) + (delivered - pd)
            key = ("error_rate", channel, route)
            if t.error_rate is None:
                continue
            if key in self.firing:  # judged on what it has not been judged on yet (see the module doc)
                uf, ua = self._unjudged.pop((channel, route), (0, 0))
                tf, ta = n_failed + uf, n_all + ua
                if ta < t.min_attempts:
                    current[key] = round(tf / ta, 3) if ta else 0.0
                    if n_failed or not n_all:  # this interval failed, or was silent: too soon to say it is over
                        self._unjudged[(channel, route)] = (tf, ta)
                        over[key] = (self.firing[key].value, t.error_rate)
                    continue  # this interval delivered without a failure: resolved
                n_failed, n_all = tf, ta
            if n_all:
                current[key] = round(n_failed / n_all, 3)
            if n_all >= t.min_attempts and n_failed / n_all >= t.error_rate:
                over[key] = (round(n_failed / n_all, 3), t.error_rate)
        self._last_attempts = counters
        if self.config.thresholds.listener_down:
            for channel in self.down_channels():
                over[("listener_down", channel, "")] = (1.0, 1.0)
        self.current = current
        return over

    def _payload(self, status: str, key: tuple[str, str, str], f: _Firing, now: float) -> dict[str, Any]:
        kind, channel, route = key
        return {"status": status, "alert": kind, "channel": channel, "route": route or None,
                "value": f.value, "threshold": f.threshold, "since": f.since, "at": now, "engine": self.host,
                "engine_id": self.engine_id}

    async def step(self, now: float | None = None) -> None:
        """One evaluation: new alerts fire, old ones repeat or resolve."""
        now = time.time() if now is None else now
        over = await asyncio.to_thread(self.evaluate, now)
        shared = self.shared()
        if not shared:  # the store-wide alerts are another engine's now: forget them, quietly
            for key in [k for k in self.firing if k[0] in STORE_WIDE]:
                del self.firing[key]
                self._unsent_resolved.pop(key, None)
        else:  # what the holders before this one sent (or this one, before a restart)
            await asyncio.to_thread(self._load_shared)
        await self._apply(over, now)
        if shared and self.shared():
            await asyncio.to_thread(self._save_shared)

    # -- the store-wide alerts' state, handed over with the lease --------------------------
    def _load_shared(self) -> None:
        with self.store.engine.connect() as conn:
            stored = leases.load_state(conn, LEASE)
        firing: dict[tuple[str, str, str], _Firing] = {}
        resolved: dict[tuple[str, str, str], dict[str, Any]] = {}
        for st in stored.values():
            key = (st["alert"], st["channel"], st["route"])
            if key[0] not in STORE_WIDE:
                continue
            if st.get("resolved") is not None:
                resolved[key] = st["resolved"]
            else:
                firing[key] = _Firing(since=st["since"], sent_at=st["sent_at"], value=st["value"],
                                      threshold=st["threshold"])
        self.firing = {k: f for k, f in self.firing.items() if k[0] not in STORE_WIDE} | firing
        self._unsent_resolved = {k: v for k, v in self._unsent_resolved.items() if k[0] not in STORE_WIDE} | resolved
        self._saved = self._shared_state()

    def _shared_state(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for (kind, channel, route), f in self.firing.items():
            if kind in STORE_WIDE:
                out[f"{kind}\x1f{channel}\x1f{route}"] = {
                    "alert": kind, "channel": channel, "route": route, "since": f.since, "sent_at": f.sent_at,
                    "value": f.value, "threshold": f.threshold, "resolved": None}
        for (kind, channel, route), payload in self._unsent_resolved.items():
            if kind in STORE_WIDE:
                out[f"{kind}\x1f{channel}\x1f{route}"] = {"alert": kind, "channel": channel, "route": route,
                                                           "resolved": payload}
        return out

    def _save_shared(self) -> None:
        state = self._shared_state()
        if state == self._saved:
            return
        with self.store.engine.begin() as conn:
            leases.save_state(conn, LEASE, state)
        self._saved = state

    async def _apply(self, over: dict[tuple[str, str, str], tuple[float, float]], now: float) -> None:
        for key, (value, limit) in over.items():
            f = self.firing.get(key)
            if f is None:
                f = self.firing[key] = _Firing(since=now, sent_at=None, value=value, threshold=limit)
                self._unsent_resolved.pop(key, None)
                log.warning("alert.firing", alert=key[0], channel=key[1], route=key[2] or None, value=value,
                            threshold=limit)
            f.value = value
            if f.sent_at is None or now - f.sent_at >= self.config.repeat_after:
                if await self._post(self._payload("firing", key, f, now)):
                    f.sent_at = now
        for key in [k for k in self.firing if k not in over]:
            f = self.firing.pop(key)
            f.value = self.current.get(key, 0.0)  # what it is now (below the threshold), not what it fired with
            if key[0] == "error_rate":
                self._unjudged.pop(key[1:], None)
            log.info("alert.resolved", alert=key[0], channel=key[1], route=key[2] or None, value=f.value)
            if f.sent_at is not None:  # resolve only what the webhook was told of
                self._unsent_resolved[key] = self._payload("resolved", key, f, now)
        for key, payload in list(self._unsent_resolved.items()):
            if await self._post(payload):
                del self._unsent_resolved[key]

    async def _post(self, payload: dict[str, Any]) -> bool:
        wh = self.config.webhook
        if wh is None:
            return True
        if self._client is None:
            verify: Any = client_context(wh.tls) if wh.tls is not None else True
            self._client = httpx.AsyncClient(timeout=wh.timeout, verify=verify, headers=wh.headers)
        try:
            r = await self._client.post(wh.url, json=payload)
        except httpx.HTTPError as e:
            log.warning("alert.webhook_failed", error=type(e).__name__, alert=payload["alert"])
            return False
        if r.status_code >= 300:
            log.warning("alert.webhook_failed", status=r.status_code, alert=payload["alert"])
            return False
        return True

    async def _run(self) -> None:
        while True:
            try:
                await self.step()
            except Exception as e:  # a store outage must not end the monitor; next interval tries again
                log.warning("alert.evaluation_failed", error=type(e).__name__)
            await asyncio.sleep(self.config.interval)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="alerts")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._client is not None:
            await self._client.aclose()
