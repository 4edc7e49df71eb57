"""Certificates made in the test: a CA, a server certificate for 127.0.0.1/localhost, clients.

Nothing is checked into the repository and nothing expires between runs: every test
session gets a fresh CA (EC P-256, like most current deployments), so the TLS tests
prove the engine verifies chains rather than trusting a fixture file.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass(frozen=True)
class Pair:
    cert: Path
    key: Path


@dataclass(frozen=True)
class PKI:
    ca: Path
    ca_key: Path
    server: Pair
    client: Pair
    rogue_client: Pair  # signed by another CA: must be refused under mutual TLS
    other_ca: Path


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _write(path: Path, key: ec.EllipticCurvePrivateKey | None, cert: x509.Certificate | None) -> None:
    if key is not None:
        path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
        path.chmod(0o600)
    if cert is not None:
        path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def _ca(cn: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = _key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False,
                                         encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    return key, cert


def _leaf(ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate, cn: str, *, server: bool
          ) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = _key()
    now = dt.datetime.now(dt.UTC)
    b = (x509.CertificateBuilder()
         .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
         .issuer_name(ca_cert.subject).public_key(key.public_key())
         .serial_number(x509.random_serial_number())
         .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
         .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
         .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH if server
                                               else ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
         .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False))
    if server:
        b = b.add_extension(x509.SubjectAlternativeName([
            x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
    return key, b.sign(ca_key, hashes.SHA256())


def make_pki(folder: Path) -> PKI:
    """Write ca.pem, server.pem/-key.pem, client.pem/-key.pem and a rogue client into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    ca_key, ca = _ca("medrelay test CA")
    _write(folder / "ca.pem", None, ca)
    _write(folder / "ca-key.pem", ca_key, None)
    pairs = {}
    for name, cn, server in (("server", "localhost", True), ("client", "medrelay-test-client", False)):
        k, c = _leaf(ca_key, ca, cn, server=server)
        _write(folder / f"{name}.pem", None, c)
        _write(folder / f"{name}-key.pem", k, None)
        pairs[name] = Pair(folder / f"{name}.pem", folder / f"{name}-key.pem")
    other_key, other = _ca("some other CA")
    _write(folder / "other-ca.pem", None, other)
    rk, rc = _leaf(other_key, other, "rogue-client", server=False)
    _write(folder / "rogue.pem", None, rc)
    _write(folder / "rogue-key.pem", rk, None)
    return PKI(ca=folder / "ca.pem", ca_key=folder / "ca-key.pem", server=pairs["server"],
                   client=pairs["client"], rogue_client=Pair(folder / "rogue.pem", folder / "rogue-key.pem"),
                   other_ca=folder / "other-ca.pem")


# -- openssl s_client as an independent TLS peer ---------------------------------------
OPENSSL = "/usr/bin/openssl"


def s_client_handshake(port: int, pki: PKI, *args: str, timeout: float = 10.0) -> tuple[bool, str]:
    """Handshake only (stdin closed at once): (True, output) when a session was established.

    ``-verify_return_error`` makes an untrusted server fail too, so success means both
    sides accepted the session: protocol, cipher suite and certificates.
    """
    import subprocess

    r = subprocess.run([OPENSSL, "s_client", "-connect", f"127.0.0.1:{port}", "-servername", "localhost",
                        "-CAfile", str(pki.ca), "-verify_return_error", *args],
                       stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout)
    out = r.stdout + r.stderr
    established = r.returncode == 0 and "Cipher is (NONE)" not in out and "New, " in out
    return established, out


def s_client_exchange(port: int, pki: PKI, payload: bytes, until: bytes, *args: str,
                      timeout: float = 10.0) -> bytes:
    """Send ``payload`` through ``openssl s_client -quiet`` and read until ``until`` shows up."""
    import subprocess
    import threading
    import time

    p = subprocess.Popen([OPENSSL, "s_client", "-quiet", "-connect", f"127.0.0.1:{port}",
                          "-servername", "localhost", "-CAfile", str(pki.ca), "-verify_return_error", *args],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    got = bytearray()

    def reader() -> None:
        assert p.stdout is not None
        while True:
            chunk = p.stdout.read1(65536)  # type: ignore[attr-defined]
            if not chunk:
                return
            got.extend(chunk)

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    try:
        assert p.stdin is not None
        try:
            p.stdin.write(payload)
            p.stdin.flush()
        except BrokenPipeError:  # the server refused the handshake and s_client has already exited
            pass
        deadline = time.monotonic() + timeout
        while until not in got and time.monotonic() < deadline and p.poll() is None:
            time.sleep(0.02)
    finally:
        p.kill()
        p.wait(5)
        t.join(2)
    return bytes(got)
