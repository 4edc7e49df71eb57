"""MLLP over TLS: the listener with a server certificate, our sender verifying it."""

import asyncio
import datetime
import ipaddress
import ssl

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from mllp_peers import MLLPReceiver, adt, msa, wrap

from engine.envelope import Envelope
from engine.security.tls import TLSConfig
from routes.mllp import MLLPDestinationConfig, MLLPSender


def make_pki(tmp_path):
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test ca")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(1).not_valid_before(now - datetime.timedelta(minutes=1))
          .not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(2)
            .not_valid_before(now - datetime.timedelta(minutes=1)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    paths = {n: tmp_path / f"{n}.pem" for n in ("ca", "cert", "key")}
    paths["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths["cert"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths["key"].write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
    return paths


def test_tls_listener_and_sender(engine_factory, tmp_path):
    pki = make_pki(tmp_path)
    with MLLPReceiver() as rx:
        eng = engine_factory(f"""
store: {{url: "sqlite:///data/medrelay.db", blobs: data/blobs}}
keys: {{kek_file: data/keys.json}}
channels:
  adt:
    source: {{type: mllp, port: 0, tls: {{cert: "{pki['cert']}", key: "{pki['key']}"}}}}
    routes:
      - name: ris
        to: {{type: mllp, host: 127.0.0.1, port: {rx.port}}}
""")
        host, port = eng.address("adt")

        async def go():
            s = MLLPSender(MLLPDestinationConfig(type="mllp", host=host, port=port,
                                                 tls=TLSConfig(ca=str(pki["ca"]), server_name="localhost")))
            try:
                return await s.send(Envelope(channel="x", kind="hl7v2", payload=adt("TLS1")))
            finally:
                await s.close()

        assert asyncio.run(go()) == "AA"
        assert rx.wait_for(1) == [adt("TLS1")]

        # a plain-TCP client cannot talk to the TLS listener; a TLS client without the CA is refused
        import socket
        ctx = ssl.create_default_context()
        with socket.create_connection((host, port), timeout=5) as raw:
            with pytest.raises(ssl.SSLError):
                ctx.wrap_socket(raw, server_hostname="localhost")
        ctx = ssl.create_default_context(cafile=str(pki["ca"]))
        with socket.create_connection((host, port), timeout=5) as raw:
            with ctx.wrap_socket(raw, server_hostname="localhost") as tls:
                tls.sendall(wrap(adt("TLS2")))
                data = b""
                while not data.endswith(b"\x1c\r"):
                    chunk = tls.recv(65536)
                    assert chunk
                    data += chunk
                assert msa(data[1:-2])[1:3] == ["AA", "TLS2"]
