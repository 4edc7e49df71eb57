"""The FHIR listener against hostile and careless clients (issue 9, items 1, 2, 6 and 13).

Every error a client can cause is a 4xx OperationOutcome (validated with fhir.resources)
that names what is wrong, never a 500, never a Python exception name; required bindings
are enforced on every write path; the store being down is a 503 with Retry-After; and at
the HTTP level (raw sockets, plain and TLS) slow or greedy clients are answered and closed
within the configured limits while others are still served.
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import ssl
import time
from pathlib import Path

import httpx
import pytest
import structlog
from conftest import wait_until
from fhir.resources.R4B import get_fhir_model_class
from fhir_support import TOKEN, FhirServer, adt_bundle
from http_peers import until_closed
from sqlalchemy import func, select, text

from engine.store import schema
from engine.store.fhir.tables import fhir_index, fhir_resources, fhir_versions

AUTH = {"Authorization": f"Bearer {TOKEN}"}
FHIR_JSON = {"Content-Type": "application/fhir+json"}
PY_NAMES = re.compile(r"\b(\w+Error|\w+Exception|Traceback)\b|<class '")
OperationOutcome = get_fhir_model_class("OperationOutcome")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = FhirServer(tmp_path_factory.mktemp("fhir-hostile")).start()
    yield s
    s.stop()


@pytest.fixture
def client(server):
    with httpx.Client(base_url=server.base_url, headers=AUTH, timeout=30) as c:
        yield c


def assert_outcome(r: httpx.Response, *statuses: int) -> dict:
    """A 4xx (or one of ``statuses``) whose body is a valid OperationOutcome in plain words."""
    if statuses:
        assert r.status_code in statuses, (r.status_code, r.text[:500])
    else:
        assert r.status_code < 500, (r.status_code, r.text[:500])
    assert r.headers["content-type"].startswith("application/fhir+json"), r.headers
    body = r.json()
    assert body["resourceType"] == "OperationOutcome", body
    OperationOutcome.model_validate(body)
    assert not PY_NAMES.search(r.text), r.text
    return body


def expressions(outcome: dict) -> list[str]:
    return [x for issue in outcome["issue"] for x in issue.get("expression", [])]


def rows(server) -> tuple[int, int, int, int]:
    with server.store.engine.connect() as c:
        return tuple(c.execute(select(func.count()).select_from(t)).scalar_one()
                     for t in (fhir_resources, fhir_versions, fhir_index, schema.messages))


def patient(mrn: str, **extra) -> dict:
    return {"resourceType": "Patient", "identifier": [{"system": "urn:oid:1.2.3", "value": mrn}],
            "name": [{"family": "Hostile", "given": ["Ann"]}], "gender": "female", **extra}


# -- item 6: the samples of the issue ----------------------------------------------
def test_issue_samples_are_4xx(client):
    pid = client.post("/Patient", json=patient("H-1")).json()["id"]
    assert_outcome(client.get(f"/Patient/{pid}/_history/99999999999999999999"), 404)
    assert_outcome(client.get(f"/Patient/{pid}/_history/%C2%B2"), 404)  # "²".isdigit() is true
    r = client.get("/AuditEvent", params={"_id": "99999999999999999999"})
    assert r.status_code == 200 and r.json()["total"] == 0
    assert_outcome(client.get("/AuditEvent/99999999999999999999"), 404)
    assert_outcome(client.get("/AuditEvent", params={"_count": "99999999999999999999999"}), 400)
    bundle = {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"resource": patient("H-2"), "request": {"method": "POST", "url": "Patient", "ifNoneExist": True}}]}
    out = assert_outcome(client.post("/", json=bundle), 400)
    assert expressions(out) == ["Bundle.entry[0].request.ifNoneExist"]
    out = assert_outcome(client.post("/Patient", content=b'{"resourceType":"\\ud800"}', headers=FHIR_JSON), 400)
    assert "surrogate" in out["issue"][0]["diagnostics"]
    deep = b'{"resourceType":"Patient","extension":' + b"[" * 1000 + b"]" * 1000 + b"}"
    assert_outcome(client.post("/Patient", content=deep, headers=FHIR_JSON), 400)
    assert_outcome(client.post("/", content=b"[" * 100_000, headers=FHIR_JSON), 400)
    # a KeyError inside fhir.resources used to be the whole message
    out = assert_outcome(client.post("/Encounter", json={"resourceType": "Encounter", "status": "planned",
                                                         "class": {"code": "AMB"},
                                                         "contained": [{"resourceType": "Nope"}]}), 400)
    assert expressions(out) == ["Encounter.contained[0].resourceType"]


def test_messages_name_the_element(client):
    cases = [
        ({"name": {"family": "x"}}, "Patient.name"),
        ({"name": [{"family": ["x"]}]}, "Patient.name[0].family"),
        ({"active": "yes"}, "Patient.active"),  # pydantic would store "yes" as true
        ({"telecom": [{"system": None}]}, "Patient.telecom[0].system"),
        ({"birthDate": "1970-13-01"}, "Patient.birthDate"),
        ({"bogus": 1}, "Patient.bogus"),
        ({"contact": []}, "Patient.contact"),
    ]
    for extra, where in cases:
        out = assert_outcome(client.post("/Patient", json=patient("H-el", **extra)), 400)
        assert where in expressions(out), (extra, out)
        assert all(i["diagnostics"].startswith(i["expression"][0]) for i in out["issue"] if "expression" in i)


def test_bad_bytes_are_400(client):
    for body in (b'{"resourceType":"Patient","name":[{"family":"\xff"}]}',  # not UTF-8
                 '{"resourceType":"Patient"}'.encode("utf-16"),  # json.loads would take it
                 b'{"resourceType":"Patient","multipleBirthInteger":NaN}',
                 b'{"resourceType":"Patient","extension":[{"url":"u","valueDecimal":1e400}]}',
                 b'{"resourceType":"Patient","multipleBirthInteger":' + b"9" * 5000 + b"}",
                 b"", b"null", b"[]", b'"Patient"', b"{"):
        assert_outcome(client.post("/Patient", content=body, headers=FHIR_JSON), 400)
    out = assert_outcome(client.post("/Patient", content=b'{"resourceType":"Patient","x":"\\udfff"}',
                                     headers=FHIR_JSON), 400)
    assert "surrogate" in out["issue"][0]["diagnostics"]
    ok = client.post("/Patient", content='{"resourceType":"Patient","name":[{"family":"\\ud83d\\ude00 é"}]}'
                     .encode(), headers=FHIR_JSON)  # a surrogate pair is one character: fine
    assert ok.status_code == 201, ok.text
    assert ok.json()["name"][0]["family"] == "\U0001f600 é"


def test_search_and_history_numbers(client):
    for path, params in [
        ("/Patient", {"_lastUpdated": "9999-12-31T23:59:59.9999"}),
        ("/Patient", {"_lastUpdated": "0001-01-01T00:00:00-05:00"}),
        ("/Patient", {"_count": "99999999999999999999"}),
        ("/Patient", {"_cursor": "WzFlMzAsIDFd"}),  # [1e30, 1]
        ("/Patient", {"_cursor": "Wzk5OTk5OTk5OTk5OTk5OTk5OTk5OTksIDFd"}),  # [99999999999999999999999, 1]
        ("/Patient/_history", {"_cursor": "Wzk5OTk5OTk5OTk5OTk5OTk5OTk5OTksIDFd"}),
        ("/Patient/_history", {"_since": "9999-12-31T23:59:59.9999Z"}),
        ("/Observation", {"date": "ge9999-12-31T23:59:59.9999"}),
        ("/AuditEvent", {"date": "9999-12-31T23:59:59.9999"}),
        ("/AuditEvent", {"_cursor": "99999999999999999999"}),
    ]:
        r = client.get(path, params=params)
        assert r.status_code < 500, (path, params, r.text)
        if r.status_code >= 400:
            assert_outcome(r)
    created = client.post("/Patient", json=patient("H-date", birthDate="9999-12-31"))
    assert created.status_code == 201, created.text
    odd = client.post("/Observation", json={"resourceType": "Observation", "status": "final", "code": {"text": "x"},
                                            "effectiveDateTime": "9999-12-31T23:59:59.9999+14:00"})
    assert odd.status_code in (201, 400), odd.text  # indexed or refused, never a 500


# -- item 13: required bindings -------------------------------------------------------
@pytest.mark.parametrize(("resource", "where"), [
    (patient("B-1", gender="not-a-gender"), "Patient.gender"),
    (patient("B-2", telecom=[{"system": "phone", "value": "1", "use": "bogus"}]), "Patient.telecom[0].use"),
    (patient("B-3", telecom=[{"system": "pager2", "value": "1"}]), "Patient.telecom[0].system"),
    (patient("B-4", name=[{"use": "nick", "family": "x"}]), "Patient.name[0].use"),
    (patient("B-5", address=[{"use": "home", "type": "igloo"}]), "Patient.address[0].type"),
    ({**patient("B-6"), "identifier": [{"use": "primary", "value": "x"}]}, "Patient.identifier[0].use"),
    (patient("B-7", contact=[{"gender": "x"}]), "Patient.contact[0].gender"),
    ({"resourceType": "Observation", "status": "bogus-status", "code": {"text": "x"}}, "Observation.status"),
    ({"resourceType": "Observation", "status": "final", "code": {"text": "x"},
      "valueQuantity": {"value": 1, "comparator": "~"}}, "Observation.valueQuantity.comparator"),
    ({"resourceType": "Encounter", "status": "walking", "class": {"code": "AMB"}}, "Encounter.status"),
    ({"resourceType": "DiagnosticReport", "status": "done", "code": {"text": "x"}}, "DiagnosticReport.status"),
    ({"resourceType": "ServiceRequest", "status": "active", "intent": "wish", "subject": {"reference": "Patient/x"}},
     "ServiceRequest.intent"),
    ({"resourceType": "ServiceRequest", "status": "active", "intent": "order", "priority": "now",
      "subject": {"reference": "Patient/x"}}, "ServiceRequest.priority"),
    ({"resourceType": "ImagingStudy", "status": "done", "subject": {"reference": "Patient/x"}}, "ImagingStudy.status"),
    ({"resourceType": "Endpoint", "status": "on", "connectionType": {"code": "hl7-fhir-rest"},
      "payloadType": [{"text": "x"}], "address": "https://x"}, "Endpoint.status"),
    (patient("B-8", text={"status": "made-up", "div": '<div xmlns="http://www.w3.org/1999/xhtml">x</div>'}),
     "Patient.text.status"),
])
def test_required_bindings_on_create_and_update(client, server, resource, where):
    before = rows(server)
    out = assert_outcome(client.post(f"/{resource['resourceType']}", json=resource), 400)
    assert where in expressions(out)
    assert any(i["code"] == "code-invalid" for i in out["issue"])
    out = assert_outcome(client.put(f"/{resource['resourceType']}/bind-x", json={**resource, "id": "bind-x"}), 400)
    assert where in expressions(out)
    assert rows(server) == before


def test_required_bindings_in_bundles(client, server):
    before = rows(server)
    b = adt_bundle("B-TX", "V-TX", "O-TX")
    b["entry"][2]["resource"]["status"] = "bogus-status"
    out = assert_outcome(client.post("/", json=b), 400)
    assert expressions(out) == ["Bundle.entry[2].resource.status"]
    assert rows(server) == before  # nothing of the transaction is left behind
    b = adt_bundle("B-TX", "V-TX", "O-TX")
    b["entry"][0]["request"]["method"] = "FETCH"
    out = assert_outcome(client.post("/", json=b), 400)
    assert expressions(out) == ["Bundle.entry[0].request.method"]
    assert rows(server) == before
    batch = {"resourceType": "Bundle", "type": "batch", "entry": [
        {"resource": patient("B-BATCH", gender="nope"), "request": {"method": "POST", "url": "Patient"}},
        {"resource": patient("B-BATCH-OK"), "request": {"method": "POST", "url": "Patient"}}]}
    r = client.post("/", json=batch)
    assert r.status_code == 200, r.text
    first, second = r.json()["entry"]
    assert first["response"]["status"].startswith("400")
    OperationOutcome.model_validate(first["response"]["outcome"])
    assert first["response"]["outcome"]["issue"][0]["expression"] == ["Bundle.entry[0].resource.gender"]
    assert second["response"]["status"].startswith("201")


def test_store_destination_refuses_bad_codes(server):
    from engine.components import DeliveryError
    from engine.envelope import Envelope
    from engine.store.fhir.handler import store_fhir

    b = adt_bundle("B-DEST", "V-DEST", "O-DEST")
    b["entry"][0]["resource"]["gender"] = "m"
    before = rows(server)
    env = Envelope(channel="x", kind="fhir", payload=json.dumps(b).encode())
    with pytest.raises(DeliveryError) as e, server.store.engine.begin() as conn:
        store_fhir(server.ctx, conn, env)
    assert e.value.permanent
    assert rows(server) == before


# -- item 6: the store unreachable, and the last resort ----------------------------
class SqliteOutage:
    """The database file is moved away and a directory put at its path: nothing can open it."""

    def __init__(self, url: str, tmp: Path) -> None:
        self.db = Path(url.removeprefix("sqlite:///"))
        self.aside = tmp / "aside"

    def begin(self) -> None:
        self.aside.mkdir()
        for f in self.db.parent.glob(self.db.name + "*"):
            shutil.move(f, self.aside / f.name)
        self.db.mkdir()

    def end(self) -> None:
        self.db.rmdir()
        for f in self.aside.iterdir():
            shutil.move(f, self.db.parent / f.name)


class PostgresOutage:
    """The database stops taking connections and every session in it is ended (as a restart does)."""

    def __init__(self, url: str, tmp: Path) -> None:
        from sqlalchemy import create_engine
        from sqlalchemy.engine import make_url

        self.name = make_url(url).database
        self.admin = create_engine(make_url(url).set(database="postgres"), isolation_level="AUTOCOMMIT")

    def begin(self) -> None:
        with self.admin.connect() as c:
            try:
                c.execute(text(f'ALTER DATABASE "{self.name}" ALLOW_CONNECTIONS false'))
            except Exception as e:  # a role that does not own its test database
                pytest.skip(f"cannot take the test database offline: {type(e).__name__}")
            c.execute(text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = :d "
                           "AND pid <> pg_backend_pid()"), {"d": self.name})

    def end(self) -> None:
        with self.admin.connect() as c:
            c.execute(text(f'ALTER DATABASE "{self.name}" ALLOW_CONNECTIONS true'))
        self.admin.dispose()


def test_store_down_is_503_then_recovers(tmp_path, store_url):
    s = FhirServer(tmp_path / "down", store_url=store_url).start()
    outage = (SqliteOutage if store_url.startswith("sqlite") else PostgresOutage)(store_url, tmp_path)
    try:
        c = httpx.Client(base_url=s.base_url, headers=AUTH, timeout=30)
        pid = c.post("/Patient", json=patient("DOWN-1")).json()["id"]
        outage.begin()
        try:
            s.store.engine.dispose()
            for r in (c.get(f"/Patient/{pid}"), c.get("/Patient", params={"identifier": "DOWN-1"}),
                      c.get("/Patient/_history"), c.post("/Patient", json=patient("DOWN-2")),
                      c.put(f"/Patient/{pid}", json={**patient("DOWN-1"), "id": pid}),
                      c.post("/", json=adt_bundle("DOWN-3", "V-DOWN", "O-DOWN")), c.get("/AuditEvent")):
                assert_outcome(r, 503)
                assert r.headers["retry-after"].isdigit()
        finally:
            outage.end()
        assert c.get(f"/Patient/{pid}").status_code == 200
        deadline = time.monotonic() + 20
        while (r := c.post("/Patient", json=patient("DOWN-2"))).status_code == 503 and time.monotonic() < deadline:
            time.sleep(0.5)  # the intake's own connection comes back at its own pace
        assert r.status_code == 201, r.text
    finally:
        s.stop()


def test_unexpected_failure_is_500_with_an_incident_id(tmp_path):
    """A stored body that no longer decrypts (tampered in the database) is nobody's client error."""
    server = FhirServer(tmp_path).start()
    try:
        client = httpx.Client(base_url=server.base_url, headers=AUTH, timeout=30)
        pid = client.post("/Patient", json=patient("H-TAMPER")).json()["id"]
        with server.store.engine.begin() as conn:
            blob = conn.execute(select(fhir_resources.c.blob_id).where(fhir_resources.c.id == pid)).scalar_one()
            conn.execute(text("UPDATE blobs SET nonce = :n WHERE id = :id"), {"n": b"\0" * 12, "id": blob})
        with structlog.testing.capture_logs() as logs:
            r = client.get(f"/Patient/{pid}")
        assert r.status_code == 500
        body = r.json()
        OperationOutcome.model_validate(body)
        assert not PY_NAMES.search(r.text) and "H-TAMPER" not in r.text
        incident = re.search(r"incident ([0-9a-f]{12})", body["issue"][0]["diagnostics"]).group(1)
        errors = [e for e in logs if e["event"] == "fhir.internal_error"]
        assert errors and errors[0]["incident"] == incident and errors[0]["error"] and errors[0]["where"]
    finally:
        server.stop()


# -- item 6: the class, by mutation ------------------------------------------------------
BAD_VALUES = [None, True, 0, -1, 1.5, 10**30, "", "x" * 3000, [], {}, [None], [{}], [[]], {"a": {"b": 1}},
              "2024-13-45", "urn:uuid:nope", "Patient/", "../../etc", "\u0000", "é" * 10]
BASES = {
    "Patient": patient("FZ"),
    "Observation": {"resourceType": "Observation", "status": "final", "code": {"text": "x"},
                    "subject": {"reference": "Patient/fz"}, "effectiveDateTime": "2024-01-01",
                    "valueQuantity": {"value": 1, "unit": "x"}},
    "Encounter": {"resourceType": "Encounter", "status": "planned", "class": {"code": "AMB"},
                  "period": {"start": "2024-01-01"}},
    "ServiceRequest": {"resourceType": "ServiceRequest", "status": "active", "intent": "order",
                       "subject": {"reference": "Patient/fz"}, "authoredOn": "2024-01-01"},
}
NESTED = {"Patient": ["name.0.family", "identifier.0.value", "identifier.0.system", "telecom", "birthDate",
                      "meta", "meta.lastUpdated", "id", "extension", "contained"],
          "Observation": ["subject.reference", "valueQuantity.value", "code.coding", "code", "effectiveDateTime",
                          "component"],
          "Encounter": ["class", "period.start", "subject", "status"],
          "ServiceRequest": ["intent", "subject", "authoredOn", "priority"]}


def _set(doc: dict, path: str, value) -> dict:
    out = json.loads(json.dumps(doc))
    node, parts = out, path.split(".")
    for p in parts[:-1]:
        node = node[int(p)] if isinstance(node, list) else node.setdefault(p, {})
    last = parts[-1]
    if isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value
    return out


def mutations():
    for rtype, base in BASES.items():
        for path in [*(k for k in base if k != "resourceType"), *NESTED[rtype]]:
            for value in BAD_VALUES:
                yield rtype, _set(base, path, value)


def check(r: httpx.Response, what) -> None:
    assert r.status_code < 500, (what, r.status_code, r.text[:300])
    if r.status_code >= 400:
        try:
            assert_outcome(r)
        except AssertionError as e:
            raise AssertionError(f"{what}: {e}") from None


def test_fuzz_writes(client):
    sent = 0
    for i, (rtype, body) in enumerate(mutations()):
        if i % 3 == 0:
            r = client.post(f"/{rtype}", json=body)
        elif i % 3 == 1:
            r = client.put(f"/{rtype}/fz-{i % 7}", json={**body, "id": f"fz-{i % 7}"})
        else:
            r = client.post("/", json={"resourceType": "Bundle", "type": "transaction" if i % 2 else "batch",
                                       "entry": [{"fullUrl": "urn:uuid:1", "resource": body,
                                                  "request": {"method": "POST", "url": rtype}}]})
        check(r, (rtype, body))
        sent += 1
    assert sent > 300


def test_fuzz_bundles_and_requests(client):
    good = {"resource": patient("FZ-B"), "request": {"method": "POST", "url": "Patient"}}
    entries = [None, 1, "x", [], {}, {"request": None}, {"request": []}, {"request": {"method": 5}},
               {"request": {"method": "POST"}}, {"request": {"method": "POST", "url": 5}},
               {"request": {"method": "POST", "url": "Patient"}, "resource": []},
               {"request": {"method": "POST", "url": "Patient"}, "resource": {"resourceType": 5}},
               {"request": {"method": "GET", "url": "Patient/x/_history/99999999999999999999"}},
               {"request": {"method": "GET", "url": "Patient/x/_history/²"}},
               {"request": {"method": "PUT", "url": "Patient?"}, "resource": patient("FZ")},
               {"request": {"method": "PUT", "url": "Patient?foo=bar"}, "resource": patient("FZ")},
               {"request": {"method": "POST", "url": "Patient", "ifNoneExist": "identifier="},
                "resource": patient("FZ")},
               {"request": {"method": "POST", "url": "Patient", "ifNoneExist": ["x"]}, "resource": patient("FZ")},
               {"request": {"method": "PUT", "url": "Patient/a", "ifMatch": 3}, "resource": patient("FZ")},
               {"request": {"method": "PUT", "url": "Patient/a", "ifMatch": "W/\"99999999999999999999\""},
                "resource": patient("FZ")},
               {"request": {"method": "DELETE", "url": "Patient?identifier=|"}},
               {"request": {"method": "POST", "url": "Patient"}, "fullUrl": 5, "resource": patient("FZ")},
               {"request": {"method": "POST", "url": "Patient"}, "resource": {**patient("FZ"),
                                                                              "generalPractitioner": [
                                                                                  {"reference": "urn:uuid:x"}]}},
               {"request": {"method": "POST", "url": "Observation"},
                "resource": {**BASES["Observation"], "subject": {"reference": "Patient?identifier=a|b"}}},
               {"request": {"method": "POST", "url": "Basic"}, "resource": {"resourceType": "Basic"}}]
    sent = 0
    for btype in ("transaction", "batch", "collection", 5, None):
        for entry in entries:
            for shape in ([entry], [good, entry], entry):
                r = client.post("/", json={"resourceType": "Bundle", "type": btype, "entry": shape})
                check(r, (btype, entry))
                sent += 1
    assert sent > 300


def test_fuzz_reads_and_headers(client):
    pid = client.post("/Patient", json=patient("FZ-R")).json()["id"]
    sent = 0
    ids = ["", "x" * 65, "é", "a b", "%00", "..", "-", "99999999999999999999", "%ED%A0%80", pid]
    for rid in ids:
        for path in (f"/Patient/{rid}", f"/Patient/{rid}/_history", f"/Patient/{pid}/_history/{rid}",
                     f"/AuditEvent/{rid}", f"/Observation/{rid}"):
            for method in ("GET", "DELETE", "PATCH"):
                check(client.request(method, path), (method, path))
                sent += 1
    params = [("_count", v) for v in ("-1", "abc", "1e3", "٣", "", "99999999999999999999")]
    params += [("_sort", v) for v in ("name", "-", "_id,,", "")]
    params += [("_offset", v) for v in ("-5", "x")]
    params += [(k, v) for k in ("birthdate", "date", "_lastUpdated", "_since", "authored")
               for v in ("x", "ge", "2024-02-30", "eq9999", "ap2024", "gt2024-01-01T25:00", "sa-1")]
    params += [(k, v) for k in ("identifier", "subject", "patient", "_id", "status", "code", "_include",
                                "name", "family:exact", "gender:missing", "foo", "_cursor", "_format", "_summary")
               for v in ("", "|", "||", "a|b|c", "Patient/", "x" * 2000, "\u00e9", "%", "true")]
    for k, v in params:
        for rtype in ("Patient", "Observation", "AuditEvent"):
            check(client.get(f"/{rtype}", params={k: v}), (rtype, k, v))
            sent += 1
        check(client.get("/Patient/_history", params={k: v}), ("history", k, v))
        check(client.post("/Patient/_search", data={k: v}), ("_search", k, v))
        sent += 2
    for headers in ({"Prefer": "return=bogus"}, {"Prefer": "handling=strict, return=representation;;"},
                    {"Prefer": "=" * 50}, {"Content-Type": "text/plain"}, {"Content-Type": "application/xml"},
                    {"Content-Type": "multipart/form-data; boundary=x"}, {"Content-Type": ";;;"},
                    {"Accept": "application/fhir+xml"}, {"Accept": "text/html"}, {"If-Match": "garbage"},
                    {"If-Match": 'W/"99999999999999999999"'}, {"If-None-Exist": "foo=bar"},
                    {"If-None-Exist": "identifier=urn:oid:1.2.3|FZ-R"}, {"If-None-Exist": "&&&"},
                    {"If-None-Match": "*"}, {"Content-Length": "abc"}):
        for method, path in (("POST", "/Patient"), ("PUT", f"/Patient/{pid}"), ("GET", f"/Patient/{pid}"),
                             ("PUT", "/Patient?identifier=urn:oid:1.2.3|FZ-R"), ("POST", "/")):
            try:
                r = client.request(method, path, content=json.dumps(patient("FZ-R", id=pid)).encode(),
                                   headers=headers)
            except httpx.HTTPError:  # h11 on our side refuses some of these itself: no answer to check
                continue
            check(r, (method, path, headers))
            sent += 1
    assert sent > 300


# -- items 1 and 2: the HTTP level, with raw sockets -----------------------------------------
SLOW = {"header_timeout": 1.0, "body_timeout": 1.5, "idle_timeout": 1.0, "handshake_timeout": 1.0}
MARGIN = 3.0  # the machine is shared and slow: a timeout must fire, not fire to the millisecond


@pytest.fixture(scope="module")
def slow(tmp_path_factory):
    s = FhirServer(tmp_path_factory.mktemp("fhir-slow"), **SLOW).start()
    yield s
    s.stop()


def connect(server, *, tls: ssl.SSLContext | None = None) -> socket.socket:
    sock = socket.create_connection(server.listener.address, timeout=15)
    return tls.wrap_socket(sock, server_hostname="localhost") if tls is not None else sock


def response_outcome(data: bytes, status: int) -> dict:
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(f"HTTP/1.1 {status} ".encode()), data[:300]
    assert b"content-type: application/fhir+json" in head.lower()
    outcome = json.loads(body)
    OperationOutcome.model_validate(outcome)
    return outcome


def request_head(method: str, path: str, **headers: str) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: localhost", f"Authorization: Bearer {TOKEN}",
             *(f"{k.replace('_', '-')}: {v}" for k, v in headers.items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def test_silent_connection_is_closed(slow):
    with connect(slow) as sock:
        data, took = until_closed(sock)
    assert data == b"" and 0.8 <= took <= SLOW["idle_timeout"] + MARGIN


def test_slowloris_headers_get_408(slow):
    with connect(slow) as sock:
        data, took = until_closed(sock, dribble=b"GET /fhir/metadata HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 200)
    assert 0.9 <= took <= SLOW["header_timeout"] + MARGIN
    assert "headers" in response_outcome(data, 408)["issue"][0]["diagnostics"]


def test_slow_body_gets_408(slow):
    with connect(slow) as sock:
        sock.sendall(request_head("POST", "/fhir/Patient", Content_Type="application/fhir+json",
                                  Content_Length="500"))
        data, took = until_closed(sock, dribble=b'{"resourceType":"Patient"' + b" " * 400)
    assert 1.3 <= took <= SLOW["body_timeout"] + MARGIN
    assert "body" in response_outcome(data, 408)["issue"][0]["diagnostics"]


def test_keep_alive_idle_is_closed(slow):
    with connect(slow) as sock:
        sock.sendall(b"GET /fhir/metadata HTTP/1.1\r\nHost: x\r\n\r\n")
        data, took = until_closed(sock)
    assert data.startswith(b"HTTP/1.1 200 ") and b"CapabilityStatement" in data
    assert took <= SLOW["idle_timeout"] + MARGIN


def test_large_response_to_a_slow_reader_is_whole_and_a_non_reader_is_cut_off(slow):
    big = patient("BIG", extension=[{"url": "urn:x", "valueString": "x" * 6_000_000}])
    pid = httpx.post(slow.base_url + "/Patient", json=big, headers=AUTH, timeout=60).json()["id"]

    def get() -> socket.socket:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(slow.listener.address)
        sock.sendall(request_head("GET", f"/fhir/Patient/{pid}"))
        return sock

    with get() as reader:  # 256 KiB every half second: ~12 s, many times idle_timeout
        reader.settimeout(10)
        data, start = b"", time.monotonic()
        while len(data) < 6_000_000:
            burst = len(data) + 256 * 1024
            while len(data) < burst and (chunk := reader.recv(65536)):
                data += chunk
            if not chunk:
                break
            time.sleep(0.5)
        head, _, body = data.partition(b"\r\n\r\n")
        length = int(re.search(rb"content-length: (\d+)", head.lower()).group(1))
        while len(body) < length and (chunk := reader.recv(1 << 20)):
            body += chunk
        assert len(body) == length and json.loads(body)["id"] == pid
        assert time.monotonic() - start > 3 * SLOW["idle_timeout"]
    with get() as sleeper:  # never reads: the server gives up on it
        time.sleep(SLOW["idle_timeout"] + MARGIN)
        sleeper.settimeout(5)
        got = 0
        try:
            while chunk := sleeper.recv(1 << 20):
                got += len(chunk)
        except OSError:
            pass
        assert got < 6_000_000


def test_slow_clients_do_not_starve_others(slow):
    socks = [connect(slow) for _ in range(20)]
    try:
        for s in socks:
            s.sendall(b"GET /fhir/metadata HTTP/1.1\r\nHost: x\r\nX-Partial: ")
        start = time.monotonic()
        r = httpx.get(slow.base_url + "/Patient", headers=AUTH, timeout=10)
        assert r.status_code == 200 and time.monotonic() - start < 2.0
        for s in socks:  # and each of them is answered 408 and closed
            data, _ = until_closed(s, limit=SLOW["header_timeout"] + MARGIN)
            response_outcome(data, 408)
    finally:
        for s in socks:
            s.close()


def test_connection_cap(tmp_path):
    s = FhirServer(tmp_path, max_connections=3, idle_timeout=30).start()
    held = [connect(s) for _ in range(3)]
    try:
        time.sleep(0.3)
        with connect(s) as extra:
            extra.sendall(b"GET /fhir/metadata HTTP/1.1\r\nHost: x\r\n\r\n")
            data, took = until_closed(extra)
        assert took < 2 and b"retry-after: 5" in data.lower()
        response_outcome(data, 503)
        for h in held:
            h.close()
        deadline = time.monotonic() + 10
        while True:  # places are given back as the server sees the closes
            r = httpx.get(s.base_url + "/metadata", timeout=10)
            if r.status_code == 200 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert r.status_code == 200
    finally:
        for h in held:
            h.close()
        s.stop()


@pytest.mark.parametrize(("head", "status"), [
    (b"GET /fhir/metadata HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20_000 + b"\r\n\r\n", 431),
    (b"GET /fhir/metadata HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(150)) + b"\r\n",
     431),
    (b"GET /fhir/Patient?name=" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414),
    (b"HELLO THERE\r\n\r\n", 400),
    (b"GET /fhir/metadata HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n", 400),
    (b"GET /fhir/metadata HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n", 400),
    (b"GET /fhir/Pat\xc3\xa9ient HTTP/1.1\r\nHost: x\r\n\r\n", 400),
])
def test_bad_heads_get_outcomes(slow, head, status):
    with connect(slow) as sock:
        sock.sendall(head)
        data, took = until_closed(sock)
    response_outcome(data, status)
    assert took < MARGIN


def test_declared_huge_body_is_refused_unread(slow):
    with connect(slow) as sock:
        sock.sendall(request_head("POST", "/fhir/Patient", Content_Type="application/fhir+json",
                                  Content_Length=str(10**12)))
        data, took = until_closed(sock)
    assert took < MARGIN
    response_outcome(data, 413)


def test_streamed_body_over_the_limit_is_413(tmp_path):
    s = FhirServer(tmp_path, max_body_bytes=50_000, body_budget_bytes=50_000).start()
    try:
        with connect(s) as sock:
            sock.sendall(request_head("POST", "/fhir/Patient", Content_Type="application/fhir+json",
                                      Transfer_Encoding="chunked"))
            chunk = b"%x\r\n%s\r\n" % (10_000, b" " * 10_000)
            sock.settimeout(0.05)
            data, sent = b"", 0
            while not data and sent < 200:  # the answer comes while we are still sending
                try:
                    sock.sendall(chunk)
                    sent += 1
                    data += sock.recv(65536)
                except TimeoutError:
                    continue
                except OSError:
                    break
            rest, _ = until_closed(sock)
        response_outcome(data + rest, 413)
        assert sent < 200
    finally:
        s.stop()


def test_bodies_that_would_parse_into_too_much_memory_are_413(tmp_path):
    """~25 bytes of Python objects per byte of [{},{},...]: refused before json.loads builds them,
    while a real Bundle of the same size (~8 per byte) is taken."""
    s = FhirServer(tmp_path, max_body_bytes=1_000_000, body_budget_bytes=1_000_000).start()
    try:
        c = httpx.Client(base_url=s.base_url, headers={**AUTH, **FHIR_JSON}, timeout=60)
        bomb = b'{"resourceType":"Bundle","type":"batch","entry":[' + b",".join([b"{}"] * 300_000) + b"]}"
        out = assert_outcome(c.post("/", content=bomb), 413)
        assert "MiB" in out["issue"][0]["diagnostics"]
        entry = {"resource": {"resourceType": "Observation", "status": "final", "code": {"text": "x"},
                              "valueQuantity": {"value": 72, "unit": "/min"}},
                 "request": {"method": "POST", "url": "Observation"}}
        real = json.dumps({"resourceType": "Bundle", "type": "batch", "entry": [entry] * 4000}).encode()
        assert len(bomb) > len(real) > 500_000
        r = c.post("/", content=real)
        assert r.status_code == 200, r.text[:300]
        assert all(e["response"]["status"].startswith("201") for e in r.json()["entry"])
    finally:
        s.stop()


def test_body_budget_makes_a_request_wait_then_503(tmp_path):
    s = FhirServer(tmp_path, max_body_bytes=200_000, body_budget_bytes=200_000, body_timeout=3).start()
    try:
        body = json.dumps(patient("BUDGET", text={"status": "generated", "div": '<div xmlns="http://www.w3.org/'
                                                  '1999/xhtml">' + "x" * 150_000 + "</div>"})).encode()
        with connect(s) as holder:  # declares a whole budget's worth and sends half of it
            holder.sendall(request_head("POST", "/fhir/Patient", Content_Type="application/fhir+json",
                                        Content_Length=str(200_000)) + body[:50_000])
            wait_until(lambda: s.listener.api.budget.used == 200_000)  # the holder has the whole budget
            start = time.monotonic()
            r = httpx.post(s.base_url + "/Patient", content=body, headers={**AUTH, **FHIR_JSON}, timeout=15)
            assert_outcome(r, 503)
            assert r.headers["retry-after"] == "5" and 1.0 <= time.monotonic() - start <= 1.5 + MARGIN
        wait_until(lambda: s.listener.api.budget.used == 0)  # the holder is gone: its reservation with it
        r = httpx.post(s.base_url + "/Patient", content=body, headers={**AUTH, **FHIR_JSON}, timeout=15)
        assert r.status_code == 201, r.text
        assert s.listener.api.budget.used == 0
    finally:
        s.stop()


# -- the same over TLS: the handshake has its own timeout, the cap applies before it ---------
@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    from tls_certs import make_pki

    return make_pki(tmp_path_factory.mktemp("pki-hostile"))


@pytest.fixture(scope="module")
def tls_slow(tmp_path_factory, pki):
    s = FhirServer(tmp_path_factory.mktemp("fhir-tls-slow"), max_connections=6,
                   tls={"cert": str(pki.server.cert), "key": str(pki.server.key)}, **SLOW).start()
    yield s
    s.stop()


def tls_ctx(pki) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(pki.ca))


def tls_rejections(server) -> int:
    a = schema.audit_events
    with server.store.engine.connect() as c:
        return c.execute(select(func.count()).where(a.c.action == "fhir.tls_rejected")).scalar_one()


def test_tls_silent_handshake_is_closed(tls_slow):
    before = tls_rejections(tls_slow)
    with connect(tls_slow) as sock:  # TCP only: no ClientHello
        data, took = until_closed(sock)
    assert data == b"" and 0.8 <= took <= SLOW["handshake_timeout"] + MARGIN
    with connect(tls_slow) as sock:  # half a ClientHello, then nothing
        sock.sendall(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")
        data, took = until_closed(sock)
    assert took <= SLOW["handshake_timeout"] + MARGIN
    time.sleep(0.3)
    # a peer that stays silent is a probe, logged, not a refused handshake in the audit trail
    # (asyncio reports its handshake timeout as ConnectionAbortedError)
    assert tls_rejections(tls_slow) == before


def test_tls_slow_clients_after_the_handshake(tls_slow, pki):
    with connect(tls_slow, tls=tls_ctx(pki)) as sock:
        data, took = until_closed(sock)
    assert data == b"" and took <= SLOW["idle_timeout"] + MARGIN
    with connect(tls_slow, tls=tls_ctx(pki)) as sock:
        data, took = until_closed(sock, dribble=b"GET /fhir/metadata HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 200)
    assert took <= SLOW["header_timeout"] + MARGIN
    response_outcome(data, 408)


def test_tls_cap_refuses_before_the_handshake(tmp_path, pki):
    # Its own server with a long handshake timeout: with tls_slow's 1 s, a stall of the machine
    # between the held connections and the extra one let the held ones time out first and the
    # extra one in. The server accepts in arrival order, so no wait is needed before the extra.
    s = FhirServer(tmp_path, max_connections=6, handshake_timeout=30,
                   tls={"cert": str(pki.server.cert), "key": str(pki.server.key)}).start()
    try:
        held = [connect(s) for _ in range(6)]  # six handshakes pending: the cap is reached
        try:
            start = time.monotonic()
            with pytest.raises((ssl.SSLError, OSError)):
                connect(s, tls=tls_ctx(pki)).close()
            assert time.monotonic() - start < 2.0
        finally:
            for h in held:
                h.close()
        deadline = time.monotonic() + 10
        while True:  # places are given back as the server sees the closes
            try:
                r = httpx.get(s.base_url.replace("127.0.0.1", "localhost") + "/metadata", verify=tls_ctx(pki),
                              timeout=10)
                break
            except httpx.TransportError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        assert r.status_code == 200
    finally:
        s.stop()


def test_structure_table_covers_every_stored_type():
    """A type added to SEARCH_PARAMS needs scripts/gen_fhir_structure.py run again."""
    from engine.store.fhir.params import STORED_TYPES
    from engine.store.fhir.structure import TABLE

    data = json.loads(TABLE.read_text())
    assert data["fhirVersion"] == "4.0.1" and "4.0.1" in data["source"]
    assert set(STORED_TYPES) <= set(data["types"]) and "Bundle.entry.request" in data["types"]
    assert data["types"]["Patient"]["gender"][2] == "http://hl7.org/fhir/ValueSet/administrative-gender"
