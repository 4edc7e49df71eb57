"""The console over TLS (engine/security: BCP 195 context, our own upgrade so refusals are
audited): HTTPS with a verified certificate, the session cookie marked Secure, TLS 1.1 refused,
mutual TLS refusing a client without a certificate from our CA, with an audit event."""

from __future__ import annotations

import ssl

import httpx
import pytest
from console_support import login, start
from tls_certs import make_pki


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_pki(tmp_path_factory.mktemp("pki"))


def test_https_secure_cookie_and_old_tls_refused(engine_factory, pki):
    s = start(engine_factory, extra=f', tls: {{cert: "{pki.server.cert}", key: "{pki.server.key}"}}')
    try:
        assert s.base.startswith("https://")
        ctx = ssl.create_default_context(cafile=str(pki.ca))
        with s.client("viewer", verify=ctx) as c:
            assert c.get("/api/channels").status_code == 200
        c, r = login(s.base, "operator", verify=ctx)
        assert r.status_code == 303
        cookie = r.headers["set-cookie"]
        assert "medrelay_session=" in cookie and "Secure" in cookie and "HttpOnly" in cookie
        assert c.get("/api/me").json()["user"] == "operator"
        old = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        old.load_verify_locations(str(pki.ca))
        old.maximum_version = ssl.TLSVersion.TLSv1_1
        old.minimum_version = ssl.TLSVersion.TLSv1
        with pytest.raises(httpx.ConnectError), httpx.Client(base_url=s.base, verify=old) as bad:
            bad.get("/api/channels")
        with pytest.raises(httpx.HTTPError), httpx.Client(base_url=s.base.replace("https", "http")) as plain:
            plain.get("/api/channels")
    finally:
        s.rx.stop()


def test_mutual_tls_refusal_is_audited(engine_factory, pki):
    s = start(engine_factory, extra=f', tls: {{cert: "{pki.server.cert}", key: "{pki.server.key}", '
                                    f'ca: "{pki.ca}", require_client_cert: true}}')
    try:
        ctx = ssl.create_default_context(cafile=str(pki.ca))
        with pytest.raises(httpx.HTTPError), httpx.Client(base_url=s.base, verify=ctx) as c:
            c.get("/api/channels")
        ctx.load_cert_chain(str(pki.client.cert), str(pki.client.key))
        with s.client("viewer", verify=ctx) as c:
            assert c.get("/api/channels").status_code == 200
        from sqlalchemy import select

        from engine.store import schema

        a = schema.audit_events
        def rejected():
            with s.eng.store.engine.connect() as conn:
                return list(conn.execute(select(a.c.action).where(a.c.action == "console.tls_rejected")))
        assert s.eng.wait_for(rejected)
    finally:
        s.rx.stop()
