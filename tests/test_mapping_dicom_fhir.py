"""dicom_map and fhir_map: paths of each kind, the shared rules, tables and validation of the output."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from engine.envelope import Drop, Envelope
from engine.mapping.base import MappingError
from engine.mapping.dicom import DICOM, parse_dicom_path
from engine.mapping.fhir import FHIR
from engine.mapping.interpreter import check_rules
from engine.mapping.tables import Table
from engine.security.crypto import KeyRing
from transforms.dicom_map import DicomMapConfig
from transforms.dicom_map import build as dicom_map
from transforms.fhir_map import FhirMapConfig
from transforms.fhir_map import build as fhir_map

STATIONS = Table("stations", ("code", "target_code"), {"CT01": {"code": "CT01", "target_code": "Radiology"}})
LAB = Table("lab-codes", ("code", "target_code", "target_display", "target_system"), {
    "GLU": {"code": "GLU", "target_code": "2345-7", "target_display": "Glucose", "target_system": "http://loinc.org"}})


class Ctx:
    def __init__(self, tmp: Path) -> None:
        self.keyring = KeyRing(tmp / "keys.json")

        class settings:
            tables = {"stations": STATIONS, "lab-codes": LAB}
        self.settings = settings


def ct(**changes) -> bytes:
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.StationName = "CT01"
    ds.InstitutionName = "general hosp."
    item = Dataset()
    item.ReferencedSOPClassUID = "1.2.840.10008.3.1.2.3.1"
    item.ReferencedSOPInstanceUID = "1.2.3.4.5"
    ds.ReferencedStudySequence = Sequence([item])
    block = ds.private_block(0x0009, "ACME 1.0", create=True)
    block.add_new(0x10, "LO", "secret")
    for k, v in changes.items():
        setattr(ds, k, v)
    buf = io.BytesIO()
    ds.save_as(buf)
    return buf.getvalue()


def run_dicom(tmp_path, rules, payload=None, headers=None) -> pydicom.Dataset:
    t = dicom_map(DicomMapConfig(type="dicom_map", rules=rules), Ctx(tmp_path))
    out = t(Envelope(channel="c", kind="dicom", payload=payload or ct(), headers=headers or {}))
    return pydicom.dcmread(io.BytesIO(out.payload))


@pytest.mark.parametrize("path,last", [
    ("InstitutionName", (0x00080080, "InstitutionName")),
    ("(0008,0080)", (0x00080080, "InstitutionName")),
    ("00080080", (0x00080080, "InstitutionName")),
    ("ReferencedStudySequence[0].ReferencedSOPInstanceUID", (0x00081155, "ReferencedSOPInstanceUID")),
])
def test_dicom_path_forms(path, last):
    p = parse_dicom_path(path)
    assert (p.steps[-1].tag, p.steps[-1].keyword) == last


@pytest.mark.parametrize("bad,reason", [
    ("InstitutionNam", "unknown DICOM keyword"), ("(0009,0010)", "named by its creator"),
    ("InstitutionName.PatientID", "not a sequence"), ("(0008,\"X\",10)", "odd group"),
    ("(0008,9998)", "not in the DICOM data dictionary"),
])
def test_dicom_bad_paths(bad, reason):
    errs = check_rules([{"set": {bad: "x"}}], DICOM, {})
    assert errs and reason in errs[0].message, errs


def test_dicom_set_copy_delete_lookup_private_and_sequences(tmp_path):
    ds = run_dicom(tmp_path, [
        {"set": {"InstitutionName": "General Hospital", "(0009,\"ACME 1.0\",11)": "new private",
                 "RequestAttributesSequence[0].RequestedProcedureID": "RP1"}},
        {"copy": {"from": "StationName", "to": "StationAETitle"}},
        {"lookup": {"field": "StationName", "table": "stations",
                    "set": {"InstitutionalDepartmentName": "target_code"}}},
        {"delete": ["(0009,\"ACME 1.0\",10)", "OperatorsName"]},
        {"set": {"ReferencedStudySequence.ReferencedSOPInstanceUID": "9.9.9"}},
    ])
    assert ds.InstitutionName == "General Hospital"
    assert ds.InstitutionalDepartmentName == "Radiology"
    assert ds.RequestAttributesSequence[0].RequestedProcedureID == "RP1"
    assert ds.ReferencedStudySequence[0].ReferencedSOPInstanceUID == "9.9.9"
    block = ds.private_block(0x0009, "ACME 1.0")
    assert block[0x11].value == "new private" and 0x10 not in [e.tag.element & 0xFF for e in ds if e.tag.group == 9
                                                              and not e.tag.is_private_creator]
    assert "OperatorsName" not in ds
    assert ds.PixelData  # pixels pass through
    assert ds[0x0008, 0x0080].VR == "LO"


def test_dicom_private_block_found_by_creator_wherever_it_sits(tmp_path):
    """The creator sits at (0009,0010) in one file and (0009,0012) in another: the rule finds both."""
    ds0 = pydicom.dcmread(io.BytesIO(ct()))
    ds0.add_new(0x00090012, "LO", "OTHER VENDOR")  # not ours
    payload = io.BytesIO()
    ds0.save_as(payload)
    ds = run_dicom(tmp_path, [{"set": {"(0009,\"OTHER VENDOR\",01)": "v"}}], payload.getvalue())
    assert ds[0x00091201].value == "v"


def test_regenerate_uids_consistently_across_instances(tmp_path):
    ctx = Ctx(tmp_path)
    t = dicom_map(DicomMapConfig(type="dicom_map", rules=[
        {"regenerate_uids": ["StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID",
                             "ReferencedStudySequence.ReferencedSOPInstanceUID"]}]), ctx)
    a, b = ct(SOPInstanceUID="1.2.3.100"), ct(SOPInstanceUID="1.2.3.101")
    headers = {"SOPInstanceUID": "1.2.3.100", "StudyInstanceUID": "x"}
    out_a = t(Envelope(channel="c", kind="dicom", payload=a, headers=headers))
    da = pydicom.dcmread(io.BytesIO(out_a.payload))
    db = pydicom.dcmread(io.BytesIO(t(Envelope(channel="c", kind="dicom", payload=b)).payload))
    orig = pydicom.dcmread(io.BytesIO(a))
    assert da.StudyInstanceUID == db.StudyInstanceUID != orig.StudyInstanceUID
    assert da.SOPInstanceUID != db.SOPInstanceUID
    assert da.file_meta.MediaStorageSOPInstanceUID == da.SOPInstanceUID
    assert out_a.headers["SOPInstanceUID"] == da.SOPInstanceUID
    assert out_a.headers["StudyInstanceUID"] == da.StudyInstanceUID
    assert da.ReferencedStudySequence[0].ReferencedSOPInstanceUID.startswith("2.25.")
    # the same key again (a new transform, the same engine key file): the same UIDs
    again = dicom_map(DicomMapConfig(type="dicom_map", rules=[{"regenerate_uids": "StudyInstanceUID"}]), Ctx(tmp_path))
    dc = pydicom.dcmread(io.BytesIO(again(Envelope(channel="c", kind="dicom", payload=a)).payload))
    assert dc.StudyInstanceUID == da.StudyInstanceUID


def test_dicom_when_foreach_and_filter_by_modality(tmp_path):
    ds = run_dicom(tmp_path, [
        {"when": {"Modality": "CT", "InstitutionName": {"regex": "(?i)^general"}},
         "then": [{"set": {"InstitutionName": "General Hospital"}}]},
        {"foreach": "ReferencedStudySequence", "rules": [
            {"when": {"ReferencedStudySequence.ReferencedSOPInstanceUID": "1.2.3.4.5"},
             "then": [{"set": {"ReferencedStudySequence.ReferencedSOPClassUID": "1.2.840.10008.3.1.2.3.2"}}]}]},
    ])
    assert ds.InstitutionName == "General Hospital"
    assert ds.ReferencedStudySequence[0].ReferencedSOPClassUID == "1.2.840.10008.3.1.2.3.2"
    with pytest.raises(Drop):
        run_dicom(tmp_path, [{"when": {"Modality": {"not": "MR"}}, "then": [{"drop": "not MR"}]}])


# -- FHIR ---------------------------------------------------------------------------------------
BUNDLE = {"resourceType": "Bundle", "type": "transaction", "entry": [
    {"fullUrl": "urn:uuid:1", "resource": {"resourceType": "Patient",
                                           "identifier": [{"system": "urn:mrn", "value": "1"}],
                                           "telecom": [{"system": "phone", "value": "555"}]},
     "request": {"method": "POST", "url": "Patient"}},
    {"fullUrl": "urn:uuid:2", "resource": {"resourceType": "Observation", "status": "final",
                                           "code": {"coding": [{"system": "urn:local", "code": "GLU"}]},
                                           "subject": {"reference": "urn:uuid:1"}},
     "request": {"method": "POST", "url": "Observation"}},
    {"fullUrl": "urn:uuid:3", "resource": {"resourceType": "Observation", "status": "final",
                                           "code": {"coding": [{"system": "urn:local", "code": "XYZ"}]}},
     "request": {"method": "POST", "url": "Observation"}},
]}


def run_fhir(tmp_path, rules, doc=None, **kw) -> dict:
    t = fhir_map(FhirMapConfig(type="fhir_map", rules=rules, **kw), Ctx(tmp_path))
    return json.loads(t(Envelope(channel="c", kind="fhir", payload=json.dumps(doc or BUNDLE).encode())).payload)


def resources(bundle, rtype):
    return [e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == rtype]


def test_fhir_lookup_adds_a_coding_per_observation_and_stays_valid(tmp_path):
    out = run_fhir(tmp_path, [{"lookup": {"field": "Observation.code.coding.where(system='urn:local').code",
                                          "table": "lab-codes", "add": {"Observation.code.coding": {
                                              "system": "target_system", "code": "target_code",
                                              "display": "target_display"}}}}])
    obs = resources(out, "Observation")
    assert obs[0]["code"]["coding"] == [{"system": "urn:local", "code": "GLU"},
                                        {"system": "http://loinc.org", "code": "2345-7", "display": "Glucose"}]
    assert obs[1]["code"]["coding"] == [{"system": "urn:local", "code": "XYZ"}]


def test_fhir_set_delete_where_and_create(tmp_path):
    out = run_fhir(tmp_path, [
        {"set": {"Patient.active": True, "Patient.identifier.where(system='urn:other').value": "X9",
                 "Observation.category[0].coding[0].code": "laboratory"}},
        {"delete": ["Patient.telecom", "Patient.identifier.where(system='urn:mrn')"]},
        {"copy": {"from": "Observation.code.coding.code", "to": "Observation.code.text"}},
    ])
    p = resources(out, "Patient")[0]
    assert p["active"] is True and p["identifier"] == [{"system": "urn:other", "value": "X9"}] and "telecom" not in p
    o = resources(out, "Observation")
    assert o[0]["category"] == [{"coding": [{"code": "laboratory"}]}] and o[0]["code"]["text"] == "GLU"
    assert o[1]["code"]["text"] == "XYZ"


def test_fhir_output_is_validated(tmp_path):
    with pytest.raises(MappingError, match="not valid FHIR"):
        run_fhir(tmp_path, [{"set": {"Patient.gender": 12}}])
    assert resources(run_fhir(tmp_path, [{"set": {"Patient.gender": "x"}}], validate_output=False),
                     "Patient")[0]["gender"] == "x"


def test_fhir_paths_are_checked():
    errs = check_rules([{"set": {"Patient.nmae.family": "x", "gender": "x",
                                 "Patient.name.where(use='official').exists()": 1}}], FHIR, {})
    assert [e.message.split(":")[0] for e in errs] == ["Patient.nmae.family", "gender",
                                                       "Patient.name.where(use='official').exists()"]
    assert "no element 'nmae'" in errs[0].message


def test_fhir_when_reads_fhirpath(tmp_path):
    out = run_fhir(tmp_path, [{"when": {"Observation.code.coding.where(system='urn:local').code": "XYZ"},
                               "then": [{"set": {"Observation.status": "preliminary"}}]}])
    assert [o["status"] for o in resources(out, "Observation")] == ["final", "preliminary"]


def test_a_single_resource_works_too(tmp_path):
    out = run_fhir(tmp_path, [{"set": {"Patient.gender": "female"}}],
                   doc={"resourceType": "Patient", "name": [{"family": "DOE"}]})
    assert out == {"resourceType": "Patient", "name": [{"family": "DOE"}], "gender": "female"}
