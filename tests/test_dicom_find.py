"""C-FIND against the archive index with DCMTK findscu: levels, wildcards, ranges, UID lists."""

from __future__ import annotations

import pytest
from pydicom import dcmread

from tests.dicom_peers import data_file, dicom_yaml, findscu, storescu_any

pytestmark = pytest.mark.dcmtk

FILES = ("CT_small.dcm", "MR_small.dcm", "JPEG2000.dcm", "rtplan.dcm", "693_UNCI.dcm")


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    """One engine with five instances (five patients and studies), shared by the read-only queries below."""
    from tests.conftest import EngineThread

    d = tmp_path_factory.mktemp("find")
    e = EngineThread(dicom_yaml(), d)
    port = e.address("dcm")[1]
    files = [data_file(n) for n in FILES]
    assert storescu_any(port, files) == ["Success"] * len(files)
    yield port, {n: dcmread(f, stop_before_pixels=True) for n, f in zip(FILES, files, strict=True)}, d
    e.stop()


def q(archive, level, keys, model="-S"):
    port, _, d = archive
    proc, res = findscu(port, level, keys, model=model, out_dir=d / "rsp")
    assert "Error" not in proc.stdout or "0x0000" in proc.stdout, proc.stdout
    return res


def test_patient_level_wildcards(archive):
    res = q(archive, "PATIENT", {"PatientName": "compressedsamples^*", "PatientID": "",
                                 "NumberOfPatientRelatedStudies": ""}, model="-P")
    assert sorted(r.PatientID for r in res) == ["1CT1", "4MR1", "8NM1"]
    assert {int(r.NumberOfPatientRelatedStudies) for r in res} == {1}
    res = q(archive, "PATIENT", {"PatientName": "*MR?", "PatientID": ""}, model="-P")
    assert [r.PatientID for r in res] == ["4MR1"]
    res = q(archive, "PATIENT", {"PatientID": "id00001", "PatientName": ""}, model="-P")
    assert [str(r.PatientName) for r in res] == ["Last^First^mid^pre"]
    # only the requested keys plus QueryRetrieveLevel come back
    assert set(res[0].dir()) == {"PatientID", "PatientName", "QueryRetrieveLevel"}


def test_patient_level_refused_in_study_root(archive):
    port, _, d = archive
    proc, res = findscu(port, "PATIENT", {"PatientID": ""}, model="-S", out_dir=d / "rsp")
    assert res == [] and "DataSetDoesNotMatchSOPClass" in proc.stdout  # DCMTK name of 0xA900, proc.stdout


def test_study_level_date_ranges(archive):
    res = q(archive, "STUDY", {"StudyDate": "20040101-20041231", "StudyInstanceUID": "", "ModalitiesInStudy": "",
                               "NumberOfStudyRelatedInstances": "", "PatientName": ""})
    assert sorted(r.StudyDate for r in res) == ["20040119", "20040826", "20040826"]
    assert sorted(r.ModalitiesInStudy for r in res) == ["CT", "MR", "NM"]
    assert {int(r.NumberOfStudyRelatedInstances) for r in res} == {1}
    assert len(q(archive, "STUDY", {"StudyDate": "-20031231", "StudyInstanceUID": ""})) == 1
    assert len(q(archive, "STUDY", {"StudyDate": "20040201-", "StudyInstanceUID": ""})) == 2
    assert len(q(archive, "STUDY", {"StudyDate": "20040119", "StudyInstanceUID": ""})) == 1
    assert len(q(archive, "STUDY", {"StudyTime": "070000-080000", "StudyInstanceUID": ""})) == 1
    assert len(q(archive, "STUDY", {"StudyInstanceUID": ""})) == 5


def test_study_level_uid_list_and_modalities(archive):
    _, ds, _ = archive
    uids = [str(ds["CT_small.dcm"].StudyInstanceUID), str(ds["rtplan.dcm"].StudyInstanceUID), "1.2.3.4"]
    res = q(archive, "STUDY", {"StudyInstanceUID": "\\".join(uids)})
    assert sorted(r.StudyInstanceUID for r in res) == sorted(uids[:2])
    res = q(archive, "STUDY", {"ModalitiesInStudy": "NM", "StudyInstanceUID": ""})
    assert [r.StudyInstanceUID for r in res] == [ds["JPEG2000.dcm"].StudyInstanceUID]
    res = q(archive, "STUDY", {"ModalitiesInStudy": "CT\\MR", "StudyInstanceUID": ""})
    assert len(res) == 3


def test_series_and_image_levels(archive):
    _, ds, _ = archive
    mr_study = str(ds["MR_small.dcm"].StudyInstanceUID)
    res = q(archive, "SERIES", {"StudyInstanceUID": mr_study, "SeriesInstanceUID": "", "Modality": "",
                                "NumberOfSeriesRelatedInstances": ""})
    assert [r.Modality for r in res] == ["MR"]
    res = q(archive, "SERIES", {"Modality": "C?", "SeriesInstanceUID": ""})
    assert len(res) == 2
    res = q(archive, "IMAGE", {"StudyInstanceUID": mr_study, "SOPInstanceUID": "", "SOPClassUID": "",
                               "InstanceNumber": ""})
    assert [int(r.InstanceNumber) for r in res] == [1]
    sops = [str(ds["CT_small.dcm"].SOPInstanceUID), str(ds["693_UNCI.dcm"].SOPInstanceUID)]
    res = q(archive, "IMAGE", {"SOPInstanceUID": "\\".join(sops), "InstanceNumber": ""})
    assert sorted(r.SOPInstanceUID for r in res) == sorted(sops)
    res = q(archive, "IMAGE", {"PatientID": "1CT1", "SOPInstanceUID": ""}, model="-P")
    assert [r.SOPInstanceUID for r in res] == [ds["CT_small.dcm"].SOPInstanceUID]


def test_worklist_find_answers(archive):
    """Modality Worklist C-FIND is served (items come from engine.store.dicom.worklist; none stored here)."""
    port, _, d = archive
    proc, res = findscu(port, "", {"PatientName": "*", "ScheduledProcedureStepSequence[0].Modality": "CT"},
                        model="-W", out_dir=d / "mwl")
    assert "Received Final Find Response (Success)" in proc.stdout, proc.stdout
    assert res == []
