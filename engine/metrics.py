"""Prometheus metrics: counters per channel and route, queue depth read from the store."""

from __future__ import annotations

import threading
import time
from typing import Any

from prometheus_client import CollectorRegistry, Counter, start_http_server
from prometheus_client.core import GaugeMetricFamily
from sqlalchemy import func, select

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
        self.server: Any = None
        self.port: int | None = None

    def intake(self, channel: str, status: str) -> None:
        self.received.labels(channel).inc()
        if status in ("accepted", "duplicate"):
            self.acked.labels(channel).inc()
        else:
            self.rejected.labels(channel).inc()

    def serve(self, host: str, port: int) -> int:
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        self.server = server
        self.port = server.server_port
        return self.port

    def close(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
