"""DICOM archive identity (issue 9 item 14): how the index keys patients.

PatientID + IssuerOfPatientID is the key (an absent issuer is a value of its own); an
instance without a PatientID gets a patient of its own per study, never the one patient
every such instance used to be merged into. Real peers where the protocol matters
(DCMTK storescu / findscu against a running engine); the keying rules themselves through
the index code on both backends; and the migration of an index written the old way.
"""

from __future__ import annotations

import types

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from sqlalchemy import func, select, update

from engine.store.dicom import index as idx
from engine.store.dicom import terms
from engine.store.dicom.tables import index_state, index_terms
from listeners.dicom_qr import QueryRetrieve
from tests.dicom_peers import data_file, dicom_yaml, findscu, storescu_any

NO_ID_FILES = {"test-SR.dcm": "Test^S R", "reportsi.dcm": "Last Name^First Name", "ExplVR_BigEnd.dcm": "Anonymized"}
CT = "1.2.840.10008.5.1.4.1.1.2"
TS = "1.2.840.10008.1.2.1"


# -- through a running engine, with DCMTK ------------------------------------------
@pytest.mark.dcmtk
def test_instances_without_patient_id_stay_apart(engine_factory, tmp_path):
    """The three pydicom files without a PatientID come back as three patients, each under its
    own name, and a C-FIND for one name returns that file's study only (before: one patient
    named after the first arrival, every study under it, the other names found nothing)."""
    eng = engine_factory(dicom_yaml())
    port = eng.address("dcm")[1]
    files = [data_file(n) for n in (*NO_ID_FILES, "CT_small.dcm")]
    assert storescu_any(port, files) == ["Success"] * len(files)
    study_of = {n: str(dcmread(f, stop_before_pixels=True).StudyInstanceUID) for n, f in zip(NO_ID_FILES, files,
                                                                                                strict=False)}
    _, res = findscu(port, "PATIENT", {"PatientName": "", "PatientID": "", "NumberOfPatientRelatedStudies": ""},
                     model="-P", out_dir=tmp_path / "p")
    got = sorted((str(r.PatientName), str(r.PatientID), int(r.NumberOfPatientRelatedStudies)) for r in res)
    assert got == sorted([(n, "", 1) for n in NO_ID_FILES.values()] + [("CompressedSamples^CT1", "1CT1", 1)])
    for name, patient_name in NO_ID_FILES.items():
        for model, level in (("-S", "STUDY"), ("-P", "STUDY")):
            _, res = findscu(port, level, {"PatientName": patient_name, "StudyInstanceUID": "", "PatientID": ""},
                             model=model, out_dir=tmp_path / "s")
            assert [str(r.StudyInstanceUID) for r in res] == [study_of[name]], (name, model)
            assert [str(r.PatientName) for r in res] == [patient_name]


@pytest.mark.dcmtk
def test_an_old_merged_index_is_split_on_migrate(engine_factory, tmp_path):
    """An index written before the fix (the three studies under one patient keyed by the empty
    PatientID, no search terms) is split by the migration at the next start: each study gets
    its patient back with its own name, read again from the stored instance, and the search
    terms of every old row are filled in (an exact PatientID query finds the old CT)."""
    yaml = dicom_yaml()
    first = engine_factory(yaml)
    port = first.address("dcm")[1]
    files = [data_file(n) for n in (*NO_ID_FILES, "CT_small.dcm")]
    assert storescu_any(port, files) == ["Success"] * len(files)
    store, data_dir = first.store, first.data_dir
    _age_to_the_old_layout(store)
    with store.engine.connect() as c:  # the bug, reproduced: three studies under one patient
        assert c.execute(select(func.count()).select_from(idx.patients)).scalar() == 2
    first.stop()

    from tests.conftest import EngineThread

    second = EngineThread(yaml, data_dir)  # the same data folder: migrate runs at start
    try:
        port = second.address("dcm")[1]
        _, res = findscu(port, "PATIENT", {"PatientName": "", "NumberOfPatientRelatedStudies": ""}, model="-P",
                         out_dir=tmp_path / "p")
        assert sorted(str(r.PatientName) for r in res) == sorted([*NO_ID_FILES.values(), "CompressedSamples^CT1"])
        assert {int(r.NumberOfPatientRelatedStudies) for r in res} == {1}
        for patient_name in NO_ID_FILES.values():
            _, res = findscu(port, "STUDY", {"PatientName": patient_name, "StudyInstanceUID": ""},
                             out_dir=tmp_path / "s")
            assert len(res) == 1, patient_name
        _, res = findscu(port, "STUDY", {"PatientID": "1CT1", "PatientName": ""}, out_dir=tmp_path / "s")
        assert [str(r.PatientName) for r in res] == ["CompressedSamples^CT1"]
        # a new instance of one of the split studies finds its patient by the new key
        with second.store.engine.connect() as c:
            assert c.execute(select(func.count()).select_from(idx.patients)).scalar() == 4
    finally:
        second.stop()


def _age_to_the_old_layout(store) -> None:
    """What the index looked like when written by the code before issue 9."""
    hkey = store.keyring.hmac_key(idx.HMAC_KEY_NAME)
    p, st = idx.patients, idx.studies
    with store.engine.begin() as c:
        no_id = [r.pk for r in c.execute(select(p.c.pk, p.c.attrs_blob).order_by(p.c.pk))
                 if not terms.has_patient_id(_json(store, c, r.attrs_blob))]
        assert len(no_id) == 3
        c.execute(update(st).where(st.c.patient_pk.in_(no_id)).values(patient_pk=no_id[0]))
        c.execute(p.delete().where(p.c.pk.in_(no_id[1:])))
        c.execute(update(p).where(p.c.pk == no_id[0]).values(pid_hmac=terms.keyed(hkey, "PatientID", "\x00")))
        c.execute(index_terms.delete())
        c.execute(index_state.delete())


def _json(store, conn, blob_id):
    import json

    return json.loads(store.get_blob(conn, blob_id))


# -- the keying rules, through the index code (both backends) ----------------------
def _attrs(n: int, *, study: int | None = None, **patient) -> dict:
    s = n if study is None else study
    return {
        "PATIENT": {k: v for k, v in patient.items() if v is not None},
        "STUDY": {"StudyInstanceUID": f"1.2.826.0.1.3680043.10.7.{s}", "StudyDate": "20240101"},
        "SERIES": {"SeriesInstanceUID": f"1.2.826.0.1.3680043.10.7.{s}.{n}", "Modality": "CT"},
        "IMAGE": {"SOPInstanceUID": f"1.2.826.0.1.3680043.10.7.{s}.{n}.1", "SOPClassUID": CT},
    }


def _file(store, *items) -> None:
    hkey = store.keyring.hmac_key(idx.HMAC_KEY_NAME)
    with store.engine.begin() as conn:
        for i, a in enumerate(items):
            assert idx.index_instance(conn, store, hkey, a, message_id=f"m{i}", transfer_syntax=TS, digest="d",
                                      size=1) == "indexed"


def _find(store, level: str, **keys) -> list[Dataset]:
    qr = QueryRetrieve(types.SimpleNamespace(store=store, keyring=store.keyring, channel="t"), ae_title="T",
                       fold_pn=True, move_destinations={})
    ds = Dataset()
    ds.QueryRetrieveLevel = level
    for k, v in keys.items():
        setattr(ds, k, v)
    return qr.find_responses(ds, "patient")


def _patients(store) -> int:
    with store.engine.connect() as c:
        return c.execute(select(func.count()).select_from(idx.patients)).scalar_one()


def test_issuer_is_part_of_the_patient_key(store):
    """PatientID 123 with no issuer, issuer A and issuer B are three patients; a second study of
    123/A joins 123/A. An absent issuer matches only an absent issuer, not every issuer."""
    _file(store, _attrs(1, PatientID="123", PatientName="NONE^ISSUER"),
          _attrs(2, PatientID="123", IssuerOfPatientID="A", PatientName="FROM^A"),
          _attrs(3, PatientID="123", IssuerOfPatientID="B", PatientName="FROM^B"),
          _attrs(4, PatientID="123", IssuerOfPatientID="A", PatientName="FROM^A"))
    assert _patients(store) == 3
    res = _find(store, "PATIENT", PatientID="123", IssuerOfPatientID="", PatientName="",
                NumberOfPatientRelatedStudies="")
    got = sorted((str(r.get("IssuerOfPatientID") or ""), str(r.PatientName), int(r.NumberOfPatientRelatedStudies))
                 for r in res)
    assert got == [("", "NONE^ISSUER", 1), ("A", "FROM^A", 2), ("B", "FROM^B", 1)]
    assert [str(r.PatientName) for r in _find(store, "PATIENT", PatientID="123", IssuerOfPatientID="B",
                                              PatientName="")] == ["FROM^B"]


def test_no_patient_id_is_a_patient_per_study(store):
    """Blank, empty and absent PatientID are the same; each study is its own patient, and the
    instances of one study stay with one patient (even with an issuer and no id)."""
    _file(store, _attrs(1, PatientName="A^A"), _attrs(2, PatientID="", PatientName="B^B"),
          _attrs(3, PatientID="   ", PatientName="C^C", IssuerOfPatientID="X"),
          _attrs(4, study=1, PatientName="A^A"), _attrs(5, study=1, PatientID="", PatientName="A^A"))
    assert _patients(store) == 3
    res = _find(store, "STUDY", PatientName="", StudyInstanceUID="", NumberOfStudyRelatedInstances="")
    assert sorted((str(r.PatientName), int(r.NumberOfStudyRelatedInstances)) for r in res) == [
        ("A^A", 3), ("B^B", 1), ("C^C", 1)]
    assert [str(r.PatientName) for r in _find(store, "PATIENT", PatientName="B^B")] == ["B^B"]


def test_first_writer_wins_for_a_patients_attributes(store):
    """The same PatientID with another name is the same patient, and keeps the first name (the
    conformance statement says so); the second study is found under the first name."""
    _file(store, _attrs(1, PatientID="P1", PatientName="FIRST^NAME"),
          _attrs(2, PatientID="P1", PatientName="SECOND^NAME"))
    assert _patients(store) == 1
    assert [str(r.PatientName) for r in _find(store, "PATIENT", PatientID="P1", PatientName="")] == ["FIRST^NAME"]
    assert _find(store, "PATIENT", PatientName="SECOND^NAME") == []
    assert len(_find(store, "STUDY", PatientName="FIRST^NAME", StudyInstanceUID="")) == 2


def test_a_known_study_keeps_its_patient_and_makes_no_orphan(store):
    """An instance of an indexed study that names another patient is filed under the study's
    patient (first writer wins), and no patient row without studies appears for the other."""
    _file(store, _attrs(1, PatientID="P1", PatientName="ONE^P"), _attrs(2, study=1, PatientID="P2",
                                                                         PatientName="TWO^P"))
    assert _patients(store) == 1
    assert _find(store, "PATIENT", PatientID="P2") == []


def test_the_per_study_key_is_never_a_patient_ids_key(store):
    """A PatientID that happens to equal a Study Instance UID is still a real PatientID."""
    hkey = store.keyring.hmac_key(idx.HMAC_KEY_NAME)
    uid = "1.2.826.0.1.3680043.10.7.1"
    assert terms.patient_key(hkey, {}, uid) != terms.patient_key(hkey, {"PatientID": uid}, uid)
    _file(store, _attrs(1, PatientName="NO^ID"), _attrs(2, PatientID=uid, PatientName="HAS^ID"))
    assert _patients(store) == 2


def test_migrate_is_recorded_and_runs_once(store):
    """The index records its version; a second migrate does no work (no decryption)."""
    _file(store, _attrs(1, PatientID="P1", PatientName="ONE^P"))
    with store.engine.connect() as c:
        assert c.execute(select(index_state.c.version)).scalar_one() == 1
    calls = []
    real = store.get_blob
    store.get_blob = lambda *a, **k: calls.append(1) or real(*a, **k)
    store.migrate()
    assert calls == []


def test_the_split_on_migrate_on_both_backends(store):
    """The migration's split, without a network: three instances without PatientID filed under one
    patient the old way are split into three named patients; a study whose instance cannot be read
    gets a patient without attributes (no name rather than another patient's)."""
    hkey = store.keyring.hmac_key(idx.HMAC_KEY_NAME)
    with store.engine.begin() as conn:
        for i, name in enumerate(NO_ID_FILES):
            raw = data_file(name).read_bytes()
            blob = store.put_blob(conn, raw, f"m{i}")
            a = idx.extract(idx.read_index_dataset(raw))
            idx.index_instance(conn, store, hkey, a, message_id=f"m{i}", transfer_syntax=TS, digest="d",
                               size=len(raw), blob_id=blob)
        lost = _attrs(9, PatientName="LOST^ONE")
        idx.index_instance(conn, store, hkey, lost, message_id="m9", transfer_syntax=TS, digest="d", size=1,
                           blob_id=None)  # its message does not exist: unreadable
    p, st = idx.patients, idx.studies
    with store.engine.begin() as c:
        first = c.execute(select(func.min(p.c.pk))).scalar()
        c.execute(update(st).values(patient_pk=first))
        c.execute(p.delete().where(p.c.pk != first))
        c.execute(update(p).values(pid_hmac=terms.keyed(hkey, "PatientID", "\x00")))
        c.execute(index_terms.delete())
        c.execute(index_state.delete())
    store.migrate()
    res = _find(store, "STUDY", PatientName="", StudyInstanceUID="")
    assert sorted(str(r.get("PatientName") or "") for r in res) == sorted(["", *NO_ID_FILES.values()])
    assert _patients(store) == 4
    for patient_name in NO_ID_FILES.values():
        assert len(_find(store, "STUDY", PatientName=patient_name, StudyInstanceUID="")) == 1
    assert _find(store, "STUDY", PatientName="LOST^ONE", StudyInstanceUID="") == []
