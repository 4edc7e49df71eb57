"""PROXY protocol (v1/v2) on the mllp and dicom sources: a real HAProxy (send-proxy, send-proxy-v2)
in front of the engine, a client from 127.0.0.2 through it, the audit row naming 127.0.0.2; raw
sockets for malformed, slow, oversize and untrusted headers."""

from __future__ import annotations

import shutil
import socket
import struct
import subprocess
import time

import pytest
from conftest import need_tool
from mllp_peers import RawClient, adt, msa
from ports import free_port, wait_port
from sqlalchemy import select

from engine.security import proxy_protocol as pp
from engine.store import schema

CLIENT_IP = "127.0.0.2"  # Linux routes all of 127/8 to lo: a client address that is not the balancer's

MLLP_YAML = """
store: {{url: "sqlite:///data/medrelay.db", blobs: data/blobs}}
keys: {{kek_file: data/keys.json}}
channels:
  adt:
    source: {{type: mllp, port: 0, proxy_protocol: {{trusted: ["127.0.0.1/32"], timeout: {timeout}}}}}
    routes: []
"""


def audit_rows(store, action):
    a = schema.audit_events
    with store.engine.connect() as c:
        return [dict(r) for r in c.execute(select(a).where(a.c.action == action).order_by(a.c.id)).mappings()]


def v2_header(src: str, sport: int, dst: str = "127.0.0.1", dport: int = 2575, tlv: bytes = b"") -> bytes:
    body = socket.inet_aton(src) + socket.inet_aton(dst) + struct.pack("!HH", sport, dport) + tlv
    return pp.V2_SIGNATURE + bytes([0x21, 0x11]) + struct.pack("!H", len(body)) + body


# -- the parser alone ---------------------------------------------------------------------
def _parse(data: bytes) -> pp.ProxyHeader:
    p = pp.Parser()
    fed = 0
    while p.header is None:
        n = p.need()
        assert n > 0
        p.feed(data[fed:fed + n])
        fed += n
    assert fed == p.header.length  # never a byte past the header
    return p.header


def test_parser_v1_v2_and_refusals():
    h = _parse(b"PROXY TCP4 10.1.2.3 127.0.0.1 40000 2575\r\nMSH|...")
    assert h.source == ("10.1.2.3", 40000) and h.version == 1
    assert _parse(b"PROXY TCP6 fe80::1 ::1 1 2\r\n").source == ("fe80::1", 1)
    assert _parse(b"PROXY UNKNOWN\r\n").source is None
    assert _parse(v2_header("10.9.8.7", 5555, tlv=b"\x05\x00\x02ab") + b"rest").source == ("10.9.8.7", 5555)
    local = pp.V2_SIGNATURE + bytes([0x20, 0x00, 0, 0])
    assert _parse(local).source is None
    for bad in (b"GET / HTTP/1.1\r\n", b"\x0bMSH|", b"PROXY TCP4 1.2.3.4 5.6.7.8 1 99999\r\n",
                b"PROXY TCP4 ::1 ::1 1 2\r\n", b"PROXY TCP4 1.2.3.4\n", b"PROXY " + b"9" * 120,
                pp.V2_SIGNATURE + bytes([0x31, 0x11, 0, 12]) + b"\0" * 12,
                pp.V2_SIGNATURE + bytes([0x21, 0x11, 0xFF, 0xFF])):
        with pytest.raises(pp.ProxyError):
            _parse(bad + b"\0" * 200)


# -- mllp: raw sockets ---------------------------------------------------------------------
@pytest.fixture
def mllp(engine_factory):
    eng = engine_factory(MLLP_YAML.format(timeout=3))
    return eng, eng.address("adt")[1]


def _client(port: int, source: str = "127.0.0.1") -> RawClient:
    c = RawClient.__new__(RawClient)
    c.sock = socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0))
    c.buf = b""
    return c


def test_mllp_trusted_header_names_the_peer(mllp):
    eng, port = mllp
    for i, header in enumerate((b"PROXY TCP4 10.20.30.40 127.0.0.1 41000 2575\r\n", v2_header("10.20.30.41", 41001))):
        with _client(port) as c:
            c.send_raw(header)
            assert msa(c.request(adt(f"PX{i}")))[1] == "AA"
    eng.wait_for(lambda: len(audit_rows(eng.store, "message.receive")) == 2)
    assert [r["peer"] for r in audit_rows(eng.store, "message.receive")] == ["10.20.30.40:41000", "10.20.30.41:41001"]


def test_mllp_trusted_without_header_malformed_oversize_closed(mllp):
    eng, port = mllp
    for data in (b"\x0bMSH|^~\\&|A|B|C|D|20240101||ADT^A01|X1|P|2.5\r\x1c\r",
                 b"PROXY TCP4 bogus\r\n" + b"\x0bMSH|",
                 b"PROXY " + b"1" * 200,
                 pp.V2_SIGNATURE + bytes([0x21, 0x11, 0x40, 0x00]) + b"\0" * 300):
        with _client(port) as c:
            c.send_raw(data)
            assert c.is_closed(5)  # closed, no ACK: nothing after the bad header was read
    assert audit_rows(eng.store, "message.receive") == []


def test_mllp_slow_header_costs_no_cpu_and_times_out(mllp):
    eng, port = mllp
    header = b"PROXY TCP4 10.0.0.9 127.0.0.1 4000 2575\r\n"
    cpu0 = time.process_time()
    with _client(port) as c:  # a byte every 0.05 s: completes within the 3 s timeout
        for b in header:
            c.send_raw(bytes([b]))
            time.sleep(0.05)
        assert msa(c.request(adt("SLOW1")))[1] == "AA"
    with _client(port) as c:  # never finishes: closed at the timeout
        c.send_raw(header[:10])
        t0 = time.monotonic()
        assert c.is_closed(15)
        assert 1.5 < time.monotonic() - t0 < 12
    assert time.process_time() - cpu0 < 2.0  # the engine runs in this process: no busy loop
    eng.wait_for(lambda: [r["peer"] for r in audit_rows(eng.store, "message.receive")] == ["10.0.0.9:4000"])


def test_mllp_untrusted_served_as_before_and_header_not_believed(mllp):
    eng, port = mllp
    with _client(port, CLIENT_IP) as c:
        reply = c.request(adt("UNTR1"))
        assert msa(reply)[1] == "AA"
        local = c.sock.getsockname()
    with _client(port, CLIENT_IP) as c:  # a header from an untrusted address is MLLP garbage: closed
        c.send_raw(b"PROXY TCP4 10.6.6.6 127.0.0.1 1 2575\r\n")
        assert c.is_closed(5)
    eng.wait_for(lambda: len(audit_rows(eng.store, "message.receive")) == 1)
    assert audit_rows(eng.store, "message.receive")[0]["peer"] == f"{local[0]}:{local[1]}"


# -- a real HAProxy in front -------------------------------------------------------------------
HAPROXY = shutil.which("haproxy") or "/usr/sbin/haproxy"


def stop_peers(procs: list[subprocess.Popen]) -> None:
    """Stop the balancer processes a fixture started (SIGTERM, then SIGKILL after 10 s)."""
    for p in procs:
        p.terminate()
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(10)


@pytest.fixture
def haproxy(tmp_path):
    need_tool(HAPROXY)  # a failure under CI=true (scripts/test.sh installs it), a skip on a dev box
    procs: list[subprocess.Popen] = []

    def start(backend_port: int, option: str) -> int:
        fport = free_port()
        cfg = tmp_path / f"haproxy{len(procs)}.cfg"
        cfg.write_text(f"""
global
    maxconn 64
defaults
    mode tcp
    timeout connect 5s
    timeout client 60s
    timeout server 60s
frontend f
    bind 127.0.0.1:{fport}
    default_backend b
backend b
    server s1 127.0.0.1:{backend_port} {option}
""")
        p = subprocess.Popen([HAPROXY, "-db", "-f", str(cfg)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        procs.append(p)
        wait_port(fport, 20, p)
        return fport

    yield start
    stop_peers(procs)


@pytest.mark.parametrize("option", ["send-proxy", "send-proxy-v2"])
def test_mllp_through_haproxy_audits_the_client(mllp, haproxy, option):
    eng, port = mllp
    front = haproxy(port, option)
    with _client(front, CLIENT_IP) as c:
        assert msa(c.request(adt("HAP1")))[1] == "AA"
        local = c.sock.getsockname()
    eng.wait_for(lambda: len(audit_rows(eng.store, "message.receive")) == 1)
    assert audit_rows(eng.store, "message.receive")[0]["peer"] == f"{CLIENT_IP}:{local[1]}"


DICOM_YAML = """
store: {url: "sqlite:///data/medrelay.db", blobs: data/blobs}
keys: {kek_file: data/keys.json}
channels:
  dcm:
    source:
      type: dicom
      port: 0
      ae_title: MEDRELAY
      calling_aets: [TESTSCU]
      proxy_protocol: {trusted: ["127.0.0.1"], timeout: 3}
    routes: []
"""


def _pynetdicom_store(port: int, aet: str):
    from pydicom import dcmread
    from pynetdicom import AE

    from tests.dicom_peers import TEST_FILES, data_file

    ds = dcmread(data_file(TEST_FILES[0]))
    ae = AE(ae_title=aet)
    ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    ae.add_requested_context("1.2.840.10008.1.1")
    assoc = ae.associate("127.0.0.1", port, ae_title="MEDRELAY", bind_address=(CLIENT_IP, 0))
    try:
        if not assoc.is_established:
            return None
        status = assoc.send_c_store(ds)
        echo = assoc.send_c_echo()
        return status.Status, echo.Status
    finally:
        if assoc.is_established:
            assoc.release()


@pytest.mark.parametrize("option", ["send-proxy", "send-proxy-v2"])
def test_dicom_through_haproxy_audits_the_client(engine_factory, haproxy, option):
    eng = engine_factory(DICOM_YAML)
    front = haproxy(eng.address("dcm")[1], option)
    assert _pynetdicom_store(front, "TESTSCU") == (0x0000, 0x0000)  # storage and pynetdicom's own path
    assert _pynetdicom_store(front, "WRONGAET") is None
    eng.wait_for(lambda: audit_rows(eng.store, "dicom.association") and audit_rows(eng.store, "message.receive"))
    assert audit_rows(eng.store, "message.receive")[0]["peer"].startswith(f"TESTSCU@{CLIENT_IP}:")
    assert audit_rows(eng.store, "dicom.association")[0]["peer"].startswith(f"{CLIENT_IP}:")


def test_dicom_trusted_without_header_is_closed(engine_factory):
    eng = engine_factory(DICOM_YAML)
    port = eng.address("dcm")[1]
    from tests.dicom_peers import echoscu

    r = echoscu(port)  # from 127.0.0.1 (trusted) with no header: closed, nothing answered
    assert r.returncode != 0
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"PROXY TCP4 10.1.1.1 127.0.0.1 5 104\r")  # never ends
        s.settimeout(15)
        t0 = time.monotonic()
        assert s.recv(100) == b""
        assert time.monotonic() - t0 < 12


def test_dicom_tls_through_haproxy_header_before_the_handshake(engine_factory, haproxy, tmp_path):
    """TLS passes through HAProxy (TCP mode); the v2 header precedes the ClientHello: the engine
    reads it raw, then does the (mutual) handshake on what follows."""
    import ssl

    from tls_certs import make_pki

    pki = make_pki(tmp_path / "pki")
    yaml_text = DICOM_YAML.replace(
        "      proxy_protocol:",
        f'      tls: {{cert: "{pki.server.cert}", key: "{pki.server.key}", ca: "{pki.ca}", '
        f'require_client_cert: true}}\n      proxy_protocol:')
    eng = engine_factory(yaml_text)
    front = haproxy(eng.address("dcm")[1], "send-proxy-v2")
    from pynetdicom import AE

    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(pki.ca))
    ctx.load_cert_chain(pki.client.cert, pki.client.key)
    ae = AE(ae_title="WRONGAET")
    ae.add_requested_context("1.2.840.10008.1.1")
    assoc = ae.associate("127.0.0.1", front, ae_title="MEDRELAY", bind_address=(CLIENT_IP, 0),
                         tls_args=(ctx, "localhost"))
    assert assoc.is_rejected  # over TLS, after the handshake: the rejection is audited with the client
    eng.wait_for(lambda: audit_rows(eng.store, "dicom.association"))
    assert audit_rows(eng.store, "dicom.association")[0]["peer"].startswith(f"{CLIENT_IP}:")


def test_mllp_tls_through_haproxy_header_before_the_handshake(engine_factory, haproxy, tmp_path):
    """MLLP over TLS passed through HAProxy with send-proxy-v2: the engine reads the header from
    the paused socket, handshakes on the ClientHello after it, audits the client's address; a
    trusted connection that starts with a ClientHello instead is closed before any handshake."""
    import ssl

    from tls_certs import make_pki

    pki = make_pki(tmp_path / "pki")
    yaml_text = MLLP_YAML.format(timeout=3).replace(
        "port: 0, proxy_protocol:", f'port: 0, tls: {{cert: "{pki.server.cert}", key: "{pki.server.key}"}}, '
        "proxy_protocol:")
    eng = engine_factory(yaml_text)
    port = eng.address("adt")[1]
    front = haproxy(port, "send-proxy-v2")
    ctx = ssl.create_default_context(cafile=str(pki.ca))
    raw = socket.create_connection(("127.0.0.1", front), timeout=10, source_address=(CLIENT_IP, 0))
    with ctx.wrap_socket(raw, server_hostname="localhost") as tls:
        c = RawClient.__new__(RawClient)
        c.sock, c.buf = tls, b""
        assert msa(c.request(adt("TLS1")))[1] == "AA"
        local = tls.getsockname()
    eng.wait_for(lambda: len(audit_rows(eng.store, "message.receive")) == 1)
    assert audit_rows(eng.store, "message.receive")[0]["peer"] == f"{CLIENT_IP}:{local[1]}"
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)  # trusted, no header: no handshake
    with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
        with ctx.wrap_socket(raw, server_hostname="localhost") as tls:
            tls.recv(1)


FHIR_YAML = """
store: {url: "sqlite:///data/medrelay.db", blobs: data/blobs}
keys: {kek_file: data/keys.json}
channels:
  api:
    source: {type: fhir, port: 0, auth: {open: true}, proxy_protocol: {trusted: [127.0.0.1], timeout: 3}}
"""


@pytest.mark.parametrize("option", ["send-proxy", "send-proxy-v2"])
def test_fhir_through_haproxy_audits_the_client(engine_factory, haproxy, option):
    """The HTTP stack (engine/http): FHIR requests through HAProxy carry the client's address."""
    import httpx

    eng = engine_factory(FHIR_YAML)
    port = eng.address("api")[1]
    front = haproxy(port, option)
    with httpx.Client(transport=httpx.HTTPTransport(local_address=CLIENT_IP), timeout=20) as c:
        r = c.post(f"http://127.0.0.1:{front}/fhir/Patient", json={"resourceType": "Patient", "gender": "other"})
        assert r.status_code == 201
        assert c.get(f"http://127.0.0.1:{front}/fhir/Patient?gender=other").status_code == 200
    eng.wait_for(lambda: audit_rows(eng.store, "fhir.search"))
    assert audit_rows(eng.store, "fhir.search")[0]["peer"].startswith(f"{CLIENT_IP}:")
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:  # trusted, no header: closed unanswered
        s.sendall(b"GET /fhir/metadata HTTP/1.1\r\nHost: x\r\n\r\n")
        s.settimeout(10)
        try:
            assert s.recv(1000) == b""
        except ConnectionResetError:
            pass  # aborted: closed all the same, no answer
    with socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(CLIENT_IP, 0)) as s:
        s.sendall(b"GET /fhir/metadata HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")  # untrusted: as today
        s.settimeout(10)
        assert s.recv(1000).startswith(b"HTTP/1.1 200")
    with socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(CLIENT_IP, 0)) as s:
        s.sendall(b"PROXY TCP4 10.6.6.6 127.0.0.1 1 80\r\nGET /fhir/metadata HTTP/1.1\r\nHost: x\r\n\r\n")
        s.settimeout(10)  # untrusted: the header is not believed, it is a bad request line
        assert s.recv(1000).startswith(b"HTTP/1.1 400")


def test_http_header_slow_malformed_oversize(engine_factory):
    """The HTTP stack's reader (the paused socket, shared with MLLP over TLS): a header sent a
    byte at a time is served and costs no CPU; malformed, oversize and unfinished ones are closed
    unanswered (the unfinished one at the timeout)."""
    eng = engine_factory(FHIR_YAML)
    port = eng.address("api")[1]
    request = b"GET /fhir/metadata HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"

    def answer(s: socket.socket) -> bytes:
        s.settimeout(15)
        try:
            return s.recv(1000)
        except ConnectionResetError:
            return b""

    cpu0 = time.process_time()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        for b in v2_header("10.3.3.3", 3333):
            s.sendall(bytes([b]))
            time.sleep(0.05)
        s.sendall(request)
        assert answer(s).startswith(b"HTTP/1.1 200")
    assert time.process_time() - cpu0 < 2.0
    for bad in (b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n", b"PROXY " + b"1" * 150,
                pp.V2_SIGNATURE + bytes([0x21, 0x11, 0x30, 0x00]) + b"\0" * 500):
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(bad + request)
            assert answer(s) == b""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"PROXY TCP4 ")
        t0 = time.monotonic()
        assert answer(s) == b""
        assert 1.5 < time.monotonic() - t0 < 12


def test_v1_unknown_with_any_bytes_up_to_crlf_is_accepted_and_the_rest_ignored(engine_factory):
    """Spec 2.1: after ``PROXY UNKNOWN`` the receiver ignores everything up to the CRLF and uses
    the connection's own address. Bytes there that are not ASCII (or a lone CR/LF) closed the
    connection ("malformed v1 header"). The header still ends at the first CRLF and within 107 bytes."""
    for line in (b"PROXY UNKNOWN\r\n", b"PROXY UNKNOWN \xff\xfe\x00 garbage \xe9\r\n",
                 b"PROXY UNKNOWN ffff:f...f:ffff ffff:f...f:ffff 65535 65535\r\n",
                 b"PROXY UNKNOWN a\rb\nc\r\n", b"PROXY UNKNOWN " + b"\x80" * 91 + b"\r\n"):
        h = _parse(line + b"GET / HTTP/1.1\r\n")
        assert h.source is None and h.length == len(line), line
    for bad in (b"PROXY UNKNOWNX\r\n", b"PROXY UNKNOWN " + b"x" * 100 + b"\r\n", b"PROXY UNKNOWN\n"):
        with pytest.raises(pp.ProxyError):
            _parse(bad + b"\0" * 200)

    eng = engine_factory(FHIR_YAML)
    port = eng.address("api")[1]
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"PROXY UNKNOWN \xc3\x28 \x00\x01\r\nGET /fhir/metadata HTTP/1.1\r\nHost: x\r\n"
                  b"Connection: close\r\n\r\n")
        s.settimeout(15)
        assert s.recv(1000).startswith(b"HTTP/1.1 200")


def test_fhir_tls_refused_handshake_behind_a_balancer_is_audited_with_the_client(engine_factory, tmp_path):
    """A trusted balancer's PROXY header, then a ClientHello without the client certificate
    mutual TLS asks for: the Security Alert names the announced client, not the balancer."""
    import ssl

    from tls_certs import make_pki

    pki = make_pki(tmp_path / "pki")
    eng = engine_factory(FHIR_YAML.replace(
        "auth: {open: true},",
        f'auth: {{open: true}}, tls: {{cert: "{pki.server.cert}", key: "{pki.server.key}", ca: "{pki.ca}", '
        'require_client_cert: true},'))
    port = eng.address("api")[1]
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(pki.ca))  # no client certificate
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    raw.sendall(b"PROXY TCP4 10.7.7.7 127.0.0.1 40001 443\r\n")
    with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
        with ctx.wrap_socket(raw, server_hostname="localhost") as tls:
            tls.sendall(b"GET /fhir/metadata HTTP/1.1\r\nHost: x\r\n\r\n")
            assert tls.recv(100) == b""
            raise ConnectionError("closed")
    eng.wait_for(lambda: audit_rows(eng.store, "fhir.tls_rejected"))
    assert audit_rows(eng.store, "fhir.tls_rejected")[0]["peer"] == "10.7.7.7:40001"
