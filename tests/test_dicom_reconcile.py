"""Patient Information Reconciliation and IOCM in the archive, with real peers.

Images go in with DCMTK storescu; ADT A08 / A40 come over MLLP (a raw-socket client), a FHIR
Patient update over HTTP (httpx); C-FIND is DCMTK findscu, C-GET DCMTK getscu. After an update
C-FIND answers with the new demographics and retrieved instances carry them, while the stored
bytes stay as the modality sent them (rewrite on retrieve); a merge moves the studies to the
surviving patient; a KOS rejection note hides the instances it names, or deletes them.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import httpx
import pytest
from dicom_peers import data_file, findscu, run, storescu
from mllp_peers import RawClient, msa
from pydicom import Dataset, dcmread
from pydicom.dataset import FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from sqlalchemy import select

from engine.store import schema
from engine.store.dicom import index as idx
from engine.store.dicom.iocm import KOS_CLASS
from engine.store.dicom.tables import patients

TOKEN = "reconcile-test-token-8d2f"
YAML = """
store: {url: "sqlite:///data/medrelay.db", blobs: data/blobs}
keys: {kek_file: data/keys.json}
channels:
  adt:
    source: {type: mllp, port: 0}
    routes:
      - name: archive-patients
        transforms: [{type: patient_update}]
        to: {type: store}
  api:
    source: {type: fhir, port: 0, auth: {bearer_tokens: ["${RECONCILE_TOKEN}"]}}
    routes:
      - name: archive-patients
        when: {resourceType: Patient}
        transforms: [{type: patient_update}]
        to: {type: store}
  web:
    source: {type: dicomweb, host: 127.0.0.1, port: 0, base_path: /dicom-web,
             auth: {bearer_tokens: ["${RECONCILE_TOKEN}"]}}
    routes: []
  dcm:
    source: {type: dicom, port: 0, ae_title: MEDRELAY, calling_aets: [TESTSCU, GETSCU, FINDSCU]}
    routes:
      - name: archive
        to: {type: store}
      - name: iocm
        when: {SOPClassUID: 1.2.840.10008.5.1.4.1.1.88.59}
        transforms: [{type: iocm_rejection, delete: %(delete)s}]
        to: {type: store}
"""


def instance(tmp, name, *, pid, name_pn, study, series=None, issuer="HOSP"):
    ds = dcmread(data_file("CT_small.dcm"))
    ds.PatientID, ds.PatientName, ds.IssuerOfPatientID = pid, name_pn, issuer
    ds.PatientBirthDate = "19600101"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series or generate_uid()
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    p = tmp / f"{name}.dcm"
    ds.save_as(p, enforce_file_format=True)
    return p, ds


def adt(control_id: str, event: str, pid_segment: str, extra: str = "") -> bytes:
    segs = [f"MSH|^~\\&|HIS|HOSP|MEDRELAY|RAD|20260101120000||ADT^{event}^ADT_A01|{control_id}|P|2.5",
            f"EVN|{event}|20260101120000", pid_segment, "PV1|1|O"]
    if extra:
        segs.insert(3, extra)
    return ("\r".join(segs) + "\r").encode()


def find(port, level, keys, model="-P"):
    proc, rsp = findscu(port, level, keys, model=model, aet="FINDSCU", out_dir=_out())
    assert proc.returncode == 0, proc.stdout
    return rsp


_counter = [0]


def _out():
    _counter[0] += 1
    d = Path(os.environ["RECONCILE_TMP"]) / f"find{_counter[0]}"
    d.mkdir()
    return d


def get_study(port, study, out):
    out.mkdir()
    g = run("getscu", "-S", "-aet", "GETSCU", "-aec", "MEDRELAY", "+B", "-od", str(out),
            "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study}", "127.0.0.1", str(port))
    assert g.returncode == 0, g.stdout
    return {str(d.SOPInstanceUID): d for d in (dcmread(f) for f in out.iterdir())}


def done(eng, route, n):
    d = schema.deliveries

    def ok():
        with eng.store.engine.connect() as c:
            rows = c.execute(select(d.c.state).where(d.c.route == route)).scalars().all()
        assert "dead" not in rows, rows
        return len([r for r in rows if r == "done"]) >= n
    eng.wait_for(ok)


def pending(eng):
    d = schema.deliveries
    with eng.store.engine.connect() as c:
        return c.execute(select(d.c.id).where(d.c.state == "pending")).all()


def audit(eng, prefix):
    a = schema.audit_events
    with eng.store.engine.connect() as c:
        return [dict(r) for r in c.execute(select(a).where(a.c.action.like(prefix + "%")).order_by(a.c.id)).mappings()]


@pytest.fixture
def eng(engine_factory, tmp_path, monkeypatch):
    monkeypatch.setenv("RECONCILE_TMP", str(tmp_path))
    monkeypatch.setenv("RECONCILE_TOKEN", TOKEN)
    return engine_factory(YAML % {"delete": "false"})


@pytest.mark.dcmtk
def test_update_merge_and_fhir_update_reach_find_and_retrieve(eng, tmp_path):
    port = eng.address("dcm")[1]
    study_a, study_b = generate_uid(), generate_uid()
    a1, ds_a1 = instance(tmp_path, "a1", pid="PIR1", name_pn="Doe^Jane", study=study_a)
    a2, _ = instance(tmp_path, "a2", pid="PIR1", name_pn="Doe^Jane", study=study_a)
    b1, _ = instance(tmp_path, "b1", pid="PIR2", name_pn="Roe^Rick", study=study_b)
    assert storescu(port, [a1, a2, b1]).returncode == 0
    # before any change: retrieval gives the stored instance byte-identical (no rewrite)
    got = get_study(port, study_a, tmp_path / "get0")
    assert got[str(ds_a1.SOPInstanceUID)].PixelData == ds_a1.PixelData
    assert str(got[str(ds_a1.SOPInstanceUID)].PatientName) == "Doe^Jane"

    # ADT A08: new name, birth date and sex for PIR1 (issuer HOSP, as the images carry it)
    with RawClient(*eng.address("adt")) as c:
        ack = c.request(adt("A08-1", "A08", "PID|1||PIR1^^^HOSP^MR||Doe^Janet^Q||19700215|F"))
    assert msa(ack)[1] == "AA"
    done(eng, "archive-patients", 1)
    (p,) = find(port, "PATIENT", {"PatientID": "PIR1", "PatientName": "", "PatientBirthDate": "", "PatientSex": ""})
    assert str(p.PatientName) == "Doe^Janet^Q" and p.PatientBirthDate == "19700215" and p.PatientSex == "F"
    assert find(port, "PATIENT", {"PatientName": "Doe^Jane", "PatientID": ""}) == []  # the old name is gone
    assert [r.PatientID for r in find(port, "PATIENT", {"PatientName": "DOE^JANET*", "PatientID": ""})] == ["PIR1"]
    (s,) = find(port, "STUDY", {"StudyInstanceUID": study_a, "PatientName": ""}, model="-S")
    assert str(s.PatientName) == "Doe^Janet^Q"
    # C-GET sends the new demographics; pixel data and UIDs are untouched
    got = get_study(port, study_a, tmp_path / "get1")
    sent = got[str(ds_a1.SOPInstanceUID)]
    assert str(sent.PatientName) == "Doe^Janet^Q" and sent.PatientBirthDate == "19700215"
    assert sent.PixelData == ds_a1.PixelData and sent.StudyInstanceUID == study_a
    # DICOMweb reads the same archive: QIDO-RS answers, WADO-URI retrieves with the new name
    whost, wport = eng.address("web")
    auth = {"Authorization": f"Bearer {TOKEN}"}
    base = f"http://{whost}:{wport}/dicom-web"
    qido = httpx.get(f"{base}/studies", params={"PatientID": "PIR1", "includefield": "PatientName"},
                     headers={**auth, "Accept": "application/dicom+json"})
    assert qido.status_code == 200 and "Doe^Janet^Q" in qido.text and "Doe^Jane\"" not in qido.text
    wado = httpx.get(base, params={"requestType": "WADO", "studyUID": study_a, "seriesUID": ds_a1.SeriesInstanceUID,
                                   "objectUID": ds_a1.SOPInstanceUID, "contentType": "application/dicom"},
                     headers=auth)
    assert wado.status_code == 200 and str(dcmread(io.BytesIO(wado.content)).PatientName) == "Doe^Janet^Q"
    # ... and the archive's copy is still what the modality sent (stored, not rewritten)
    with eng.store.engine.connect() as conn:
        row = idx.existing_instance(conn, str(ds_a1.SOPInstanceUID))
        stored = conn.execute(select(schema.messages.c.id).where(schema.messages.c.id == row["message_id"])).scalar()
        raw = eng.store.message_payload(conn, stored)
    assert b"Doe^Jane" in raw and b"Janet" not in raw

    # ADT A40: PIR2 merged into PIR1
    with RawClient(*eng.address("adt")) as c:
        ack = c.request(adt("A40-1", "A40", "PID|1||PIR1^^^HOSP^MR||Doe^Janet^Q||19700215|F",
                            extra="MRG|PIR2^^^HOSP^MR"))
        assert msa(ack)[1] == "AA"
        # an ADT that is not a patient change is filtered, not an error
        assert msa(c.request(adt("A01-1", "A01", "PID|1||PIR9^^^HOSP^MR||X^Y")))[1] == "AA"
    done(eng, "archive-patients", 2)
    assert find(port, "PATIENT", {"PatientID": "PIR2"}) == []
    (p,) = find(port, "PATIENT", {"PatientID": "PIR1", "NumberOfPatientRelatedStudies": ""})
    assert int(p.NumberOfPatientRelatedStudies) == 2
    got = get_study(port, study_b, tmp_path / "get2")
    (moved,) = got.values()
    assert moved.PatientID == "PIR1" and str(moved.PatientName) == "Doe^Janet^Q"
    with eng.store.engine.connect() as conn:
        assert len(conn.execute(select(patients.c.pk)).all()) == 1

    # FHIR Patient update (identifier system urn:medrelay:id:HOSP = issuer HOSP)
    patient = {"resourceType": "Patient", "identifier": [{"system": "urn:medrelay:id:HOSP", "value": "PIR1"}],
               "name": [{"family": "Doe", "given": ["Janette"]}], "gender": "female"}
    host, fport = eng.address("api")
    r = httpx.post(f"http://{host}:{fport}/fhir/Patient", json=patient, headers={"Authorization": f"Bearer {TOKEN}"})
    assert r.status_code == 201, r.text
    done(eng, "archive-patients", 3)
    (p,) = find(port, "PATIENT", {"PatientID": "PIR1", "PatientName": "", "PatientBirthDate": ""})
    assert str(p.PatientName) == "Doe^Janette" and p.PatientBirthDate == "19700215"  # absent: unchanged

    actions = [(a["action"], a["entity"]) for a in audit(eng, "dicom.patient")]
    assert [a for a, _ in actions] == ["dicom.patient.update", "dicom.patient.merge", "dicom.patient.update"]
    assert actions[1][1]["studies_moved"] == 1
    assert all("Doe" not in str(e) and "PIR" not in str(e) for _, e in actions)


@pytest.mark.dcmtk
def test_update_for_an_id_stored_without_issuer_needs_it_said(engine_factory, tmp_path, monkeypatch):
    """Images without Issuer of Patient ID are a different patient key: an A08 with issuer HOSP does not
    touch them unless `also_without_issuer` says the site's Patient IDs are unique."""
    monkeypatch.setenv("RECONCILE_TMP", str(tmp_path))
    monkeypatch.setenv("RECONCILE_TOKEN", TOKEN)
    yaml = (YAML % {"delete": "false"}).replace(
        "transforms: [{type: patient_update}]\n        to: {type: store}\n  api",
        "transforms: [{type: patient_update, also_without_issuer: true}]\n        to: {type: store}\n  api")
    eng = engine_factory(yaml)
    port = eng.address("dcm")[1]
    f, _ = instance(tmp_path, "n1", pid="NOISS", name_pn="Old^Name", study=generate_uid(), issuer="")
    assert storescu(port, [f]).returncode == 0
    with RawClient(*eng.address("adt")) as c:
        assert msa(c.request(adt("A31-1", "A31", "PID|1||NOISS^^^HOSP^MR||New^Name")))[1] == "AA"
    done(eng, "archive-patients", 1)
    (p,) = find(port, "PATIENT", {"PatientID": "NOISS", "PatientName": ""})
    assert str(p.PatientName) == "New^Name"


def kos(tmp, ref: Dataset, *, code="113001") -> Path:
    ds = Dataset()
    ds.SOPClassUID = KOS_CLASS
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = ref.StudyInstanceUID
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "KO"
    ds.PatientID, ds.PatientName, ds.IssuerOfPatientID = ref.PatientID, ref.PatientName, ref.IssuerOfPatientID
    ds.SeriesNumber, ds.InstanceNumber = 99, 1
    ds.ValueType = "CONTAINER"
    title = Dataset()
    title.CodeValue, title.CodingSchemeDesignator, title.CodeMeaning = code, "DCM", "Rejected for Quality Reasons"
    ds.ConceptNameCodeSequence = Sequence([title])
    sop = Dataset()
    sop.ReferencedSOPClassUID, sop.ReferencedSOPInstanceUID = ref.SOPClassUID, ref.SOPInstanceUID
    se = Dataset()
    se.SeriesInstanceUID = ref.SeriesInstanceUID
    se.ReferencedSOPSequence = Sequence([sop])
    st = Dataset()
    st.StudyInstanceUID = ref.StudyInstanceUID
    st.ReferencedSeriesSequence = Sequence([se])
    ds.CurrentRequestedProcedureEvidenceSequence = Sequence([st])
    ds.ContentSequence = Sequence()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = KOS_CLASS
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    p = tmp / f"kos-{code}.dcm"
    ds.save_as(p, enforce_file_format=True)
    return p


@pytest.mark.dcmtk
@pytest.mark.parametrize("delete", [False, True])
def test_kos_rejection_note_hides_or_deletes(engine_factory, tmp_path, monkeypatch, delete):
    monkeypatch.setenv("RECONCILE_TMP", str(tmp_path))
    monkeypatch.setenv("RECONCILE_TOKEN", TOKEN)
    eng = engine_factory(YAML % {"delete": "true" if delete else "false"})
    port = eng.address("dcm")[1]
    study, series = generate_uid(), generate_uid()
    keep, ds_keep = instance(tmp_path, "keep", pid="IOCM1", name_pn="Io^Cm", study=study, series=series)
    bad, ds_bad = instance(tmp_path, "bad", pid="IOCM1", name_pn="Io^Cm", study=study, series=series)
    other, ds_other = instance(tmp_path, "other", pid="IOCM1", name_pn="Io^Cm", study=study)  # its own series
    assert storescu(port, [keep, bad, other]).returncode == 0
    done(eng, "archive", 3)  # filed (archived) before the notes reject two of them
    not_a_rejection = kos(tmp_path, ds_other, code="113000")  # a KOS of another title: just stored
    note = kos(tmp_path, ds_bad)
    other_note = kos(tmp_path, ds_other, code="113039")  # the other series' only instance
    assert storescu(port, [not_a_rejection, note, other_note]).returncode == 0
    eng.wait_for(lambda: len(audit(eng, "dicom.iocm")) == 2)
    eng.wait_for(lambda: not pending(eng))
    images = find(port, "IMAGE", {"StudyInstanceUID": study, "SeriesInstanceUID": "", "SOPInstanceUID": ""},
                  model="-S")
    uids = {str(r.SOPInstanceUID) for r in images}
    assert str(ds_bad.SOPInstanceUID) not in uids and str(ds_other.SOPInstanceUID) not in uids
    assert str(ds_keep.SOPInstanceUID) in uids and len(uids) == 4  # keep + the three notes
    # the other series had only the rejected instance: it is gone from SERIES level too
    series_uids = {str(r.SeriesInstanceUID) for r in find(port, "SERIES", {"StudyInstanceUID": study,
                                                                           "SeriesInstanceUID": ""}, model="-S")}
    assert series in series_uids and str(ds_other.SeriesInstanceUID) not in series_uids
    got = get_study(port, study, tmp_path / "get")
    assert str(ds_bad.SOPInstanceUID) not in got and str(ds_keep.SOPInstanceUID) in got and len(got) == 4
    events = audit(eng, "dicom.iocm")
    assert {e["entity"]["reason"] for e in events} == {"113001", "113039"}
    assert all(e["entity"]["hidden"] == 1 for e in events)
    with eng.store.engine.connect() as c:
        rejected = c.execute(select(schema.metadata.tables["dicom_rejected"])).mappings().all()
        assert {r["sop_uid"] for r in rejected} == {str(ds_bad.SOPInstanceUID), str(ds_other.SOPInstanceUID)}
        mids = [r["message_id"] for r in rejected]
        left = c.execute(select(schema.messages.c.id).where(schema.messages.c.id.in_(mids))).scalars().all()
    if delete:
        assert {e["action"] for e in events} == {"dicom.iocm.delete"}
        assert all(r["deleted"] == 1 for r in rejected) and left == []
    else:
        assert {e["action"] for e in events} == {"dicom.iocm.reject"}
        assert sorted(left) == sorted(mids)  # hidden, still stored
