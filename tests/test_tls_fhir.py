"""FHIR over HTTPS in a running engine: httpx with the test CA, mutual TLS, old protocols and
plain HTTP refused, and the FHIR route delivering to an HTTPS server that wants our certificate."""

from __future__ import annotations

import ssl

import httpx
import pytest
from conftest import free_port
from tls_certs import make_pki, s_client_handshake

TOKEN = "tls-test-token-4b7a0e"
ENV = {"FHIR_TOKEN": TOKEN}
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_pki(tmp_path_factory.mktemp("pki"))


def source(pki, *, port: int = 0, mutual: bool = False) -> str:
    return (f'{{type: fhir, port: {port}, auth: {{bearer_tokens: ["${{FHIR_TOKEN}}"]}}, '
            f'tls: {{cert: "{pki.server.cert}", key: "{pki.server.key}", ca: "{pki.ca}", '
            f'require_client_cert: {str(mutual).lower()}}}}}')


def yaml(pki, *, mutual: bool = False, port: int = 0, routes: str = "[]") -> str:
    return f"""
store: {{url: "sqlite:///data/medrelay.db", blobs: data/blobs}}
keys: {{kek_file: data/keys.json}}
channels:
  api:
    source: {source(pki, port=port, mutual=mutual)}
    routes: {routes}
"""


def patient(mrn: str) -> dict:
    return {"resourceType": "Patient", "identifier": [{"system": "urn:oid:1.2.3.4", "value": mrn}],
            "name": [{"family": "Tlstest", "given": ["Ada"]}]}


def client_ctx(pki, *, cert: bool = False) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(pki.ca))
    if cert:
        ctx.load_cert_chain(pki.client.cert, pki.client.key)
    return ctx


def test_https_with_test_ca_and_refusals(engine_factory, pki):
    e = engine_factory(yaml(pki), env=ENV)
    port = e.address("api")[1]
    base = f"https://localhost:{port}/fhir"
    r = httpx.get(f"{base}/metadata", verify=client_ctx(pki))
    assert r.status_code == 200 and r.json()["resourceType"] == "CapabilityStatement"
    r = httpx.post(f"{base}/Patient", json=patient("TLS-1"), headers=AUTH, verify=client_ctx(pki))
    assert r.status_code == 201, r.text
    with pytest.raises(httpx.ConnectError):  # the server's certificate is checked against our CA only
        httpx.get(f"{base}/metadata", verify=ssl.create_default_context(cafile=str(pki.other_ca)))
    with pytest.raises(httpx.HTTPError):  # plain HTTP on the TLS port gets no FHIR answer
        r = httpx.get(f"http://127.0.0.1:{port}/fhir/metadata", timeout=5)
        assert r.status_code >= 400
    ok, text = s_client_handshake(port, pki, "-tls1_1", "-cipher", "DEFAULT@SECLEVEL=0")
    assert not ok and "Cipher is (NONE)" in text
    ok, text = s_client_handshake(port, pki, "-tls1_2", "-cipher", "ECDHE-ECDSA-AES128-SHA@SECLEVEL=0")
    assert not ok and "Cipher is (NONE)" in text
    ok, text = s_client_handshake(port, pki, "-tls1_2", "-cipher", "ECDHE-ECDSA-AES128-GCM-SHA256")
    assert ok, text


def test_mutual_tls_on_the_fhir_api(engine_factory, pki):
    e = engine_factory(yaml(pki, mutual=True), env=ENV)
    base = f"https://localhost:{e.address('api')[1]}/fhir"
    with pytest.raises((httpx.ConnectError, httpx.ReadError, httpx.RemoteProtocolError)):
        # a generous timeout: a refusal slower than it was a ReadTimeout, which this does not expect
        httpx.get(f"{base}/metadata", verify=client_ctx(pki), timeout=30)
    r = httpx.get(f"{base}/metadata", verify=client_ctx(pki, cert=True))
    assert r.status_code == 200
    assert r.url.scheme == "https" and r.json()["resourceType"] == "CapabilityStatement"

    def rejections() -> list[str]:
        from sqlalchemy import select

        from engine.store import schema

        with e.store.engine.connect() as c:
            return list(c.execute(select(schema.audit_events.c.detail)
                                  .where(schema.audit_events.c.action == "fhir.tls_rejected")).scalars())

    # the refused handshake (no client certificate) is a Security Alert in the audit trail
    e.wait_for(lambda: len(rejections()) == 1)
    assert "TLS handshake failed" in rejections()[0]


def test_fhir_route_delivers_over_mutual_tls(engine_factory, pki):
    back_port = free_port()
    back = engine_factory(yaml(pki, mutual=True, port=back_port), env=ENV)
    routes = f"""
      - name: upstream
        to:
          type: fhir
          base_url: "https://localhost:{back_port}/fhir"
          auth: {{token: "${{FHIR_TOKEN}}"}}
          tls: {{ca: "{pki.ca}", cert: "{pki.client.cert}", key: "{pki.client.key}"}}
        retry: {{max_attempts: 20, initial_delay: 0.1, max_delay: 0.5}}"""
    front = engine_factory(yaml(pki, routes=routes), env=ENV)
    r = httpx.post(f"https://localhost:{front.address('api')[1]}/fhir/Patient", json=patient("TLS-ROUTE-1"),
                   headers=AUTH, verify=client_ctx(pki))
    assert r.status_code == 201, r.text
    search = f"https://localhost:{back_port}/fhir/Patient?identifier=urn:oid:1.2.3.4|TLS-ROUTE-1"

    def arrived():
        got = httpx.get(search, headers=AUTH, verify=client_ctx(pki, cert=True)).json()
        return got.get("total") == 1 or len(got.get("entry") or []) == 1

    back.wait_for(arrived, timeout=30)
