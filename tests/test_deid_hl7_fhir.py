"""HL7 v2 and FHIR de-identification, and one pseudonym per patient across DICOM, HL7 and FHIR."""

import io
import json
from datetime import date, timedelta
from pathlib import Path

import pydicom
import pytest

from engine.envelope import Envelope
from transforms.deid_pseudonym import Pseudonymizer
from transforms.deidentify import DeidentifyConfig, build

SECRET = b"unit-test-secret-0123456789abcdef"
P = Pseudonymizer(SECRET)
STUDY_UID = "1.2.826.0.1.3680043.10.1.77"
SHIFT = P.date_shift_days("MRN12345", 365)


def shifted(yyyymmdd: str) -> str:
    d = date(int(yyyymmdd[:4]), int(yyyymmdd[4:6]), int(yyyymmdd[6:8])) + timedelta(days=SHIFT)
    return d.strftime("%Y%m%d")


ORU = (
    "MSH|^~\\&|RIS|HOSP|EHR|HOSP|20240102030405||ORU^R01|MSG0001|P|2.5.1\r"
    "EVN|R01|20240102030405|||OPER^Smith^Op\r"
    "PID|1||MRN12345^^^HOSP^MR~999-88-7777^^^SSA^SS||DOE^JOHN^Q||19600215|M||2106-3|"
    "1 Main St^^Springfield^IL^62701||(555)555-1234|||M||ACCT987|999-88-7777\r"
    "PD1|||Clinic\r"
    "NK1|1|DOE^JANE|SPO|1 Main St\r"
    "PV1|1|O|RAD^101^A^HOSP||||1234^Welby^Marcus|5678^Kildare^James|9^Consult^Doc||||||||"
    "9^Admit^Doc||VIS555\r"
    "ORC|RE|PLC100|FIL200||CM||||20240102|||1234^Welby^Marcus\r"
    "OBR|1|PLC100|FIL200|71020^Chest XR^CPT|||20240102030000|||||||||1234^Welby^Marcus||ACC777|REQ1|SPS1\r"
    "OBX|1|TX|IMP^Impression||Patient John Doe has no findings||||||F\r"
    "OBX|2|NM|1234-5^Dose^LN||12.5|mGy|||||F\r"
    "NTE|1||John's wife called\r"
    f"ZDS|{STUDY_UID}^RIS^Application^DICOM\r"
    "ZXX|DOE^JOHN\r"
    "GT1|1||DOE^JOHN\r"
    "IN1|1|PLAN|INS1|ACME Insurance\r"
)


def transform(**config):
    return build(DeidentifyConfig(type="deidentify", **config), secret=SECRET)


def hl7(message: str = ORU, **config) -> dict[str, list[list[str]]]:
    out = transform(**config)(Envelope(channel="t", kind="hl7v2", payload=message.encode()))
    segs: dict[str, list[list[str]]] = {}
    for seg in out.payload.decode().split("\r"):
        if seg:
            fields = seg.split("|")
            if fields[0] == "MSH":
                fields.insert(1, "|")  # index = MSH-n
            segs.setdefault(fields[0], []).append(fields)
    return segs


def fld(fields: list[str], n: int) -> str:
    return fields[n] if n < len(fields) else ""


def test_hl7_patient_identity_replaced_and_removed():
    s = hl7()
    pid = s["PID"][0]
    assert fld(pid, 3) == f"{P.patient_id('MRN12345')}^^^^MR~{P.patient_id('999-88-7777')}^^^^SS"
    assert fld(pid, 5) == "ANON^" + P.patient_name("MRN12345")[1]
    assert fld(pid, 7) == "" and fld(pid, 8) == "" and fld(pid, 11) == "" and fld(pid, 13) == ""
    assert fld(pid, 19) == ""
    assert fld(pid, 18) == P.ident("acct", "ACCT987")
    for seg in ("NK1", "GT1", "IN1", "PD1", "ZXX", "NTE"):
        assert seg not in s
    assert [fld(o, 2) for o in s["OBX"]] == ["NM"]
    pv1 = s["PV1"][0]
    assert fld(pv1, 7) == fld(pv1, 8) == fld(pv1, 9) == fld(pv1, 17) == fld(pv1, 3) == ""
    assert fld(pv1, 19) == P.ident("visit", "VIS555")
    assert fld(s["EVN"][0], 5) == ""
    assert fld(s["ORC"][0], 12) == "" and fld(s["OBR"][0], 16) == ""
    assert fld(s["ORC"][0], 2) == fld(s["OBR"][0], 2) == P.ident("order", "PLC100")
    assert fld(s["OBR"][0], 18) == P.ident("acc", "ACC777")
    assert fld(s["ZDS"][0], 1).split("^")[0] == P.uid(STUDY_UID)
    assert "DOE" not in json.dumps(s) and "Main St" not in json.dumps(s)


def test_hl7_dates_shift_with_the_patient_and_msh_stays_parseable():
    s = hl7()
    msh = s["MSH"][0]
    assert fld(msh, 2) == "^~\\&" and fld(msh, 9) == "ORU^R01" and fld(msh, 10) == "MSG0001"
    assert fld(msh, 7) == shifted("20240102") + "030405"
    assert fld(s["OBR"][0], 7) == shifted("20240102") + "030000"
    assert fld(s["ORC"][0], 9) == shifted("20240102")
    kept = hl7(options=["retain_long_full_dates"])
    assert fld(kept["MSH"][0], 7) == "20240102030405"


@pytest.mark.parametrize(
    ("options", "birth", "sex"),
    [
        ([], "", ""),
        (["retain_patient_characteristics"], "1960", "M"),
        (["retain_long_modified_dates"], "shift", ""),
        (["retain_long_full_dates", "retain_patient_characteristics"], "19600215", "M"),
    ],
)
def test_hl7_birth_date_and_sex_follow_the_options(options, birth, sex):
    pid = hl7(options=options)["PID"][0]
    assert fld(pid, 7) == (shifted("19600215") if birth == "shift" else birth)
    assert fld(pid, 8) == sex


def test_hl7_free_text_kept_when_asked():
    s = hl7(remove_free_text=False)
    assert "NTE" in s and [fld(o, 2) for o in s["OBX"]] == ["TX", "NM"]


def test_hl7_custom_encoding_characters():
    msg = ORU.replace("|", "#").replace("^", "$")
    out = transform()(Envelope(channel="t", kind="hl7v2", payload=msg.encode())).payload.decode()
    assert out.startswith("MSH#$~\\&#RIS")
    assert f"{P.patient_id('MRN12345')}$$$$MR" in out and "DOE" not in out


def test_hl7_rejects_non_hl7():
    with pytest.raises(ValueError):
        transform()(Envelope(channel="t", kind="hl7v2", payload=b"hello"))


BUNDLE = {
    "resourceType": "Bundle", "type": "transaction",
    "entry": [
        {"fullUrl": "http://x/fhir/Patient/p1", "request": {"method": "PUT", "url": "Patient/p1"},
         "resource": {
             "resourceType": "Patient", "id": "p1",
             "text": {"status": "generated", "div": "<div>John Doe</div>"},
             "identifier": [{"type": {"coding": [{"code": "MR"}]}, "system": "urn:oid:1.2.3", "value": "MRN12345",
                             "assigner": {"display": "HOSP"}}],
             "name": [{"family": "Doe", "given": ["John"]}], "telecom": [{"system": "phone", "value": "555-0199"}],
             "gender": "male", "birthDate": "1960-02-15", "address": [{"line": ["1 Main St"]}],
             "extension": [{"url": "http://hl7.org/fhir/StructureDefinition/patient-mothersMaidenName",
                            "valueString": "Smith"}],
             "contact": [{"name": {"family": "Doe"}}]}},
        {"resource": {
            "resourceType": "ImagingStudy", "id": "s1", "status": "available",
            "subject": {"reference": "Patient/p1", "display": "John Doe"},
            "identifier": [{"system": "urn:dicom:uid", "value": f"urn:oid:{STUDY_UID}"},
                           {"type": {"coding": [{"code": "ACSN"}]}, "value": "ACC777"}],
            "started": "2024-01-02T03:00:00+01:00",
            "series": [{"uid": STUDY_UID + ".1", "modality": {"code": "CR"},
                        "instance": [{"uid": STUDY_UID + ".1.1"}]}],
            "note": [{"text": "John Doe note"}]}},
        {"resource": {"resourceType": "Observation", "status": "final", "code": {"text": "Dose"},
                      "subject": {"reference": "Patient/p1"}, "effectiveDateTime": "2024-01-02",
                      "performer": [{"reference": "Practitioner/doc1", "display": "Dr Welby"}]}},
        {"resource": {"resourceType": "Practitioner", "id": "doc1", "name": [{"family": "Welby"}],
                      "identifier": [{"value": "NPI1"}]}},
    ],
}


def fhir(doc=BUNDLE, **config) -> dict:
    out = transform(**config)(Envelope(channel="t", kind="fhir", payload=json.dumps(doc).encode()))
    return json.loads(out.payload)


def test_fhir_patient_whitelisted_and_pseudonymised():
    b = fhir()
    pat = b["entry"][0]["resource"]
    assert pat["identifier"] == [{"type": {"coding": [{"code": "MR"}]}, "system": "urn:oid:1.2.3",
                                  "value": P.patient_id("MRN12345")}]
    assert pat["name"] == [{"family": "ANON", "given": [P.patient_name("MRN12345")[1]]}]
    assert set(pat) == {"resourceType", "id", "identifier", "name"}
    assert pat["id"] != "p1"
    assert b["entry"][0]["fullUrl"].endswith("/Patient/" + pat["id"])
    assert b["entry"][0]["request"]["url"] == "Patient/" + pat["id"]
    study, obs, doc = (e["resource"] for e in b["entry"][1:])
    assert study["subject"] == {"reference": "Patient/" + pat["id"]}
    assert obs["subject"]["reference"] == "Patient/" + pat["id"]
    assert obs["performer"][0]["reference"] == "Practitioner/" + doc["id"] and doc["id"] != "doc1"
    assert set(doc) == {"resourceType", "id"}
    text = json.dumps(b)
    for phi in ("Doe", "John", "555-0199", "Main St", "Smith", "Welby", "MRN12345", "ACC777", "NPI1", "div"):
        assert phi not in text


def test_fhir_uids_dates_and_options():
    b = fhir()
    study = b["entry"][1]["resource"]
    assert study["identifier"][0]["value"] == "urn:oid:" + P.uid(STUDY_UID)
    assert study["identifier"][1]["value"] == P.ident("acc", "ACC777")
    assert study["series"][0]["uid"] == P.uid(STUDY_UID + ".1")
    s = shifted("20240102")
    assert study["started"] == f"{s[:4]}-{s[4:6]}-{s[6:]}T03:00:00+01:00"
    assert "note" not in study
    assert "birthDate" not in b["entry"][0]["resource"]
    pat = fhir(options=["retain_patient_characteristics"])["entry"][0]["resource"]
    assert pat["birthDate"] == "1960" and pat["gender"] == "male"
    kept = fhir(options=["retain_uids", "retain_long_full_dates"])["entry"][1]["resource"]
    assert kept["series"][0]["uid"] == STUDY_UID + ".1" and kept["started"].startswith("2024-01-02")


def test_fhir_single_resource_and_bad_input():
    pat = fhir(BUNDLE["entry"][0]["resource"])
    assert pat["identifier"][0]["value"] == P.patient_id("MRN12345")
    with pytest.raises(ValueError):
        fhir([1, 2])


def test_same_patient_same_pseudonym_in_dicom_hl7_and_fhir():
    files = Path(pydicom.__file__).parent / "data" / "test_files"
    ds = pydicom.dcmread(files / "CT_small.dcm")
    ds.PatientID, ds.PatientName, ds.StudyDate = "MRN12345", "DOE^JOHN", "20240102"
    ds.StudyInstanceUID = STUDY_UID
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    opts = ["retain_long_modified_dates"]
    out = transform(options=opts)(Envelope(channel="t", kind="dicom", payload=buf.getvalue()))
    d = pydicom.dcmread(io.BytesIO(out.payload))
    h = hl7(options=opts)
    f = fhir(options=opts)
    pid, pat, study = h["PID"][0], f["entry"][0]["resource"], f["entry"][1]["resource"]
    assert d.PatientID == fld(pid, 3).split("^")[0] == pat["identifier"][0]["value"]
    family, given = str(d.PatientName).split("^")
    assert fld(pid, 5) == f"{family}^{given}" and pat["name"][0] == {"family": family, "given": [given]}
    assert d.StudyDate == fld(h["OBR"][0], 7)[:8] == study["started"][:10].replace("-", "")
    assert d.StudyInstanceUID == fld(h["ZDS"][0], 1).split("^")[0] == study["identifier"][0]["value"][8:]
