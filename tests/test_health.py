"""/healthz and /readyz on the metrics port: what a load balancer and a HEALTHCHECK ask."""

import time

import httpx
from sqlalchemy import insert

from engine.ops.health import readiness, stalled_routes
from engine.store import schema

YAML = """
store: {url: "sqlite:///data/m.db", blobs: data/blobs}
keys: {kek_file: data/keys.json}
metrics: {host: 127.0.0.1, port: 0}
channels:
  in:
    source: {type: mllp, host: 127.0.0.1, port: 0}
    routes:
      - {name: out, to: {type: file, path: out}}
"""


def test_ready_then_not_ready_when_a_route_worker_dies(engine_factory):
    eng = engine_factory(YAML)
    base = f"http://127.0.0.1:{eng.runtime.metrics.port}"
    assert httpx.get(f"{base}/healthz").json() == {"status": "alive"}
    r = httpx.get(f"{base}/readyz")
    assert r.status_code == 200, r.text
    assert r.json()["checks"] == {"engine": "started", "store": "ok", "listeners": "ok", "route_workers": "ok",
                                  "queue": "ok"}
    assert "medrelay_messages_received" in httpx.get(f"{base}/metrics").text
    assert httpx.get(f"{base}/nothing").status_code == 404
    worker = eng.runtime.workers[0]
    eng.call(_cancel(worker))
    r = httpx.get(f"{base}/readyz")
    assert r.status_code == 503 and r.json()["checks"]["route_workers"] == "stopped: in/out"
    assert httpx.get(f"{base}/healthz").status_code == 200


async def _cancel(worker):
    worker._task.cancel()
    try:
        await worker._task
    except BaseException:
        pass


def _pending(store, route, *, due, lease=0.0):
    now = time.time()
    with store.engine.begin() as c:
        c.execute(insert(schema.deliveries).values(
            message_id="m" * 32, channel="c", route=route, state="pending", attempts=0,
            next_attempt_at=now + due, lease_until=now + lease, updated_at=now))


def test_stalled_means_due_and_untaken_not_waiting_for_a_retry(sqlite_store):
    s = sqlite_store
    _pending(s, "ordered-waiting", due=+60)      # head waits for its retry: not stalled
    _pending(s, "ordered-waiting", due=-900)     # behind the head: waits for it by design
    _pending(s, "ordered-stuck", due=-900)       # head due for 15 min, nobody took it
    _pending(s, "leased", due=-900, lease=60)    # being sent right now
    _pending(s, "unordered", due=-900)
    routes = [("c", "ordered-waiting", True), ("c", "ordered-stuck", True), ("c", "leased", True),
              ("c", "unordered", False)]
    assert stalled_routes(s, routes, 300) == ["c/ordered-stuck", "c/unordered"]
    assert stalled_routes(s, routes, 3600) == []
    r = readiness(started=True, store=s, expected_channels=["c", "d"], listeners={"c": object()},
                  workers_alive=lambda: [], routes=routes, stall_after=300)
    assert not r.ready
    assert r.checks["listeners"] == "not listening: d"
    assert r.checks["queue"] == "stalled: c/ordered-stuck, c/unordered"
    r = readiness(started=False, store=s, expected_channels=[], listeners={}, workers_alive=lambda: [],
                  routes=[], stall_after=300)
    assert not r.ready and r.checks["engine"] == "starting or draining"


def test_store_unreachable_is_not_ready(tmp_path):
    from engine.security.crypto import KeyRing
    from engine.store.db import Store

    (tmp_path / "db-is-a-folder").mkdir()  # SQLite cannot open it: every connection fails
    bad = Store(f"sqlite:///{tmp_path}/db-is-a-folder", tmp_path / "b", KeyRing(tmp_path / "k.json"))
    r = readiness(started=True, store=bad, expected_channels=[], listeners={}, workers_alive=lambda: [],
                  routes=[], stall_after=300)
    assert not r.ready and r.checks["store"].startswith("unreachable")


def test_a_checker_that_resets_after_the_status_line_leaves_no_traceback(sqlite_store, capfd):
    """HAProxy's `option httpchk` closes with a reset once it has the status: the metrics server
    printed socketserver's traceback to stderr for each check (every 2 s per balancer)."""
    import socket
    import struct

    from engine.metrics import Metrics

    class Slow:
        ready = True

        def as_json(self):
            return {"status": "ready"}

    def readiness():
        time.sleep(0.3)  # the reset arrives before the answer is written
        return Slow()

    metrics = Metrics(sqlite_store)
    port = metrics.serve("127.0.0.1", 0, readiness)
    try:
        for _ in range(3):
            s = socket.create_connection(("127.0.0.1", port))
            s.sendall(b"GET /readyz HTTP/1.0\r\n\r\n")
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            s.close()  # RST
        time.sleep(1.5)
        assert httpx.get(f"http://127.0.0.1:{port}/readyz").status_code == 200  # still serving
    finally:
        metrics.close()
    err = capfd.readouterr().err
    assert "Traceback" not in err and "Exception occurred" not in err, err
