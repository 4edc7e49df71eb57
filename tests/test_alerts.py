"""Alerts: thresholds crossed are POSTed to a webhook (a real HTTP server in the test), repeated
after repeat_after, and resolved; a webhook that is down loses nothing."""

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import engine_fakes
from test_engine_pipeline import submit

from engine.envelope import Envelope


class Receiver:
    def __init__(self) -> None:
        self.got: list[dict] = []
        self.fail = False
        outer = self

        class H(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if outer.fail:
                    self.send_response(503)
                else:
                    outer.got.append({"auth": self.headers.get("Authorization"), **json.loads(body)})
                    self.send_response(204)
                self.end_headers()

            def log_message(self, *a):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), H)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_port}/hook"

    def of(self, alert, status=None):
        return [g for g in self.got if g["alert"] == alert and (status is None or g["status"] == status)]


YAML = """
store: {{url: "sqlite:///data/m.db", blobs: data/blobs}}
keys: {{kek_file: data/keys.json}}
alerts:
  webhook: {{url: "{url}", headers: {{Authorization: "Bearer ${{HOOK_TOKEN}}"}}}}
  interval: 0.2
  repeat_after: 1.0
  thresholds: {{queue_depth: 3, dead_letters: 1, oldest_pending_seconds: null, error_rate: null}}
channels:
  in:
    source: {{type: test_null}}
    routes:
      - name: a
        to: {{type: test_collect, name: alerts}}
        retry: {{max_attempts: 1, initial_delay: 0.05}}
"""


def test_dead_letter_fires_repeats_and_resolves(engine_factory, monkeypatch):
    monkeypatch.setenv("HOOK_TOKEN", "s3cret")
    rx = Receiver()
    engine_fakes.SCRIPT["alerts"] = ["perm"]
    eng = engine_factory(YAML.format(url=rx.url))
    submit(eng, b"one")
    fired = eng.wait_for(lambda: rx.of("dead_letters", "firing"))
    f = fired[0]
    assert (f["channel"], f["route"], f["value"], f["threshold"], f["auth"]) == ("in", "a", 1.0, 1.0, "Bearer s3cret")
    assert "one" not in json.dumps(rx.got)  # counts and names only, never content
    time.sleep(0.6)
    assert len(rx.of("dead_letters", "firing")) == 1  # suppressed until repeat_after
    eng.wait_for(lambda: len(rx.of("dead_letters", "firing")) >= 2, timeout=5)
    # an operator deals with it: the dead letter is gone -> one "resolved"
    from sqlalchemy import update

    from engine.store import schema
    with eng.store.engine.begin() as c:
        c.execute(update(schema.deliveries).where(schema.deliveries.c.state == "dead").values(state="done"))
    eng.wait_for(lambda: rx.of("dead_letters", "resolved"))
    time.sleep(0.5)
    assert len(rx.of("dead_letters", "resolved")) == 1


def test_webhook_down_then_back_loses_no_alert(engine_factory, monkeypatch):
    monkeypatch.setenv("HOOK_TOKEN", "t")
    rx = Receiver()
    rx.fail = True
    yaml = YAML.format(url=rx.url).replace("type: test_collect, name: alerts", "type: test_collect, name: slow")
    engine_fakes.SCRIPT["slow"] = ["fail"] * 50
    yaml = yaml.replace("retry: {max_attempts: 1, initial_delay: 0.05}", "retry: {max_attempts: 50, initial_delay: 30}")
    eng = engine_factory(yaml)
    for i in range(4):  # the head fails and waits 30 s; the rest queue behind it
        env = Envelope(channel="in", kind="hl7v2", payload=b"m%d" % i, headers={"MSH-9.1": "ADT"})
        eng.call(eng.runtime.intake.submit(env))
    time.sleep(1.0)
    assert rx.got == []
    rx.fail = False
    got = eng.wait_for(lambda: rx.of("queue_depth", "firing"))
    assert got[0]["value"] >= 3


def test_listener_down_is_reported(engine_factory, monkeypatch):
    monkeypatch.setenv("HOOK_TOKEN", "t")
    rx = Receiver()
    eng = engine_factory(YAML.format(url=rx.url))
    lst = eng.runtime.listeners.pop("in")  # as if it had stopped serving
    try:
        eng.wait_for(lambda: rx.of("listener_down", "firing"))
    finally:
        eng.runtime.listeners["in"] = lst
    eng.wait_for(lambda: rx.of("listener_down", "resolved"))


def test_error_rate_needs_enough_attempts_and_is_per_interval(sqlite_store):
    from engine.ops.alerts import AlertMonitor, AlertsConfig

    counts = {("c", "r"): (0, 0)}
    cfg = AlertsConfig(thresholds={"error_rate": 0.5, "min_attempts": 10, "dead_letters": None})
    mon = AlertMonitor(cfg, sqlite_store, routes=lambda: [("c", "r")], down_channels=lambda: [],
                       attempts=lambda: dict(counts))
    assert mon.evaluate() == {}
    counts[("c", "r")] = (4, 1)  # 80 % but only 5 attempts
    assert mon.evaluate() == {}
    counts[("c", "r")] = (12, 4)  # this interval: 8 failed of 11
    assert mon.evaluate() == {("error_rate", "c", "r"): (0.727, 0.5)}
    counts[("c", "r")] = (13, 20)  # this interval: 1 failed of 17
    assert mon.evaluate() == {}
