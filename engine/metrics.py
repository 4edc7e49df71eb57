"""Prometheus metrics: counters per channel and route, queue depth read from the store.

The same small HTTP server answers ``/healthz`` and ``/readyz`` (engine/ops/health.py), so a load
balancer or a container HEALTHCHECK needs only the one operations port."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, generate_latest
from prometheus_client.core import GaugeMetricFamily
from sqlalchemy import func, select

from engine.ops.ops_port import OpsPort
from engine.store import schema


class _QueueDepth:
    """Pending and dead deliveries per route, computed at scrape time (cached 1 s)."""

    def __init__(self, store: Any) -> None:
        self.store = store
        self._cache: tuple[float, list[Any]] = (0.0, [])
        self._lock = threading.Lock()

    def _rows(self) -> list[Any]:
        with self._lock:
            at, rows = self._cache
            if time.monotonic() - at < 1.0:
                return rows
            d = schema.deliveries
            with self.store.engine.connect() as conn:
                rows = conn.execute(
                    select(d.c.channel, d.c.route, d.c.state, func.count())
                    .where(d.c.state.in_(("pending", "dead")))
                    .group_by(d.c.channel, d.c.route, d.c.state)).all()
            self._cache = (time.monotonic(), list(rows))
            return rows

    def collect(self) -> Any:
        depth = GaugeMetricFamily("medrelay_queue_depth", "Deliveries waiting to be sent",
                                  labels=["channel", "route"])
        dead = GaugeMetricFamily("medrelay_dead_letters", "Deliveries in the dead-letter state",
                                 labels=["channel", "route"])
        for ch, route, state, n in self._rows():
            (depth if state == "pending" else dead).add_metric([ch, route], n)
        yield depth
        yield dead



class Metrics:
    def __init__(self, store: Any) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.received = Counter("medrelay_messages_received", "Messages handed to intake", ["channel"], registry=r)
        self.acked = Counter("medrelay_messages_acked", "Messages committed and acknowledged "
                             "(including duplicates answered with the original outcome)", ["channel"], registry=r)
        self.rejected = Counter("medrelay_messages_rejected", "Messages refused at intake", ["channel"],
                                registry=r)
        self.delivered = Counter("medrelay_deliveries_delivered", "Deliveries sent successfully",
                                 ["channel", "route"], registry=r)
        self.filtered = Counter("medrelay_deliveries_filtered", "Deliveries dropped by a transform",
                                ["channel", "route"], registry=r)
        self.failed = Counter("medrelay_delivery_failures", "Failed delivery attempts",
                              ["channel", "route"], registry=r)
        self.dead = Counter("medrelay_deliveries_dead_lettered", "Deliveries moved to dead letter",
                            ["channel", "route"], registry=r)
        r.register(_QueueDepth(store))
        self.server: OpsPort | None = None
        self.port: int | None = None

    def intake(self, channel: str, status: str) -> None:
        self.received.labels(channel).inc()
        if status in ("accepted", "duplicate"):
            self.acked.labels(channel).inc()
        else:
            self.rejected.labels(channel).inc()

    def serve(self, host: str, port: int, readiness: Callable[[], Any] | None = None) -> int:
        """Serve /metrics, /healthz and /readyz on ``host:port`` (engine/ops/ops_port.py: one
        selector thread, a small pool for the paths that read the store, connections capped)."""
        registry = self.registry

        def answer(path: str) -> tuple[int, str, bytes]:
            if path == "/metrics":
                return 200, CONTENT_TYPE_LATEST, generate_latest(registry)
            if path == "/healthz":
                return 200, "application/json", b'{"status": "alive"}'
            if path == "/readyz":
                if readiness is None:
                    return 200, "application/json", b'{"status": "ready"}'
                r = readiness()
                return 200 if r.ready else 503, "application/json", json.dumps(r.as_json()).encode()
            return 404, "application/json", b'{"error": "not found"}'

        # /healthz and unknown paths cost nothing: answered by the selector thread, never queued
        self.server = OpsPort(host, port, answer, inline=lambda path: path not in ("/metrics", "/readyz"))
        self.port = self.server.start()
        return self.port

    def close(self) -> None:
        if self.server is not None:
            self.server.close()
