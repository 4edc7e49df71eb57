"""Several engines on one PostgreSQL store (issue 10): leases, and duplicate windows across engines.

Two engines here are two Runtimes in this test process, each with its own Store (its own
connections, committer and workers), on one database, one blob folder and one key file, as
two hosts would have them. The same message is sent to both at the same instant by real
peers (raw MLLP sockets, DCMTK storescu, httpx): it must be stored once, and the loser must
answer as a duplicate with the original answer. Before issue 10 the MSH-3/4/10 look-up only
saw committed rows and both engines stored the message (46 of 50 in the issue), and two
ORUs of one debounce key each kept a pending delivery.

Leases: a holder in another process is SIGKILLed; its lease moves within one lease period.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import engine_fakes
import httpx
import pytest
from conftest import IN_CI, _reset_pg
from dicom_peers import data_file, store_statuses, storescu, tool
from mllp_peers import MLLPReceiver, RawClient, msa
from sqlalchemy import func, select, text

from engine.store import leases, schema
from engine.store.db import PG_CONNECT_ARGS, Store


def _pg_url() -> str:
    url = os.environ.get("MEDRELAY_TEST_PG_URL")
    if not url:
        if IN_CI:
            pytest.fail("MEDRELAY_TEST_PG_URL not set: PostgreSQL is required under CI")
        pytest.skip("PostgreSQL not available (run scripts/test.sh)")
    return url


@pytest.fixture
def pg(tmp_path):
    url = _pg_url()
    _reset_pg(url)
    shared = tmp_path / "shared"
    shared.mkdir()
    return url, shared


def _yaml(url: str, shared: Path, channels: str) -> str:
    return (f'store: {{url: "{url}", blobs: "{shared}/blobs"}}\n'
            f'keys: {{kek_file: "{shared}/keys.json"}}\n'
            "log: {level: warning}\n"
            "channels:\n" + textwrap.indent(textwrap.dedent(channels).strip("\n"), "  ") + "\n")


def _both(fa, fb) -> tuple:
    """Run two calls at the same instant (a barrier), return both results."""
    barrier = threading.Barrier(2)
    out: list = [None, None]
    errors: list[BaseException] = []

    def run(i: int, f) -> None:
        try:
            barrier.wait(10)
            out[i] = f()
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(0, fa)), threading.Thread(target=run, args=(1, fb))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    if errors:
        raise errors[0]
    return out[0], out[1]


def _count(store, table, *where) -> int:
    with store.engine.connect() as c:
        return c.execute(select(func.count()).select_from(table).where(*where)).scalar_one()


# -- MSH-3/4/10 ------------------------------------------------------------------------------

def test_same_msh_sent_to_two_engines_at_once_is_stored_and_delivered_once(engine_factory, pg):
    url, shared = pg
    with MLLPReceiver() as rx:
        cfg = _yaml(url, shared, f"""
            adt:
              source: {{type: mllp, port: 0}}
              routes:
                - name: ris
                  to: {{type: mllp, host: 127.0.0.1, port: {rx.port}, timeout: 5}}
            """)
        a, b = engine_factory(cfg), engine_factory(cfg)
        ca, cb = RawClient("127.0.0.1", a.address("adt")[1]), RawClient("127.0.0.1", b.address("adt")[1])
        rounds = 50
        try:
            for i in range(rounds):
                msg = _adt(f"DUP{i:03}", mrn=f"M{i}")
                ack_a, ack_b = _both(lambda m=msg: ca.request(m, timeout=20), lambda m=msg: cb.request(m, timeout=20))
                assert msa(ack_a)[1] == "AA" and msa(ack_b)[1] == "AA"
                assert ack_a == ack_b, "the duplicate must answer the original ACK"
        finally:
            ca.close()
            cb.close()
        m, d = schema.messages, schema.deliveries
        assert _count(a.store, m) == rounds  # once each, not twice
        assert _count(a.store, d) == rounds
        a.wait_for(lambda: len(rx.received) >= rounds, timeout=30)
        time.sleep(1.0)
        ids = [r.split(b"\r", 1)[0].split(b"|")[9] for r in rx.received]
        assert len(ids) == rounds and len(set(ids)) == rounds  # delivered once each
        with a.store.engine.connect() as c:
            dup = c.execute(select(func.count()).select_from(schema.audit_events).where(
                schema.audit_events.c.action == "message.receive",
                schema.audit_events.c.detail == "duplicate")).scalar_one()
        assert dup == rounds  # each loser audited as a duplicate


def _adt(cid: str, *, mrn: str) -> bytes:
    return (f"MSH|^~\\&|HIS|HOSP|RIS|RAD|20240102030405||ADT^A08^ADT_A01|{cid}|P|2.5\r"
            f"EVN|A08|20240102030405\rPID|1||{mrn}^^^HOSP^MR||DOE^JOHN||19800101|M\rPV1|1|I|W^389^1\r").encode()


# -- debounce ----------------------------------------------------------------------------------

def test_two_messages_of_one_debounce_key_at_two_engines_give_one_delivery(engine_factory, pg):
    url, shared = pg
    engine_fakes.OUTBOX.pop("deb", None)
    cfg = _yaml(url, shared, """
        oru:
          source: {type: mllp, port: 0}
          dedupe_window: 0
          routes:
            - name: ris
              debounce: {key: PID-3.1, seconds: 1.5}
              to: {type: test_collect, name: deb}
        """)
    a, b = engine_factory(cfg), engine_factory(cfg)
    ca, cb = RawClient("127.0.0.1", a.address("oru")[1]), RawClient("127.0.0.1", b.address("oru")[1])
    keys = 40
    try:
        for i in range(keys):
            ack_a, ack_b = _both(lambda i=i: ca.request(_adt(f"A{i}", mrn=f"STUDY{i}"), timeout=20),
                                 lambda i=i: cb.request(_adt(f"B{i}", mrn=f"STUDY{i}"), timeout=20))
            assert msa(ack_a)[1] == "AA" and msa(ack_b)[1] == "AA"
    finally:
        ca.close()
        cb.close()
    d = schema.deliveries
    assert _count(a.store, d) == 2 * keys
    a.wait_for(lambda: _count(a.store, d, d.c.state == "pending") == 0, timeout=60)
    time.sleep(0.5)
    assert _count(a.store, d, d.c.state == "superseded") == keys
    got = engine_fakes.OUTBOX.get("deb", [])
    mrns = sorted(p.split(b"PID|1||", 1)[1].split(b"^", 1)[0] for p in got)
    assert mrns == sorted(f"STUDY{i}".encode() for i in range(keys)), "one delivery per key, not two"


# -- SOP Instance UID ----------------------------------------------------------------------------

def test_same_sop_instance_to_two_engines_at_once_is_stored_once(engine_factory, pg, tmp_path):
    tool("storescu")
    url, shared = pg
    cfg = _yaml(url, shared, """
        ct:
          source: {type: dicom, port: 0, ae_title: MEDRELAY, calling_aets: [TESTSCU]}
          routes:
            - {name: archive, to: {type: store}}
        """)
    a, b = engine_factory(cfg), engine_factory(cfg)
    pa, pb = a.address("ct")[1], b.address("ct")[1]
    rounds = 8
    for i in range(rounds):
        files = [_new_instance(tmp_path / f"ct{i}.dcm")]
        ra, rb = _both(lambda f=files: storescu(pa, f), lambda f=files: storescu(pb, f))
        assert store_statuses((ra.stdout or "") + (ra.stderr or "")) == ["Success"]
        assert store_statuses((rb.stdout or "") + (rb.stderr or "")) == ["Success"]
    from engine.store.dicom.tables import instances

    assert _count(a.store, instances) == rounds
    assert _count(a.store, schema.messages) == rounds  # the loser stored no second message
    assert _count(a.store, schema.deliveries) == rounds


def _new_instance(path: Path) -> Path:
    from pydicom import dcmread
    from pydicom.uid import generate_uid

    ds = dcmread(data_file("CT_small.dcm"))
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.save_as(path, enforce_file_format=True)
    return path


# -- FHIR conditional create -------------------------------------------------------------------------

def test_conditional_create_at_two_engines_at_once_creates_one_resource(engine_factory, pg):
    url, shared = pg
    cfg = _yaml(url, shared, """
        fhir:
          source: {type: fhir, port: 0, auth: {bearer_tokens: ["${FHIR_TOKEN}"]}}
          routes: []
        """)
    env = {"FHIR_TOKEN": "tok-0123456789abcdef"}
    a, b = engine_factory(cfg, env=env), engine_factory(cfg, env=env)

    def base(e) -> str:
        lst = e.runtime.listener("fhir")
        host, port = lst.address
        return f"http://{host}:{port}{lst.config.base_path}"

    auth = {"Authorization": "Bearer tok-0123456789abcdef"}
    rounds = 20
    with httpx.Client(headers=auth, timeout=30) as ha, httpx.Client(headers=auth, timeout=30) as hb:
        for i in range(rounds):
            ident = f"urn:test|MRN{i}"
            body = {"resourceType": "Patient", "identifier": [{"system": "urn:test", "value": f"MRN{i}"}]}
            hdr = {"If-None-Exist": f"identifier={ident}"}
            ra, rb = _both(lambda j=body, h=hdr: ha.post(base(a) + "/Patient", json=j, headers=h),
                           lambda j=body, h=hdr: hb.post(base(b) + "/Patient", json=j, headers=h))
            assert sorted([ra.status_code, rb.status_code]) == [200, 201], (ra.text, rb.text)
            assert ra.json()["id"] == rb.json()["id"]  # the loser answers with the resource the winner made
        found = hb.get(base(b) + "/Patient", params={"identifier": "urn:test|MRN7"}).json()
    assert len(found.get("entry", [])) == 1
    from engine.store.fhir.tables import fhir_resources as r

    with a.store.engine.connect() as c:
        n = c.execute(select(func.count(func.distinct(r.c.id))).where(r.c.type == "Patient")).scalar_one()
    assert n == rounds


# -- leases ---------------------------------------------------------------------------------------------

HOLDER = textwrap.dedent("""
    import sys, time
    from engine.security.crypto import KeyRing
    from engine.ops.singleton import Keeper
    from engine.store.db import Store
    url, blobs, keys = sys.argv[1:4]
    s = Store(url, blobs, KeyRing(keys))
    k = Keeper(s, lease=3.0, tick=0.3)
    k.want("route:adt/ris")
    k.start()
    while not k.held("route:adt/ris"):
        time.sleep(0.05)
    print("held", flush=True)
    time.sleep(600)
""")


def test_a_killed_holders_lease_moves_to_another_process_within_a_lease_period(pg):
    from engine.ops.singleton import Keeper
    from engine.security.crypto import KeyRing

    url, shared = pg
    keys = shared / "keys.json"
    KeyRing(keys)
    s = Store(url, shared / "blobs", KeyRing(keys))
    s.migrate()
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, url, str(shared / "blobs"), str(keys)],
                            stdout=subprocess.PIPE, text=True)
    other = Keeper(s, lease=3.0, tick=0.3)
    try:
        assert proc.stdout is not None
        while (line := proc.stdout.readline()) and line.strip() != "held":  # log lines go to stdout too
            pass
        assert line.strip() == "held", "the holder process never got the lease"
        other.want("route:adt/ris")
        other.start()
        end = time.monotonic() + 5
        while time.monotonic() < end:  # never two holders while the first one lives
            assert not other.held("route:adt/ris")
            time.sleep(0.1)
        with s.engine.connect() as c:
            holder, _left = leases.holders(c)["route:adt/ris"]
        assert holder.split(":")[1] == str(proc.pid)
        proc.kill()
        proc.wait(10)
        killed = time.monotonic()
        while not other.held("route:adt/ris") and time.monotonic() - killed < 15:
            time.sleep(0.05)
        took = time.monotonic() - killed
        assert other.held("route:adt/ris"), "the lease never moved"
        assert took < 3.0 + 0.3 + 1.5, f"took {took:.1f} s for a 3 s lease"
    finally:
        if proc.poll() is None:
            proc.kill()
        other.stop()
        s.dispose()


def test_store_gc_runs_once_at_a_time(pg):
    from engine.security.crypto import KeyRing
    from engine.store.gc import collect

    url, shared = pg
    s = Store(url, shared / "blobs", KeyRing(shared / "keys.json"))
    s.migrate()
    try:
        with leases.hold(s, "store-gc"), pytest.raises(leases.LeaseHeld):
            collect(s)
        assert collect(s) == (0, 0)  # free again once the first is done
    finally:
        s.dispose()


# -- connection settings ------------------------------------------------------------------------------

def test_postgres_connections_carry_timeouts_and_keepalives(pg):
    from engine.security.crypto import KeyRing

    url, shared = pg
    s = Store(url, shared / "blobs", KeyRing(shared / "keys.json"))
    try:
        for engine in (s.engine, s.queue_engine):
            with engine.connect() as c:
                info = {o.keyword.decode(): (o.val or b"").decode()
                        for o in c.connection.dbapi_connection.pgconn.info}
                for k, v in PG_CONNECT_ARGS.items():
                    assert info.get(k) == str(v), (k, info.get(k))
        with s.queue_engine.connect() as c:
            assert c.execute(text("SHOW synchronous_commit")).scalar() == "off"
        with s.engine.connect() as c:
            assert c.execute(text("SHOW synchronous_commit")).scalar() == "on"  # intake stays durable
    finally:
        s.dispose()


def test_a_database_that_never_answers_fails_the_connect_within_its_timeout(tmp_path):
    """A listener that accepts (the kernel's backlog) but never speaks, like a host gone silent
    behind a live address: without connect_timeout libpq would wait for ever."""
    from engine.security.crypto import KeyRing

    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)
    port = silent.getsockname()[1]
    try:
        s = Store(f"postgresql+psycopg://u:p@127.0.0.1:{port}/db?connect_timeout=2", tmp_path / "b",
                  KeyRing(tmp_path / "k.json"))
        t0 = time.monotonic()
        with pytest.raises(Exception, match="(?i)timeout|timed out"):
            with s.engine.connect():
                pass
        assert time.monotonic() - t0 < 8
        s.dispose()
    finally:
        silent.close()


# -- singletons: the audit export ------------------------------------------------------------------

def test_audit_export_runs_in_one_engine_and_moves_when_it_stops(engine_factory, pg):
    """Each audit row reaches the repository once with two engines exporting the same store (before
    issue 10 both read and sent the same rows: 83-103 twice); when the exporting engine stops, the
    other takes over within a lease period and exports what came after."""
    import re

    from conftest import free_port as free
    from test_audit_syslog import SyslogReceiver

    url, shared = pg
    port = free()
    rx = SyslogReceiver(port, None).start()
    try:
        cfg = _yaml(url, shared, """
            adt:
              source: {type: mllp, port: 0}
              routes:
                - name: sink
                  to: {type: test_collect, name: audit-scale}
            """).replace("log: {level: warning}\n", "log: {level: warning}\n"
                         f"audit:\n  syslog: {{host: 127.0.0.1, port: {port}, transport: tcp, "
                         "poll_interval: 0.1, batch: 5, retry_initial: 0.1, retry_max: 0.5}\n")
        a, b = engine_factory(cfg), engine_factory(cfg)
        ca, cb = RawClient("127.0.0.1", a.address("adt")[1]), RawClient("127.0.0.1", b.address("adt")[1])
        try:
            for i in range(40):
                assert msa((ca if i % 2 else cb).request(_adt(f"AUD{i}", mrn=f"M{i}"), timeout=20))[1] == "AA"
        finally:
            ca.close()
            cb.close()
        a_exports = a.runtime.keeper.held("audit-export")
        assert a_exports != b.runtime.keeper.held("audit-export")  # exactly one of them

        def ids() -> list[int]:
            return [int(re.search(rb'id="(\d+)"', f).group(1)) for f in list(rx.frames)]

        a.wait_for(lambda: _count(a.store, schema.audit_events, schema.audit_events.c.exported == 0) == 0,
                   timeout=30)
        time.sleep(1.0)
        sent = ids()
        assert len(sent) == len(set(sent)) and len(sent) >= 80, f"{len(sent) - len(set(sent))} sent twice"
        exporter, other = (a, b) if a_exports else (b, a)
        exporter.stop()  # releases its leases: the other engine takes the export over
        c = RawClient("127.0.0.1", other.address("adt")[1])
        try:
            assert msa(c.request(_adt("AUD-LATE", mrn="M-LATE"), timeout=20))[1] == "AA"
        finally:
            c.close()
        other.wait_for(lambda: other.runtime.keeper.held("audit-export"), timeout=10)
        other.wait_for(lambda: _count(other.store, schema.audit_events, schema.audit_events.c.exported == 0) == 0,
                       timeout=30)
        late = ids()
        assert len(late) > len(sent) and len(late) == len(set(late))
    finally:
        rx.stop()


# -- ordered route leases spread over the engines ------------------------------------------------------
def _route_holders(store) -> dict[str, str]:
    with store.engine.connect() as c:
        return {n: h for n, (h, _) in leases.holders(c).items() if n.startswith("route:")}


def test_ordered_route_leases_spread_over_engines_and_the_handover_keeps_order(engine_factory, pg):
    """Six ordered routes; engine A starts alone and takes all six leases; engine B starts while
    messages flow: A gives three up at renewal (each once its worker has settled what it had), B
    takes them. Every route's receiver gets every message once, in the order sent. Before, the
    first engine kept every ordered route's lease for as long as it ran."""
    url, shared = pg
    names = [f"bal{i}" for i in range(6)]
    for n in names:
        engine_fakes.OUTBOX.pop(n, None)
    routes = "".join(f"\n    - name: r{i}\n      to: {{type: test_collect, name: {n}}}" for i, n in enumerate(names))
    cfg = _yaml(url, shared, "adt:\n  source: {type: mllp, port: 0}\n  routes:" + routes)
    a = engine_factory(cfg)
    a.wait_for(lambda: len([h for h in _route_holders(a.store).values() if h == a.runtime.keeper.holder]) == 6,
               timeout=20)
    sent: list[bytes] = []
    client = RawClient("127.0.0.1", a.address("adt")[1])
    b = None
    try:
        for i in range(150):
            cid = f"BAL{i:04}".encode()
            assert msa(client.request(_adt(cid.decode(), mrn=f"M{i}"), timeout=20))[1] == "AA"
            sent.append(cid)
            if i == 30:
                b = engine_factory(cfg)
            time.sleep(0.02)
    finally:
        client.close()
    assert b is not None

    def split() -> tuple[int, int]:
        held = list(_route_holders(a.store).values())
        return held.count(a.runtime.keeper.holder), held.count(b.runtime.keeper.holder)

    a.wait_for(lambda: split() == (3, 3), timeout=30)
    a.wait_for(lambda: all(len(engine_fakes.OUTBOX.get(n, [])) >= len(sent) for n in names), timeout=60)
    time.sleep(1.0)
    for n in names:
        got = [p.split(b"\r", 1)[0].split(b"|")[9] for p in engine_fakes.OUTBOX[n]]
        assert got == sent, f"{n}: out of order or duplicated"
    assert split() == (3, 3)  # stable: nobody takes back what it gave up


def test_a_route_lease_nobody_else_wants_is_taken_after_the_grace(pg):
    """Balancing never strands a route: engine A wants four route leases, engine B another one (another
    configuration). A's share is two; it gives two up, and since nobody takes them it takes them back
    once they have been free for the grace period, and then gives nothing up any more."""
    from engine.ops.singleton import Keeper
    from engine.security.crypto import KeyRing

    url, shared = pg
    sa = Store(url, shared / "blobs", KeyRing(shared / "keys.json"))
    sb = Store(url, shared / "blobs", KeyRing(shared / "keys.json"))
    try:
        sa.migrate()
        # the grace (lease + 2 ticks = 5.4 s) is long next to the 1 s the test waits inside it: a
        # stall of the test thread of a few seconds on a loaded machine does not run it out
        ka, kb = Keeper(sa, lease=5.0, tick=0.2), Keeper(sb, lease=5.0, tick=0.2)
        ka.start()
        kb.start()
        routes = [f"route:c/r{i}" for i in range(4)]
        kb.want("route:other/x")
        for r in routes:
            ka.want(r)
        deadline = time.monotonic() + 30
        while sum(ka.yielding(r) for r in routes) != 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        given = [r for r in routes if ka.yielding(r)]
        assert len(given) == 2 and ka.engines == 2
        assert sum(ka.held(r) for r in routes) == 2
        for r in given:  # what a route worker does once it has nothing in hand
            ka.yielded(r)
        time.sleep(1.0)  # within the grace: left for others
        assert sum(ka.held(r) for r in routes) == 2
        deadline = time.monotonic() + 30
        while sum(ka.held(r) for r in routes) != 4 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert sum(ka.held(r) for r in routes) == 4  # taken back, over its share
        time.sleep(1.0)  # and kept: not yielded again (every try would pause the route for the grace)
        assert sum(ka.held(r) for r in routes) == 4 and not any(ka.yielding(r) for r in routes)
        ka.stop()
        kb.stop()
    finally:
        sa.dispose()
        sb.dispose()
