"""Per-client connection cap of the one HTTP stack (engine/http): raw sockets, a FHIR listener.

Before the cap, 300 half-sent requests from one address took all of ``max_connections`` and
every other client got 503 until the header timeout closed them. Now one address holds at
most ``max_connections_per_client`` (default 50); its next connections are refused at once
(503 + Retry-After), and a client at another address (127.0.0.2: Linux routes 127/8 to lo) is
served at once. Behind a trusted balancer the cap counts the client the PROXY header
announces, so two clients behind one balancer are counted apart.
"""

from __future__ import annotations

import socket
import time

import structlog
from conftest import wait_until
from http_peers import answered

OTHER = "127.0.0.2"
HALF = b"GET /fhir/metadata HTTP/1.1\r\nHost: x\r\nX-Wait: "  # a head never finished
FULL = b"GET /fhir/metadata HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
AT_ONCE = 5.0  # "at once", on a slow shared machine

FHIR = """
store: {url: "sqlite:///data/medrelay.db", blobs: data/blobs}
keys: {kek_file: data/keys.json}
channels:
  api:
    source: {type: fhir, port: 0, auth: {open: true}, header_timeout: 60, idle_timeout: 60%s}
"""


def connect(port: int, source: str = "127.0.0.1") -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=15, source_address=(source, 0))


def status_of(sock: socket.socket) -> bytes:
    """The status line the server answers with (b"" if it closed without one)."""
    sock.settimeout(15)
    data = b""
    try:
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(4096)
            if not chunk:
                break
            data += chunk
    except ConnectionResetError:
        pass
    return data


def silent(sock: socket.socket) -> bool:
    """Nothing written and not closed by the server (still held open, waiting for the head)."""
    return not answered(sock)


def served(port: int, source: str = "127.0.0.1", header: bytes = b"") -> float:
    """Seconds until a complete request from ``source`` got its 200."""
    t0 = time.monotonic()
    with connect(port, source) as s:
        s.sendall(header + FULL)
        answer = status_of(s)
    assert answer.startswith(b"HTTP/1.1 200"), answer[:300]
    return time.monotonic() - t0


def refused_now(sock: socket.socket) -> None:
    t0 = time.monotonic()
    answer = status_of(sock)
    assert answer.startswith(b"HTTP/1.1 503"), answer[:300]
    assert b"\r\nretry-after: 5\r\n" in answer.lower()
    assert time.monotonic() - t0 < AT_ONCE


def test_one_address_with_300_half_sent_requests_leaves_the_listener_to_the_others(engine_factory):
    """The issue 11 probe's case with the defaults (max_connections 200, per client 50)."""
    eng = engine_factory(FHIR % "")
    port = eng.address("api")[1]
    held: list[socket.socket] = []
    refused = 0
    with structlog.testing.capture_logs() as logs:
        t0 = time.monotonic()
        try:
            for _ in range(300):
                s = connect(port)
                s.sendall(HALF)
                held.append(s)
            # the first 50 wait for their heads; the other 250 were answered 503 and closed
            wait_until(lambda: sum(not silent(s) for s in held) >= 250, timeout=60)
            waiting = [s for s in held if silent(s)]
            assert len(waiting) == 50
            for s in held:
                if s not in waiting:
                    refused_now(s)
                    refused += 1
            assert refused == 250
            assert served(port, OTHER) < AT_ONCE  # another address: served at once
            assert served(port, OTHER) < AT_ONCE
            refused_now(_sent(connect(port), HALF))  # the full address: still refused, no hang
        finally:
            elapsed = time.monotonic() - t0
            for s in held:
                s.close()
    # each place comes back when its connection goes
    wait_until(lambda: _try(port), timeout=30)
    lines = [e for e in logs if e.get("reason") == "max_connections_per_client"]
    assert lines and lines[0]["client"] == "127.0.0.1" and lines[0]["limit"] == 50
    assert len(lines) <= 1 + elapsed / 10  # throttled: one line per client per 10 s, not 251
    # refused connections still closing did not count against max_connections (the burst of 250
    # pushed it past 200, so a client at another address arriving then got 503)
    assert not [e for e in logs if e.get("reason") == "max_connections"]


def _sent(sock: socket.socket, data: bytes) -> socket.socket:
    sock.sendall(data)
    return sock


def _try(port: int, header: bytes = b"") -> bool:
    with connect(port) as s:
        s.sendall(header + FULL)
        return status_of(s).startswith(b"HTTP/1.1 200")


def test_behind_a_trusted_balancer_the_announced_clients_are_counted_apart(engine_factory):
    """All connections come from the balancer (127.0.0.1); the PROXY header names the client.
    10.1.1.1 fills its 3 places; 10.1.1.2 behind the same balancer is still served, and so is
    a client connecting directly from 127.0.0.2 (untrusted: counted on its own address)."""
    eng = engine_factory(FHIR % ", max_connections_per_client: 3, proxy_protocol: {trusted: [127.0.0.1], timeout: 5}")
    port = eng.address("api")[1]

    def proxy(client: str) -> bytes:
        return f"PROXY TCP4 {client} 127.0.0.1 40000 443\r\n".encode()

    held = [_sent(connect(port), proxy("10.1.1.1") + HALF) for _ in range(3)]
    try:
        wait_until(lambda: all(silent(s) for s in held))
        assert served(port, header=proxy("10.1.1.2")) < AT_ONCE
        with connect(port) as s:  # a fourth from 10.1.1.1: refused at once
            s.sendall(proxy("10.1.1.1") + HALF)
            refused_now(s)
        assert served(port, header=b"PROXY TCP4 10.1.1.2 127.0.0.1 40001 443\r\n") < AT_ONCE
        assert served(port, OTHER) < AT_ONCE
        assert all(silent(s) for s in held)  # the held ones untouched
        # the balancer's own health check (LOCAL / UNKNOWN) counts on the balancer's address
        assert served(port, header=b"PROXY UNKNOWN\r\n") < AT_ONCE
    finally:
        for s in held:
            s.close()
    wait_until(lambda: _try(port, proxy("10.1.1.1")), timeout=30)


def test_tls_places_are_taken_before_the_handshake_and_given_back_when_it_fails(tmp_path):
    """Over TLS the client's place is taken at accept (connections over the cap cost no
    handshake) and given back when the handshake fails, which has no connection_lost."""
    import ssl

    from fhir_support import TOKEN, FhirServer
    from tls_certs import make_pki

    pki = make_pki(tmp_path / "pki")
    ctx = ssl.create_default_context(cafile=str(pki.ca))
    s = FhirServer(tmp_path / "fhir", max_connections=20, max_connections_per_client=3, handshake_timeout=30,
                   tls={"cert": str(pki.server.cert), "key": str(pki.server.key)}).start()
    port = s.listener.address[1]
    request = (f"GET /fhir/metadata HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {TOKEN}\r\n"
               "Connection: close\r\n\r\n").encode()

    def over_tls(source: str) -> bytes:
        with ctx.wrap_socket(connect(port, source), server_hostname="localhost") as t:
            t.sendall(request)
            return status_of(t)

    try:
        held = [connect(port) for _ in range(3)]  # three handshakes pending from 127.0.0.1
        try:
            wait_until(lambda: all(silent(h) for h in held))
            t0 = time.monotonic()
            try:
                answer = over_tls("127.0.0.1")
            except (ssl.SSLError, OSError):
                answer = b""
            assert answer == b"" and time.monotonic() - t0 < AT_ONCE  # refused before any handshake
            assert over_tls(OTHER).startswith(b"HTTP/1.1 200")  # another address: served
        finally:
            for h in held:
                h.close()
        assert wait_until(lambda: _tls_ok(over_tls), timeout=30)
        for _ in range(5):  # failed handshakes one after the other: each gives its place back
            with connect(port) as bad:
                bad.sendall(b"\x16\x03\x01\x00\x05hello" + b"\0" * 64)
                status_of(bad)  # closed by the server
        # given back as the server handles each failure (the client may see its close a moment before)
        assert wait_until(lambda: _tls_ok(over_tls), timeout=30)
    finally:
        s.stop()


def _tls_ok(over_tls) -> bool:
    try:
        return over_tls("127.0.0.1").startswith(b"HTTP/1.1 200")
    except OSError:
        return False
