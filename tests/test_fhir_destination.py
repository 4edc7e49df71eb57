"""`to: {type: fhir}` against medrelay's own FHIR server running as a second instance."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
from fhir_support import TOKEN, FhirServer, adt_bundle
from mllp_peers import RawClient, adt, msa

from engine.components import DeliveryError
from engine.context import ComponentContext
from engine.envelope import Envelope
from routes.fhir import FhirDestinationConfig, build

AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    s = FhirServer(tmp_path_factory.mktemp("fhir-target")).start()
    yield s
    s.stop()


def destination(base_url: str, token: str | None = TOKEN, **extra):
    cfg = {"type": "fhir", "base_url": base_url, **extra}
    if token is not None:
        cfg["auth"] = {"token": token}
    ctx = ComponentContext(settings=None, store=None, keyring=None, audit=None, channel="c", route="r")  # type: ignore[arg-type]
    return build(FhirDestinationConfig.model_validate(cfg), ctx)


def send(dest, payload, **headers):
    env = Envelope(channel="c", kind="fhir", payload=json.dumps(payload).encode() if isinstance(payload, dict)
                   else payload, headers=headers)

    async def go():
        try:
            return await dest.send(env)
        finally:
            await dest.close()

    return asyncio.run(go())


def total(server, path, **params):
    with httpx.Client(base_url=server.base_url, headers=AUTH) as c:
        return c.get(path, params=params).json()["total"]


def test_transaction_delivered_once(target):
    assert send(destination(target.base_url), adt_bundle("D-1", "DV-1", "DO-1")) == "HTTP 200"
    assert send(destination(target.base_url), adt_bundle("D-1", "DV-1", "DO-1")) == "HTTP 200"  # retry
    assert total(target, "/Patient", identifier="urn:oid:2.16.840.1.113883.19.5|D-1") == 1
    assert total(target, "/Observation", identifier="urn:obx|DO-1") == 1


def test_single_resources(target):
    assert send(destination(target.base_url), {"resourceType": "Patient", "gender": "female"}) == "HTTP 201"
    ep = {"resourceType": "Endpoint", "id": "dest-ep", "status": "active", "connectionType": {"code": "x"},
          "payloadType": [{"text": "x"}], "address": "https://x"}
    assert send(destination(target.base_url), ep) == "HTTP 201"
    assert send(destination(target.base_url), ep) == "HTTP 200"  # PUT by id: idempotent
    assert send(destination(target.base_url), b"", interaction="delete", resourceType="Endpoint",
                id="dest-ep") == "HTTP 204"


@pytest.mark.parametrize(("payload", "token"), [
    ({"resourceType": "Patient", "birthDate": "nope"}, TOKEN),  # 400
    ({"resourceType": "Patient"}, "wrong-token"),  # 401
    ({"resourceType": "Bundle", "type": "batch", "entry": [
        {"resource": {"resourceType": "Patient", "birthDate": "x"}, "request": {"method": "POST", "url": "Patient"}}
    ]}, TOKEN),  # 200 with a failed entry
])
def test_permanent_failures(target, payload, token):
    with pytest.raises(DeliveryError) as e:
        send(destination(target.base_url, token), payload)
    assert e.value.permanent
    assert "birthDate" not in str(e.value) and "nope" not in str(e.value)


def test_unreachable_is_retryable():
    with pytest.raises(DeliveryError) as e:
        send(destination("http://127.0.0.1:9/fhir", timeout=2), {"resourceType": "Patient"})
    assert not e.value.permanent


@pytest.mark.parametrize(("status", "permanent"), [(503, False), (500, False), (429, False), (408, False),
                                                   (404, True), (422, True), (302, True)])
def test_status_classes(status, permanent):
    dest = destination("http://127.0.0.1:1/fhir")
    dest.client = httpx.AsyncClient(transport=httpx.MockTransport(
        lambda req: httpx.Response(status, json={"resourceType": "OperationOutcome",
                                                 "issue": [{"severity": "error", "code": "transient"}]})))
    with pytest.raises(DeliveryError) as e:
        send(dest, {"resourceType": "Patient"})
    assert e.value.permanent is permanent


def test_config_secret_and_url():
    schema = FhirDestinationConfig.model_json_schema()
    assert schema["$defs"]["FhirDestinationAuth"]["properties"]["token"]["secret"] is True
    with pytest.raises(ValueError):
        FhirDestinationConfig.model_validate({"type": "fhir", "base_url": "ftp://x"})


TARGET_YAML = """
store: {{url: "{url}", blobs: data/blobs}}
keys: {{kek_file: data/keys.json}}
channels:
  api:
    source: {{type: fhir, port: 0, auth: {{bearer_tokens: ["${{API_TOKEN}}"]}}}}
"""

SOURCE_YAML = """
store: {{url: "{url}", blobs: data/blobs}}
keys: {{kek_file: data/keys.json}}
channels:
  adt-in:
    source: {{type: mllp, port: 0}}
    routes:
      - name: to-fhir
        transforms: [{{type: hl7_to_fhir}}]
        to: {{type: fhir, base_url: "{base}", auth: {{token: "${{FHIR_TOKEN}}"}}}}
  api:
    source: {{type: fhir, port: 0, auth: {{open: true}}}}
    routes:
      - name: forward
        to: {{type: fhir, base_url: "{base}", auth: {{token: "${{FHIR_TOKEN}}"}}}}
"""


def test_two_instances(engine_factory, store_url, tmp_path):
    """MLLP ADT -> hl7_to_fhir -> fhir destination -> second medrelay's FHIR API; and FHIR -> FHIR."""
    # the target keeps SQLite: two engines on one PostgreSQL database would share their tables
    target = engine_factory(TARGET_YAML.format(url=f"sqlite:///{tmp_path}/target.db"), env={"API_TOKEN": "tok-b"})
    host, port = target.address("api")
    base = f"http://{host}:{port}/fhir"
    source = engine_factory(SOURCE_YAML.format(url=store_url, base=base), env={"FHIR_TOKEN": "tok-b"})

    mhost, mport = source.address("adt-in")
    c = RawClient(mhost, mport)
    assert msa(c.request(adt("CTRL-1")))[1] == "AA"
    assert msa(c.request(adt("CTRL-2")))[1] == "AA"  # same patient again, new control id
    hdr = {"Authorization": "Bearer tok-b"}

    def patients():
        r = httpx.get(f"{base}/Patient", params={"identifier": "12345"}, headers=hdr)
        return r.json()["total"] if r.status_code == 200 else 0

    target.wait_for(lambda: patients() >= 1)
    d = source.store
    from sqlalchemy import func, select

    from engine.store import schema

    def delivered():
        with d.engine.connect() as conn:
            return conn.execute(select(func.count()).select_from(schema.deliveries).where(
                schema.deliveries.c.route == "to-fhir", schema.deliveries.c.state == "done")).scalar_one() == 2

    source.wait_for(delivered)
    assert patients() == 1

    ah, ap = source.address("api")
    r = httpx.post(f"http://{ah}:{ap}/fhir", json=adt_bundle("E2E-1", "E2E-V", "E2E-O"))
    assert r.status_code == 200
    target.wait_for(lambda: httpx.get(f"{base}/Observation", params={"identifier": "urn:obx|E2E-O"},
                                      headers=hdr).json()["total"] == 1)
