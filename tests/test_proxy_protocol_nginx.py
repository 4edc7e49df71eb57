"""nginx's `stream` proxy with `proxy_protocol on;` in front of medrelay engines: the very
`stream { ... }` block of docs/deployment.md, read from the markdown, its engine addresses and
listen ports replaced by this test's (three engines, as in the doc), run by a real nginx.
Clients bind 127.0.0.2 (test_proxy_protocol.CLIENT_IP); nginx reaches the engines from
127.0.0.1, the address they trust, so a row naming 127.0.0.2 can only come from the header.
If the doc's example stops working (or stops sending the header), these tests fail."""

from __future__ import annotations

import re
import socket
import subprocess
from pathlib import Path

import pytest
from conftest import ROOT, need_tool
from mllp_peers import RawClient, adt, msa
from ports import free_port, wait_port
from sqlalchemy import select
from test_proxy_protocol import (
    CLIENT_IP,
    DICOM_YAML,
    FHIR_YAML,
    MLLP_YAML,
    _client,
    _pynetdicom_store,
    audit_rows,
    stop_peers,
)

from engine.store import schema

NGINX = "/usr/sbin/nginx"
STREAM_MODULE = "/usr/lib/nginx/modules/ngx_stream_module.so"
DOC = ROOT / "docs" / "deployment.md"
DOC_ENGINES = ("10.0.0.11", "10.0.0.12", "10.0.0.13")
DOC_PORTS = {"2575": "adt", "11112": "dcm", "8080": "api"}  # the doc's port: this test's channel

# one engine with test_proxy_protocol's three sources (each trusting 127.0.0.1): dcm, adt, api
ENGINE_YAML = (DICOM_YAML + MLLP_YAML.format(timeout=3).split("channels:\n")[1]
               + FHIR_YAML.split("channels:\n")[1])


def doc_stream_block() -> str:
    """The nginx `stream { ... }` example of docs/deployment.md (the one fenced block holding it)."""
    blocks = [b for b in re.findall(r"^```[a-z]*\n(.*?)^```", DOC.read_text(), re.S | re.M)
              if b.lstrip().startswith("stream {")]
    assert len(blocks) == 1, f"docs/deployment.md: expected one nginx stream block, found {len(blocks)}"
    return blocks[0]


def localise(block: str, engines: list[dict[str, int]]) -> tuple[str, dict[str, int]]:
    """The doc's block with its engines' addresses replaced by the local engines' ports (doc
    engine i -> engines[i], port by channel) and each `listen` port by a free local one.
    Returns the config and {channel: nginx port}."""
    def engine(m: re.Match) -> str:
        return f"127.0.0.1:{engines[DOC_ENGINES.index(m[1])][DOC_PORTS[m[2]]]}"

    out, n = re.subn(r"\b(10\.0\.0\.1[123]):(\d+)\b", engine, block)
    assert n == len(DOC_ENGINES) * len(DOC_PORTS), block
    fronts: dict[str, int] = {}

    def listen(m: re.Match) -> str:
        fronts[DOC_PORTS[m[1]]] = free_port()
        return f"listen 127.0.0.1:{fronts[DOC_PORTS[m[1]]]};"

    out = re.sub(r"listen (\d+);", listen, out)
    assert sorted(fronts) == sorted(DOC_PORTS.values()), block
    assert "10.0.0." not in out
    return out, fronts


@pytest.fixture
def nginx(tmp_path):
    """start(stream_block) -> a running nginx (own prefix, config, pid and error log in tmp_path)."""
    need_tool(NGINX)
    need_tool(STREAM_MODULE)
    procs: list[subprocess.Popen] = []

    def start(stream: str, ports: list[int]) -> Path:
        d = tmp_path / f"nginx{len(procs)}"
        d.mkdir()
        (d / "nginx.conf").write_text(
            f"load_module {STREAM_MODULE};\nworker_processes 1;\nerror_log {d}/error.log info;\n"
            f"events {{ worker_connections 64; }}\n{stream}")
        with open(d / "stderr.log", "wb") as err:
            p = subprocess.Popen([NGINX, "-p", str(d), "-c", str(d / "nginx.conf"), "-e", str(d / "error.log"),
                                  "-g", f"daemon off; pid {d}/nginx.pid;"], stdout=subprocess.DEVNULL, stderr=err)
        procs.append(p)
        try:
            for port in ports:
                wait_port(port, 20, p)
        except AssertionError as e:
            logs = [f.read_text()[-2000:] for f in (d / "stderr.log", d / "error.log") if f.exists()]
            raise AssertionError(f"nginx: {e}; {' '.join(logs)}") from None
        return d

    yield start
    stop_peers(procs)


@pytest.fixture
def deployment(engine_factory, nginx):
    """Three engines behind nginx running the doc's stream block: (engines, {channel: nginx port})."""
    engines = [engine_factory(ENGINE_YAML) for _ in DOC_ENGINES]
    ports = [{ch: e.address(ch)[1] for ch in DOC_PORTS.values()} for e in engines]
    conf, fronts = localise(doc_stream_block(), ports)
    nginx(conf, list(fronts.values()))
    return engines, fronts


def message_peers(store) -> list[str]:
    m = schema.messages
    with store.engine.connect() as c:
        return [r for (r,) in c.execute(select(m.c.peer).order_by(m.c.received_at))]


def test_doc_block_sends_the_header_to_every_server():
    """The doc's example itself: every `server` sends the PROXY header (not only the first)."""
    block = doc_stream_block()
    servers = re.findall(r"server \{[^}]*\}", block)
    assert len(servers) == len(DOC_PORTS)
    assert all("proxy_protocol on;" in s for s in servers), servers


def test_mllp_through_nginx_every_engine_records_the_client(deployment):
    """ADTs through the doc's nginx: AA each; spread over the three engines (least_conn), each
    engine's audit row and stored message name 127.0.0.2 and the client's own port."""
    engines, fronts = deployment
    sent: set[str] = set()
    for i in range(12):  # bounded: until every engine has had a connection
        with _client(fronts["adt"], CLIENT_IP) as c:
            assert msa(c.request(adt(f"NGX{i}")))[1] == "AA"
            sent.add(f"{CLIENT_IP}:{c.sock.getsockname()[1]}")
        counts = [len(audit_rows(e.store, "message.receive")) for e in engines]
        if all(counts):
            break
    engines[0].wait_for(lambda: sum(len(audit_rows(e.store, "message.receive")) for e in engines) == len(sent))
    for e in engines:
        peers = [r["peer"] for r in audit_rows(e.store, "message.receive")]
        assert peers and set(peers) <= sent, (peers, sent)
        assert set(message_peers(e.store)) == set(peers)


def test_dicom_through_nginx_records_the_client(deployment):
    """pynetdicom (C-STORE + C-ECHO) from 127.0.0.2 through nginx: stored and audited with the
    client; a rejected AE title is audited with it too; DCMTK's echoscu gets through as well."""
    from tests.dicom_peers import echoscu

    engines, fronts = deployment
    assert _pynetdicom_store(fronts["dcm"], "TESTSCU") == (0x0000, 0x0000)
    assert _pynetdicom_store(fronts["dcm"], "WRONGAET") is None
    assert echoscu(fronts["dcm"]).returncode == 0  # DCMTK (cannot bind 127.0.0.2): the header is no obstacle

    def rows(action):
        return [r for e in engines for r in audit_rows(e.store, action)]

    engines[0].wait_for(lambda: rows("message.receive") and rows("dicom.association"))
    assert [r["peer"].split(":")[0] for r in rows("message.receive")] == [f"TESTSCU@{CLIENT_IP}"]
    assert [r["peer"].split(":")[0] for r in rows("dicom.association")] == [CLIENT_IP]


def test_fhir_through_nginx_records_the_client(deployment):
    """FHIR (httpx from 127.0.0.2) through nginx: created, searched; the search audited with the client."""
    import httpx

    engines, fronts = deployment
    base = f"http://127.0.0.1:{fronts['api']}/fhir"
    with httpx.Client(transport=httpx.HTTPTransport(local_address=CLIENT_IP), timeout=20) as c:
        for _ in range(3):  # fresh connections: round robin over the three engines
            r = c.post(f"{base}/Patient", json={"resourceType": "Patient", "gender": "other"},
                       headers={"Connection": "close"})
            assert r.status_code == 201, r.text
            assert c.get(f"{base}/Patient?gender=other", headers={"Connection": "close"}).status_code == 200

    def searches():
        return [r for e in engines for r in audit_rows(e.store, "fhir.search")]

    engines[0].wait_for(lambda: len(searches()) == 3)
    assert {r["peer"].split(":")[0] for r in searches()} == {CLIENT_IP}


def test_mllp_tls_through_nginx_header_before_the_handshake(engine_factory, nginx, tmp_path):
    """MLLP over TLS passed through the doc's nginx (TCP): nginx's header precedes the
    ClientHello; every engine reads it, handshakes, and audits the client."""
    import ssl

    from tls_certs import make_pki

    pki = make_pki(tmp_path / "pki")
    yaml_text = ENGINE_YAML.replace(
        "{type: mllp, port: 0,", f'{{type: mllp, port: 0, tls: {{cert: "{pki.server.cert}", key: "{pki.server.key}"}},')
    assert yaml_text != ENGINE_YAML
    engines = [engine_factory(yaml_text) for _ in DOC_ENGINES]
    ports = [{ch: e.address(ch)[1] for ch in DOC_PORTS.values()} for e in engines]
    conf, fronts = localise(doc_stream_block(), ports)
    nginx(conf, list(fronts.values()))
    ctx = ssl.create_default_context(cafile=str(pki.ca))
    sent = []
    for i in range(len(DOC_ENGINES)):  # least_conn, one at a time: a connection to each engine
        raw = socket.create_connection(("127.0.0.1", fronts["adt"]), timeout=10, source_address=(CLIENT_IP, 0))
        with ctx.wrap_socket(raw, server_hostname="localhost") as tls:
            c = RawClient.__new__(RawClient)
            c.sock, c.buf = tls, b""
            assert msa(c.request(adt(f"NGXTLS{i}")))[1] == "AA"
            sent.append(f"{CLIENT_IP}:{tls.getsockname()[1]}")
    engines[0].wait_for(lambda: sum(len(audit_rows(e.store, "message.receive")) for e in engines) == len(sent))
    assert sorted(r["peer"] for e in engines for r in audit_rows(e.store, "message.receive")) == sorted(sent)


def test_engine_without_the_header_is_not_reached_past_a_trusted_balancer(engine_factory, nginx):
    """The doc's block with its `proxy_protocol on;` lines removed (the variant the doc offers for
    engines without `proxy_protocol`) in front of engines that trust 127.0.0.1: the MLLP
    connection is closed unanswered, so the test above really depends on the header."""
    engines = [engine_factory(ENGINE_YAML) for _ in DOC_ENGINES]
    ports = [{ch: e.address(ch)[1] for ch in DOC_PORTS.values()} for e in engines]
    conf, fronts = localise(doc_stream_block().replace(" proxy_protocol on;", ""), ports)
    nginx(conf, list(fronts.values()))
    with _client(fronts["adt"], CLIENT_IP) as c:
        c.send_raw(b"\x0b" + adt("NOHDR") + b"\x1c\r")
        assert c.is_closed(10)
    assert all(audit_rows(e.store, "message.receive") == [] for e in engines)
    with socket.create_connection(("127.0.0.1", fronts["api"]), timeout=10, source_address=(CLIENT_IP, 0)) as s:
        s.sendall(b"GET /fhir/metadata HTTP/1.1\r\nHost: x\r\n\r\n")
        s.settimeout(10)
        try:
            assert s.recv(1000) == b""
        except ConnectionResetError:
            pass
