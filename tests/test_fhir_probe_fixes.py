"""The FHIR listener's answers to probe session 5b (docs/notes/fhir-probe-fixes.md), over HTTP.

If-Match on every write (one parser: ``*``, weak and strong tags, lists; malformed is 400),
Bundle checks (bdl-7, reference syntax, referential integrity), links that do not follow a
forged Host, no log noise on DELETE, and Content-Type: FHIR JSON in UTF-8 or 415.
"""

from __future__ import annotations

import json

import httpx
import pytest
import structlog
from fhir_support import AUTH, FhirServer, server_fixtures

server, client = server_fixtures("fhir-probe")


def patient(mrn: str, **extra) -> dict:
    return {
        "resourceType": "Patient",
        "identifier": [{"system": "urn:oid:1.2.3", "value": mrn}],
        "name": [{"family": "Probe", "given": ["Pat"]}],
        **extra,
    }


def outcome(r: httpx.Response, status: int) -> str:
    assert r.status_code == status, (r.status_code, r.text[:400])
    body = r.json()
    assert body["resourceType"] == "OperationOutcome", body
    return " ".join(i.get("diagnostics", "") for i in body["issue"])


def create(client: httpx.Client, mrn: str) -> str:
    r = client.post("/Patient", json=patient(mrn))
    assert r.status_code == 201, r.text
    assert r.headers["etag"] == 'W/"1"'
    return r.json()["id"]


# -- finding 2: DELETE honours If-Match --------------------------------------------------
def test_delete_with_a_stale_if_match_is_412_and_deletes_nothing(client):
    pid = create(client, "IFM-DEL-1")
    outcome(client.delete(f"/Patient/{pid}", headers={"If-Match": 'W/"9"'}), 412)
    assert client.get(f"/Patient/{pid}").status_code == 200
    assert client.delete(f"/Patient/{pid}", headers={"If-Match": '"1"'}).status_code == 204  # strong form too
    assert client.get(f"/Patient/{pid}").status_code == 410
    # deleted: no current version, so any If-Match (even *) fails
    outcome(client.delete(f"/Patient/{pid}", headers={"If-Match": "*"}), 412)


def test_conditional_delete_honours_if_match(client):
    pid = create(client, "IFM-DEL-2")
    query = {"identifier": "urn:oid:1.2.3|IFM-DEL-2"}
    outcome(client.delete("/Patient", params=query, headers={"If-Match": 'W/"2"'}), 412)
    assert client.get(f"/Patient/{pid}").status_code == 200
    assert client.delete("/Patient", params=query, headers={"If-Match": 'W/"1"'}).status_code == 204
    assert client.get(f"/Patient/{pid}").status_code == 410


def test_transaction_delete_entry_honours_if_match(client):
    pid = create(client, "IFM-DEL-3")
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [{"request": {"method": "DELETE", "url": f"Patient/{pid}", "ifMatch": 'W/"5"'}}],
    }
    outcome(client.post("/", json=bundle), 412)
    assert client.get(f"/Patient/{pid}").status_code == 200
    batch = {**bundle, "type": "batch"}
    r = client.post("/", json=batch)
    assert r.status_code == 200 and r.json()["entry"][0]["response"]["status"].startswith("412")
    assert client.get(f"/Patient/{pid}").status_code == 200


# -- finding 3: If-Match values ------------------------------------------------------------
def test_if_match_star_matches_any_current_version(client):
    pid = create(client, "IFM-STAR")
    r = client.put(f"/Patient/{pid}", json=patient("IFM-STAR", id=pid, active=True), headers={"If-Match": "*"})
    assert r.status_code == 200, r.text
    assert r.headers["etag"] == 'W/"2"'
    # no such resource: * has no current representation to match (RFC 9110 13.1.1)
    outcome(
        client.put("/Patient/ifm-star-none", json=patient("IFM-STAR-N", id="ifm-star-none"), headers={"If-Match": "*"}),
        412,
    )
    assert client.get("/Patient/ifm-star-none").status_code == 404


def test_if_match_lists_and_forms(client):
    pid = create(client, "IFM-LIST")
    r = client.put(
        f"/Patient/{pid}", json=patient("IFM-LIST", id=pid, active=True), headers={"If-Match": 'W/"7", W/"1"'}
    )
    assert r.status_code == 200, r.text
    r = client.put(f"/Patient/{pid}", json=patient("IFM-LIST", id=pid, active=False), headers={"If-Match": '"2"'})
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("value", ["", "garbage", "2", "W/2", '"2', 'W/"2",', '*, W/"2"'])
def test_malformed_if_match_is_400_on_every_write(client, value):
    pid = create(client, f"IFM-BAD-{abs(hash(value)) % 10_000}")
    headers = {"If-Match": value}
    outcome(client.put(f"/Patient/{pid}", json=patient("IFM-BAD", id=pid, active=True), headers=headers), 400)
    outcome(client.delete(f"/Patient/{pid}", headers=headers), 400)
    outcome(client.delete("/Patient", params={"_id": pid}, headers=headers), 400)
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [{"request": {"method": "DELETE", "url": f"Patient/{pid}", "ifMatch": value}}],
    }
    outcome(client.post("/", json=bundle), 400)
    r = client.get(f"/Patient/{pid}")
    assert r.status_code == 200 and r.headers["etag"] == 'W/"1"'


# -- finding 8: no warning on DELETE ------------------------------------------------------------
def test_delete_logs_no_extraction_warning(client):
    pid = create(client, "TERMS-DEL")
    pid2 = create(client, "TERMS-DEL-2")
    with structlog.testing.capture_logs() as logs:
        assert client.delete(f"/Patient/{pid}").status_code == 204
        assert client.delete(f"/Patient/{pid2}", headers={"If-Match": 'W/"1"'}).status_code == 204
        assert client.delete("/Patient", params={"identifier": "urn:oid:1.2.3|nobody"}).status_code == 204
    assert [e for e in logs if e.get("event") == "fhir.accepted"], logs
    assert not [e for e in logs if e.get("event") == "message_terms.extract_failed"], logs


# -- finding 10: Content-Type ----------------------------------------------------------------
@pytest.mark.parametrize(
    "ctype",
    [
        "application/json; charset=latin-1",
        "application/fhir+json;charset=ISO-8859-1",
        'application/fhir+json; charset="utf-16"',
    ],
)
def test_a_charset_other_than_utf8_is_415(client, ctype):
    body = json.dumps(patient("CT-LATIN", name=[{"family": "Müller"}])).encode("latin-1")
    outcome(client.post("/Patient", content=body, headers={"Content-Type": ctype}), 415)
    outcome(client.put("/Patient/ct-latin", content=body, headers={"Content-Type": ctype}), 415)
    bundle = json.dumps({"resourceType": "Bundle", "type": "batch", "entry": []}).encode()
    outcome(client.post("/", content=bundle, headers={"Content-Type": ctype}), 415)
    form = {"Content-Type": "application/x-www-form-urlencoded; charset=latin-1"}
    outcome(client.post("/Patient/_search", content=b"family=M\xfcller", headers=form), 415)
    assert client.get("/Patient", params={"identifier": "urn:oid:1.2.3|CT-LATIN"}).json()["total"] == 0


def test_a_body_without_content_type_is_415(client):
    body = json.dumps(patient("CT-NONE")).encode()
    outcome(client.post("/Patient", content=body), 415)
    outcome(client.put("/Patient/ct-none", content=body), 415)
    outcome(client.post("/Binary", content=json.dumps({"resourceType": "Binary", "contentType": "text/plain"})), 415)

    def chunked():
        yield body

    outcome(client.post("/Patient", content=chunked()), 415)  # no Content-Length either
    outcome(client.post("/Patient/_search", content=b"family=Probe"), 415)
    assert client.get("/Patient", params={"identifier": "urn:oid:1.2.3|CT-NONE"}).json()["total"] == 0


def test_utf8_and_no_body_are_still_taken(client):
    body = json.dumps(patient("CT-OK", name=[{"family": "Müller"}]), ensure_ascii=False).encode()
    for ctype in (
        "application/fhir+json; charset=utf-8",
        'application/json;charset="UTF-8"',
        "application/fhir+json; fhirVersion=4.0",
    ):
        r = client.post("/Patient", content=body, headers={"Content-Type": ctype})
        assert r.status_code == 201, (ctype, r.text)
    assert client.post("/Patient/_search", params={"family": "Müller"}).status_code == 200  # no body: no type needed
    pid = create(client, "CT-DEL")
    assert client.delete(f"/Patient/{pid}").status_code == 204


# -- finding 4: transaction and batch Bundle checks ------------------------------------------------
def _obs(subject: str, **extra) -> dict:
    return {
        "resourceType": "Observation",
        "status": "final",
        "code": {"text": "probe"},
        "subject": {"reference": subject},
        **extra,
    }


def _count(server, rtype: str) -> int:
    with server.store.engine.connect() as c:
        from sqlalchemy import func, select

        from engine.store.fhir.tables import fhir_resources

        return c.execute(
            select(func.count()).select_from(fhir_resources).where(fhir_resources.c.type == rtype)
        ).scalar_one()


@pytest.mark.parametrize("btype", ["transaction", "batch"])
def test_duplicate_full_url_is_400_naming_the_entries(client, server, btype):
    urn = "urn:uuid:0c7a3f6e-1111-4222-8333-444455556666"
    before = _count(server, "Patient")
    bundle = {
        "resourceType": "Bundle",
        "type": btype,
        "entry": [
            {"fullUrl": urn, "resource": patient("DUP-1"), "request": {"method": "POST", "url": "Patient"}},
            {
                "fullUrl": "urn:uuid:0c7a3f6e-1111-4222-8333-444455557777",
                "resource": _obs(urn),
                "request": {"method": "POST", "url": "Observation"},
            },
            {"fullUrl": urn, "resource": patient("DUP-2"), "request": {"method": "POST", "url": "Patient"}},
        ],
    }
    r = client.post("/", json=bundle)
    text = outcome(r, 400)
    assert "Bundle.entry[2].fullUrl" in text and "Bundle.entry[0].fullUrl" in text and "bdl-7" in text
    assert r.json()["issue"][0]["expression"] == ["Bundle.entry[2].fullUrl"]
    assert urn not in r.text
    assert _count(server, "Patient") == before


@pytest.mark.parametrize(
    "ref",
    [
        "Organization/../../x",
        "Patient/../Patient/x",
        "Patient/a/../b",
        "../Patient/x",
        "Patient/",
        "Patient//x",
        "patient/x",
        "Patient/x y",
        "http://h/fhir/../Patient/x",
        "http://h/fhir/./Patient/x",
        "ftp://h/Patient/x",
        "javascript:alert(1)",
        "Patient/x?y=1#z",
        "NotAType/x",
        "",
    ],
)
def test_invalid_references_are_400_on_every_write(client, server, ref):
    pid = create(client, "REF-SYNTAX")
    before = _count(server, "Observation")
    body = _obs(ref, performer=[{"reference": f"Patient/{pid}"}])
    want = "Observation.subject.reference"
    r = client.post("/Observation", json=body)
    assert outcome(r, 400) and r.json()["issue"][0]["expression"] == [want], r.text
    outcome(client.put("/Observation/ref-syntax", json={**body, "id": "ref-syntax"}), 400)
    for btype in ("transaction", "batch"):
        r = client.post(
            "/",
            json={
                "resourceType": "Bundle",
                "type": btype,
                "entry": [
                    {"resource": patient("REF-SYN-OK"), "request": {"method": "POST", "url": "Patient"}},
                    {"resource": body, "request": {"method": "POST", "url": "Observation"}},
                ],
            },
        )
        if btype == "transaction":
            assert outcome(r, 400) and r.json()["issue"][0]["expression"] == [
                "Bundle.entry[1].resource.subject.reference"
            ], r.text
        else:
            assert r.status_code == 200 and r.json()["entry"][1]["response"]["status"].startswith("400")
    assert _count(server, "Observation") == before


def test_valid_reference_forms_are_taken(client):
    pid = create(client, "REF-OK")
    for ref in (
        f"Patient/{pid}",
        f"Patient/{pid}/_history/1",
        f"http://127.0.0.1:1/fhir/Patient/{pid}",
        "https://other.example/fhir/Patient/123",
        "Practitioner/not-stored-here",
        "#p1",
    ):
        body = _obs(ref)
        if ref == "#p1":
            body["contained"] = [{"resourceType": "Patient", "id": "p1"}]
        r = client.post("/Observation", json=body)
        assert r.status_code == 201, (ref, r.text)
        assert r.json()["subject"]["reference"] == ref


def test_references_to_missing_resources_are_400(client, server):
    """Referential integrity (as HAPI FHIR's default): a relative reference to a stored type
    must name a resource that exists, on every write path; nothing is stored."""
    pid = create(client, "REF-INT")
    assert client.delete(f"/Patient/{pid}").status_code == 204
    before = _count(server, "Observation")
    for ref in (
        "Patient/doesnotexist",
        f"Patient/{pid}",
        f"Patient/{pid}/_history/7",
        f"Patient/{pid}/_history/2",
        "Encounter/nope",
    ):
        r = client.post("/Observation", json=_obs(ref))
        text = outcome(r, 400)
        assert r.json()["issue"][0]["code"] == "not-found", r.text
        assert r.json()["issue"][0]["expression"] == ["Observation.subject.reference"], r.text
        assert "Observation.subject.reference" in text and ref not in text
        r = client.post(
            "/",
            json={
                "resourceType": "Bundle",
                "type": "transaction",
                "entry": [{"resource": _obs(ref), "request": {"method": "POST", "url": "Observation"}}],
            },
        )
        assert outcome(r, 400) and r.json()["issue"][0]["expression"] == ["Bundle.entry[0].resource.subject.reference"]
        r = client.post(
            "/",
            json={
                "resourceType": "Bundle",
                "type": "batch",
                "entry": [{"resource": _obs(ref), "request": {"method": "POST", "url": "Observation"}}],
            },
        )
        assert r.json()["entry"][0]["response"]["status"].startswith("400"), r.text
    # a version that exists, and a target the same transaction writes, are fine
    r = client.post("/Observation", json=_obs(f"Patient/{pid}/_history/1"))
    assert r.status_code == 201, r.text
    r = client.post(
        "/",
        json={
            "resourceType": "Bundle",
            "type": "transaction",
            "entry": [
                {
                    "resource": patient("REF-INT-2", id="ref-int-2"),
                    "request": {"method": "PUT", "url": "Patient/ref-int-2"},
                },
                {"resource": _obs("Patient/ref-int-2"), "request": {"method": "POST", "url": "Observation"}},
            ],
        },
    )
    assert r.status_code == 200, r.text
    # ... but not one it deletes
    r = client.post(
        "/",
        json={
            "resourceType": "Bundle",
            "type": "transaction",
            "entry": [
                {"request": {"method": "DELETE", "url": "Patient/ref-int-2"}},
                {"resource": _obs("Patient/ref-int-2"), "request": {"method": "POST", "url": "Observation"}},
            ],
        },
    )
    assert "deletes" in outcome(r, 400)
    assert _count(server, "Observation") == before + 2


# -- finding 5: links do not follow a forged Host ---------------------------------------------------
def _links(r: httpx.Response) -> list[str]:
    body = r.json()
    return [link["url"] for link in body.get("link", [])] + [
        e["fullUrl"] for e in body.get("entry", []) if "fullUrl" in e
    ]


def test_a_forged_host_never_reaches_a_link(client, server):
    for i in range(3):
        create(client, f"HOST-{i}")
    host, port = server.listener.address
    own = f"http://{host}:{port}/fhir"
    for forged in ("evil.example", f"evil.example:{port}", "evil.example:80", "[::1]:1", "a" * 300, "x y"):
        headers = {"Host": forged}
        r = client.get("/Patient", params={"_count": 1}, headers=headers)
        assert r.status_code == 200, (forged, r.text[:200])
        links = _links(r)
        assert len(links) >= 3 and all(u.startswith(own + "/") for u in links), (forged, links)
        r = client.post("/Patient", json=patient("HOST-NEW"), headers=headers)
        assert r.headers["location"].startswith(own + "/Patient/"), r.headers
        r = client.post(
            "/",
            json={
                "resourceType": "Bundle",
                "type": "batch",
                "entry": [{"resource": patient("HOST-B"), "request": {"method": "POST", "url": "Patient"}}],
            },
            headers=headers,
        )
        assert r.json()["entry"][0]["fullUrl"].startswith(own + "/Patient/"), r.text
        r = client.get("/Patient/_history", params={"_count": 1}, headers=headers)
        assert all(u.startswith(own + "/") for u in _links(r)), r.text
        assert "evil" not in client.get("/AuditEvent", params={"_count": 1}, headers=headers).text
    # a Host naming this server is kept (localhost on a loopback listener)
    r = client.get("/Patient", params={"_count": 1}, headers={"Host": f"localhost:{port}"})
    assert all(u.startswith(f"http://localhost:{port}/fhir/") for u in _links(r))


def test_public_url_sets_every_link(tmp_path):
    s = FhirServer(tmp_path, public_url="https://fhir.example.org/r4/").start()
    try:
        with httpx.Client(base_url=s.base_url, headers=AUTH, timeout=30) as c:
            r = c.post("/Patient", json=patient("PUB-1"), headers={"Host": "evil.example"})
            assert r.headers["location"].startswith("https://fhir.example.org/r4/Patient/"), r.headers
            create(c, "PUB-2")
            r = c.get("/Patient", params={"_count": 1}, headers={"Host": "evil.example"})
            links = _links(r)
            assert links and all(u.startswith("https://fhir.example.org/r4/Patient") for u in links), links
    finally:
        s.stop()


@pytest.mark.parametrize(
    "url", ["ftp://x/fhir", "fhir.example/fhir", "https://x/fhir?a=1", "https://x/f#y", "https://"]
)
def test_public_url_must_be_an_http_url(url):
    from pydantic import ValidationError

    from listeners.fhir import FhirSourceConfig

    with pytest.raises(ValidationError):
        FhirSourceConfig.model_validate({"type": "fhir", "auth": {"open": True}, "public_url": url})
