"""The one throttle of the log lines a peer can multiply (engine/security/refusal_log.py), on its
own and under real floods: raw sockets against the MLLP, DICOM and FHIR listeners of a running
engine. Each flood leaves a bounded number of lines, and every event is accounted for: each
line stands for itself plus ``suppressed`` others, so lines without ``summary`` plus the sum of
``suppressed`` is the number of events, once the listener has stopped (its stop logs the counts
still held back). Meanwhile the listener serves: an ADT gets its AA, a C-ECHO answers, a FHIR
read its 200. The audit trail is not throttled: every refused association has its row.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import time
from collections.abc import Iterator

import pytest
from conftest import wait_until
from mllp_peers import RawClient, adt, msa
from pynetdicom import AE
from pynetdicom.sop_class import Verification
from sqlalchemy import func, select
from structlog.testing import capture_logs
from test_dicom_hostile import associate_rq, recv_pdu

from engine.security.refusal_log import RefusalLog
from engine.store import schema
from tests.dicom_peers import dicom_yaml

RELEASE_RQ = bytes((0x05, 0, 0, 0, 0, 4, 0, 0, 0, 0))


def of(logs: list[dict], event: str) -> list[dict]:
    return [e for e in logs if e["event"] == event]


def accounted(lines: list[dict]) -> int:
    """The events ``lines`` stand for: each logged one, plus those it says were not."""
    return sum(0 if e.get("summary") else 1 for e in lines) + sum(e["suppressed"] for e in lines)


# -- the throttle ------------------------------------------------------------------------------
def test_first_line_at_once_then_one_per_window_with_the_count():
    t = RefusalLog(every=0.3)
    with capture_logs() as logs:
        for _ in range(50):
            t.line(("x.refused", "a"), "x.refused", client="a")
        assert [e["suppressed"] for e in logs] == [0]  # the first at once, 49 held back
        time.sleep(0.35)
        t.line(("x.refused", "a"), "x.refused", client="a")  # the window is over: logged, with the 49
        assert [e["suppressed"] for e in logs] == [0, 49]
        t.line(("x.refused", "a"), "x.refused", client="a")
        t.line(("x.refused", "b"), "x.refused", "info", client="b")  # another key: at once
        t.flush()  # a's one held back, as a summary
    assert [(e["client"], e["suppressed"], e.get("summary")) for e in logs] == [
        ("a", 0, None),
        ("a", 49, None),
        ("b", 0, None),
        ("a", 1, True),
    ]
    assert logs[2]["log_level"] == "info" and logs[3]["log_level"] == "warning"
    assert accounted(logs) == 53


def test_a_key_that_does_not_come_back_has_its_count_logged_with_the_next_line_of_any():
    t = RefusalLog(every=0.2)
    with capture_logs() as logs:
        for _ in range(10):
            t.line("a", "x.refused", client="a")
        time.sleep(0.25)
        t.line("b", "x.refused", client="b")
    assert [(e["client"], e["suppressed"], e.get("summary")) for e in logs] == [
        ("a", 0, None),
        ("b", 0, None),
        ("a", 9, True),
    ]


def test_ten_thousand_addresses_keep_the_memory_and_the_lines_bounded():
    t = RefusalLog(every=60, most=16)
    with capture_logs() as logs:
        for i in range(10_000):
            t.line(("x.refused", f"10.0.{i // 256}.{i % 256}"), "x.refused", client=f"10.0.{i // 256}.{i % 256}")
            assert len(t) <= 17
        t.flush()
    assert len(logs) == 16 + 2  # one per key it remembers, the first of the others, their summary
    assert [e.get("overflow") for e in logs[-2:]] == [True, True] and logs[-1]["suppressed"] == 10_000 - 17
    assert accounted(logs) == 10_000


# -- MLLP --------------------------------------------------------------------------------------
MLLP = """
store: {{url: "sqlite:///data/medrelay.db", blobs: data/blobs}}
keys: {{kek_file: data/keys.json}}
channels:
  adt:
    source: {{type: mllp, port: 0{extra}}}
"""


def _connect_close(port: int, n: int, source: str = "127.0.0.1") -> None:
    for _ in range(n):
        s = socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0))
        s.close()


def acked(eng, control_id: str) -> int:
    """Send an ADT until it gets its AA (a connection made while the listener still holds
    max_connections of a flood is refused, as it should be); returns the connections it took."""
    deadline = time.monotonic() + 15
    for attempt in range(1, 1000):
        try:
            with RawClient(*eng.address("adt")) as c:
                assert msa(c.request(adt(control_id)))[1:3] == ["AA", control_id]
                return attempt
        except (ConnectionError, TimeoutError):
            assert time.monotonic() < deadline, "no ACK within 15 s of the flood"
            time.sleep(0.2)
    raise AssertionError("unreachable")


def test_two_thousand_mllp_connects_and_closes_are_a_few_lines_and_the_adt_is_acked(engine_factory):
    """Before: 2 info lines per connection (4000); now one connected and one disconnected line
    for the client, and their counts when the listener stops."""
    eng = engine_factory(MLLP.format(extra=""))
    listener = eng.runtime.listener("adt")
    with capture_logs() as logs:
        _connect_close(eng.address("adt")[1], 2000)
        attempts = acked(eng, "FLOOD1")
        wait_until(lambda: not listener._conns, timeout=30)
        flood = len(logs)
        eng.stop()
    connected, disconnected = of(logs, "mllp.connected"), of(logs, "mllp.disconnected")
    refused = of(logs, "mllp.too_many_connections")  # over max_connections (256) while the flood is read
    assert len(connected) <= 3 and len(disconnected) <= 6 and len(refused) <= 3, (connected, disconnected)
    assert flood < 20, flood
    assert accounted(connected) + accounted(refused) == 2000 + attempts
    assert accounted(disconnected) == accounted(connected)
    # the ADT's connection is a key of its own (it sent messages): its close is logged at once
    assert any(e["messages"] == 1 and not e.get("summary") for e in disconnected), disconnected


def test_an_mllp_flood_from_many_addresses_is_bounded_too(engine_factory):
    """600 client addresses (127.0.x.y, all loopback) cannot grow the throttle past its bound."""
    eng = engine_factory(MLLP.format(extra=""))
    port = eng.address("adt")[1]
    listener = eng.runtime.listener("adt")
    listener.lines.most = 32  # the default is 128; a smaller one for a quicker flood
    sources = [f"127.0.{1 + i // 200}.{1 + i % 200}" for i in range(600)]
    with capture_logs() as logs:
        for source in sources:
            _connect_close(port, 1, source)
            assert len(listener.lines) <= 32 + 3
        attempts = acked(eng, "FLOOD2")
        wait_until(lambda: not listener._conns, timeout=30)
        eng.stop()
    connected, refused = of(logs, "mllp.connected"), of(logs, "mllp.too_many_connections")
    assert len(connected) <= 32 + 2 and accounted(connected) + accounted(refused) == 600 + attempts
    assert len(of(logs, "mllp.disconnected")) <= 32 + 2


def test_mllp_refusals_over_the_per_client_cap_are_counted_and_the_listener_serves(engine_factory):
    eng = engine_factory(MLLP.format(extra=", max_connections_per_client: 2"))
    host, port = eng.address("adt")
    listener = eng.runtime.listener("adt")
    with capture_logs() as logs:
        held = [socket.create_connection((host, port)) for _ in range(2)]
        try:
            wait_until(lambda: listener._clients.count.get("127.0.0.1") == 2)
            _connect_close(port, 500)
            wait_until(lambda: accounted(of(logs, "mllp.too_many_connections")) >= 1)
            for s in held:
                s.close()
            wait_until(lambda: not listener._clients.count)
            with RawClient(host, port) as c:  # its places given back: served
                assert msa(c.request(adt("CAP1")))[1:3] == ["AA", "CAP1"]
            wait_until(lambda: not listener._conns, timeout=30)
            eng.stop()
        finally:
            for s in held:
                s.close()
    refused = of(logs, "mllp.too_many_connections")
    # a connection of the flood still in the accept queue when the two closed may have got in
    through = accounted(of(logs, "mllp.connected")) - 3  # the two held, the ADT's
    assert len(refused) <= 3 and accounted(refused) + through == 500 and through < 10, (refused, through)
    assert refused[0]["reason"] == "max_connections_per_client" and refused[0]["limit"] == 2


@contextlib.contextmanager
def holding(port: int, n: int, first: bytes) -> Iterator[list[socket.socket]]:
    """``n`` connections that sent ``first`` and wait (holding their places), closed at the end."""
    held = [socket.create_connection(("127.0.0.1", port)) for _ in range(n)]
    try:
        for h in held:
            h.sendall(first)
        yield held
    finally:
        for h in held:
            h.close()


# -- DICOM -------------------------------------------------------------------------------------
def _echo(port: int) -> bool:
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title="MEDRELAY")
    try:
        return assoc.is_established and assoc.send_c_echo().Status == 0x0000
    finally:
        if assoc.is_established:
            assoc.release()


def _associate_and_release(port: int, **kw: str) -> int:
    """One association (raw): the PDU type of the answer (2 AC, 3 RJ); released if accepted."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(associate_rq(Verification, **kw))
        kind, _ = recv_pdu(s)
        if kind == 0x02:
            s.sendall(RELEASE_RQ)
            assert recv_pdu(s)[0] == 0x06
        return kind


def test_three_hundred_dicom_associations_are_a_few_lines_and_every_rejection_is_audited(engine_factory):
    """Before: a dicom.association_accepted (or _rejected) line for each."""
    eng = engine_factory(dicom_yaml())
    port = eng.address("dcm")[1]
    with capture_logs() as logs:
        assert {_associate_and_release(port) for _ in range(300)} == {0x02}
        assert {_associate_and_release(port, calling="INTRUDER") for _ in range(100)} == {0x03}
        assert _echo(port)
        eng.stop()
    accepted, rejected = of(logs, "dicom.association_accepted"), of(logs, "dicom.association_rejected")
    assert len(accepted) <= 3 and accounted(accepted) == 301, accepted
    assert len(rejected) <= 3 and accounted(rejected) == 100, rejected
    assert rejected[0]["calling_aet"] == "INTRUDER" and rejected[0]["reason"] == "calling AE title not recognised"
    a = schema.audit_events
    with eng.store.engine.connect() as c:  # audit: every one (an ATNA row is required, a log line is not)
        n = c.execute(
            select(func.count()).where(a.c.action == "dicom.association", a.c.outcome == "failure")
        ).scalar_one()
    assert n == 100


@pytest.mark.parametrize("cap", ["max_connections", "max_connections_per_client"])
def test_dicom_connections_beyond_the_cap_get_rj_and_a_few_lines(engine_factory, cap):
    extra = (
        "      max_connections: 2\n      max_associations: 2\n"
        if cap == "max_connections"
        else "      max_connections_per_client: 2\n"
    )
    eng = engine_factory(dicom_yaml(extra=extra + "      acse_timeout: 30\n"))
    port = eng.address("dcm")[1]
    server = eng.runtime.listener("dcm").server
    with holding(port, 2, b"\x01") as held:  # an A-ASSOCIATE-RQ begun, never finished: held until ARTIM
        wait_until(lambda: server.open_connections == 2)
        with capture_logs() as logs:
            answers = []
            for _ in range(300):
                with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
                    s.sendall(associate_rq(Verification))
                    kind, body = recv_pdu(s)
                    answers.append((kind, bytes(body[1:4])))
            assert set(answers) == {(0x03, bytes((0x02, 0x03, 0x02)))}  # rejected-transient, local limit
            for h in held:
                h.close()
            wait_until(lambda: server.open_connections == 0)
            assert _echo(port)
            eng.stop()
    refused = of(logs, "dicom.connection_refused")
    assert len(refused) <= 3 and accounted(refused) == 300, refused
    assert refused[0]["reason"] == ("max_connections reached" if cap == "max_connections" else cap)


# -- HTTP --------------------------------------------------------------------------------------
FHIR = """
store: {url: "sqlite:///data/medrelay.db", blobs: data/blobs}
keys: {kek_file: data/keys.json}
channels:
  api:
    source: {type: fhir, port: 0, auth: {open: true}, idle_timeout: 60, %s}
"""
HALF = b"GET /fhir/metadata HTTP/1.1\r\nHost: x\r\nX-Wait: "
FULL = b"GET /fhir/metadata HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"


def _answer(s: socket.socket) -> bytes:
    s.settimeout(15)
    data = b""
    try:
        while b"\r\n\r\n" not in data and (chunk := s.recv(4096)):
            data += chunk
    except ConnectionResetError:
        pass
    return data


def test_http_connections_beyond_the_per_client_cap_are_503_and_a_few_lines(engine_factory):
    eng = engine_factory(FHIR % "header_timeout: 60, max_connections_per_client: 2")
    port = eng.address("api")[1]
    with holding(port, 2, HALF), capture_logs() as logs:
        statuses = set()
        for _ in range(300):
            with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
                s.sendall(FULL)
                statuses.add(_answer(s)[:12])
        assert statuses == {b"HTTP/1.1 503"}
        with socket.create_connection(("127.0.0.1", port), timeout=10, source_address=("127.0.0.2", 0)) as s:
            s.sendall(FULL)
            assert _answer(s).startswith(b"HTTP/1.1 200")
        eng.stop()
    refused = of(logs, "fhir.connection_refused")
    assert len(refused) <= 3 and accounted(refused) == 300, refused
    assert refused[0]["client"] == "127.0.0.1" and refused[0]["reason"] == "max_connections_per_client"


def test_http_header_timeouts_of_a_hundred_connections_are_a_few_lines(engine_factory):
    """Before: a fhir.timeout line for each connection that never finished its head."""
    eng = engine_factory(FHIR % "header_timeout: 0.5, max_connections_per_client: 200")
    port = eng.address("api")[1]
    with capture_logs() as logs:
        socks = [socket.create_connection(("127.0.0.1", port)) for _ in range(100)]
        for s in socks:
            s.sendall(HALF)
        for s in socks:
            assert _answer(s).startswith(b"HTTP/1.1 408")
            s.close()
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(FULL)
            assert _answer(s).startswith(b"HTTP/1.1 200")
        eng.stop()
    timeouts = of(logs, "fhir.timeout")
    assert len(timeouts) <= 3 and accounted(timeouts) == 100, timeouts
    assert timeouts[0]["stage"] == "headers"


# -- TLS ---------------------------------------------------------------------------------------
TLS = """
store: {{url: "sqlite:///data/medrelay.db", blobs: data/blobs}}
keys: {{kek_file: data/keys.json}}
channels:
  adt:
    source: {{type: mllp, port: 0, tls: {{cert: "{pki.server.cert}", key: "{pki.server.key}"}}}}
"""


def test_a_hundred_refused_tls_handshakes_are_a_few_lines_and_a_hundred_audit_rows(engine_factory, tmp_path):
    """Before: a mllp.tls_rejected warning for each (plain MLLP sent to the TLS port)."""
    from tls_certs import make_pki

    pki = make_pki(tmp_path / "pki")
    eng = engine_factory(TLS.format(pki=pki))
    port = eng.address("adt")[1]
    a = schema.audit_events

    def audited() -> int:
        with eng.store.engine.connect() as c:
            return c.execute(select(func.count()).where(a.c.action == "mllp.tls_rejected")).scalar_one()

    with capture_logs() as logs:
        for _ in range(100):
            with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
                s.sendall(b"\x0bMSH|^~\\&|plain\r\x1c\r")  # not a ClientHello
                _answer(s)  # until the listener closes it
        wait_until(lambda: audited() == 100, timeout=30)
        ctx = ssl.create_default_context(cafile=str(pki.ca))
        with (
            socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
            ctx.wrap_socket(raw, server_hostname="localhost") as s,
        ):
            s.sendall(b"\x0b" + adt("TLS1") + b"\x1c\r")
            assert b"MSA|AA|TLS1" in s.recv(65536)
    rejected = of(logs, "mllp.tls_rejected")
    assert 1 <= len(rejected) <= 3 and audited() == 100, rejected
