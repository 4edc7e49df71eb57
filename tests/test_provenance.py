"""Lineage out (issue 15 item 4): Provenance with what medrelay writes, and a message's outputs.

HL7 v2 comes in over the http source, hl7_to_fhir converts it, and the `store` destination
files it in medrelay's FHIR store, or the `fhir` destination sends it to a real FHIR server
(medrelay's own FHIR listener, tests/fhir_support.py). Every Provenance is read back and
validated with fhir.resources.
"""

from __future__ import annotations

import json
import subprocess
import sys

import httpx
import pytest
from fhir.resources.R4B.provenance import Provenance
from sqlalchemy import select

from engine.messages import show_message
from engine.store import schema
from engine.store.fhir import tables as fhir_tables
from engine.store.fhir.resources import FhirStore
from tests.fhir_support import TOKEN as FHIR_TOKEN
from tests.fhir_support import FhirServer

TOKEN = "prov-token-0123456789"


def oru(cid: str) -> bytes:
    return (f"MSH|^~\\&|LABSYS|NORTH|EHR|HOSP|20260101120000||ORU^R01|{cid}|P|2.5\r"
            f"PID|1||MRN{cid}^^^HOSP^MR||Doe^Jane||19800101|F\r"
            "OBR|1||ACC1|GLU^Glucose^L\r"
            "OBX|1|NM|GLU^Glucose^L||5.5|mmol/L|||||F\r").encode()


def _yaml(dest: str, transforms: str = "[{type: hl7_to_fhir}]") -> str:
    return f"""
    channels:
      lab-http:
        source: {{type: http, port: 0, path: /hl7, auth: {{bearer_tokens: ["${{API_TOKEN}}"]}}, accept: [hl7v2]}}
        routes:
          - name: to-fhir
            transforms: {transforms}
            to: {dest}
    """


def _post(e, body: bytes) -> str:
    host, port = e.address("lab-http")
    r = httpx.post(f"http://{host}:{port}/hl7", content=body,
                   headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/hl7-v2"})
    assert r.status_code == 200, r.text
    m = schema.messages
    with e.store.engine.connect() as c:
        return c.execute(select(m.c.id).where(m.c.channel == "lab-http").order_by(m.c.received_at.desc())).scalar()


def _delivered(e, mid: str) -> dict:
    return e.wait_for(lambda: (lambda i: i if i and i["deliveries"][0]["state"] == "done" else None)(
        show_message(e.store, mid)), timeout=30)


def _resources(store, rtype: str) -> list[dict]:
    fs = FhirStore(store, store.keyring)
    r = fhir_tables.fhir_resources
    with store.engine.connect() as c:
        ids = c.execute(select(r.c.id).where(r.c.type == rtype)).scalars().all()
        return [fs.read(c, rtype, i)[1] for i in ids]


def _check(prov: dict, mid: str, e) -> None:
    Provenance.model_validate(prov)  # R4B model, as the engine checks it before writing
    assert prov["entity"] == [{"role": "source", "what": {
        "identifier": {"system": "urn:medrelay:message", "value": mid},
        "display": "hl7v2 message received on channel lab-http"}}]
    codes = [a["type"]["coding"][0]["code"] for a in prov["agent"]]
    assert codes == ["assembler", "author"]
    assert prov["agent"][1]["who"]["identifier"] == {"system": "urn:medrelay:hl7v2:msh-3-msh-4",
                                                      "value": "LABSYS|NORTH"}
    ext = {x["url"]: x.get("valueString") for x in prov["extension"][0]["extension"]}
    assert ext["channel"] == "lab-http" and ext["route"] == "to-fhir" and ext["transform"] == "hl7_to_fhir"
    assert ext["config-hash"] == e.settings.config_hash
    assert prov["policy"] == [f"urn:medrelay:config:{e.settings.config_hash}"]
    assert prov["recorded"].endswith("Z")


def test_store_destination_writes_a_provenance_with_the_resources(engine_factory):
    e = engine_factory(_yaml("{type: store, provenance: true}"), env={"API_TOKEN": TOKEN})
    mid = _post(e, oru("P1"))
    info = _delivered(e, mid)
    (prov,) = _resources(e.store, "Provenance")
    _check(prov, mid, e)
    written = {f"{r['resourceType']}/{r['id']}/_history/{r['meta']['versionId']}"
               for t in ("Patient", "Observation", "DiagnosticReport") for r in _resources(e.store, t)}
    assert {t["reference"] for t in prov["target"]} == written and len(written) >= 3
    # the message lists what it produced, with the Provenance
    outs = info["outputs"]
    assert {o["target"] for o in outs} == written
    assert {o["place"] for o in outs} == {"store"} and {o["route"] for o in outs} == {"to-fhir"}
    assert {o["provenance"] for o in outs} == {f"Provenance/{prov['id']}/_history/1"}
    # and `medrelay messages show` prints them
    out = subprocess.run([sys.executable, "-m", "engine.cli", "messages", "show", "-c", str(e.config_path), mid],
                         capture_output=True, text=True, cwd=e.data_dir, env={"API_TOKEN": "x", **dict(__import__(
                             "os").environ)}, timeout=60)
    assert out.returncode == 0, out.stderr
    shown = json.loads(out.stdout)
    assert {o["target"] for o in shown["outputs"]} == written


def test_without_provenance_outputs_are_still_listed(engine_factory):
    e = engine_factory(_yaml("{type: store}"), env={"API_TOKEN": TOKEN})
    mid = _post(e, oru("P2"))
    info = _delivered(e, mid)
    assert not _resources(e.store, "Provenance")
    assert info["outputs"] and all(o["provenance"] is None for o in info["outputs"])


def test_provenance_is_searchable_by_target_in_the_fhir_api(engine_factory, tmp_path):
    """The REST API serves it: Provenance?target=Patient/<id> finds the lineage of a patient."""
    e = engine_factory(_yaml("{type: store, provenance: true}"), env={"API_TOKEN": TOKEN})
    _delivered(e, _post(e, oru("P3")))
    (patient,) = _resources(e.store, "Patient")
    from engine.store.fhir.search import search

    fs = FhirStore(e.store, e.store.keyring)
    with e.store.engine.connect() as c:
        res = search(fs, c, "Provenance", [("target", f"Patient/{patient['id']}")], strict=True)
    assert res.total == 1


@pytest.fixture
def fhir_server(tmp_path):
    s = FhirServer(tmp_path / "remote-fhir").start()
    yield s
    s.stop()


def _remote(server: FhirServer, rtype: str) -> list[dict]:
    r = httpx.get(f"{server.base_url}/{rtype}", headers={"Authorization": f"Bearer {FHIR_TOKEN}"})
    assert r.status_code == 200
    return [x["resource"] for x in r.json().get("entry", [])]


def _fhir_dest(server: FhirServer) -> str:
    return (f"{{type: fhir, base_url: '{server.base_url}', provenance: true, "
            f"auth: {{token: '${{FHIR_TOKEN}}'}}}}")


def test_fhir_destination_sends_the_provenance_in_the_same_transaction(engine_factory, fhir_server):
    e = engine_factory(_yaml(_fhir_dest(fhir_server)), env={"API_TOKEN": TOKEN, "FHIR_TOKEN": FHIR_TOKEN})
    mid = _post(e, oru("R1"))
    info = _delivered(e, mid)
    (prov,) = _remote(fhir_server, "Provenance")
    _check(prov, mid, e)
    patients = _remote(fhir_server, "Patient")
    obs = _remote(fhir_server, "Observation")
    refs = {t["reference"] for t in prov["target"]}
    # the server resolved the urn:uuid targets to what it created
    assert f"Patient/{patients[0]['id']}" in refs and f"Observation/{obs[0]['id']}" in refs
    assert not any(r.startswith("urn:") for r in refs)
    outs = info["outputs"]
    assert {o["place"] for o in outs} == {"remote"}
    assert any(o["target"].startswith(f"Patient/{patients[0]['id']}/_history/") for o in outs)
    assert {o["provenance"] for o in outs} == {f"Provenance/{prov['id']}/_history/1"}


def test_fhir_destination_single_resource_and_batch(engine_factory, fhir_server):
    """A resource without transforms (PUT when it has an id), and a batch (Provenance posted after it)."""
    cfg = f"""
    channels:
      fhir-in:
        source: {{type: http, port: 0, path: /fhir, auth: {{bearer_tokens: ["${{API_TOKEN}}"]}}, fhir: route}}
        routes:
          - {{name: out, to: {_fhir_dest(fhir_server)}}}
    """
    e = engine_factory(cfg, env={"API_TOKEN": TOKEN, "FHIR_TOKEN": FHIR_TOKEN})
    host, port = e.address("fhir-in")
    url = f"http://{host}:{port}/fhir"
    hdr = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/fhir+json"}
    r = httpx.post(url, json={"resourceType": "Patient", "id": "pat-1", "gender": "other"}, headers=hdr)
    assert r.status_code == 202
    batch = {"resourceType": "Bundle", "type": "batch", "entry": [
        {"resource": {"resourceType": "Patient", "gender": "male"}, "request": {"method": "POST", "url": "Patient"}}]}
    assert httpx.post(url, json=batch, headers=hdr).status_code == 202

    def provs():
        p = _remote(fhir_server, "Provenance")
        return p if len(p) == 2 else None

    got = e.wait_for(provs, timeout=30)
    for p in got:
        Provenance.model_validate(p)
        assert p["agent"][1]["who"]["identifier"]["system"] == "urn:medrelay:peer"
    targets = sorted(t["reference"] for p in got for t in p["target"])
    other = next(x["id"] for x in _remote(fhir_server, "Patient") if x["id"] != "pat-1")
    assert targets[0].startswith("Patient/") and any(t.startswith("Patient/pat-1") for t in targets)
    assert any(t.startswith(f"Patient/{other}") for t in targets)
