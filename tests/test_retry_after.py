"""A FHIR server's `Retry-After` on 429/503 defers the delivery (probe session 6, finding 2).

The peer is a real HTTP server on a socket; the delivery goes through the whole engine (FHIR
source -> queue -> pipeline -> FHIR destination), so the spacing seen is the one the queue
schedules, not a unit's arithmetic.
"""

from __future__ import annotations

import json
import threading
import time
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
from sqlalchemy import select

from engine.http.retry_after import retry_after_seconds
from engine.store import schema


class ThrottlingFhir:
    """Answers the first ``throttle`` requests 429 with ``Retry-After`` (or whatever ``status``),
    then 201; records when each request came."""

    def __init__(self, throttle: int, retry_after: str | float, status: int = 429) -> None:
        """``retry_after``: the header's text, or a float: an HTTP-date that many seconds after
        each answer."""
        self.times: list[float] = []
        peer = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self) -> None:
                n = int(self.headers.get("Content-Length") or 0)
                self.rfile.read(n)
                peer.times.append(time.monotonic())
                if len(peer.times) <= throttle:
                    body = json.dumps(
                        {"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": "throttled"}]}
                    ).encode()
                    self.send_response(status)
                    self.send_header(
                        "Retry-After",
                        retry_after
                        if isinstance(retry_after, str)
                        else formatdate(time.time() + retry_after, usegmt=True),
                    )
                else:
                    body = b""
                    self.send_response(201)
                    self.send_header("Location", "Patient/p1/_history/1")
                self.send_header("Content-Type", "application/fhir+json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_POST = do_PUT = _answer

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/fhir"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


YAML = """
store: {{url: "sqlite:///{dir}/store.db", blobs: data/blobs}}
keys: {{kek_file: data/keys.json}}
channels:
  api:
    source: {{type: fhir, port: 0, auth: {{open: true}}}}
    routes:
      - name: forward
        retry: {{max_attempts: {attempts}, initial_delay: 0.2, multiplier: 1.5, max_delay: 0.5}}
        to: {{type: fhir, base_url: "{base}", auth: {{token: "${{FHIR_TOKEN}}"}}, timeout: 5}}
"""


def _delivery(engine):
    d = schema.deliveries
    with engine.store.engine.connect() as conn:
        return conn.execute(select(d.c.state, d.c.attempts, d.c.last_error).where(d.c.route == "forward")).first()


def _post_patient(engine) -> None:
    host, port = engine.address("api")
    r = httpx.post(
        f"http://{host}:{port}/fhir/Patient",
        json={"resourceType": "Patient", "active": True},
        headers={"Content-Type": "application/fhir+json"},
    )
    assert r.status_code in (200, 201), r.text


@pytest.mark.parametrize("form", ["delta-seconds", "http-date"])
def test_429_retry_after_spaces_attempts_and_is_not_counted(engine_factory, tmp_path, form):
    """429 + Retry-After twice, then 201: delivered, the tries >= 3 s apart, never dead although
    max_attempts is 2 (before: retried after the 0.2-0.5 s backoff and dead-lettered at the 2nd 429)."""
    value: str | float = "3" if form == "delta-seconds" else 4.0
    peer = ThrottlingFhir(2, value)
    try:
        engine = engine_factory(YAML.format(dir=tmp_path, base=peer.base, attempts=2), env={"FHIR_TOKEN": "t"})
        _post_patient(engine)
        engine.wait_for(lambda: (_delivery(engine) or ("",))[0] in ("done", "dead"), timeout=30)
        state, attempts, _ = _delivery(engine)
        assert state == "done", _delivery(engine)
        assert len(peer.times) == 3
        gaps = [b - a for a, b in zip(peer.times, peer.times[1:], strict=False)]
        # an HTTP-date has 1 s resolution: asked for 4 s, it may read as 3.0-4.0 s
        assert min(gaps) >= 2.95, gaps
        assert attempts == 0  # the two throttled tries were not counted
    finally:
        peer.stop()


def test_503_retry_after_defers_and_counts(engine_factory, tmp_path):
    """503 + Retry-After: 2 once, then 201: the retry waits 2 s (not the 0.2 s backoff) and counts."""
    peer = ThrottlingFhir(1, "2", status=503)
    try:
        engine = engine_factory(YAML.format(dir=tmp_path, base=peer.base, attempts=3), env={"FHIR_TOKEN": "t"})
        _post_patient(engine)
        engine.wait_for(lambda: (_delivery(engine) or ("",))[0] in ("done", "dead"), timeout=30)
        state, attempts, _ = _delivery(engine)
        assert state == "done"
        assert len(peer.times) == 2 and peer.times[1] - peer.times[0] >= 1.95, peer.times
    finally:
        peer.stop()


def test_retry_after_forms():
    now = 1_000_000_000.0
    assert retry_after_seconds("7", now) == 7.0
    assert retry_after_seconds(" 0 ", now) == 0.0
    assert retry_after_seconds(formatdate(now + 30, usegmt=True), now) == pytest.approx(30, abs=1)
    assert retry_after_seconds(formatdate(now - 30, usegmt=True), now) == 0.0  # in the past: now
    for bad in (None, "", "-5", "1.5", "soon", "Wed, 99 Foo 2026 00:00:00 GMT"):
        assert retry_after_seconds(bad, now) is None, bad
