"""FHIR REST API over HTTP against a live listener: CRUD, versions, history, errors, auth."""

from __future__ import annotations

import json
import ssl
from pathlib import Path

import httpx
import pytest
from fhir_support import TOKEN, FhirServer
from pydantic import ValidationError
from sqlalchemy import select

from engine.store import schema
from listeners.fhir import FhirSourceConfig

AUTH = {"Authorization": f"Bearer {TOKEN}"}
SNAPSHOT = Path(__file__).resolve().parent.parent / "conformance" / "fhir-capability-statement.json"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = FhirServer(tmp_path_factory.mktemp("fhir-rest")).start()
    yield s
    s.stop()


@pytest.fixture
def client(server):
    with httpx.Client(base_url=server.base_url, headers=AUTH, timeout=30) as c:
        yield c


def patient(mrn: str = "MRN-1", **extra):
    return {"resourceType": "Patient", "identifier": [{"system": "urn:oid:1.2.3", "value": mrn}],
            "name": [{"family": "Doe", "given": ["Jane"]}], "birthDate": "1970-01-01", **extra}


# -- metadata and auth ---------------------------------------------------------
def test_metadata_is_public_and_matches_snapshot(server):
    r = httpx.get(server.base_url + "/metadata")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("application/fhir+json")
    assert r.json() == json.loads(SNAPSHOT.read_text())
    assert r.json()["fhirVersion"] == "4.0.1"


def test_capability_statement_is_valid_fhir():
    from fhir.resources.R4B import get_fhir_model_class

    get_fhir_model_class("CapabilityStatement").model_validate(json.loads(SNAPSHOT.read_text()))


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic x"}])
def test_auth_required(server, headers):
    r = httpx.get(server.base_url + "/Patient", headers=headers)
    assert r.status_code == 401
    assert r.headers["www-authenticate"].startswith("Bearer")
    assert r.json()["resourceType"] == "OperationOutcome"
    with server.store.engine.connect() as c:
        rows = c.execute(select(schema.audit_events).where(schema.audit_events.c.action == "login.failure")).all()
    assert rows


def test_auth_config_required():
    with pytest.raises(ValidationError):
        FhirSourceConfig.model_validate({"type": "fhir", "port": 0})
    with pytest.raises(ValidationError):
        FhirSourceConfig.model_validate({"type": "fhir", "auth": {}})
    with pytest.raises(ValidationError):
        FhirSourceConfig.model_validate({"type": "fhir", "auth": {"open": True, "bearer_tokens": ["x"]}})
    assert FhirSourceConfig.model_validate({"type": "fhir", "auth": {"open": True}}).auth.open
    secret = FhirSourceConfig.model_json_schema()["$defs"]["FhirAuth"]["properties"]["bearer_tokens"]
    assert secret.get("secret") is True


def test_open_auth(tmp_path):
    s = FhirServer(tmp_path, auth={"open": True}).start()
    try:
        r = httpx.post(s.base_url + "/Patient", json=patient())
        assert r.status_code == 201
        assert "opened" in httpx.get(s.base_url + "/metadata").json()["rest"][0]["security"]["description"]
    finally:
        s.stop()


# -- CRUD and versions -------------------------------------------------------
def test_create_read_update_delete(client, server):
    r = client.post("/Patient", json=patient())
    assert r.status_code == 201
    body = r.json()
    pid = body["id"]
    assert body["meta"]["versionId"] == "1"
    assert r.headers["etag"] == 'W/"1"'
    assert r.headers["location"].endswith(f"/Patient/{pid}/_history/1")
    assert "last-modified" in r.headers

    r = client.get(f"/Patient/{pid}")
    assert r.status_code == 200 and r.json()["name"][0]["family"] == "Doe"
    assert client.get(f"/Patient/{pid}", headers={"If-None-Match": 'W/"1"'}).status_code == 304

    upd = {**r.json(), "active": True}
    r = client.put(f"/Patient/{pid}", json=upd, headers={"If-Match": 'W/"1"'})
    assert r.status_code == 200 and r.headers["etag"] == 'W/"2"' and r.json()["meta"]["versionId"] == "2"

    r = client.put(f"/Patient/{pid}", json={**upd, "active": False}, headers={"If-Match": 'W/"1"'})
    assert r.status_code == 412 and r.json()["resourceType"] == "OperationOutcome"

    assert client.get(f"/Patient/{pid}/_history/1").json()["meta"]["versionId"] == "1"
    assert "active" not in client.get(f"/Patient/{pid}/_history/1").json()
    assert client.get(f"/Patient/{pid}/_history/2").json()["active"] is True
    assert client.get(f"/Patient/{pid}/_history/9").status_code == 404

    assert client.delete(f"/Patient/{pid}").status_code == 204
    assert client.get(f"/Patient/{pid}").status_code == 410
    assert client.delete(f"/Patient/{pid}").status_code == 204  # idempotent
    assert client.delete("/Patient/never-was").status_code == 204  # R4 http.html#delete

    h = client.get(f"/Patient/{pid}/_history").json()
    assert h["type"] == "history" and h["total"] == 3
    assert [e["request"]["method"] for e in h["entry"]] == ["DELETE", "PUT", "POST"]
    assert "resource" not in h["entry"][0]


def test_update_as_create_and_noop_update(client):
    r = client.put("/Endpoint/ep-1", json={"resourceType": "Endpoint", "id": "ep-1", "status": "active",
                                           "connectionType": {"code": "dicom-wado-rs"},
                                           "payloadType": [{"text": "DICOM"}], "address": "https://pacs/wado"})
    assert r.status_code == 201 and r.json()["id"] == "ep-1"
    same = client.get("/Endpoint/ep-1").json()
    r = client.put("/Endpoint/ep-1", json=same)
    assert r.status_code == 200 and r.json()["meta"]["versionId"] == "1"  # unchanged: no new version


def test_prefer_minimal(client):
    r = client.post("/Patient", json=patient("MRN-min"), headers={"Prefer": "return=minimal"})
    assert r.status_code == 201 and r.content == b"" and r.headers["location"]


def test_conditional_create_header(client):
    hdr = {"If-None-Exist": "identifier=urn:oid:1.2.3|MRN-cc"}
    first = client.post("/Patient", json=patient("MRN-cc"), headers=hdr)
    again = client.post("/Patient", json=patient("MRN-cc"), headers=hdr)
    assert first.status_code == 201 and again.status_code == 200
    assert first.json()["id"] == again.json()["id"]


def test_conditional_update_and_delete(client):
    r = client.put("/Patient?identifier=urn:oid:1.2.3|MRN-cu", json=patient("MRN-cu"))
    assert r.status_code == 201
    pid = r.json()["id"]
    r = client.put("/Patient?identifier=urn:oid:1.2.3|MRN-cu", json=patient("MRN-cu", active=True))
    assert r.status_code == 200 and r.json()["id"] == pid
    assert client.delete("/Patient?identifier=urn:oid:1.2.3|MRN-cu").status_code == 204
    assert client.get(f"/Patient/{pid}").status_code == 410


def test_write_goes_through_intake(client, server):
    r = client.post("/Patient", json=patient("MRN-intake"))
    with server.store.engine.connect() as c:
        m = schema.messages
        rows = c.execute(select(m.c.id, m.c.kind, m.c.headers, m.c.channel)).all()
        mine = [mid for mid, _, h, _ in rows if h.get("interaction") == "create" and h.get("id") == r.json()["id"]]
        assert len(mine) == 1
        assert b"MRN-intake" in server.store.message_payload(c, mine[0])
    assert all(k == "fhir" and ch == "fhir-in" for _, k, _, ch in rows)


def test_phi_not_in_clear_in_database(client, server):
    client.post("/Patient", json=patient("MRN-SECRET-99", name=[{"family": "Zyxwvut"}]))
    client.get("/Patient?identifier=urn:oid:1.2.3|MRN-SECRET-99")
    raw = b"".join(p.read_bytes() for p in server.root.glob("medrelay.db*"))
    assert b"Zyxwvut" not in raw and b"MRN-SECRET-99" not in raw


# -- errors --------------------------------------------------------------------
@pytest.mark.parametrize(("method", "path", "body", "status"), [
    ("POST", "/Patient", b"{not json", 400),
    ("POST", "/Patient", b'{"resourceType": "Patient", "birthDate": "yesterday"}', 400),
    ("POST", "/Patient", b'{"resourceType": "Patient", "bogus": 1}', 400),
    ("POST", "/Patient", b'{"resourceType": "Observation", "status": "final", "code": {"text": "x"}}', 400),
    ("POST", "/Basic", b'{"resourceType": "Basic"}', 404),
    ("GET", "/Patient/nope", None, 404),
    ("GET", "/Unknown/1", None, 404),
    ("PATCH", "/Patient/x", b"{}", 405),
    ("POST", "/AuditEvent", b'{"resourceType": "AuditEvent"}', 405),
    ("PUT", "/Patient/abc", b'{"resourceType": "Patient", "id": "xyz"}', 400),
    ("GET", "/Patient?_count=abc", None, 400),
    ("GET", "/Patient?date:missing=true", None, 400),
    ("POST", "/", b'{"resourceType": "Bundle", "type": "collection"}', 422),
    ("POST", "/", b'{"resourceType": "Patient"}', 400),
])
def test_errors_are_operation_outcomes(client, method, path, body, status):
    r = client.request(method, path, content=body, headers={"Content-Type": "application/fhir+json"})
    assert r.status_code == status, r.text
    assert r.json()["resourceType"] == "OperationOutcome"
    assert "Traceback" not in r.text


def test_body_too_large(tmp_path):
    s = FhirServer(tmp_path, max_body_bytes=1000).start()
    try:
        big = patient(text={"status": "generated", "div": "<div>" + "x" * 2000 + "</div>"})
        r = httpx.post(s.base_url + "/Patient", json=big, headers=AUTH)
        assert r.status_code == 413 and r.json()["resourceType"] == "OperationOutcome"
    finally:
        s.stop()


def test_unsupported_media_type(client):
    r = client.post("/Patient", content=b"<Patient/>", headers={"Content-Type": "application/fhir+xml"})
    assert r.status_code == 415


def test_reads_are_audited(client, server):
    pid = client.post("/Patient", json=patient("MRN-aud")).json()["id"]
    client.get(f"/Patient/{pid}")
    r = client.get("/AuditEvent", params={"subtype": "fhir.read", "_count": 50})
    assert r.status_code == 200
    whats = [e["resource"]["entity"][0]["what"]["reference"] for e in r.json()["entry"]
             if "what" in e["resource"].get("entity", [{}])[0]]
    assert f"Patient/{pid}" in whats
    ev = r.json()["entry"][0]["resource"]
    from fhir.resources.R4B import get_fhir_model_class

    get_fhir_model_class("AuditEvent").model_validate(ev)
    assert client.get(f"/AuditEvent/{ev['id']}").json()["id"] == ev["id"]
    assert client.get("/AuditEvent/999999").status_code == 404
    assert ev["action"] == "R" and ev["type"]["code"] == "rest"
    # the write went through intake: its receive row is coded like the DICOM export (Import, 110107)
    recv = client.get("/AuditEvent", params={"subtype": "message.receive"}).json()["entry"][0]["resource"]
    assert recv["type"] == {"system": "http://dicom.nema.org/resources/ontology/DCM", "code": "110107",
                            "display": "Import"}
    assert recv["action"] == "C"
    searches = client.get("/AuditEvent", params={"subtype": "fhir.search"}).json()
    assert all("MRN" not in json.dumps(e) for e in searches.get("entry", []))  # search values never audited


def test_tls(tmp_path):
    import datetime as dt

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    (tmp_path / "c.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "k.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                       serialization.PrivateFormat.PKCS8,
                                                       serialization.NoEncryption()))
    s = FhirServer(tmp_path / "srv", tls={"cert": str(tmp_path / "c.pem"), "key": str(tmp_path / "k.pem")}).start()
    try:
        port = s.listener.address[1]
        verify = ssl.create_default_context(cafile=str(tmp_path / "c.pem"))
        r = httpx.get(f"https://localhost:{port}/fhir/metadata", verify=verify)
        assert r.status_code == 200
    finally:
        s.stop()


def test_no_phi_in_logs(client):
    import structlog

    with structlog.testing.capture_logs() as logs:
        pid = client.post("/Patient", json=patient("MRN-LOG-7", name=[{"family": "Qwertyson"}])).json()["id"]
        client.get("/Patient", params={"identifier": "urn:oid:1.2.3|MRN-LOG-7"})
        client.post("/Patient", content=b'{"resourceType": "Patient", "birthDate": "Qwertyson"}',
                    headers={"Content-Type": "application/fhir+json"})
        client.post("/", json={"resourceType": "Bundle", "type": "transaction", "entry": [
            {"resource": patient("MRN-LOG-7"), "request": {"method": "PUT", "url": f"Patient/{pid}x"}}]})
    text = json.dumps(logs, default=str)
    assert logs and "MRN-LOG-7" not in text and "Qwertyson" not in text
