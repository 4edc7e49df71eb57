"""The FHIR listener's answers to probe session 7b findings 1, 3, 5, 6 and 8 (docs/notes/fhir-probe-7-fixes.md).

Over HTTP (httpx) against a real listener, store and intake (tests/fhir_support.py); what comes
back is validated with fhir.resources (R4B, wire-compatible with R4 here).
"""

from __future__ import annotations

import json

import httpx
import pytest
from fhir.resources.R4B.bundle import Bundle
from fhir.resources.R4B.capabilitystatement import CapabilityStatement
from fhir.resources.R4B.operationoutcome import OperationOutcome
from fhir.resources.R4B.patient import Patient
from fhir_support import server_fixtures

server, client = server_fixtures("fhir-probe-7")
XHTML = 'xmlns="http://www.w3.org/1999/xhtml"'


def patient(mrn: str, **extra) -> dict:
    return {"resourceType": "Patient", "identifier": [{"system": "urn:oid:1.2.7", "value": mrn}],
            "name": [{"family": "Probe", "given": ["Seven"]}], **extra}


def outcome(r: httpx.Response, status: int) -> OperationOutcome:
    assert r.status_code == status, (r.status_code, r.text[:600])
    return OperationOutcome.model_validate(r.json())


def create(client: httpx.Client, mrn: str) -> str:
    r = client.post("/Patient", json=patient(mrn))
    assert r.status_code == 201, r.text
    return r.json()["id"]


def bundle(btype: str, *entries: dict) -> dict:
    return {"resourceType": "Bundle", "type": btype, "entry": list(entries)}


# -- finding 1: a GET entry answers with its resource, whatever Prefer says ----------------------
@pytest.mark.parametrize("btype", ["batch", "transaction"])
def test_get_entries_carry_the_resource_without_prefer(client, btype):
    pid = create(client, f"GET-{btype}")
    r = client.post("/", json=bundle(btype, {"request": {"method": "GET", "url": f"Patient/{pid}"}},
                                     {"request": {"method": "GET", "url": f"Patient/{pid}/_history/1"}}))
    assert r.status_code == 200, r.text
    out = Bundle.model_validate(r.json())
    assert out.type == f"{btype}-response"
    for entry in out.entry:
        assert entry.response.status.startswith("200")
        assert entry.resource is not None, "a GET entry must carry the resource (http.html#transaction-response)"
        p = Patient.model_validate(entry.resource.model_dump())
        assert p.id == pid and p.identifier[0].value == f"GET-{btype}"
        assert entry.response.etag == 'W/"1"'
        assert entry.fullUrl.endswith(f"/Patient/{pid}")


def test_writes_in_a_batch_still_follow_prefer(client):
    pid = create(client, "GET-MIXED")
    entries = ({"resource": patient("GET-MIXED-NEW"), "request": {"method": "POST", "url": "Patient"}},
               {"request": {"method": "GET", "url": f"Patient/{pid}"}})
    out = client.post("/", json=bundle("batch", *entries)).json()
    Bundle.model_validate(out)
    assert "resource" not in out["entry"][0]  # a write: minimal unless return=representation
    assert out["entry"][1]["resource"]["id"] == pid
    out = client.post("/", json=bundle("batch", *entries), headers={"Prefer": "return=minimal"}).json()
    assert "resource" not in out["entry"][0] and out["entry"][1]["resource"]["id"] == pid


def test_a_search_in_a_batch_is_refused_and_the_capability_statement_says_so(client):
    r = client.post("/", json=bundle("batch", {"request": {"method": "GET", "url": "Patient?identifier=x"}}))
    out = Bundle.model_validate(r.json())
    assert out.entry[0].response.status.startswith("400")
    cs = CapabilityStatement.model_validate(client.get("/metadata").json())
    docs = {i.code: i.documentation for i in cs.rest[0].interaction}
    assert "searches (Type?query) are not supported inside a Bundle" in docs["batch"]
    assert "answer with the resource whatever Prefer: return says" in docs["transaction"]


# -- finding 3: narrative limited to FHIR's XHTML subset (txt-1, txt-2) -------------------------
BAD_DIVS = [
    f"<div {XHTML}><script>alert(1)</script></div>",
    f'<div {XHTML}><p onclick="alert(1)">x</p></div>',
    f'<div {XHTML}><img src="x" onerror="alert(1)"/></div>',
    f'<div {XHTML}><a href="javascript:alert(1)">x</a></div>',
    f'<div {XHTML}><a href=" JaVa&#x09;script:alert(1)">x</a></div>',
    f'<div {XHTML}><img src="data:image/svg+xml;base64,PHN2Zz4="/></div>',
    f'<div {XHTML}><iframe src="https://evil.example/"/>x</div>',
    f'<div {XHTML}><form action="https://evil.example/"><input name="q"/></form></div>',
    f'<div {XHTML}><p style="background:url(https://evil.example/t.png)">x</p></div>',
    f'<div {XHTML}><svg xmlns="http://www.w3.org/2000/svg"><script>alert(1)</script></svg></div>',
    "<div>no namespace</div>",
    f"<p {XHTML}>not a div</p>",
    f"<div {XHTML}>   </div>",  # txt-2
    f'<!DOCTYPE div [<!ENTITY a "aaaaaaaaaa"><!ENTITY b "&a;&a;&a;&a;&a;&a;">]><div {XHTML}>&b;</div>',
    f'<?xml-stylesheet href="x"?><div {XHTML}>x</div>',
    f"<div {XHTML}>unclosed",
    f"<div {XHTML}>" + "<span>" * 100 + "x" + "</span>" * 100 + "</div>",
]


@pytest.mark.parametrize("div", BAD_DIVS)
def test_a_narrative_outside_the_xhtml_subset_is_refused_on_create(client, div):
    r = client.post("/Patient", json=patient("XSS-C", text={"status": "generated", "div": div}))
    oo = outcome(r, 400)
    assert any(i.code in ("invariant", "value") and "Patient.text.div" in (i.expression or []) for i in oo.issue)
    assert "alert" not in r.text  # the content is never echoed


def test_a_bad_narrative_is_refused_on_update_contained_transaction_and_batch(client):
    pid = create(client, "XSS-U")
    div = f"<div {XHTML}><script>alert(1)</script></div>"
    text = {"status": "generated", "div": div}
    outcome(client.put(f"/Patient/{pid}", json=patient("XSS-U", id=pid, text=text)), 400)
    contained = patient("XSS-K", contained=[{"resourceType": "Practitioner", "id": "pr", "text": text}])
    oo = outcome(client.post("/Patient", json=contained), 400)
    assert any("Patient.contained[0].text.div" in (i.expression or []) for i in oo.issue)
    tx = bundle("transaction",
                {"resource": patient("XSS-T", text=text), "request": {"method": "POST", "url": "Patient"}})
    oo = outcome(client.post("/", json=tx), 400)
    assert any("Bundle.entry[0].resource.text.div" in (i.expression or []) for i in oo.issue)
    batch = {**tx, "type": "batch"}
    out = Bundle.model_validate(client.post("/", json=batch).json())
    assert out.entry[0].response.status.startswith("400")
    # nothing stored
    found = client.get("/Patient", params={"identifier": "urn:oid:1.2.7|XSS-T"}).json()
    assert found["total"] == 0
    assert "script" not in json.dumps(client.get(f"/Patient/{pid}").json())


def test_a_narrative_within_the_subset_is_kept(client):
    div = (f'<div {XHTML} xml:lang="en"><h3 class="t">Summary</h3><p style="color:red">Seen <b>today</b>, '
           '<a href="https://example.org/x">link</a> <a name="n1">anchor</a></p><table border="1"><tbody><tr>'
           '<td colspan="2">a &amp; b</td></tr></tbody></table><ul><li>one</li></ul>'
           '<img src="data:image/png;base64,iVBORw0KGgo=" alt="dot"/></div>')
    r = client.post("/Patient", json=patient("XSS-OK", text={"status": "generated", "div": div}))
    assert r.status_code == 201, r.text
    assert Patient.model_validate(r.json()).text.div == div


# -- finding 5: PUT with no id, or another id, in the body -----------------------------------------
def test_update_without_an_id_in_the_body_is_400(client):
    pid = create(client, "NOID")
    oo = outcome(client.put(f"/Patient/{pid}", json=patient("NOID", active=True)), 400)
    assert any("Patient.id" in (i.expression or []) for i in oo.issue)
    outcome(client.put(f"/Patient/{pid}", json=patient("NOID", id="someone-else", active=True)), 400)
    r = client.get(f"/Patient/{pid}")
    assert r.json()["meta"]["versionId"] == "1" and "active" not in r.json()
    tx = bundle("transaction", {"resource": patient("NOID"), "request": {"method": "PUT", "url": f"Patient/{pid}"}})
    outcome(client.post("/", json=tx), 400)
    r = client.put(f"/Patient/{pid}", json=patient("NOID", id=pid, active=True))
    assert r.status_code == 200 and Patient.model_validate(r.json()).active is True


# -- finding 8: one resource, one entry; DELETE of an unknown id ---------------------------------
def test_a_put_and_a_delete_of_one_resource_in_a_transaction_is_400_duplicate(client):
    tx = bundle("transaction",
                {"resource": patient("DUPX", id="dupx"), "request": {"method": "PUT", "url": "Patient/dupx"}},
                {"request": {"method": "DELETE", "url": "Patient/dupx"}})
    oo = outcome(client.post("/", json=tx), 400)
    assert oo.issue[0].code == "duplicate"
    assert client.get("/Patient/dupx").status_code == 404
    pid = create(client, "DUPY")
    tx = bundle("transaction",
                {"request": {"method": "DELETE", "url": f"Patient/{pid}"}},
                {"resource": patient("DUPY", id=pid), "request": {"method": "PUT", "url": f"Patient/{pid}"}})
    assert outcome(client.post("/", json=tx), 400).issue[0].code == "duplicate"
    assert client.get(f"/Patient/{pid}").status_code == 200


def test_delete_of_an_id_that_never_existed_is_204(client):
    r = client.delete("/Patient/never-existed-7")
    assert r.status_code == 204, r.text
    assert client.get("/Patient/never-existed-7").status_code == 404  # still unknown: no version made
    out = client.post("/", json=bundle("transaction", {"request": {"method": "DELETE", "url": "Patient/never-7b"}}))
    assert out.status_code == 200, out.text
    assert Bundle.model_validate(out.json()).entry[0].response.status.startswith("204")
