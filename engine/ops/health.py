"""Liveness and readiness, as a load balancer and a container runtime ask for them.

``/healthz`` answers 200 while the process serves HTTP at all (a hung event loop does not stop
it, by design: liveness restarts only a dead process). ``/readyz`` answers 200 only when this
engine should be given traffic: it has finished starting and is not draining, its store
answers, every enabled channel's listener is bound, every route worker is running, and no
route has work that has been due for longer than ``metrics.stall_after`` seconds without
being taken (a stalled worker, not a slow peer: a route whose head is waiting for its retry
is not stalled, since another engine would meet the same peer). The body says which check
failed, without PHI, so an operator reading a load balancer's log knows where to look.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import and_, func, select, text

from engine.store import schema


@dataclass
class Readiness:
    ready: bool
    checks: dict[str, str] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        return {"status": "ready" if self.ready else "not ready", "checks": self.checks}


def _store_check(store: Any) -> str:
    try:
        with store.engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    except Exception as e:  # any database failure means "not ready"; the reason is for the operator
        return f"unreachable: {type(e).__name__}"
    return "ok"


def stalled_routes(store: Any, routes: list[tuple[str, str, bool]], stall_after: float,
                   now: float | None = None) -> list[str]:
    """Routes whose next delivery has been due for ``stall_after`` seconds and is not leased.

    An ordered route is judged by its head (the oldest pending delivery): the ones behind it wait
    for it by design. An unordered route by its earliest due delivery.
    """
    now = time.time() if now is None else now
    d = schema.deliveries
    out: list[str] = []
    with store.engine.connect() as conn:
        for channel, route, ordered in routes:
            base = and_(d.c.channel == channel, d.c.route == route, d.c.state == "pending")
            if ordered:
                head = conn.execute(select(d.c.next_attempt_at, d.c.lease_until).where(base)
                                    .order_by(d.c.id).limit(1)).first()
                due = head is not None and head.next_attempt_at < now - stall_after and head.lease_until < now
            else:
                earliest = conn.execute(select(func.min(d.c.next_attempt_at))
                                        .where(base, d.c.lease_until < now)).scalar()
                due = earliest is not None and earliest < now - stall_after
            if due:
                out.append(f"{channel}/{route}")
    return out


def readiness(*, started: bool, store: Any, expected_channels: list[str], listeners: dict[str, Any],
              workers_alive: Callable[[], list[str]], routes: list[tuple[str, str, bool]],
              stall_after: float) -> Readiness:
    checks: dict[str, str] = {"engine": "started" if started else "starting or draining"}
    if store is None:
        checks["store"] = "not open"
    else:
        checks["store"] = _store_check(store)
    missing = [c for c in expected_channels if c not in listeners]
    checks["listeners"] = "ok" if not missing else "not listening: " + ", ".join(missing)
    dead = workers_alive()
    checks["route_workers"] = "ok" if not dead else "stopped: " + ", ".join(dead)
    if checks["store"] == "ok":
        try:
            stalled = stalled_routes(store, routes, stall_after)
        except Exception as e:
            checks["queue"] = f"unknown: {type(e).__name__}"
        else:
            checks["queue"] = "ok" if not stalled else "stalled: " + ", ".join(stalled)
    else:
        checks["queue"] = "unknown: store not reachable"
    ok = (started and checks["store"] == "ok" and not missing and not dead and checks["queue"] == "ok")
    return Readiness(ok, checks)
