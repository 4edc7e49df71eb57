"""FHIR search over HTTP: every parameter, date prefixes, paging, _include."""

from __future__ import annotations

import httpx
import pytest
from fhir_support import TOKEN, FhirServer

from engine.store.fhir.params import date_range

AUTH = {"Authorization": f"Bearer {TOKEN}"}
LOINC = "http://loinc.org"
DCM = "http://dicom.nema.org/resources/ontology/DCM"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = FhirServer(tmp_path_factory.mktemp("fhir-search")).start()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def data(server):
    """Two patients, their observations, reports, studies, encounters and orders."""
    with httpx.Client(base_url=server.base_url, headers=AUTH) as c:
        def post(res):
            r = c.post(f"/{res['resourceType']}", json=res)
            assert r.status_code == 201, r.text
            return r.json()["id"]

        p1 = post({"resourceType": "Patient", "identifier": [{"system": "urn:mrn", "value": "A1"}]})
        p2 = post({"resourceType": "Patient", "identifier": [{"system": "urn:mrn", "value": "B2"},
                                                             {"system": "urn:other", "value": "A1"}]})
        obs = {}
        for i, (pid, code, when, status) in enumerate([
            (p1, "8867-4", "2024-03-01T10:00:00Z", "final"),
            (p1, "8480-6", "2024-03-02T10:00:00Z", "final"),
            (p2, "8867-4", "2024-04-01", "preliminary"),
        ]):
            obs[i] = post({"resourceType": "Observation", "status": status,
                           "code": {"coding": [{"system": LOINC, "code": code}]},
                           "subject": {"reference": f"Patient/{pid}"}, "effectiveDateTime": when})
        dr = post({"resourceType": "DiagnosticReport", "status": "final",
                   "code": {"coding": [{"system": LOINC, "code": "24627-2"}]},
                   "subject": {"reference": f"Patient/{p1}"},
                   "effectivePeriod": {"start": "2024-03-01T08:00:00Z", "end": "2024-03-01T09:00:00Z"}})
        st = post({"resourceType": "ImagingStudy", "status": "available",
                   "subject": {"reference": f"Patient/{p2}"}, "started": "2024-05-05T12:00:00Z",
                   "series": [{"uid": "1.2.3.4", "modality": {"system": DCM, "code": "CT"}}]})
        enc = post({"resourceType": "Encounter", "status": "finished", "class": {"code": "AMB"},
                    "subject": {"reference": f"Patient/{p1}"},
                    "period": {"start": "2024-03-01T08:00:00Z", "end": "2024-03-03T08:00:00Z"}})
        sr = post({"resourceType": "ServiceRequest", "status": "active", "intent": "order",
                   "code": {"coding": [{"system": "urn:proc", "code": "CTHEAD"}]},
                   "subject": {"reference": f"Patient/{p2}"}, "authoredOn": "2024-05-01"})
        return {"p1": p1, "p2": p2, "obs": obs, "dr": dr, "st": st, "enc": enc, "sr": sr}


@pytest.fixture
def client(server):
    with httpx.Client(base_url=server.base_url, headers=AUTH) as c:
        yield c


def ids(client, path, **params):
    r = client.get(path, params=params)
    assert r.status_code == 200, r.text
    b = r.json()
    assert b["type"] == "searchset"
    return {e["resource"]["id"] for e in b.get("entry", []) if e["search"]["mode"] == "match"}


def test_id_and_identifier(client, data):
    assert ids(client, "/Patient", _id=data["p1"]) == {data["p1"]}
    assert ids(client, "/Patient", _id=f"{data['p1']},{data['p2']}") == {data["p1"], data["p2"]}
    assert ids(client, "/Patient", identifier="urn:mrn|A1") == {data["p1"]}
    assert ids(client, "/Patient", identifier="A1") == {data["p1"], data["p2"]}  # any system
    assert ids(client, "/Patient", identifier="urn:other|") == {data["p2"]}  # system only
    assert ids(client, "/Patient", identifier="urn:mrn|A1,urn:mrn|B2") == {data["p1"], data["p2"]}
    assert ids(client, "/Patient", identifier="urn:mrn|ZZ") == set()


def test_patient_and_subject(client, data):
    o = data["obs"]
    assert ids(client, "/Observation", patient=data["p1"]) == {o[0], o[1]}
    assert ids(client, "/Observation", patient=f"Patient/{data['p2']}") == {o[2]}
    assert ids(client, "/Observation", subject=f"Patient/{data['p1']}") == {o[0], o[1]}
    assert ids(client, "/Observation", subject=data["p1"]) == {o[0], o[1]}
    assert ids(client, "/ImagingStudy", patient=data["p2"]) == {data["st"]}
    assert ids(client, "/DiagnosticReport", patient=data["p1"]) == {data["dr"]}
    assert ids(client, "/Encounter", subject=f"Patient/{data['p1']}") == {data["enc"]}
    assert ids(client, "/ServiceRequest", patient=data["p2"]) == {data["sr"]}


def test_code_status_modality(client, data):
    o = data["obs"]
    assert ids(client, "/Observation", code=f"{LOINC}|8867-4") == {o[0], o[2]}
    assert ids(client, "/Observation", code="8480-6") == {o[1]}
    assert ids(client, "/Observation", code="http://other|8480-6") == set()
    assert ids(client, "/Observation", status="preliminary") == {o[2]}
    assert ids(client, "/Observation", status="final", code="8867-4") == {o[0]}  # AND
    assert ids(client, "/ImagingStudy", modality=f"{DCM}|CT") == {data["st"]}
    assert ids(client, "/ImagingStudy", modality="MR") == set()
    assert ids(client, "/ServiceRequest", code="urn:proc|CTHEAD", status="active") == {data["sr"]}
    assert ids(client, "/Endpoint", status="active") == set()


@pytest.mark.parametrize(("value", "expected"), [
    ("2024-03-01", {0}), ("eq2024-03-01", {0}), ("2024-03", {0, 1}), ("2024", {0, 1, 2}),
    ("ne2024-03-01", {1, 2}), ("lt2024-03-02", {0}), ("le2024-03-02", {0, 1}),
    ("gt2024-03-01", {1, 2}), ("ge2024-03-02", {1, 2}), ("sa2024-03-01", {1, 2}),
    ("eb2024-04-01", {0, 1}), ("ge2024-03-01T10:00:00Z", {0, 1, 2}), ("gt2024-03-01T10:00:00Z", {1, 2}),
    ("2024-03-01T10:00:00Z", {0}), ("2024-03-01T12:00:00+02:00", {0}),
])
def test_date_prefixes(client, data, value, expected):
    assert ids(client, "/Observation", date=value) == {data["obs"][i] for i in expected}


def test_date_ranges_and_repeats(client, data):
    o = data["obs"]
    # repeated parameter = AND: a range
    r = client.get("/Observation", params=[("date", "ge2024-03-01"), ("date", "lt2024-04-01")])
    assert {e["resource"]["id"] for e in r.json()["entry"]} == {o[0], o[1]}
    # eq needs the period within the day; ge+le finds a period overlapping it
    assert ids(client, "/Encounter", date="2024-03-02") == set()
    r = client.get("/Encounter", params=[("date", "ge2024-03-02"), ("date", "le2024-03-02")])
    assert {e["resource"]["id"] for e in r.json()["entry"]} == {data["enc"]}
    assert ids(client, "/Encounter", date="2024-03") == {data["enc"]}
    assert ids(client, "/DiagnosticReport", date="2024-03-01") == {data["dr"]}
    assert ids(client, "/ImagingStudy", started="ge2024-05-01") == {data["st"]}
    assert ids(client, "/ServiceRequest", authored="2024-05") == {data["sr"]}
    assert ids(client, "/Patient", _lastUpdated="gt2000-01-01") >= {data["p1"], data["p2"]}
    assert ids(client, "/Patient", _lastUpdated="lt2000-01-01") == set()
    assert client.get("/Observation", params={"date": "notadate"}).status_code == 400


def test_unknown_params_strict_by_default_or_lenient(client, data):
    r = client.get("/Observation", params={"foo": "bar", "status": "final"})
    assert r.status_code == 400 and "foo" in r.json()["issue"][0]["diagnostics"]
    r = client.get("/Observation", params={"foo": "bar"}, headers={"Prefer": "handling=strict"})
    assert r.status_code == 400
    r = client.get("/Observation", params={"foo": "bar", "status": "final"}, headers={"Prefer": "handling=lenient"})
    assert r.status_code == 200 and "foo" not in r.json()["link"][0]["url"]
    assert {e["resource"]["id"] for e in r.json()["entry"] if e["search"]["mode"] == "match"} == {
        data["obs"][0], data["obs"][1]}


def test_modifiers_on_clinical_parameters(client, data):
    o = data["obs"]
    assert ids(client, "/Observation", **{"status:not": "final"}) == {o[2]}
    assert ids(client, "/Observation", **{"code:missing": "false", "patient": data["p1"]}) == {o[0], o[1]}
    assert ids(client, "/Observation", **{"date:missing": "true", "patient": data["p1"]}) == set()
    assert ids(client, "/Observation", **{"subject:Patient": data["p2"]}) == {o[2]}
    assert ids(client, "/Observation", date="ap2024-03-01T10:00:00Z") >= {o[0]}
    assert ids(client, "/Observation", **{"patient.identifier": "urn:mrn|A1"}) == {o[0], o[1]}
    assert client.get("/Observation", params={"code:text": "pulse"}).status_code == 400
    assert client.get("/Observation", params={"status:exact": "final"}).status_code == 400


def test_endpoint_name_is_a_string_parameter(client):
    r = client.post("/Endpoint", json={"resourceType": "Endpoint", "status": "active", "name": "Radiology PACS",
                                       "connectionType": {"code": "dicom-wado-rs"},
                                       "payloadType": [{"text": "any"}], "address": "https://pacs/x"})
    eid = r.json()["id"]
    assert ids(client, "/Endpoint", name="radiology p") == {eid}
    assert ids(client, "/Endpoint", **{"name:exact": "Radiology PACS"}) == {eid}
    assert ids(client, "/Endpoint", **{"name:contains": "pac"}) == {eid}
    assert ids(client, "/Endpoint", name="pacs") == set()


def test_paging_is_stable(client, server, data):
    for i in range(7):
        client.post("/Endpoint", json={"resourceType": "Endpoint", "status": "test", "name": f"ep{i}",
                                       "connectionType": {"code": "hl7-fhir-rest"},
                                       "payloadType": [{"text": "any"}], "address": f"https://x/{i}"})
    seen: list[str] = []
    url = "/Endpoint?status=test&_count=3"
    first = client.get(url).json()
    assert first["total"] == 7
    page, pages = first, 0
    while True:
        pages += 1
        seen += [e["resource"]["id"] for e in page.get("entry", [])]
        nxt = [lk["url"] for lk in page["link"] if lk["relation"] == "next"]
        if pages == 1:  # changes while paging: an update and a new match must not shift pages
            first_id = seen[0]
            res = client.get(f"/Endpoint/{first_id}").json()
            client.put(f"/Endpoint/{first_id}", json={**res, "name": "renamed"})
            client.post("/Endpoint", json={"resourceType": "Endpoint", "status": "test",
                                           "connectionType": {"code": "hl7-fhir-rest"},
                                           "payloadType": [{"text": "any"}], "address": "https://x/late"})
        if not nxt:
            break
        page = httpx.get(nxt[0], headers=AUTH).json()
    assert pages == 3 and len(seen) == 7 and len(set(seen)) == 7
    assert client.get("/Endpoint", params={"_count": 0}).json()["total"] >= 8
    assert client.get("/Endpoint", params={"_cursor": "garbage"}).status_code == 400


def test_include(client, data):
    b = client.get("/ImagingStudy", params={"_include": "ImagingStudy:subject"}).json()
    modes = {(e["resource"]["resourceType"], e["search"]["mode"]) for e in b["entry"]}
    assert modes == {("ImagingStudy", "match"), ("Patient", "include")}
    assert b["total"] == 1
    inc = [e["resource"]["id"] for e in b["entry"] if e["search"]["mode"] == "include"]
    assert inc == [data["p2"]]

    b = client.get("/DiagnosticReport", params={"_include": "DiagnosticReport:subject:Patient"}).json()
    assert [e["resource"]["id"] for e in b["entry"] if e["search"]["mode"] == "include"] == [data["p1"]]
    b = client.get("/Observation", params={"_include": "Observation:patient", "patient": data["p1"]}).json()
    included = [e for e in b["entry"] if e["search"]["mode"] == "include"]
    assert len(included) == 1 and included[0]["resource"]["id"] == data["p1"]
    assert client.get("/Observation", params={"_include": "Observation:code"}).status_code == 400


def test_post_search(client, data):
    r = client.post("/Observation/_search", data={"patient": data["p2"]},
                    headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert r.status_code == 200 and {e["resource"]["id"] for e in r.json()["entry"]} == {data["obs"][2]}


def test_type_history(client, data):
    b = client.get("/Observation/_history", params={"_count": 2}).json()
    assert b["type"] == "history" and b["total"] >= 3 and len(b["entry"]) == 2
    nxt = [lk["url"] for lk in b["link"] if lk["relation"] == "next"]
    b2 = httpx.get(nxt[0], headers=AUTH).json()
    assert not {e["fullUrl"] for e in b["entry"]} & {e["fullUrl"] for e in b2["entry"]}


def test_date_range_precision():
    lo, hi = date_range("2024")
    assert hi - lo == 366 * 86400
    lo, hi = date_range("2024-02")
    assert hi - lo == 29 * 86400
    lo, hi = date_range("2024-12-31T23:59:59.5Z")
    assert round(hi - lo, 3) == 0.001
    with pytest.raises(ValueError):
        date_range("2024-13-40")
