"""`source: {type: http}` (issue 15 item 2): POST HL7 v2, DICOM or FHIR JSON, answered after commit.

httpx as the client; the engine is real (intake, store, FHIR store, DICOM index).
"""

from __future__ import annotations

import json
import ssl

import httpx
import pytest
from sqlalchemy import func, select

from engine.hl7.ack import parse_ack
from engine.hl7.batch import read_batch_ack
from engine.store import schema
from engine.store.dicom import tables as dicom_tables
from engine.store.fhir import tables as fhir_tables
from tests.dicom_peers import data_file
from tests.test_source_file import batch, hl7
from tests.tls_certs import make_pki

TOKEN = "http-src-token-0123456789"


def _yaml(extra: str = "") -> str:
    return f"""
    channels:
      orders-http:
        source: {{type: http, host: 127.0.0.1, port: 0, path: /hl7, auth: {{bearer_tokens: ["${{API_TOKEN}}"]}}{extra}}}
        routes:
          - {{name: fwd, to: {{type: file, path: out}}}}
    """


@pytest.fixture
def http_engine(engine_factory):
    def make(extra: str = ""):
        e = engine_factory(_yaml(extra), env={"API_TOKEN": TOKEN})
        host, port = e.address("orders-http")
        return e, f"http://{host}:{port}/hl7"

    return make


def _auth(ctype: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {TOKEN}", "Content-Type": ctype}


def _messages(e) -> list:
    m = schema.messages
    with e.store.engine.connect() as c:
        return c.execute(select(m.c.id, m.c.kind, m.c.headers).where(m.c.channel == "orders-http")).all()


def test_hl7_post_answers_the_ack_after_commit_and_a_resend_is_a_duplicate(http_engine):
    e, url = http_engine()
    r = httpx.post(url, content=hl7("H1"), headers=_auth("application/hl7-v2"))
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/hl7-v2")
    ack = parse_ack(r.content)
    assert ack.code == "AA" and ack.control_id == "H1"
    rows = _messages(e)
    assert [x.headers["MSH-10"] for x in rows] == ["H1"]  # committed before the answer
    with e.store.engine.connect() as c:
        assert c.execute(select(func.count()).select_from(schema.deliveries)).scalar() == 1
    again = httpx.post(url, content=hl7("H1"), headers=_auth("text/plain; charset=utf-8"))
    assert again.status_code == 200 and again.headers["content-type"].startswith("text/plain")
    assert again.content == r.content  # the original ACK, byte for byte
    assert len(_messages(e)) == 1


def test_hl7_refusals_are_ack_bodies_with_err(http_engine):
    e, url = http_engine(", accept_versions: ['2.5']")
    r = httpx.post(url, content=hl7("H2", version="2.3"), headers=_auth("application/hl7-v2"))
    assert r.status_code == 422
    a = parse_ack(r.content)
    assert a.code == "AR" and a.error_code == "203" and a.control_id == "H2"
    r = httpx.post(url, content=b"this is no HL7 at all", headers=_auth("application/hl7-v2"))
    assert r.status_code == 400 and parse_ack(r.content).code == "AR"
    r = httpx.post(url, content=hl7("H3") + hl7("H4"), headers=_auth("application/hl7-v2"))
    assert r.status_code == 400 and parse_ack(r.content).code == "AR"  # two messages without a batch
    r = httpx.post(url, content=b"", headers=_auth("application/hl7-v2"))
    assert r.status_code == 400 and parse_ack(r.content).code == "AR"
    assert not _messages(e)


def test_hl7_batch_gets_a_batch_ack_listing_the_failed_message(http_engine):
    e, url = http_engine(", accept_versions: ['2.5']")
    body = batch(["BA1", "BA2"]).replace(b"|BA2|P|2.5", b"|BA2|P|2.3")
    r = httpx.post(url, content=body, headers=_auth("application/hl7-v2"))
    assert r.status_code == 422
    acks = read_batch_ack(r.content)
    assert [(a.code, a.control_id) for a in acks] == [("AR", "BA2")]
    assert [x.headers["MSH-10"] for x in _messages(e)] == ["BA1"]


def test_dicom_post_is_indexed_like_a_c_store(http_engine):
    e, url = http_engine()
    ct = data_file("CT_small.dcm").read_bytes()
    r = httpx.post(url, content=ct, headers=_auth("application/dicom"))
    assert r.status_code == 200 and r.json() == {"status": "0x0000", "stored": True}
    r2 = httpx.post(url, content=ct, headers=_auth("application/dicom"))  # a re-send: the index knows it
    assert r2.status_code == 200
    with e.store.engine.connect() as c:
        assert c.execute(select(func.count()).select_from(dicom_tables.instances)).scalar() == 1
    bad = httpx.post(url, content=b"\0" * 128 + b"DICM" + b"\x02\x00\x10\x00UI\x04\x001.2\0",
                     headers=_auth("application/dicom"))
    assert bad.status_code == 400 and bad.json()["stored"] is False
    wrong = httpx.post(url, content=hl7("X"), headers=_auth("application/dicom"))
    assert wrong.status_code == 400 and "not dicom" in wrong.json()["error"]
    assert [x.kind for x in _messages(e)] == ["dicom"]


def test_fhir_post_creates_in_the_fhir_store_and_errors_are_operation_outcomes(http_engine):
    e, url = http_engine()
    p = {"resourceType": "Patient", "name": [{"family": "Post"}]}
    r = httpx.post(url, content=json.dumps(p), headers=_auth("application/fhir+json"))
    assert r.status_code == 201, r.text
    body = r.json()
    assert body["resourceType"] == "Patient" and body["id"] and body["meta"]["versionId"] == "1"
    assert r.headers["location"].startswith(f"Patient/{body['id']}/_history/1")
    with e.store.engine.connect() as c:
        assert c.execute(select(func.count()).select_from(fhir_tables.fhir_resources)).scalar() == 1
    bad = httpx.post(url, content=b'{"resourceType": "Patient", "gender": "robot"}',
                     headers=_auth("application/fhir+json"))
    assert bad.status_code == 400 and bad.json()["resourceType"] == "OperationOutcome"
    broken = httpx.post(url, content=b'{"resourceType": ', headers=_auth("application/json"))
    assert broken.status_code == 400 and broken.json()["resourceType"] == "OperationOutcome"
    tx = {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"fullUrl": "urn:uuid:1", "resource": {"resourceType": "Patient"},
         "request": {"method": "POST", "url": "Patient"}},
        {"resource": {"resourceType": "Observation", "status": "final", "code": {"text": "x"},
                      "subject": {"reference": "urn:uuid:1"}}, "request": {"method": "POST", "url": "Observation"}}]}
    t = httpx.post(url, content=json.dumps(tx), headers=_auth("application/fhir+json"))
    assert t.status_code == 200 and t.json()["type"] == "transaction-response"
    assert [x.headers["resourceType"] for x in _messages(e)] == ["Patient", "Bundle"]


def test_auth_type_and_size_limits(http_engine):
    e, url = http_engine(", max_body_bytes: 4096, body_budget_bytes: 8192, accept: [hl7v2, fhir]")
    r = httpx.post(url, content=hl7("A1"), headers={"Content-Type": "application/hl7-v2"})
    assert r.status_code == 401 and parse_ack(r.content).code == "AR" and "Bearer" in r.headers["www-authenticate"]
    r = httpx.post(url, content=b"{}", headers={"Content-Type": "application/fhir+json", "Authorization": "Bearer no"})
    assert r.status_code == 401 and r.json()["resourceType"] == "OperationOutcome"
    r = httpx.post(url, content=b"x", headers=_auth("application/dicom"))  # not accepted on this channel
    assert r.status_code == 415
    r = httpx.post(url, content=b"x", headers=_auth("image/png"))
    assert r.status_code == 415
    big = hl7("A2") + b"NTE|1||" + b"x" * 8000 + b"\r"
    r = httpx.post(url, content=big, headers=_auth("application/hl7-v2"))
    assert r.status_code == 413 and parse_ack(r.content).code == "AR"
    r = httpx.get(url, headers=_auth("application/hl7-v2"))
    assert r.status_code == 405
    r = httpx.post(url.replace("/hl7", "/other"), content=hl7("A3"), headers=_auth("application/hl7-v2"))
    assert r.status_code == 404
    assert not _messages(e)
    with e.store.engine.connect() as c:
        fails = c.execute(select(func.count()).select_from(schema.audit_events)
                          .where(schema.audit_events.c.action == "login.failure")).scalar()
    assert fails == 2


def test_https_with_the_shared_tls(engine_factory, tmp_path):
    pki = make_pki(tmp_path / "pki")
    e = engine_factory(_yaml(f", tls: {{cert: {pki.server.cert}, key: {pki.server.key}}}"), env={"API_TOKEN": TOKEN})
    host, port = e.address("orders-http")
    r = httpx.post(f"https://{host}:{port}/hl7", content=hl7("T1"), headers=_auth("application/hl7-v2"),
                   verify=ssl.create_default_context(cafile=str(pki.ca)))
    assert r.status_code == 200 and parse_ack(r.content).code == "AA"
    with pytest.raises(httpx.HTTPError):
        httpx.post(f"http://{host}:{port}/hl7", content=hl7("T2"), headers=_auth("application/hl7-v2"), timeout=5)
