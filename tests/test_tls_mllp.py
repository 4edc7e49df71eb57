"""MLLP over TLS, both directions, with certificates made in the test and real peers:
Python's ssl module and `openssl s_client`. BCP 195: TLS 1.2+, AEAD ECDHE suites only."""

from __future__ import annotations

import socket
import ssl
import time
from pathlib import Path

import pytest
from conftest import need_tool
from mllp_peers import MLLPReceiver, adt, msa, wrap
from sqlalchemy import func, select
from tls_certs import OPENSSL, make_pki, s_client_exchange, s_client_handshake

from engine.store import schema

YAML = """
store: {{url: "sqlite:///data/medrelay.db", blobs: data/blobs}}
keys: {{kek_file: data/keys.json}}
channels:
  adt:
    source:
      type: mllp
      port: 0
      tls: {{cert: "{pki.server.cert}", key: "{pki.server.key}", ca: "{pki.ca}", require_client_cert: {mutual}}}
    routes:
      - name: ris
        to:
          type: mllp
          host: 127.0.0.1
          port: {rx}
          timeout: 2
          connect_timeout: 2
          tls: {{ca: "{ca}", cert: "{pki.client.cert}", key: "{pki.client.key}", server_name: localhost}}
        retry: {{max_attempts: 50, initial_delay: 0.05, max_delay: 0.2}}
"""


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_pki(tmp_path_factory.mktemp("pki"))


class TLSReceiver(MLLPReceiver):
    """The downstream RIS, now behind TLS (mutual when ``client_ca`` is given)."""

    def __init__(self, pki, client_ca=None) -> None:
        super().__init__()
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(pki.server.cert, pki.server.key)
        if client_ca is not None:
            ctx.load_verify_locations(client_ca)
            ctx.verify_mode = ssl.CERT_REQUIRED
        self.server.socket = ctx.wrap_socket(self.server.socket, server_side=True)
        self.server.handle_error = lambda *a: None  # failed handshakes are part of the tests


@pytest.fixture
def rx(pki):
    r = TLSReceiver(pki, client_ca=pki.ca).start()
    yield r
    r.stop()


def count_messages(eng) -> int:
    with eng.store.engine.connect() as c:
        return c.execute(select(func.count()).select_from(schema.messages)).scalar_one()


def client_ctx(pki, *, cert=None, key=None, max_version=None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(pki.ca))
    if cert:
        ctx.load_cert_chain(cert, key)
    if max_version:
        ctx.maximum_version = max_version
    return ctx


def tls_request(port: int, ctx: ssl.SSLContext, payload: bytes, timeout: float = 10) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as raw, \
            ctx.wrap_socket(raw, server_hostname="localhost") as s:
        s.sendall(wrap(payload))
        buf = b""
        while b"\x1c\r" not in buf:
            chunk = s.recv(65536)
            if not chunk:
                raise ConnectionError(f"closed; got {buf!r}")
            buf += chunk
        return buf[buf.index(b"\x0b") + 1:buf.index(b"\x1c\r")]


def test_python_ssl_client_to_tls_listener_and_tls_sender_to_ris(engine_factory, pki, rx):
    eng = engine_factory(YAML.format(pki=pki, mutual="false", rx=rx.port, ca=pki.ca))
    port = eng.address("adt")[1]
    ack = tls_request(port, client_ctx(pki), adt("TLS0001"))
    assert msa(ack)[1:3] == ["AA", "TLS0001"]
    got = rx.wait_for(1)  # the engine connected to the RIS over mutual TLS and was accepted
    assert b"TLS0001" in got[0]


def test_openssl_s_client_is_a_real_peer(engine_factory, pki, rx):
    need_tool(OPENSSL)
    eng = engine_factory(YAML.format(pki=pki, mutual="false", rx=rx.port, ca=pki.ca))
    port = eng.address("adt")[1]
    out = s_client_exchange(port, pki, wrap(adt("OSSL001")), b"\x1c\r")
    assert b"MSA|AA|OSSL001" in out
    ok, text = s_client_handshake(port, pki, "-tls1_3")
    assert ok and "TLSv1.3" in text
    ok, text = s_client_handshake(port, pki, "-tls1_2", "-cipher", "ECDHE-ECDSA-AES256-GCM-SHA384")
    assert ok and "ECDHE-ECDSA-AES256-GCM-SHA384" in text


def test_tls_1_1_and_1_0_are_refused(engine_factory, pki, rx):
    need_tool(OPENSSL)
    eng = engine_factory(YAML.format(pki=pki, mutual="false", rx=rx.port, ca=pki.ca))
    port = eng.address("adt")[1]
    for flag, name in (("-tls1_1", "TLSv1.1"), ("-tls1", "TLSv1\n")):
        # SECLEVEL=0 lets our client offer the old protocol, so the refusal is the server's:
        # s_client reports the version it tried, and the server ends it (alert 70 or a close)
        ok, text = s_client_handshake(port, pki, flag, "-cipher", "DEFAULT@SECLEVEL=0")
        assert not ok, text
        assert f"Protocol  : {name}" in text and "Cipher is (NONE)" in text, text
        assert any(s in text for s in ("alert protocol version", "unexpected eof", "unsupported protocol")), text
    assert count_messages(eng) == 0


@pytest.mark.parametrize("cipher", [
    "ECDHE-ECDSA-AES128-SHA",   # CBC, not AEAD
    "ECDHE-ECDSA-AES256-SHA384",  # CBC, not AEAD
    "AES128-GCM-SHA256",  # no forward secrecy (static RSA key exchange)
    "DHE-RSA-AES128-GCM-SHA256",  # finite-field DHE: not in the BCP 195 list we allow
])
def test_weak_tls12_cipher_suites_are_refused(engine_factory, pki, rx, cipher):
    need_tool(OPENSSL)
    eng = engine_factory(YAML.format(pki=pki, mutual="false", rx=rx.port, ca=pki.ca))
    ok, text = s_client_handshake(eng.address("adt")[1], pki, "-tls1_2", "-cipher", cipher + "@SECLEVEL=0")
    assert not ok, text
    assert "Cipher is (NONE)" in text, text
    assert any(s in text for s in ("handshake failure", "no shared cipher", "unexpected eof")), text


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_python_client_limited_to_tls11_is_refused(engine_factory, pki, rx):
    eng = engine_factory(YAML.format(pki=pki, mutual="false", rx=rx.port, ca=pki.ca))
    ctx = client_ctx(pki)
    ctx.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
    ctx.maximum_version = ssl.TLSVersion.TLSv1_1
    try:
        ctx.set_ciphers("DEFAULT@SECLEVEL=0")
    except ssl.SSLError:
        pytest.skip("local OpenSSL cannot offer TLS 1.1 at all")
    with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
        tls_request(eng.address("adt")[1], ctx, adt("OLD0001"))
    assert count_messages(eng) == 0


def test_mutual_tls_requires_a_client_certificate_from_our_ca(engine_factory, pki, rx):
    eng = engine_factory(YAML.format(pki=pki, mutual="true", rx=rx.port, ca=pki.ca))
    port = eng.address("adt")[1]
    with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
        tls_request(port, client_ctx(pki), adt("NOCERT1"))  # no client certificate
    with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
        tls_request(port, client_ctx(pki, cert=pki.rogue_client.cert, key=pki.rogue_client.key), adt("ROGUE01"))
    assert count_messages(eng) == 0
    ack = tls_request(port, client_ctx(pki, cert=pki.client.cert, key=pki.client.key), adt("GOOD001"))
    assert msa(ack)[1] == "AA"
    if need_tool(OPENSSL):
        out = s_client_exchange(port, pki, wrap(adt("OSSLMT1")), b"\x1c\r",
                                "-cert", str(pki.client.cert), "-key", str(pki.client.key))
        assert b"MSA|AA|OSSLMT1" in out
        out = s_client_exchange(port, pki, wrap(adt("OSSLNO1")), b"\x1c\r", timeout=3)
        assert b"MSA|" not in out
    eng.wait_for(lambda: count_messages(eng) == 2)
    # the refused handshakes are in the audit trail (Security Alert, Node Authentication)
    eng.wait_for(lambda: len(tls_rejections(eng)) >= 2)


def tls_rejections(eng) -> list[str]:
    with eng.store.engine.connect() as c:
        return list(c.execute(select(schema.audit_events.c.detail)
                              .where(schema.audit_events.c.action == "mllp.tls_rejected")).scalars())


def test_plain_mllp_to_the_tls_port_is_audited_and_a_silent_peer_only_logged(engine_factory, pki, rx):
    eng = engine_factory(YAML.format(pki=pki, mutual="false", rx=rx.port, ca=pki.ca))
    port = eng.address("adt")[1]
    probe = socket.create_connection(("127.0.0.1", port))
    probe.close()  # connect and close: a port probe, not a refusal
    with socket.create_connection(("127.0.0.1", port), timeout=10) as plain:
        plain.sendall(wrap(adt("PLAIN01")))
        try:
            assert b"MSA|" not in plain.recv(4096)  # the server drops it: not TLS
        except (ConnectionError, TimeoutError):
            pass
    eng.wait_for(lambda: len(tls_rejections(eng)) == 1)
    assert "TLS handshake failed" in tls_rejections(eng)[0]
    ack = tls_request(port, client_ctx(pki), adt("AFTER01"))
    assert msa(ack)[1] == "AA"
    assert len(tls_rejections(eng)) == 1


def test_plain_client_on_tls_port_gets_nothing(engine_factory, pki, rx):
    eng = engine_factory(YAML.format(pki=pki, mutual="false", rx=rx.port, ca=pki.ca))
    with socket.create_connection(eng.address("adt"), timeout=5) as s:
        s.sendall(wrap(adt("PLAIN01")))
        s.settimeout(5)
        try:
            data = s.recv(65536)
        except (ConnectionError, TimeoutError):
            data = b""
    assert b"MSA" not in data
    assert count_messages(eng) == 0


def test_sender_refuses_untrusted_receiver_and_retries(engine_factory, pki, tmp_path):
    """The route verifies the RIS: signed by another CA -> no delivery, the message waits."""
    rx = TLSReceiver(pki).start()
    try:
        eng = engine_factory(YAML.format(pki=pki, mutual="false", rx=rx.port, ca=pki.other_ca))
        ack = tls_request(eng.address("adt")[1], client_ctx(pki), adt("UNTRUST1"))
        assert msa(ack)[1] == "AA"  # stored and acknowledged; delivery is the route's problem
        d = schema.deliveries
        eng.wait_for(lambda: _last_error(eng))
        time.sleep(0.3)
        assert rx.received == []
        err = _last_error(eng)
        assert "SSL" in err or "certificate" in err.lower() or "Cert" in err, err
        with eng.store.engine.connect() as c:
            assert c.execute(select(d.c.state)).scalar_one() == "pending"
    finally:
        rx.stop()


def _last_error(eng) -> str | None:
    d = schema.deliveries
    with eng.store.engine.connect() as c:
        return c.execute(select(d.c.last_error)).scalar_one_or_none()


def test_relative_tls_paths_are_relative_to_the_yaml(pki, rx, tmp_path, monkeypatch):
    """`tls: {cert: certs/server.pem}` means beside channels.yaml, whatever the working directory."""
    import shutil

    from conftest import EngineThread

    folder = tmp_path / "eng"
    (folder / "certs").mkdir(parents=True)
    for src in (pki.server.cert, pki.server.key, pki.ca):
        shutil.copy(src, folder / "certs" / Path(src).name)
    yaml = (YAML.format(pki=pki, mutual="false", rx=rx.port, ca=pki.ca)
            .replace(f'"{pki.server.cert}"', '"certs/server.pem"')
            .replace(f'"{pki.server.key}"', '"certs/server-key.pem"')
            .replace(f'ca: "{pki.ca}", require', 'ca: "certs/ca.pem", require'))
    assert "certs/server.pem" in yaml and "certs/ca.pem" in yaml
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # not the YAML's folder
    e = EngineThread(yaml, folder)
    try:
        ack = tls_request(e.address("adt")[1], client_ctx(pki), adt("REL0001"))
        assert msa(ack)[1] == "AA"
    finally:
        e.stop()


def test_check_reports_missing_tls_files_everywhere(tmp_path):
    import subprocess
    import sys

    cfg = tmp_path / "channels.yaml"
    cfg.write_text("channels: {}\naudit:\n  syslog:\n    host: arr.example\n    tls: {ca: missing-ca.pem}\n")
    r = subprocess.run([sys.executable, "-m", "engine.cli", "check", str(cfg)], capture_output=True, text=True,
                       cwd=tmp_path)
    assert r.returncode == 4, r.stdout + r.stderr
    assert f"{cfg}:5: audit.syslog.tls.ca: file not found: {tmp_path / 'missing-ca.pem'}" in r.stderr
