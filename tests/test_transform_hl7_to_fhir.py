"""hl7_to_fhir unit tests: OBX value types, conditional requests, config, logging without PHI."""

from __future__ import annotations

import json

import pytest
from structlog.testing import capture_logs

from engine.envelope import Drop, Envelope
from transforms.hl7_to_fhir import Hl7ToFhirConfig, build, convert

MSH = "MSH|^~\\&|LIS|LAB|MR|HOSP|20240301101500||{t}|C1|P|2.5.1"
PID = "PID|1||QZ42^^^HOSP^MR||Doe^Jane||19800101|F"


def cfg(**kw):
    return Hl7ToFhirConfig(type="hl7_to_fhir", **kw)


def oru(*obx: str, obr: str = "OBR|1||F1^LAB|X^Panel^L|||20240301080000||||||||||||||||||F") -> bytes:
    return "\r".join([MSH.format(t="ORU^R01^ORU_R01"), PID, obr, *obx]).encode()


def observations(bundle):
    return [e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == "Observation"]


@pytest.mark.parametrize("obx, expected", [
    ("OBX|1|NM|A^a^L||7.25|mmol/L^^UCUM", {"valueQuantity": {"value": 7.25, "unit": "mmol/L",
                                                            "system": "http://unitsofmeasure.org",
                                                            "code": "mmol/L"}}),
    ("OBX|1|NM|A^a^L||12|mmol/L", {"valueQuantity": {"value": 12, "unit": "mmol/L"}}),
    ("OBX|1|NM|A^a^L||not a number", {"valueString": "not a number"}),
    ("OBX|1|SN|A^a^L||<=^5", {"valueQuantity": {"value": 5, "comparator": "<="}}),
    ("OBX|1|SN|A^a^L||=^5", {"valueQuantity": {"value": 5}}),
    ("OBX|1|SN|A^a^L||^2^/^3", {"valueRatio": {"numerator": {"value": 2}, "denominator": {"value": 3}}}),
    ("OBX|1|SN|A^a^L||^2^-^3", {"valueRange": {"low": {"value": 2}, "high": {"value": 3}}}),
    ("OBX|1|SN|A^a^L||<>^5", {"valueString": "<>5"}),
    ("OBX|1|SN|A^a^L||^2^+", {"valueString": "2+"}),
    ("OBX|1|ST|A^a^L||a\\F\\b\\S\\c\\T\\d\\E\\e", {"valueString": "a|b^c&d\\e"}),
    ("OBX|1|TX|A^a^L||one~two", {"valueString": "one\ntwo"}),
    ("OBX|1|CWE|A^a^L||123^Thing^SCT^^^^^^orig", {"valueCodeableConcept": {
        "coding": [{"system": "http://snomed.info/sct", "code": "123", "display": "Thing"}], "text": "orig"}}),
    ("OBX|1|CE|A^a^L||^Only text", {"valueCodeableConcept": {"text": "Only text"}}),
    ("OBX|1|DT|A^a^L||20240102", {"valueDateTime": "2024-01-02"}),
    ("OBX|1|TS|A^a^L||202401021030+0200", {"valueDateTime": "2024-01-02T10:30:00+02:00"}),
    ("OBX|1|TM|A^a^L||1030", {"valueTime": "10:30:00"}),
    ("OBX|1|ST|A^a^L||", {}),
])
def test_obx_value_types(obx, expected):
    obs = observations(convert(oru(obx), cfg()))[0]
    got = {k: v for k, v in obs.items() if k.startswith("value")}
    assert got == expected


def test_assume_ucum_and_reference_ranges():
    b = convert(oru("OBX|1|NM|A^a^L||5|mg|1.5-4.5|H~A|||F", "OBX|2|NM|A^a^L||5|mg|>2||||X",
                    "OBX|3|NM|A^a^L||5||negative||||W"), cfg(assume_ucum_units=True))
    o1, o2, o3 = observations(b)
    assert o1["valueQuantity"]["system"] == "http://unitsofmeasure.org"
    assert o1["referenceRange"] == [{"low": {"value": 1.5, "unit": "mg", "system": "http://unitsofmeasure.org",
                                             "code": "mg"},
                                     "high": {"value": 4.5, "unit": "mg", "system": "http://unitsofmeasure.org",
                                              "code": "mg"}}]
    assert [c["coding"][0]["code"] for c in o1["interpretation"]] == ["H", "A"]
    assert o1["status"] == "final" and o2["status"] == "cancelled" and o3["status"] == "entered-in-error"
    assert o2["referenceRange"][0]["low"]["value"] == 2
    assert o3["referenceRange"] == [{"text": "negative"}]


def test_identifier_system_rules():
    adt = "\r".join([MSH.format(t="ADT^A01"), "PID|1||42^^^HOSP^MR~7^^^&1.2.3&ISO^PI"]).encode()
    p = convert(adt, cfg())["entry"][0]
    assert p["request"]["ifNoneExist"] == "identifier=urn:medrelay:id:HOSP|42"
    assert p["resource"]["identifier"][1]["system"] == "urn:oid:1.2.3"
    p = convert(adt, cfg(identifier_systems={"HOSP": "https://hosp.example/mrn"}))["entry"][0]
    assert p["request"]["ifNoneExist"] == "identifier=https://hosp.example/mrn|42"
    p = convert(adt, cfg(patient_identifier_system="urn:oid:9.9"))["entry"][0]
    assert p["request"]["ifNoneExist"] == "identifier=urn:oid:9.9|42"


def test_query_values_are_percent_encoded():
    adt = "\r".join([MSH.format(t="ADT^A08"), "PID|1||A B\\T\\C#1^^^My Hosp^MR"]).encode()
    url = convert(adt, cfg())["entry"][0]["request"]["url"]
    assert url == "Patient?identifier=urn:medrelay:id:My%2520Hosp|A%20B%26C%231"


@pytest.mark.parametrize("event, method", [("A01", "POST"), ("A04", "POST"), ("A08", "PUT")])
def test_patient_request_by_event(event, method):
    adt = "\r".join([MSH.format(t=f"ADT^{event}"), PID]).encode()
    assert convert(adt, cfg())["entry"][0]["request"]["method"] == method
    assert convert(adt, cfg(patient_request="update"))["entry"][0]["request"]["method"] == "PUT"


def test_unsupported_messages_drop_or_error():
    msg = "\r".join([MSH.format(t="SIU^S12"), PID]).encode()
    with pytest.raises(Drop):
        convert(msg, cfg())
    with pytest.raises(ValueError):
        convert(msg, cfg(unsupported="error"))


@pytest.mark.parametrize("segments, match", [
    ([MSH.format(t="ADT^A01")], "PID"),
    ([MSH.format(t="ADT^A01"), "PID|1||"], "PID-3"),
    ([MSH.format(t="ORU^R01"), PID], "without OBR"),
    ([MSH.format(t="ORU^R01"), PID, "OBR|1|||X"], "order number"),
    ([MSH.format(t="ADT^A40"), PID, "MRG|"], "MRG-1"),
])
def test_malformed_input_raises_clear_errors(segments, match):
    with pytest.raises(ValueError, match=match):
        convert("\r".join(segments).encode(), cfg())


def test_order_status_from_orc():
    def sr(orc: str):
        msg = "\r".join([MSH.format(t="ORM^O01"), PID, orc, "OBR|1|P1||CT^CT^L"]).encode()
        return next(e["resource"] for e in convert(msg, cfg())["entry"]
                    if e["resource"]["resourceType"] == "ServiceRequest")
    assert sr("ORC|NW|P1")["status"] == "active"
    assert sr("ORC|CA|P1")["status"] == "revoked"
    assert sr("ORC|SC|P1|||CM")["status"] == "completed"
    assert sr("ORC|XO|P1|||HD")["status"] == "on-hold"


def test_transform_envelope_and_no_phi_in_logs():
    t = build(cfg())
    env = Envelope(channel="lab", kind="hl7v2", payload=oru("OBX|1|ST|A^a^L||secret"),
                   headers={"MSH-9.1": "ORU", "MSH-9.2": "R01", "MSH-10": "C1"})
    with capture_logs() as logs:
        out = t(env)
    assert out.kind == "fhir" and out.lineage == (env.id,)
    assert out.headers["resourceType"] == "Bundle" and out.headers["source_msh_10"] == "C1"
    assert json.loads(out.payload)["type"] == "transaction"
    text = json.dumps(logs) + json.dumps(dict(out.headers))
    for phi in ("Doe", "Jane", "19800101", "QZ42"):
        assert phi not in text
    assert all(entry["log_level"] == "debug" for entry in logs)
