"""Route workers across store outages (issue 9 item 4).

PostgreSQL: a real outage. A TCP proxy (tests/tcp_proxy.py) sits between the engine and
PostgreSQL; it resets every connection and refuses new ones for 7 s while MLLP messages flow
into an ordered route whose receiver is slow, so the worker holds a leased claim when the
database goes. Before the fix its "done" update failed, the rows kept their 120 s lease and
the ordered claim waited at the leased head: delivery stalled for two minutes after the
database came back. Now the worker writes the claim's outcome once the store answers, and
delivery resumes within seconds; every acknowledged message is delivered, in order.

SQLite: the queue's own statements fail (injected at the driver level with a SQLAlchemy
event, as a disk or lock error would) while intake keeps working. SQLite writes no lease, so
a worker that re-claimed after a failed "done" would send again; it must hold the outcome,
back off (never a busy loop), never die, and resume when the store answers.
"""

from __future__ import annotations

import os
import threading
import time

import engine_fakes
import pytest
from conftest import IN_CI, _reset_pg
from mllp_peers import MLLPReceiver, RawClient, adt, make_ack, msa
from sqlalchemy import event, func
from sqlalchemy import select as sql_select
from sqlalchemy.engine import make_url
from tcp_proxy import TcpProxy

from engine.envelope import Envelope
from engine.store import schema

OUTAGE = 7.0
RESUME_WITHIN = 15.0  # seconds after the restore (a loaded machine needs some); the lease it used to wait for is 120 s


def _pg_url() -> str:
    url = os.environ.get("MEDRELAY_TEST_PG_URL")
    if not url:
        if IN_CI:
            pytest.fail("MEDRELAY_TEST_PG_URL not set: PostgreSQL is required under CI")
        pytest.skip("PostgreSQL not available (run scripts/test.sh)")
    return url


class Sender(threading.Thread):
    """An HL7 sender that resends each message until it gets AA, as real senders do."""

    def __init__(self, port: int, ids: list[str], release: threading.Event, hold_from: int) -> None:
        super().__init__(daemon=True)
        self.port, self.ids = port, ids
        self.release, self.hold_from = release, hold_from
        self.acked: list[str] = []
        self.refused = 0
        self.stop = threading.Event()

    def run(self) -> None:
        client = None
        deadline = time.monotonic() + 60
        for i, cid in enumerate(self.ids):
            if i == self.hold_from:
                self.release.wait(30)
            while not self.stop.is_set() and time.monotonic() < deadline:
                try:
                    if client is None:
                        client = RawClient("127.0.0.1", self.port, timeout=5)
                    if msa(client.request(adt(cid), timeout=10))[1] == "AA":
                        self.acked.append(cid)
                        break
                    self.refused += 1
                except (OSError, TimeoutError, AssertionError):
                    self.refused += 1
                    if client is not None:
                        client.close()
                    client = None
                time.sleep(0.2)
        if client is not None:
            client.close()


def test_postgres_outage_ordered_route_resumes_within_seconds(engine_factory):
    url = _pg_url()
    _reset_pg(url)
    real = make_url(url)
    arrivals: list[tuple[str, float]] = []
    # The receiver answers five, then holds the sixth until the database has gone: the worker is
    # mid-claim with a backlog behind it whatever the pace of the machine (a fixed 0.1 s per
    # message let the deliveries catch up with a slow sender).
    cut = threading.Event()

    def slow_ack(msg: bytes, n: int) -> bytes:
        if len(arrivals) >= 5:
            cut.wait(25)  # under the route's ack timeout (30 s): held, never timed out
        time.sleep(0.1)  # a slow receiver
        arrivals.append((msg.split(b"\r", 1)[0].split(b"|")[9].decode(), time.monotonic()))
        return make_ack(msg)

    proxy = TcpProxy(real.host or "127.0.0.1", real.port or 5432)
    rx = MLLPReceiver(slow_ack).start()
    try:
        proxied = real.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)
        eng = engine_factory(f"""
store: {{url: "{proxied}", blobs: data/blobs}}
keys: {{kek_file: data/keys.json}}
channels:
  adt:
    source: {{type: mllp, port: 0}}
    routes:
      - name: ris
        to: {{type: mllp, host: 127.0.0.1, port: {rx.port}, timeout: 30, connect_timeout: 2}}
        retry: {{max_attempts: 100, initial_delay: 0.2, max_delay: 1}}
""")
        ids = [f"PG{i:03}" for i in range(50)]
        release = threading.Event()
        sender = Sender(eng.address("adt")[1], ids, release, hold_from=35)
        sender.start()
        eng.wait_for(lambda: len(sender.acked) == 35 and len(arrivals) >= 5, timeout=30)
        assert len(arrivals) < 35  # a backlog: the worker holds leased rows when the database goes
        proxy.cut()
        cut_at = time.monotonic()
        cut.set()
        release.set()  # messages keep coming during the outage; they are refused, and resent
        time.sleep(OUTAGE)
        proxy.restore()
        restored_at = time.monotonic()
        sender.join(60)
        assert sender.acked == ids and sender.refused > 0
        eng.wait_for(lambda: {cid for cid, _ in arrivals} >= set(ids), timeout=RESUME_WITHIN + 20)
        after = [t for _, t in arrivals if t > restored_at]
        assert after and after[0] - restored_at < RESUME_WITHIN, "delivery did not resume within seconds"
        first_seen: list[str] = []
        for cid, _ in arrivals:
            if cid not in first_seen:
                first_seen.append(cid)
        assert first_seen == ids  # in order; a resend (at-least-once) only ever repeats the head
        d = schema.deliveries
        with eng.store.engine.connect() as c:
            states = dict(c.execute(sql_select(d.c.state, func.count()).group_by(d.c.state)).all())
            leased = c.execute(sql_select(func.count()).select_from(d).where(d.c.lease_until > 0)).scalar()
        assert states == {"done": len(ids)} and leased == 0
        assert time.monotonic() - cut_at < 50
        eng.stop()
    finally:
        rx.stop()
        proxy.close()


# -- SQLite: the queue's statements fail while intake goes on ---------------------------------

YAML = engine_fakes.collect_yaml(max_attempts=5, initial_delay=0.2, max_delay=0.5)


class QueueFault:
    """Make statements on the deliveries table fail on the queue's engine while ``on``."""

    def __init__(self, store, kinds: tuple[str, ...]) -> None:
        self.on = False
        self.kinds = kinds  # "SELECT", "UPDATE"
        self.raised = 0
        self.engine = store.queue_engine

        def before(conn, cursor, statement, parameters, context, executemany):
            s = statement.lstrip().upper()
            if self.on and "DELIVERIES" in s and s.startswith(self.kinds):
                self.raised += 1
                import sqlite3

                raise sqlite3.OperationalError("disk I/O error (injected)")

        self._before = before
        event.listen(self.engine, "before_cursor_execute", before)

    def remove(self) -> None:
        event.remove(self.engine, "before_cursor_execute", self._before)


def _submit(eng, payload: bytes) -> None:
    env = Envelope(channel="in", kind="hl7v2", payload=payload)
    assert eng.call(eng.runtime.intake.submit(env, response=b"ok")).status == "accepted"


def _states(eng) -> dict[str, int]:
    d = schema.deliveries
    with eng.store.engine.connect() as c:
        return dict(c.execute(sql_select(d.c.state, func.count()).group_by(d.c.state)).all())


@pytest.fixture(autouse=True)
def _clean_fakes():
    engine_fakes.OUTBOX.clear()
    engine_fakes.SCRIPT.clear()


def test_sqlite_done_update_fails_nothing_is_sent_twice(engine_factory, tmp_path):
    eng = engine_factory(YAML.format(name="q1", url=f"sqlite:///{tmp_path}/q.db"))
    fault = QueueFault(eng.store, ("UPDATE",))
    try:
        fault.on = True
        for i in range(5):
            _submit(eng, f"m{i}".encode())
        eng.wait_for(lambda: engine_fakes.OUTBOX.get("q1") and fault.raised >= 2, timeout=30)
        sent = list(engine_fakes.OUTBOX["q1"])
        time.sleep(3.0)  # the store keeps failing: the worker backs off and holds what it sent
        assert engine_fakes.OUTBOX["q1"] == sent  # nothing re-claimed, nothing sent again
        assert fault.raised <= 20, f"{fault.raised} store attempts in ~3 s: not backing off"
        assert _states(eng) == {"pending": 5}
        fault.on = False
        eng.wait_for(lambda: _states(eng) == {"done": 5}, timeout=30)
        assert engine_fakes.OUTBOX["q1"] == [f"m{i}".encode() for i in range(5)]  # each once, in order
        assert all(w.alive for w in eng.runtime.workers)
    finally:
        fault.remove()


def test_sqlite_claim_and_retry_schedule_fail_worker_survives(engine_factory, tmp_path):
    eng = engine_factory(YAML.format(name="q2", url=f"sqlite:///{tmp_path}/q.db"))
    fault = QueueFault(eng.store, ("SELECT", "UPDATE"))
    try:
        fault.on = True  # the claim itself fails
        _submit(eng, b"a")
        eng.wait_for(lambda: fault.raised >= 1, timeout=30)  # the claim was tried (and failed)
        time.sleep(2.5)
        assert engine_fakes.OUTBOX.get("q2") is None and 1 <= fault.raised <= 26
        fault.on = False
        eng.wait_for(lambda: engine_fakes.OUTBOX.get("q2") == [b"a"] and _states(eng) == {"done": 1}, timeout=30)

        engine_fakes.SCRIPT["q2"] = ["fail", "ok"]  # a failed send whose retry schedule cannot be written
        fault.kinds = ("UPDATE",)
        fault.raised = 0
        fault.on = True
        _submit(eng, b"b")
        eng.wait_for(lambda: fault.raised >= 2, timeout=30)
        assert engine_fakes.SCRIPT["q2"] == ["ok"]  # one attempt, held: not retried before it is recorded
        fault.on = False
        eng.wait_for(lambda: engine_fakes.OUTBOX.get("q2") == [b"a", b"b"], timeout=30)
        eng.wait_for(lambda: _states(eng) == {"done": 2}, timeout=30)
        d = schema.deliveries
        with eng.store.engine.connect() as c:
            attempts = c.execute(sql_select(d.c.attempts).order_by(d.c.id.desc()).limit(1)).scalar()
        assert attempts == 1  # the failed attempt was recorded once the store came back
        assert all(w.alive for w in eng.runtime.workers)
    finally:
        fault.remove()
