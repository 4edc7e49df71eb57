"""Patient search as FHIR clients expect it, over HTTP, against the blind index (issue 9 items 11-12).

Eleven patients with accents, several given names, several identifiers and telecoms; every
parameter and modifier must return exactly the right set (a wrong patient in a result is the
failure this prevents), unknown parameters are refused unless the client asks for lenient
handling, and none of the patients' names, birth dates, identifiers or phone numbers are
anywhere in the database files.
"""

from __future__ import annotations

import time
from datetime import date

import httpx
import pytest
from fhir_support import TOKEN, FhirServer
from sqlalchemy import delete, text

from engine.store.db import Store
from engine.store.fhir import blind_dates as bd
from engine.store.fhir.params import date_range
from engine.store.fhir.search import MAX_RECHECK, search
from engine.store.fhir.tables import fhir_index, fhir_index_state

AUTH = {"Authorization": f"Bearer {TOKEN}"}
V2_0203 = "http://terminology.hl7.org/CodeSystem/v2-0203"


def patient(family, given, *, gender=None, birth=None, ids=(), telecom=(), address=None, **extra):
    res = {"resourceType": "Patient", "name": [{"family": family, "given": list(given)}]}
    if gender:
        res["gender"] = gender
    if birth:
        res["birthDate"] = birth
    if ids:
        res["identifier"] = [dict(i) for i in ids]
    if telecom:
        res["telecom"] = [{"system": s, "value": v} for s, v in telecom]
    if address:
        res["address"] = [address]
    res.update(extra)
    return res


PATIENTS = {
    1: patient("Müller", ["Anna", "Maria"], gender="female", birth="1980-03-15",
               ids=[{"system": "urn:mrn", "value": "M001"},
                    {"system": "urn:ssn", "value": "111-22-3333",
                     "type": {"coding": [{"system": V2_0203, "code": "SS"}]}}],
               telecom=[("phone", "+1 (555) 010-0001"), ("email", "Anna.Mueller@Example.org")],
               address={"line": ["Unter den Linden 5"], "city": "Berlin", "postalCode": "10115", "country": "DE"},
               maritalStatus={"text": "married"}),
    2: patient("Muller", ["Hans"], gender="male", birth="1980-03", ids=[{"system": "urn:mrn", "value": "M002"}],
               telecom=[("phone", "555-0002")], address={"city": "Berlin", "postalCode": "10117"}),
    3: patient("MÜLLER-LÜDENSCHEIDT", ["Klaus"], gender="male", birth="1979-12-31",
               ids=[{"system": "urn:mrn", "value": "M003"}]),
    4: patient("Mullerton", ["Ann"], gender="female", birth="1980", ids=[{"system": "urn:mrn", "value": "m001"}]),
    5: patient("Ng", ["Ana"], gender="other", birth="2001-07-04", ids=[{"system": "urn:other", "value": "M001"}],
               telecom=[("email", "ana.ng@example.org")], address={"city": "Zürich", "country": "CH"}),
    6: patient("van der Berg", ["Johannes"], gender="male", birth="1750-06-01", ids=[{"value": "NOSYS1"}]),
    7: patient("O'Brien", ["Siobhán"], gender="female", birth="2024-02-29",
               ids=[{"system": "urn:mrn", "value": "M007"}]),
    8: {"resourceType": "Patient", "name": [{"family": "Doe", "given": ["Jane", "Q"], "prefix": ["Dr."],
                                             "text": "Jane Doe"}]},
    9: patient("Doe", ["John"], gender="male", birth="1980-03-16", ids=[{"system": "urn:mrn", "value": "M009"}],
               telecom=[("phone", "+15550100001")]),
    10: patient("Schwarzenegger", ["Arnold"], gender="male", birth="1947-07-30",
                ids=[{"system": "urn:mrn", "value": "M010"}]),
    11: patient("Schwarzenbach", ["Annemarie"], gender="female", birth="1990-01-01",
                ids=[{"system": "urn:mrn", "value": "M011"}]),
}
WITH_BIRTH = set(PATIENTS) - {8}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = FhirServer(tmp_path_factory.mktemp("fhir-patients")).start()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def pids(server):
    out = {}
    with httpx.Client(base_url=server.base_url, headers=AUTH, timeout=30) as c:
        for key, res in PATIENTS.items():
            r = c.post("/Patient", json=res)
            assert r.status_code == 201, r.text
            out[key] = r.json()["id"]
        for key in (8, 9):  # observations of the two Does, for chains and _revinclude
            r = c.post("/Observation", json={"resourceType": "Observation", "status": "final",
                                             "code": {"text": "pulse"},
                                             "subject": {"reference": f"Patient/{out[key]}"}})
            assert r.status_code == 201, r.text
            out[f"obs{key}"] = r.json()["id"]
    return out


@pytest.fixture
def client(server):
    with httpx.Client(base_url=server.base_url, headers=AUTH, timeout=30) as c:
        yield c


def found(client, pids, path="/Patient", params=None, headers=None):
    """The patients (by their key in PATIENTS) a search returns; every page followed."""
    r = client.get(path, params=params, headers=headers)
    assert r.status_code == 200, r.text
    back = {v: k for k, v in pids.items()}
    out = set()
    while True:
        b = r.json()
        out |= {back[e["resource"]["id"]] for e in b.get("entry", []) if e["search"]["mode"] == "match"}
        nxt = [lk["url"] for lk in b["link"] if lk["relation"] == "next"]
        if not nxt:
            return out
        r = client.get(nxt[0])


@pytest.mark.parametrize(("params", "expected"), [
    # string: starts with, case- and accent-insensitive, of the whole field
    ({"family": "muller"}, {1, 2, 3, 4}),
    ({"family": "MÜLLER"}, {1, 2, 3, 4}),
    ({"family": "mullert"}, {4}),
    ({"family": "müller-lü"}, {3}),
    ({"family": "berg"}, set()),  # "van der Berg" does not start with it
    ({"family": "van der"}, {6}),
    ({"family": "o'br"}, {7}),
    ({"family": "Schwarzenegg"}, {10}),  # longer than the index keeps: re-checked after decryption
    ({"family": "schwarzen"}, {10, 11}),
    ({"family": "schwarzenbachx"}, set()),
    ({"family:exact": "Müller"}, {1}),
    ({"family:exact": "müller"}, set()),  # :exact is case-sensitive
    ({"family:exact": "Muller"}, {2}),  # and accent-sensitive
    ({"family:contains": "ludensch"}, {3}),
    ({"family:contains": "ULLER"}, {1, 2, 3, 4}),
    ({"family:contains": "egg"}, {10}),
    ({"given": "anna"}, {1}),
    ({"given": "maria"}, {1}),  # the second given name
    ({"given": "ann"}, {1, 4, 11}),
    ({"given": "ana"}, {5}),
    ({"given": "siobhan"}, {7}),
    ({"given": "jo"}, {6, 9}),
    ({"given:exact": "Siobhán"}, {7}),
    ({"given:contains": "mari"}, {1, 11}),
    ({"name": "doe"}, {8, 9}),
    ({"name": "jane doe"}, {8}),  # HumanName.text
    ({"name": "dr"}, {8}),  # prefix
    ({"name": "maria"}, {1}),
    ({"name": "ng,doe"}, {5, 8, 9}),  # comma: OR
    ({"family": "doe", "given": "john"}, {9}),  # two parameters: AND
    ({"name:missing": "true"}, set()),
    # birthdate: prefixes, partial dates (R4 3.1.1.4.2)
    ({"birthdate": "1980-03-15"}, {1}),
    ({"birthdate": "eq1980-03"}, {1, 2, 9}),
    ({"birthdate": "1980"}, {1, 2, 4, 9}),
    ({"birthdate": "ne1980-03-15"}, WITH_BIRTH - {1}),
    ({"birthdate": "lt1980"}, {3, 6, 10}),
    ({"birthdate": "ge2000"}, {5, 7}),
    ({"birthdate": "gt1980-03-15"}, {2, 4, 5, 7, 9, 11}),
    ({"birthdate": "le1980-03-15"}, {1, 2, 3, 4, 6, 10}),
    ({"birthdate": "sa1980-03-15"}, {5, 7, 9, 11}),
    ({"birthdate": "eb1980-03-15"}, {3, 6, 10}),
    ({"birthdate": "ap1980-03-15"}, {1, 2, 3, 4, 9}),
    ({"birthdate": "1750"}, {6}),
    ({"birthdate": "lt1800"}, {6}),
    ({"birthdate": "2024-02-29"}, {7}),
    ({"birthdate": "1980-03-15,1750-06-01"}, {1, 6}),
    ({"birthdate:missing": "true"}, {8}),
    ({"birthdate:missing": "false"}, WITH_BIRTH),
    # gender, identifier, telecom, address
    ({"gender": "male"}, {2, 3, 6, 9, 10}),
    ({"gender": "female,other"}, {1, 4, 5, 7, 11}),
    ({"gender:not": "male"}, {1, 4, 5, 7, 8, 11}),
    ({"gender:missing": "true"}, {8}),
    ({"identifier": "urn:mrn|M001"}, {1}),
    ({"identifier": "M001"}, {1, 5}),  # any system; not m001 (identifiers are case-sensitive)
    ({"identifier": "urn:mrn|m001"}, {4}),
    ({"identifier": "|NOSYS1"}, {6}),
    ({"identifier": "|M001"}, set()),
    ({"identifier": "urn:other|"}, {5}),
    ({"identifier": "urn:ssn|111-22-3333"}, {1}),
    ({"identifier": "urn:mrn|M009,urn:mrn|M010"}, {9, 10}),
    ({"identifier:of-type": f"{V2_0203}|SS|111-22-3333"}, {1}),
    ({"identifier:of-type": f"{V2_0203}|MR|111-22-3333"}, set()),
    ({"identifier:missing": "true"}, {8}),
    ({"identifier:not": "urn:mrn|M001"}, set(PATIENTS) - {1}),
    ({"telecom": "+1 555 010 0001"}, {1, 9}),
    ({"phone": "+15550100001"}, {1, 9}),
    ({"phone": "555-0002"}, {2}),
    ({"telecom": "phone|+15550100001"}, {1, 9}),
    ({"telecom": "email|+15550100001"}, set()),
    ({"email": "anna.mueller@example.org"}, {1}),
    ({"email": "+15550100001"}, set()),
    ({"phone:missing": "false"}, {1, 2, 9}),
    ({"email:missing": "false"}, {1, 5}),
    ({"address-postalcode": "10115"}, {1}),
    ({"address-postalcode": "101"}, {1, 2}),
    ({"address-city": "berlin"}, {1, 2}),
    ({"address-city": "zurich"}, {5}),
    ({"address": "unter den"}, {1}),
    ({"address-country": "de"}, {1}),
    ({"address:missing": "true"}, {3, 4, 6, 7, 8, 9, 10, 11}),
])
def test_patient_search_returns_exactly(client, pids, params, expected):
    assert found(client, pids, params=params) == expected


def test_paging_over_rechecked_results(client, pids):
    b = client.get("/Patient", params={"family:contains": "ULLER", "_count": 1}).json()
    assert b["total"] == 4 and len(b["entry"]) == 1
    assert found(client, pids, params={"family:contains": "ULLER", "_count": 1}) == {1, 2, 3, 4}


def walk(client, params):
    """Every match of a search, page by page, in the order served."""
    r = client.get("/Patient", params=params)
    out = []
    while True:
        assert r.status_code == 200, r.text
        b = r.json()
        out += [e["resource"] for e in b.get("entry", []) if e["search"]["mode"] == "match"]
        nxt = [lk["url"] for lk in b["link"] if lk["relation"] == "next"]
        if not nxt:
            return out
        r = client.get(nxt[0])


@pytest.mark.parametrize("extra", [{}, {"family:contains": "e"}])  # SQL order, and re-checked in Python
def test_sort_by_id_and_last_updated_across_pages(client, pids, extra):
    for key, field, desc in (("_id", "id", False), ("-_id", "id", True),
                             ("_lastUpdated", "lastUpdated", False), ("-_lastUpdated", "lastUpdated", True)):
        got = walk(client, {"_sort": key, "_count": 3, **extra})
        values = [r["id"] if field == "id" else r["meta"]["lastUpdated"] for r in got]
        assert values == sorted(values, reverse=desc), key
        assert len({r["id"] for r in got}) == len(got) == (11 if not extra else len(
            [k for k, p in PATIENTS.items() if "e" in p["name"][0]["family"].lower()]))
    assert client.get("/Patient", params={"_sort": "_id,family"}).status_code == 400


@pytest.mark.parametrize("params", [
    {"foo": "bar"}, {"family:text": "x"}, {"family:below": "x"}, {"birthdate:exact": "1980"},
    {"identifier:text": "x"}, {"gender:below": "x"}, {"phonetic": "x"}, {"_sort": "family"},
    {"_has:Observation:patient:code": "x"}, {"_tag": "x"}, {"_include:iterate": "Patient:general-practitioner"},
    {"organization.name": "x"}, {"name.family": "x"}, {"_id:missing": "true"},
])
def test_unsupported_is_400_naming_the_parameter_and_lenient_ignores_it(client, pids, params):
    name = next(iter(params))
    r = client.get("/Patient", params={"family": "doe", **params})
    assert r.status_code == 400
    issue = r.json()["issue"][0]
    assert issue["code"] == "not-supported" and name.split(":")[0].split(".")[0] in issue["diagnostics"]
    assert client.get("/Patient", params={"family": "doe", **params},
                      headers={"Prefer": "handling=strict"}).status_code == 400
    r = client.get("/Patient", params={"family": "doe", **params}, headers={"Prefer": "handling=lenient"})
    assert r.status_code == 200, r.text
    b = r.json()
    self_url = httpx.URL(next(lk["url"] for lk in b["link"] if lk["relation"] == "self"))
    assert [k for k, _ in self_url.params.multi_items()] == ["family", "_count"]
    assert {e["resource"]["id"] for e in b["entry"] if e["search"]["mode"] == "match"} == {pids[8], pids[9]}
    [outcome] = [e["resource"] for e in b["entry"] if e["search"]["mode"] == "outcome"]
    assert name in outcome["issue"][0]["diagnostics"]


@pytest.mark.parametrize("params", [
    {"birthdate": "notadate"}, {"birthdate": "xx1980"}, {"family": ""}, {"family": "--"},
    {"family:missing": "maybe"}, {"identifier": "|"}, {"identifier:of-type": "a|b"}, {"_count": "x"},
    {"_summary": "all"}, {"_total": "some"}, {"_elements": "na me"},
])
def test_bad_values_of_known_parameters_are_400_even_when_lenient(client, pids, params):
    for headers in ({}, {"Prefer": "handling=lenient"}):
        r = client.get("/Patient", params=params, headers=headers)
        assert r.status_code == 400 and r.json()["issue"][0]["code"] == "invalid", (params, r.text)


def test_a_search_that_expands_to_too_many_terms_is_refused(client, pids):
    many = ",".join(f"gt{1900 + i}" for i in range(60))  # ~20 000 birth-date labels
    r = client.get("/Patient", params={"birthdate": many})
    assert r.status_code == 400 and r.json()["issue"][0]["code"] == "too-costly"
    assert found(client, pids, params={"birthdate": ",".join(f"gt{2000 + i}" for i in range(5))}) == {5, 7}


def test_self_link_shows_what_was_applied(client, pids):
    r = client.get("/Patient", params=[("family", "doe"), ("given", "jo"), ("_total", "accurate"),
                                       ("_count", "5")])
    self_url = httpx.URL(next(lk["url"] for lk in r.json()["link"] if lk["relation"] == "self"))
    assert self_url.params.multi_items() == [("family", "doe"), ("given", "jo"), ("_total", "accurate"),
                                             ("_count", "5")]
    assert found(client, pids, params=dict(self_url.params)) == {9}  # the link itself reproduces the search


def test_chained_parameters(client, pids):
    def obs(params):
        r = client.get("/Observation", params=params)
        assert r.status_code == 200, r.text
        return {e["resource"]["id"] for e in r.json().get("entry", [])}

    assert obs({"patient.family": "doe"}) == {pids["obs8"], pids["obs9"]}
    assert obs({"patient.given": "jane"}) == {pids["obs8"]}
    assert obs({"subject:Patient.identifier": "urn:mrn|M009"}) == {pids["obs9"]}
    assert obs({"patient.name:exact": "Jane Doe"}) == {pids["obs8"]}  # inner search re-checked
    assert obs({"patient.family": "muller"}) == set()
    r = client.get("/Observation", params={"subject.family": "doe"})
    assert r.status_code == 400 and "subject:Patient.family" in r.json()["issue"][0]["diagnostics"]
    assert client.get("/Observation", params={"patient.foo": "x"}).status_code == 400
    assert client.get("/Observation", params={"patient.organization.name": "x"}).status_code == 400


def test_revinclude_and_reference_type_modifier(client, pids):
    b = client.get("/Patient", params={"_id": pids[9], "_revinclude": "Observation:patient"}).json()
    assert {(e["resource"]["resourceType"], e["search"]["mode"]) for e in b["entry"]} == {
        ("Patient", "match"), ("Observation", "include")}
    r = client.get("/Observation", params={"subject:Patient": pids[8]}).json()
    assert [e["resource"]["id"] for e in r["entry"]] == [pids["obs8"]]
    assert "entry" not in client.get("/Observation", params={"subject:Group": pids[8]}).json()
    assert client.get("/Patient", params={"_revinclude": "Observation:code"}).status_code == 400


def test_summary_elements_total(client, pids):
    b = client.get("/Patient", params={"family": "müller", "_summary": "count"}).json()
    assert b["total"] == 4 and "entry" not in b
    b = client.get("/Patient", params={"_id": pids[1], "_summary": "true"}).json()
    res = b["entry"][0]["resource"]
    assert "maritalStatus" not in res and res["birthDate"] == "1980-03-15"
    assert any(t["code"] == "SUBSETTED" for t in res["meta"]["tag"])
    assert "maritalStatus" in client.get("/Patient", params={"_id": pids[1]}).json()["entry"][0]["resource"]
    res = client.get("/Patient", params={"_id": pids[1], "_elements": "name"}).json()["entry"][0]["resource"]
    assert set(res) == {"resourceType", "id", "meta", "name"}
    b = client.get("/Patient", params={"family": "doe", "_total": "none"}).json()
    assert "total" not in b and len(b["entry"]) == 2


def test_capability_statement_lists_the_parameters_and_modifiers(server, client):
    cs = httpx.get(server.base_url + "/metadata").json()
    [pat] = [r for r in cs["rest"][0]["resource"] if r["type"] == "Patient"]
    params = {p["name"]: p for p in pat["searchParam"]}
    assert {"name", "family", "given", "birthdate", "gender", "identifier", "telecom", "phone", "email",
            "address", "address-postalcode", "address-city", "_id", "_lastUpdated"} <= set(params)
    assert params["family"]["type"] == "string" and ":exact :contains" in params["family"]["documentation"]
    assert params["birthdate"]["type"] == "date" and "ap" in params["birthdate"]["documentation"]
    assert ":of-type" in params["identifier"]["documentation"]
    assert "Observation:patient" in pat["searchRevInclude"]
    assert "handling=lenient" in cs["rest"][0]["documentation"]
    # every listed parameter is accepted, every one not listed is refused
    for name, p in params.items():
        value = {"date": "2000", "string": "a", "token": "x", "reference": "Patient/x"}[p["type"]]
        assert client.get("/Patient", params={name: value}).status_code == 200, name
    assert client.get("/Patient", params={"deceased": "true"}).status_code == 400


def test_no_phi_in_the_database_files(server, pids):
    if not server.store.is_sqlite:
        pytest.skip("scans the SQLite database files (tests/test_phi_at_rest.py does the whole engine)")
    needles = [b"M\xc3\xbcller", b"MULLER", b"Muller", b"Schwarzenegger", b"SCHWARZENEGGER", b"schwarzenegger",
               b"1980-03-15", b"19800315", b"1947-07-30", b"111-22-3333", b"M001", b"NOSYS1", b"5550100001",
               b"555) 010-0001", b"anna.mueller", b"Anna.Mueller", b"10115", b"Siobh", b"Unter den Linden"]
    # the data is there and readable: the scan is not vacuous
    with server.store.engine.connect() as c:
        r = search(server.listener.api.fs, c, "Patient", [("identifier", "urn:mrn|M001")])
    assert r.rows[0][1]["name"][0]["family"] == "Müller"
    files = [p for p in server.root.rglob("*") if p.is_file()]
    assert any(p.name.startswith("medrelay.db") for p in files)
    hits = {str(p.relative_to(server.root)): [n for n in needles if n in p.read_bytes()] for p in files}
    assert {k: v for k, v in hits.items() if v} == {}


# -- the blind date labels, against a plain reading of R4's rules ------------------------
def test_birthdate_labels_match_exactly_what_the_prefixes_mean():
    stored = []
    for y in (1, 1750, 1799, 1800, 1979, 1980, 1981, 2000, 2024, 2199, 2200, 2500, 9998):
        stored.append(f"{y:04d}")
        for m in (1, 2, 3, 12):
            stored.append(f"{y:04d}-{m:02d}")
            for d in (1, 14, 15, 16, 28, 29, 31):
                try:
                    date(y, m, d)
                except ValueError:
                    continue
                stored.append(f"{y:04d}-{m:02d}-{d:02d}")
    now = time.time()
    for q in ("1980", "1980-03", "1980-03-15", "1980-03-15T10:00:00Z", "1980-03-15T23:00:00-05:00", "1750",
              "2500", "2024-02", "1980-12-31", "0001"):
        low, high = date_range(q)
        for prefix in ("eq", "gt", "lt", "ge", "le", "sa", "eb", "ap"):
            conds = bd.conditions(prefix, low, high, now)
            labels = bd.cover(conds)
            assert len(labels) < 700
            wrong = [v for v in stored if bd.matches(v, conds) != bool(set(bd.stored_labels(v)) & labels)]
            assert wrong == [], (prefix, q, wrong[:5])


def test_reindex_on_start_rebuilds_an_index_written_by_an_older_version(server, pids, tmp_path):
    """A store from before the blind index has no name terms: migrate must rebuild them."""
    url = server.store.url.render_as_string(hide_password=False)
    with server.store.engine.begin() as c:  # what an older medrelay left: no state, no such rows
        c.execute(delete(fhir_index))
        c.execute(delete(fhir_index_state))
    with server.store.engine.connect() as c:
        assert search(server.listener.api.fs, c, "Patient", [("family", "doe")]).total == 0
    again = Store(url, server.root / "blobs", server.keyring)
    try:
        again.migrate()
    finally:
        again.dispose()
    with server.store.engine.connect() as c:
        r = search(server.listener.api.fs, c, "Patient", [("family", "doe")])
        assert {row.id for row, _ in r.rows} == {pids[8], pids[9]}
        assert c.execute(text("SELECT count(*) FROM fhir_index_state")).scalar_one() == 1


# -- speed: the index, not a scan ----------------------------------------------------
BIG = 2200
BORN_1927 = sum(1 for n in range(BIG) if n % 90 == 17)


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    """2 200 patients (two named Quarnstrom), filed by transaction Bundles of 200."""
    s = FhirServer(tmp_path_factory.mktemp("fhir-big")).start()
    with httpx.Client(base_url=s.base_url, headers=AUTH, timeout=120) as c:
        for batch in range(BIG // 200):
            entries = []
            for i in range(200):
                n = batch * 200 + i
                family = "Quarnstrom" if n in (17, 1234) else f"Family{n:04d}"
                entries.append({"resource": patient(family, [f"Given{n % 37}"], birth=f"19{n % 90 + 10}-01-01",
                                                    ids=[{"system": "urn:mrn", "value": f"BIG{n:05d}"}]),
                                "request": {"method": "POST", "url": "Patient"}})
            r = c.post("/", json={"resourceType": "Bundle", "type": "transaction", "entry": entries})
            assert r.status_code == 200, r.text[:500]
    yield s
    s.stop()


def test_name_and_identifier_search_decrypt_only_the_matches(big):
    fs = big.listener.api.fs
    with big.store.engine.connect() as c:
        r = search(fs, c, "Patient", [("family", "quarnstrom")])
        assert r.total == 2 and r.decrypted == 2
        r = search(fs, c, "Patient", [("identifier", "urn:mrn|BIG01234")])
        assert r.total == 1 and r.decrypted == 1
        r = search(fs, c, "Patient", [("family:exact", "Quarnstrom")])  # candidates: the two of them
        assert r.total == 2 and r.decrypted == 2
        r = search(fs, c, "Patient", [("birthdate", "1927")])
        assert r.total == BORN_1927 and r.decrypted == 20  # one page
        if big.store.is_sqlite:
            from sqlalchemy import select

            from engine.store.fhir.query import param_filter
            from engine.store.fhir.tables import fhir_resources
            f = param_filter(fs.hash_key, "Patient", "family", "quarnstrom")
            sql = select(fhir_resources.c.rid).where(f.clause).compile(compile_kwargs={"literal_binds": True})
            plan = " ".join(str(row[-1]) for row in c.exec_driver_sql(f"EXPLAIN QUERY PLAN {sql}"))
            assert "ix_fhir_index_token" in plan, plan
    with httpx.Client(base_url=big.base_url, headers=AUTH, timeout=30) as client:
        t = time.perf_counter()
        for _ in range(10):
            b = client.get("/Patient", params={"family": "quarnstrom"}).json()
            assert b["total"] == 2
        assert (time.perf_counter() - t) / 10 < 0.5  # generous: a scan of 2 200 bodies takes seconds


def test_a_contains_search_over_too_many_candidates_is_refused(big):
    with httpx.Client(base_url=big.base_url, headers=AUTH, timeout=60) as client:
        r = client.get("/Patient", params={"family:contains": "mily"})
        assert r.status_code == 400 and r.json()["issue"][0]["code"] == "too-costly"
        assert str(MAX_RECHECK) in r.json()["issue"][0]["diagnostics"]
        # narrowed by another parameter it is answered
        b = client.get("/Patient", params={"family:contains": "mily", "birthdate": "1927"}).json()
        assert b["total"] == BORN_1927 - 1  # patient 17, born in 1927, is a Quarnstrom
