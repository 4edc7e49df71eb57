"""UIDs the archive index already holds under another parent (issue 13 probe, issue 9 class).

An instance whose Series Instance UID is filed under another study, or whose SOP Instance UID
(with other content) is filed under another series, is refused with 0xC000 and an Error Comment
that names the level only; it is never filed under the first study (before: C-STORE success, then
found under the other patient's study and not under its own). Every intake path shares the check
(the index write); here DCMTK storescu (small C-STORE), pynetdicom (a streamed, > 16 MiB data
set), dicomweb-client (STOW-RS), and the index code itself (the `store` destination's path), on
SQLite and PostgreSQL; C-FIND and QIDO-RS show the first study unchanged. Also STOW-RS of a data
set whose file meta names another SOP Instance UID: stored under the data set's UID.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import requests
from dicomweb_client.api import DICOMwebClient
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from sqlalchemy import func, select

from engine.store import schema
from engine.store.dicom import index as idx
from tests.dicom_peers import findscu, store_statuses, storescu

TOKEN = "uid-conflict-token-0123456789abc"
CT = "1.2.840.10008.5.1.4.1.1.2"


def _yaml(url: str, data: Path) -> str:
    return f"""
store: {{url: "{url}", blobs: "{data}/blobs"}}
keys: {{kek_file: "{data}/keys.json"}}
channels:
  dcm:
    source: {{type: dicom, port: 0, ae_title: MEDRELAY, calling_aets: [TESTSCU]}}
    routes: []
  dcmr:
    source: {{type: dicom, port: 0, ae_title: MEDRELAY, calling_aets: [TESTSCU], duplicates: replace}}
    routes: []
  drop:
    source: {{type: file, path: "{data}/drop", ready: immediate, poll_interval: 0.1}}
    routes: []
  web:
    source: {{type: dicomweb, host: 127.0.0.1, port: 0, base_path: /dicom-web,
             auth: {{bearer_tokens: ["${{DW_TOKEN}}"]}}}}
    routes: []
"""


@pytest.fixture
def eng(engine_factory, store_url, tmp_path):
    (tmp_path / "data" / "drop").mkdir(parents=True)
    e = engine_factory(_yaml(store_url, tmp_path / "data"), env={"DW_TOKEN": TOKEN})
    e.drop = tmp_path / "data" / "drop"
    host, port = e.address("web")
    e.web = DICOMwebClient(url=f"http://{host}:{port}/dicom-web", headers={"Authorization": f"Bearer {TOKEN}"})
    return e


def _ct(study: str, series: str, sop: str, patient: str, *, desc: str = "") -> Dataset:
    ds = dcmread(get_testdata_file("CT_small.dcm"))
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = sop
    ds.PatientID, ds.PatientName = patient, f"{patient}^TEST"
    if desc:
        ds.SeriesDescription = desc  # other content, same UIDs
    return ds


def _file(tmp: Path, ds: Dataset) -> Path:
    tmp.mkdir(parents=True, exist_ok=True)
    path = tmp / f"{ds.SOPInstanceUID}-{generate_uid()[-6:]}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def _storescu(eng, channel: str, tmp: Path, ds: Dataset) -> str:
    r = storescu(eng.address(channel)[1], [_file(tmp, ds)])
    got = store_statuses(r.stdout)
    assert len(got) == 1, r.stdout + r.stderr
    return got[0]


def _pynetdicom(eng, channel: str, ds: Dataset) -> Dataset:
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID))
    assoc = ae.associate("127.0.0.1", eng.address(channel)[1], ae_title="MEDRELAY")
    assert assoc.is_established
    try:
        status = assoc.send_c_store(ds)
    finally:
        assoc.release()
    return status


def _stow_refusals(eng, ds: Dataset) -> list[int]:
    """STOW-RS with dicomweb-client of one instance that must be refused: the Failure Reasons of
    the 409 answer's Failed SOP Sequence (dicomweb-client raises on a 409)."""
    with pytest.raises(requests.HTTPError) as e:
        eng.web.store_instances([ds])
    assert e.value.response.status_code == 409
    body = e.value.response.json()
    assert "00081199" not in body
    return [i["00081197"]["Value"][0] for i in body["00081198"]["Value"]]


def _series_rows(eng, tmp: Path, series: str) -> list[tuple[str, int]]:
    """C-FIND (DCMTK findscu) at SERIES level: (study UID, instance count) of the series."""
    _, res = findscu(eng.address("dcm")[1], "SERIES", {"SeriesInstanceUID": series, "StudyInstanceUID": "",
                                                       "NumberOfSeriesRelatedInstances": ""}, out_dir=tmp / "f")
    return [(str(r.StudyInstanceUID), int(r.NumberOfSeriesRelatedInstances)) for r in res]


def _image_uids(eng, tmp: Path, study: str) -> list[str]:
    _, res = findscu(eng.address("dcm")[1], "IMAGE", {"StudyInstanceUID": study, "SeriesInstanceUID": "",
                                                      "SOPInstanceUID": ""}, out_dir=tmp / "i")
    return sorted(str(r.SOPInstanceUID) for r in res)


def _qido_instances(eng, study: str) -> list[str]:
    return sorted(i["00080018"]["Value"][0] for i in eng.web.search_for_instances(study_instance_uid=study))


def _messages(eng) -> int:
    with eng.store.engine.connect() as c:
        return int(c.execute(select(func.count()).select_from(schema.messages)).scalar_one())


def _failed_audits(eng) -> list[str]:
    with eng.store.engine.connect() as c:
        return [str(r.detail) for r in c.execute(select(schema.audit_events).where(
            schema.audit_events.c.action == "message.receive", schema.audit_events.c.outcome == "failure"))]


@pytest.mark.dcmtk
def test_series_uid_of_another_study_is_refused_on_every_path(eng, tmp_path):
    """Study A holds series X; an instance of study B (another patient) naming series X is refused
    by C-STORE (keep_first and replace channels, small and streamed) and STOW-RS with 0xC000, is
    neither stored nor routed, is audited as a failed receive, and C-FIND / QIDO-RS show series X
    with study A and its one instance only; study B stays unknown."""
    study_a, study_b, series_x = generate_uid(), generate_uid(), generate_uid()
    first = _ct(study_a, series_x, generate_uid(), "PAT-A")
    assert _storescu(eng, "dcm", tmp_path / "a", first) == "Success"
    before = _messages(eng)

    for channel in ("dcm", "dcmr"):  # the one-statement fast path (keep_first) and the full path (replace)
        status = _storescu(eng, channel, tmp_path / channel, _ct(study_b, series_x, generate_uid(), "PAT-B"))
        assert status != "Success", status
        st = _pynetdicom(eng, channel, _ct(study_b, series_x, generate_uid(), "PAT-B"))
        assert st.Status == 0xC000
        assert st.ErrorComment == "Series Instance UID is filed under another study; not stored"

    big = _ct(study_b, series_x, generate_uid(), "PAT-B")  # > 16 MiB: the streamed receive path
    big.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    big.Rows, big.Columns, big.NumberOfFrames = 1024, 1024, 9
    big.PixelData = np.zeros((9, 1024, 1024), np.uint16).tobytes()
    assert _pynetdicom(eng, "dcm", big).Status == 0xC000

    assert _stow_refusals(eng, _ct(study_b, series_x, generate_uid(), "PAT-B")) == [0xC000]

    assert _messages(eng) == before  # nothing stored (and so nothing routed)
    assert len(_failed_audits(eng)) == 6
    assert all(d == "refused: Series Instance UID is filed under another study" for d in _failed_audits(eng))
    assert _series_rows(eng, tmp_path, series_x) == [(study_a, 1)]
    assert _image_uids(eng, tmp_path, study_a) == [str(first.SOPInstanceUID)]
    assert _image_uids(eng, tmp_path, study_b) == []
    assert _qido_instances(eng, study_a) == [str(first.SOPInstanceUID)]
    assert eng.web.search_for_studies(search_filters={"StudyInstanceUID": study_b}) == []


@pytest.mark.dcmtk
def test_sop_uid_under_another_series_is_refused_a_resend_is_not(eng, tmp_path):
    """SOP Instance UID S is filed in study A / series X. The same bytes again: Success (duplicate).
    Other content in the same series: Success, first kept (keep_first) or replaced (replace). The
    same S in study B / series Y: refused 0xC000 on both channels and STOW-RS (replace would
    have moved the instance to the other patient's study), the index unchanged."""
    study_a, series_x, sop = generate_uid(), generate_uid(), generate_uid()
    first = _ct(study_a, series_x, sop, "PAT-A")
    assert _storescu(eng, "dcm", tmp_path / "a", first) == "Success"
    assert _storescu(eng, "dcm", tmp_path / "a2", first) == "Success"  # the same bytes: a duplicate
    assert _storescu(eng, "dcm", tmp_path / "k", _ct(study_a, series_x, sop, "PAT-A", desc="v2")) == "Success"
    assert _storescu(eng, "dcmr", tmp_path / "r", _ct(study_a, series_x, sop, "PAT-A", desc="v3")) == "Success"
    before = _messages(eng)

    moved = _ct(generate_uid(), generate_uid(), sop, "PAT-B")
    for channel in ("dcm", "dcmr"):
        st = _pynetdicom(eng, channel, moved)
        assert st.Status == 0xC000
        assert st.ErrorComment == "SOP Instance UID is filed under another series; not stored"
    assert _stow_refusals(eng, moved) == [0xC000]

    assert _messages(eng) == before
    assert _series_rows(eng, tmp_path, series_x) == [(study_a, 1)]
    assert _image_uids(eng, tmp_path, study_a) == [sop]
    assert _image_uids(eng, tmp_path, str(moved.StudyInstanceUID)) == []
    assert _qido_instances(eng, study_a) == [sop]
    got = eng.web.retrieve_instance(study_a, series_x, sop)
    assert got.SeriesDescription == "v3"  # the replace channel's same-series correction went in


def test_index_write_refuses_a_conflict_itself(store):
    """The shared index write (what the `store` destination and every hook reach) raises
    UidConflict for both conflicts, whatever ``replace`` says, and writes nothing."""
    hkey = store.keyring.hmac_key(idx.HMAC_KEY_NAME)

    def attrs(study: str, series: str, sop: str) -> dict:
        return {"PATIENT": {"PatientID": "P1", "PatientName": "P^1"}, "STUDY": {"StudyInstanceUID": study},
                "SERIES": {"SeriesInstanceUID": series, "Modality": "CT"},
                "IMAGE": {"SOPInstanceUID": sop, "SOPClassUID": CT}}

    a, x, s = generate_uid(), generate_uid(), generate_uid()
    with store.engine.begin() as conn:
        assert idx.index_instance(conn, store, hkey, attrs(a, x, s), message_id="m1", transfer_syntax="1.2.840."
                                  "10008.1.2.1", digest="d1", size=1) == "indexed"
    for other, digest in ((attrs(generate_uid(), x, generate_uid()), "d2"), (attrs(generate_uid(), generate_uid(), s),
                                                                             "d3")):
        for replace in (False, True):
            with store.engine.begin() as conn:
                assert not idx.index_into_known_series(conn, other, message_id="m2", transfer_syntax="1.2.840."
                                                       "10008.1.2.1", digest=digest, size=1, channel="c")
                with pytest.raises(idx.UidConflict):
                    idx.index_instance(conn, store, hkey, other, message_id="m2", transfer_syntax="1.2.840.10008.1"
                                       ".2.1", digest=digest, size=1, replace=replace)
    with store.engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(idx.instances)).scalar_one() == 1
        assert conn.execute(select(func.count()).select_from(idx.studies)).scalar_one() == 1


def test_stow_of_a_data_set_whose_file_meta_names_another_sop_uid(eng):
    """A pydicom-edited result (new SOPInstanceUID, file meta kept from its source) goes in under
    the data set's UID, and the stored file's meta is rewritten to match (WADO-RS gives it back)."""
    ds = _ct(generate_uid(), generate_uid(), generate_uid(), "PAT-AI")
    ds.SOPInstanceUID = generate_uid()  # the data set is authoritative; the meta still names the old one
    stow = eng.web.store_instances([ds])
    assert "FailedSOPSequence" not in stow
    assert [str(r.ReferencedSOPInstanceUID) for r in stow.ReferencedSOPSequence] == [str(ds.SOPInstanceUID)]
    got = eng.web.retrieve_instance(str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID))
    assert got.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    assert _qido_instances(eng, str(ds.StudyInstanceUID)) == [str(ds.SOPInstanceUID)]


def test_file_source_takes_the_data_sets_uid_and_refuses_a_conflict(eng):
    """The file source shares both: a file whose meta names another SOP Instance UID is stored
    under the data set's (its file meta written anew), and a file whose series is filed under
    another study goes to error/ (0xC000 is not retried), the first study unchanged."""
    edited = _ct(generate_uid(), generate_uid(), generate_uid(), "PAT-AI")
    edited.SOPInstanceUID = generate_uid()
    edited.save_as(eng.drop / "edited.dcm", enforce_file_format=False)
    eng.wait_for(lambda: (eng.drop / "done" / "edited.dcm").exists(), timeout=60)
    study, series, sop = str(edited.StudyInstanceUID), str(edited.SeriesInstanceUID), str(edited.SOPInstanceUID)
    got = eng.web.retrieve_instance(study, series, sop)
    assert got.file_meta.MediaStorageSOPInstanceUID == sop
    _ct(generate_uid(), series, generate_uid(), "PAT-B").save_as(eng.drop / "other.dcm", enforce_file_format=True)
    eng.wait_for(lambda: (eng.drop / "error" / "other.dcm").exists(), timeout=60)
    assert _qido_instances(eng, study) == [sop]
