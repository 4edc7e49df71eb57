"""The archive's reconciliation and IOCM operations on both backends (SQLite and PostgreSQL).

The end-to-end tests (test_dicom_reconcile.py) run on SQLite; these run the same store-level
statements on PostgreSQL too: an update rewrites the patient's sealed attributes and terms, a
merge moves studies and removes the prior patient, retrieval rewrites only revised patients,
a rejection moves the instance row out and drops the series it emptied.
"""

from __future__ import annotations

import hashlib
import io

import pytest
from dicom_peers import data_file
from pydicom import dcmread
from pydicom.uid import generate_uid
from sqlalchemy import select

from engine.audit.trail import Audit
from engine.context import ComponentContext
from engine.envelope import Envelope
from engine.store.dicom import index as idx
from engine.store.dicom import iocm, reconcile
from engine.store.dicom.tables import instances, patients, series, studies
from listeners import dicom_match as m


def put_instance(store, *, pid, name, study, series_uid=None, issuer="HOSP"):
    ds = dcmread(data_file("CT_small.dcm"))
    ds.PatientID, ds.PatientName, ds.IssuerOfPatientID = pid, name, issuer
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series_uid or generate_uid()
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    data = buf.getvalue()
    attrs = idx.extract(idx.read_index_dataset(data))
    mid = generate_uid().replace(".", "")[-32:]
    with store.engine.begin() as conn:
        blob = store.put_blob(conn, data, mid)
        idx.index_instance(conn, store, store.keyring.hmac_key(idx.HMAC_KEY_NAME), attrs, message_id=mid,
                           blob_id=blob, transfer_syntax=str(ds.file_meta.TransferSyntaxUID),
                           digest=hashlib.sha256(data).hexdigest(), size=len(data))
    return ds


def ref(conn, sop):
    row = idx.existing_instance(conn, sop)
    return idx.InstanceRef(row["sop_uid"], row["sop_class_uid"], row["transfer_syntax"], row["message_id"],
                           row["blob_id"])


def patient_names(store, query_name):
    hkey = store.keyring.hmac_key(idx.HMAC_KEY_NAME)
    from pydicom import Dataset

    q = Dataset()
    q.PatientName = query_name
    q.PatientID = ""
    keys = m.keys_of(q)
    with store.engine.connect() as conn:
        cands = idx.Candidates(conn, store, "PATIENT")
        m.narrow(cands, keys, hkey)
        return sorted(str(a.get("PatientName")) for _pk, a in cands.rows()
                      if m.identifier_matches(a, keys, fold_pn=True, derived=lambda kw: None))


def ctx_for(store):
    return ComponentContext(settings=None, store=store, keyring=store.keyring, audit=Audit(store), channel="adt")


def change(action, pid, attrs=None, prior=None, issuer="HOSP"):
    target = reconcile.Identity(pid, issuer)
    return reconcile.Change(action, target, [target], attrs or {},
                            [reconcile.Identity(p, issuer) for p in prior or []])


def test_update_merge_and_retrieval_on_both_backends(store):
    study_a, study_b = generate_uid(), generate_uid()
    a = put_instance(store, pid="S1", name="Doe^Jane", study=study_a)
    b = put_instance(store, pid="S2", name="Roe^Rick", study=study_b)
    hkey = store.keyring.hmac_key(idx.HMAC_KEY_NAME)
    with store.engine.connect() as conn:  # untouched patient: byte-identical
        before = store.get_blob(conn, ref(conn, a.SOPInstanceUID).blob_id, ref(conn, a.SOPInstanceUID).message_id)
        assert idx.load_instance(conn, store, ref(conn, a.SOPInstanceUID)) == before
    with store.engine.begin() as conn:
        got = reconcile.apply_update(store, conn, hkey, change("update", "S1", {"PatientName": "Doe^Janet",
                                                                                   "PatientSex": "F"}))
    assert got.patients == 1
    assert patient_names(store, "DOE^JANET*") == ["Doe^Janet"] and patient_names(store, "Doe^Jane") == []
    with store.engine.connect() as conn:
        out = dcmread(io.BytesIO(idx.load_instance(conn, store, ref(conn, a.SOPInstanceUID))))
        assert str(out.PatientName) == "Doe^Janet" and out.PatientSex == "F" and out.PixelData == a.PixelData
        # the other patient was not revised: still sent as stored
        bref = ref(conn, b.SOPInstanceUID)
        assert idx.load_instance(conn, store, bref) == store.get_blob(conn, bref.blob_id, bref.message_id)
    # an update that changes nothing is not a revision
    with store.engine.begin() as conn:
        assert reconcile.apply_update(store, conn, hkey, change("update", "S1", {"PatientName": "Doe^Janet"})
                                      ).patients == 0
    # merge S2 into S1
    with store.engine.begin() as conn:
        got = reconcile.apply_merge(store, conn, hkey, change("merge", "S1", prior=["S2"]))
    assert got.studies_moved == 1
    with store.engine.connect() as conn:
        assert len(conn.execute(select(patients.c.pk)).all()) == 1
        pks = set(conn.execute(select(studies.c.patient_pk)).scalars())
        assert len(pks) == 1
        moved = dcmread(io.BytesIO(idx.load_instance(conn, store, ref(conn, b.SOPInstanceUID))))
        assert moved.PatientID == "S1" and str(moved.PatientName) == "Doe^Janet"
    assert patient_names(store, "Roe*") == []
    # merge into an id the archive does not know: the prior patient is re-keyed
    c = put_instance(store, pid="S3", name="Poe^Edgar", study=generate_uid())
    with store.engine.begin() as conn:
        got = reconcile.apply_merge(store, conn, hkey, change("merge", "S4", {"PatientName": "Poe^Edgar^A"},
                                                              prior=["S3"]))
    assert got.created
    with store.engine.connect() as conn:
        out = dcmread(io.BytesIO(idx.load_instance(conn, store, ref(conn, c.SOPInstanceUID))))
    assert out.PatientID == "S4" and str(out.PatientName) == "Poe^Edgar^A"


def test_patient_update_handler_and_audit(store):
    put_instance(store, pid="H1", name="Old^Name", study=generate_uid())
    payload = (b'{"resourceType":"Parameters","parameter":[{"name":"action","valueCode":"update"},'
               b'{"name":"patient","part":[{"name":"PatientID","valueString":"H1"},'
               b'{"name":"IssuerOfPatientID","valueString":"HOSP"},{"name":"PatientName","valueString":"New^Name"},'
               b'{"name":"PatientBirthDate"}]}]}')
    env = Envelope(channel="adt", kind="fhir", payload=payload, headers={"store_as": "patient_update"})
    with store.engine.begin() as conn:
        detail = reconcile.store_patient_update(ctx_for(store), conn, env)
    assert detail.startswith("patient:update:1 patients")
    assert patient_names(store, "New^Name") == ["New^Name"]
    with pytest.raises(ValueError):
        reconcile.read_change(b'{"resourceType":"Parameters","parameter":[{"name":"action","valueCode":"merge"},'
                              b'{"name":"patient","part":[{"name":"PatientID","valueString":"H1"}]}]}')


def test_rejection_hides_and_drops_emptied_series(store):
    study, s1 = generate_uid(), generate_uid()
    keep = put_instance(store, pid="R1", name="Re^Ject", study=study, series_uid=s1)
    bad = put_instance(store, pid="R1", name="Re^Ject", study=study, series_uid=s1)
    alone = put_instance(store, pid="R1", name="Re^Ject", study=study)
    note = iocm.Rejection("1.2.3.4.5", "113001", [
        (study, s1, str(bad.SOPClassUID), str(bad.SOPInstanceUID)),
        (study, str(alone.SeriesInstanceUID), str(alone.SOPClassUID), str(alone.SOPInstanceUID)),
        (study, s1, str(bad.SOPClassUID), generate_uid())])  # never stored
    with store.engine.begin() as conn:
        counts = iocm.reject(conn, note, delete_bytes=True)
    assert (counts.hidden, counts.missing, counts.deleted) == (2, 1, 2)
    with store.engine.connect() as conn:
        assert set(conn.execute(select(instances.c.sop_uid)).scalars()) == {str(keep.SOPInstanceUID)}
        assert set(conn.execute(select(series.c.series_uid)).scalars()) == {s1}
        assert iocm.is_rejected(conn, str(bad.SOPInstanceUID))
