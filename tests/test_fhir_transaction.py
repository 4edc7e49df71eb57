"""transaction and batch Bundles over HTTP, and the `store` destination's fhir handler."""

from __future__ import annotations

import copy
import json

import httpx
import pytest
from fhir_support import TOKEN, FhirServer, adt_bundle
from sqlalchemy import func, select

from engine.components import DeliveryError
from engine.envelope import Envelope
from engine.store import schema
from engine.store.fhir.handler import store_fhir
from engine.store.fhir.tables import fhir_resources

AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = FhirServer(tmp_path_factory.mktemp("fhir-tx")).start()
    yield s
    s.stop()


@pytest.fixture
def client(server):
    with httpx.Client(base_url=server.base_url, headers=AUTH) as c:
        yield c


def count(server, rtype: str) -> int:
    with server.store.engine.connect() as c:
        r = fhir_resources
        return c.execute(select(func.count()).where(r.c.type == rtype, r.c.deleted == 0)).scalar_one()


def test_transaction_resolves_references_and_is_idempotent(client, server):
    r = client.post("/", json=adt_bundle())
    assert r.status_code == 200, r.text
    b = r.json()
    assert b["type"] == "transaction-response"
    assert [e["response"]["status"] for e in b["entry"]] == ["201 Created"] * 3
    pid = b["entry"][0]["response"]["location"].split("/")[1]
    obs_loc = b["entry"][2]["response"]["location"]
    assert b["entry"][0]["response"]["etag"] == 'W/"1"'
    obs = client.get("/" + obs_loc.split("/_history")[0]).json()
    assert obs["subject"]["reference"] == f"Patient/{pid}"
    assert obs["encounter"]["reference"].startswith("Encounter/")

    before = {t: count(server, t) for t in ("Patient", "Encounter", "Observation")}
    r2 = client.post("/", json=adt_bundle())
    assert r2.status_code == 200
    assert [e["response"]["status"] for e in r2.json()["entry"]] == ["200 OK"] * 3
    assert {t: count(server, t) for t in before} == before
    assert r2.json()["entry"][0]["response"]["location"].split("/")[1] == pid
    assert client.get(f"/Patient/{pid}").json()["meta"]["versionId"] == "1"  # unchanged: no new version


def test_transaction_updates_existing_patient(client):
    first = client.post("/", json=adt_bundle("P-upd", "V-upd", "O-upd")).json()
    pid = first["entry"][0]["response"]["location"].split("/")[1]
    b = adt_bundle("P-upd", "V-upd", "O-upd")
    b["entry"][0]["resource"]["gender"] = "female"
    r = client.post("/", json=b).json()
    assert r["entry"][0]["response"]["status"] == "200 OK"
    assert r["entry"][0]["response"]["etag"] == 'W/"2"'
    assert client.get(f"/Patient/{pid}").json()["gender"] == "female"


def test_transaction_is_atomic(client, server):
    before = count(server, "Patient")
    b = adt_bundle("P-atomic", "V-atomic", "O-atomic")
    b["entry"].append({"resource": {"resourceType": "Observation", "status": "final", "effectiveDateTime": "not-a-date",
                                    "code": {"text": "x"}}, "request": {"method": "POST", "url": "Observation"}})
    r = client.post("/", json=b)
    assert r.status_code == 400 and r.json()["resourceType"] == "OperationOutcome"
    b = adt_bundle("P-atomic", "V-atomic", "O-atomic")
    b["entry"].append({"request": {"method": "GET", "url": "Patient/does-not-exist"}})  # a DELETE of it is 204
    r = client.post("/", json=b)
    assert r.status_code == 404
    assert count(server, "Patient") == before
    assert client.get("/Patient", params={"identifier": "P-atomic"}).json()["total"] == 0


def test_transaction_errors(client):
    b = adt_bundle("P-err", "V-err", "O-err")
    b["entry"][2]["resource"]["subject"]["reference"] = "urn:uuid:not-in-bundle"
    assert client.post("/", json=b).status_code == 400
    b = adt_bundle("P-err2", "V-err2", "O-err2")
    b["entry"][1]["request"]["method"] = "PATCH"
    assert client.post("/", json=b).status_code == 405
    b = adt_bundle("P-err3", "V-err3", "O-err3")
    b["entry"][0]["request"]["url"] = "Patient?identifier=urn:oid:2.16.840.1.113883.19.5|P-err3"
    b["entry"].append(copy.deepcopy(b["entry"][0]))
    b["entry"][-1]["fullUrl"] = "urn:uuid:6f1e8f3a-0000-4000-8000-000000000009"
    assert client.post("/", json=b).status_code == 400  # the same resource twice


def test_conditional_update_multiple_matches(client):
    for _ in range(2):
        client.post("/Patient", json={"resourceType": "Patient", "identifier": [{"system": "urn:dup",
                                                                                "value": "D"}]})
    b = {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"resource": {"resourceType": "Patient"}, "request": {"method": "PUT", "url": "Patient?identifier=urn:dup|D"}}]}
    assert client.post("/", json=b).status_code == 412
    r = client.put("/Patient?identifier=urn:dup|D", json={"resourceType": "Patient"})
    assert r.status_code == 412


def test_conditional_reference(client):
    client.post("/", json=adt_bundle("P-cref", "V-cref", "O-cref"))
    b = {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"resource": {"resourceType": "Observation", "status": "final", "code": {"text": "hr"},
                      "subject": {"reference": "Patient?identifier=urn:oid:2.16.840.1.113883.19.5|P-cref"}},
         "request": {"method": "POST", "url": "Observation"}}]}
    r = client.post("/", json=b, headers={"Prefer": "return=representation"}).json()
    assert r["entry"][0]["resource"]["subject"]["reference"].startswith("Patient/")


def test_batch(client):
    pid = client.post("/Patient", json={"resourceType": "Patient"}).json()["id"]
    b = {"resourceType": "Bundle", "type": "batch", "entry": [
        {"resource": {"resourceType": "Patient", "gender": "other"}, "request": {"method": "POST", "url": "Patient"}},
        {"resource": {"resourceType": "Patient", "birthDate": "bad"}, "request": {"method": "POST", "url": "Patient"}},
        {"request": {"method": "GET", "url": f"Patient/{pid}"}},
        {"request": {"method": "DELETE", "url": "Patient/nope"}},
        {"resource": {"resourceType": "Patient", "id": pid, "active": True},
         "request": {"method": "PUT", "url": f"Patient/{pid}", "ifMatch": 'W/"7"'}},
    ]}
    r = client.post("/", json=b, headers={"Prefer": "return=representation"})
    assert r.status_code == 200
    out = r.json()
    assert out["type"] == "batch-response"
    statuses = [e["response"]["status"].split()[0] for e in out["entry"]]
    assert statuses == ["201", "400", "200", "204", "412"]  # DELETE of an id never known: 204 (http.html#delete)
    assert out["entry"][1]["response"]["outcome"]["resourceType"] == "OperationOutcome"
    assert out["entry"][2]["resource"]["id"] == pid
    created = out["entry"][0]["response"]["location"].split("/")[1]
    assert client.get(f"/Patient/{created}").status_code == 200


def test_transaction_is_one_message(client, server):
    with server.store.engine.connect() as c:
        before = c.execute(select(func.count()).select_from(schema.messages)).scalar_one()
    client.post("/", json=adt_bundle("P-msg", "V-msg", "O-msg"))
    with server.store.engine.connect() as c:
        m = schema.messages
        rows = c.execute(select(m.c.id, m.c.headers).order_by(m.c.received_at.desc())).all()
        assert len(rows) == before + 1
        assert rows[0][1] == {"resourceType": "Bundle", "interaction": "transaction"}
        assert json.loads(server.store.message_payload(c, rows[0][0]))["type"] == "transaction"
        v = c.execute(select(schema.metadata.tables["fhir_versions"].c.message_id)
                      .where(schema.metadata.tables["fhir_versions"].c.message_id == rows[0][0])).all()
        assert len(v) == 3  # each version records the message that wrote it


def test_store_handler(server):
    """`to: {type: store}` files hl7_to_fhir output through the same code."""
    ctx = server.ctx
    env = Envelope(channel="adt-in", kind="fhir", payload=json.dumps(adt_bundle("P-store", "V-s", "O-s")).encode())
    with server.store.engine.begin() as conn:
        assert store_fhir(ctx, conn, env) == "fhir transaction entries=3"
    with server.store.engine.begin() as conn:
        store_fhir(ctx, conn, env)  # replay: no duplicates
    with httpx.Client(base_url=server.base_url, headers=AUTH) as c:
        assert c.get("/Observation", params={"identifier": "urn:obx|O-s"}).json()["total"] == 1
    single = Envelope(channel="x", kind="fhir", payload=json.dumps(
        {"resourceType": "Endpoint", "id": "from-store", "status": "active", "connectionType": {"code": "x"},
         "payloadType": [{"text": "x"}], "address": "https://x"}).encode())
    with server.store.engine.begin() as conn:
        assert store_fhir(ctx, conn, single) == "fhir Endpoint 201"
    bad = Envelope(channel="x", kind="fhir", payload=b'{"resourceType": "Patient", "gender": 5}')
    with pytest.raises(DeliveryError) as exc, server.store.engine.begin() as conn:
        store_fhir(ctx, conn, bad)
    assert exc.value.permanent
