"""dicom_to_fhir (with the study aggregate on a real store) and dicom_to_hl7."""

from __future__ import annotations

import json
from io import BytesIO
from types import SimpleNamespace

import pytest
from pydantic import ValidationError
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from engine.envelope import Envelope
from transforms.dicom_to_fhir import DicomToFhirConfig
from transforms.dicom_to_fhir import build as build_fhir
from transforms.dicom_to_hl7 import DicomToHl7Config, build_message
from transforms.dicom_to_hl7 import build as build_hl7
from transforms.hl7_text import V2Message
from transforms.hl7_validate import HL7ValidationError, validate_v2


@pytest.fixture
def store(sqlite_store):  # the transform on one backend; tests/test_engine_store.py covers both
    return sqlite_store


def ct(**attrs):
    ds = dcmread(get_testdata_file("CT_small.dcm"))
    for k, v in attrs.items():
        setattr(ds, k, v)
    return ds


def payload(ds) -> bytes:
    buf = BytesIO()
    ds.save_as(buf)
    return buf.getvalue()


def env(ds) -> Envelope:
    return Envelope(channel="ct", kind="dicom", payload=payload(ds))


def study_of(out: Envelope) -> dict:
    bundle = json.loads(out.payload)
    return next(e for e in bundle["entry"] if e["resource"]["resourceType"] == "ImagingStudy")


def test_imaging_study_grows_with_instances_and_never_duplicates(store):
    t = build_fhir(DicomToFhirConfig(type="dicom_to_fhir"), SimpleNamespace(store=store))
    study = generate_uid()
    s1, s2 = generate_uid(), generate_uid()
    instances = [ct(StudyInstanceUID=study, SeriesInstanceUID=s1, SeriesNumber=1, SOPInstanceUID=generate_uid(),
                    InstanceNumber=i) for i in (1, 2)]
    instances.append(ct(StudyInstanceUID=study, SeriesInstanceUID=s2, SeriesNumber=2, Modality="PT",
                        SOPInstanceUID=generate_uid(), InstanceNumber=1, BodyPartExamined="CHEST"))
    outs = [t(env(ds)) for ds in instances]
    entry = study_of(outs[-1])
    res = entry["resource"]
    assert entry["request"] == {"method": "PUT",
                                "url": f"ImagingStudy?identifier=urn:dicom:uid|urn:oid:{study}"}
    assert res["numberOfSeries"] == 2 and res["numberOfInstances"] == 3
    assert [m["code"] for m in res["modality"]] == ["CT", "PT"]
    assert [s["uid"] for s in res["series"]] == [s1, s2]
    assert res["series"][1]["bodySite"] == {"system": "http://snomed.info/sct", "code": "51185008",
                                            "display": "Thorax"}
    assert "bodySite" not in res["series"][0]
    # every emission targets the same resource (same conditional URL): updated, not duplicated
    assert len({study_of(o)["request"]["url"] for o in outs}) == 1
    assert [study_of(o)["resource"]["numberOfInstances"] for o in outs] == [1, 2, 3]
    # re-sending an instance does not add one
    again = t(env(instances[0]))
    assert study_of(again)["resource"]["numberOfInstances"] == 3
    assert again.headers["StudyInstanceUID"] == study


def test_without_context_the_study_has_the_one_instance():
    out = build_fhir(DicomToFhirConfig(type="dicom_to_fhir"))(env(ct()))
    res = study_of(out)["resource"]
    assert res["numberOfInstances"] == 1 and res["series"][0]["instance"][0]["sopClass"] == {
        "system": "urn:ietf:rfc:3986", "code": "urn:oid:1.2.840.10008.5.1.4.1.1.2"}
    assert out.kind == "fhir" and "PatientName" not in out.headers


def test_patient_accession_endpoint_and_issuer():
    ds = ct(IssuerOfPatientID="HOSP", AccessionNumber="ACC1", PatientBirthDate="19700101",
            ReferringPhysicianName="Welby^Marcus")
    cfg = DicomToFhirConfig(type="dicom_to_fhir", endpoint_url="https://pacs/dicom-web",
                            accession_system="urn:oid:1.2.3", patient_request="update",
                            identifier_systems={"HOSP": "urn:oid:1.2.276"})
    bundle = json.loads(build_fhir(cfg)(env(ds)).payload)
    patient, endpoint, study = (e for e in bundle["entry"])
    assert patient["request"]["url"] == "Patient?identifier=urn:oid:1.2.276|1CT1"
    assert patient["resource"]["birthDate"] == "1970-01-01"
    assert endpoint["resource"]["address"] == "https://pacs/dicom-web"
    assert study["resource"]["endpoint"] == [{"reference": endpoint["fullUrl"]}]
    assert study["resource"]["subject"] == {"reference": patient["fullUrl"]}
    assert {"type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "ACSN"}]},
            "system": "urn:oid:1.2.3", "value": "ACC1"} in study["resource"]["identifier"]
    assert study["resource"]["referrer"] == {"display": "Marcus Welby"}


def test_missing_uids_fail_clearly():
    ds = ct()
    del ds.SOPInstanceUID
    with pytest.raises(ValueError, match="SOPInstanceUID"):
        build_fhir(DicomToFhirConfig(type="dicom_to_fhir"))(env(ds))


# ------------------------------------------------------------------ dicom_to_hl7
@pytest.mark.parametrize("message", ["ORU^R01", "ORM^O01", "OMI^O23"])
def test_hl7_output_is_valid_and_escaped(message):
    ds = ct(PatientName="O'Brien|X^Mary~Ann^Q^Dr^III", AccessionNumber="A&B^1", StudyDescription="CT ~ Chest|Abd")
    cfg = DicomToHl7Config(type="dicom_to_hl7", message=message, sending_facility="H\\1",
                           retrieve_url_template="https://pacs/wado?studyUID={StudyInstanceUID}&x=1")
    out = build_hl7(cfg)(env(ds))
    text = out.payload.decode("utf-8")
    assert "\n" not in text and text.count("\r") >= 4
    msh = text.split("\r")[0].split("|")
    assert msh[3] == "H\\E\\1" and msh[8].startswith(message) and msh[11] == "2.5.1"
    assert [out.headers["MSH-9.1"], out.headers["MSH-9.2"]] == message.split("^")
    assert out.headers["MSH-10"] == msh[9] and out.headers["MSH-12"] == "2.5.1"
    m = V2Message(text)
    pid, obr = m.first("PID"), m.first("OBR")
    assert pid.raw(5) == "O'Brien\\F\\X^Mary\\R\\Ann^Q^III^Dr"  # PN prefix/suffix swapped into XPN order
    assert pid.get(5) == "O'Brien|X" and pid.get(5, 2) == "Mary~Ann"
    assert obr.get(3) == "A&B^1" and obr.get(18) == "A&B^1" and obr.raw(18) == "A\\T\\B\\S\\1"
    assert obr.get(4, 2) == "CT ~ Chest|Abd"
    if message == "ORU^R01":
        obx = m.all("OBX")
        assert obx[0].get(5) == ds.StudyInstanceUID and obx[0].get(3) == "110180"
        assert obx[1].get(2) == "RP" and obx[1].get(5) == f"https://pacs/wado?studyUID={ds.StudyInstanceUID}&x=1"
    if message == "OMI^O23":
        assert m.first("IPC").get(3) == ds.StudyInstanceUID


def test_msh10_is_fresh_each_time():
    t = build_hl7(DicomToHl7Config(type="dicom_to_hl7"))
    ids = {t(env(ct())).headers["MSH-10"] for _ in range(20)}
    assert len(ids) == 20 and all(len(i) <= 20 for i in ids)


def test_charset_latin1():
    out = build_hl7(DicomToHl7Config(type="dicom_to_hl7", charset="8859/1"))(env(ct(PatientName="Müller^Jürgen")))
    assert "Müller" in out.payload.decode("latin-1") and out.payload.decode("latin-1").split("\r")[0].endswith("8859/1")


def test_template_placeholders_checked():
    with pytest.raises(ValidationError, match="unknown placeholder"):
        DicomToHl7Config(type="dicom_to_hl7", retrieve_url_template="https://x/{PatientID}")


def test_validator_rejects_broken_messages():
    ds = dcmread(get_testdata_file("MR_small.dcm"))
    text, _ = build_message(ds, DicomToHl7Config(type="dicom_to_hl7", validate_output=False))
    validate_v2(text, "ORU_R01")
    with pytest.raises(HL7ValidationError):
        # PID-5 (required) moved into PID-4
        validate_v2(text.replace("PID|1||4MR1^^^^MR||", "PID|1||4MR1^^^^MR|"), "ORU_R01")
