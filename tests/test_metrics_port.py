"""The operations port (/metrics, /healthz, /readyz) under idle connections: raw sockets, httpx.

It was a ThreadingHTTPServer: a thread per connection, unbounded, each held up to 10 s. Now one
selector thread reads request heads (engine/ops/ops_port.py), connections are capped (the oldest
still-silent one makes room), heads time out after a few seconds, and /healthz is answered even
while /readyz is stuck in the store.
"""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import httpx
import pytest
from conftest import wait_until
from http_peers import answered

from engine.metrics import Metrics

BOUND = 1.0  # /healthz while the port is flooded (the brief's 1 s; the answer itself takes ms)


def status(pid: str = "self") -> dict[str, int]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "Threads"):
            fields[key] = int(value.split()[0])
    return fields


class Ready:
    def __init__(self, ready: bool = True) -> None:
        self.ready = ready

    def as_json(self) -> dict[str, str]:
        return {"status": "ready" if self.ready else "not ready"}


class Readiness:
    """``stuck`` set: each call blocks (a store that does not answer) until ``release``."""

    def __init__(self) -> None:
        self.stuck = False
        self.release = threading.Event()

    def __call__(self) -> Ready:
        if self.stuck:
            self.release.wait(60)
        return Ready()


@pytest.fixture
def port(sqlite_store):
    readiness = Readiness()
    metrics = Metrics(sqlite_store)
    p = metrics.serve("127.0.0.1", 0, readiness)
    yield p, readiness, metrics.server
    readiness.release.set()
    metrics.close()


def healthz_took(p: int) -> float:
    t0 = time.monotonic()
    r = httpx.get(f"http://127.0.0.1:{p}/healthz", timeout=10)
    assert r.status_code == 200 and r.json() == {"status": "alive"}
    return time.monotonic() - t0


def test_300_idle_connections_cost_no_thread_each_and_healthz_still_answers(port):
    p, _, _ = port
    assert healthz_took(p) < BOUND
    before = status()
    idle = [socket.create_connection(("127.0.0.1", p), timeout=10) for _ in range(300)]
    try:
        for s in idle[::3]:
            s.sendall(b"GET /readyz HTTP/1.1\r\nHost: x\r\n")  # and some half-sent heads
        took = [healthz_took(p) for _ in range(5)]
        assert max(took) < BOUND, took
        assert httpx.get(f"http://127.0.0.1:{p}/readyz", timeout=10).status_code == 200
        after = status()
        # one selector thread and a pool of four at most; 300 were 300 threads before
        assert after["Threads"] - before["Threads"] <= 5, (before, after)
        assert after["VmRSS"] - before["VmRSS"] < 30 * 1024, (before, after)  # kB
        # the cap (64): the oldest silent connections were closed to make room
        wait_until(lambda: sum(answered(s) for s in idle) >= 300 - 64, timeout=30)
        # and the rest once their head was not complete within the header timeout (3 s)
        wait_until(lambda: all(answered(s) for s in idle), timeout=30)
    finally:
        for s in idle:
            s.close()
    assert healthz_took(p) < BOUND


def test_healthz_answers_while_readyz_is_stuck_and_the_pool_is_full(port):
    """Liveness must not wait behind readiness: /readyz blocked in the store holds the pool's
    threads; /healthz is answered by the selector thread; more /readyz get 503 at once."""
    p, readiness, server = port
    readiness.stuck = True
    stuck = []
    try:
        for _ in range(4 + 16):  # the pool's threads and its queue
            s = socket.create_connection(("127.0.0.1", p), timeout=10)
            s.sendall(b"GET /readyz HTTP/1.0\r\n\r\n")
            stuck.append(s)
        wait_until(lambda: server.busy == 20, timeout=15)
        t0 = time.monotonic()
        r = httpx.get(f"http://127.0.0.1:{p}/readyz", timeout=10)  # a further one: 503 at once
        assert r.status_code == 503 and r.json() == {"error": "busy"} and time.monotonic() - t0 < BOUND
        assert healthz_took(p) < BOUND
        assert not any(answered(s) for s in stuck)
    finally:
        readiness.release.set()
        for s in stuck:
            s.close()


def test_metrics_and_odd_requests(port):
    p, _, _ = port
    r = httpx.get(f"http://127.0.0.1:{p}/metrics", timeout=10)
    assert r.status_code == 200 and b"medrelay_messages_received" in r.content
    assert httpx.get(f"http://127.0.0.1:{p}/nope", timeout=10).status_code == 404
    assert httpx.post(f"http://127.0.0.1:{p}/healthz", timeout=10).status_code == 405
    r = httpx.head(f"http://127.0.0.1:{p}/healthz", timeout=10)
    assert r.status_code == 200 and r.content == b""
    with socket.create_connection(("127.0.0.1", p), timeout=10) as s:  # a head larger than 8 KiB: 431
        s.sendall(b"GET /healthz HTTP/1.1\r\nX: " + b"a" * 9000)
        assert s.recv(100).startswith(b"HTTP/1.1 431")
