"""The archive index's read side that DICOMweb uses, on SQLite and PostgreSQL (letter f):
``index.locate`` (one prepared statement from the UIDs to the payload blob), ``instance_chunks``
(a chunk-sealed payload read chunk by chunk, byte-identical) and the study's derived keys from
one statement (series and instance counts, modalities)."""

from __future__ import annotations

import os

from engine.store.dicom import index as idx

CT, MR = "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.4"
ELE = "1.2.840.10008.1.2.1"
STUDY = "1.2.826.0.1.3680043.99.1"


def attrs(series: str, sop: str, modality: str, sop_class: str) -> dict:
    return {"PATIENT": {"PatientName": "WEB^INDEX", "PatientID": "WEBIDX1"},
            "STUDY": {"StudyInstanceUID": STUDY, "StudyDate": "20240101"},
            "SERIES": {"SeriesInstanceUID": series, "Modality": modality},
            "IMAGE": {"SOPInstanceUID": sop, "SOPClassUID": sop_class}}


def test_locate_chunks_and_study_counts(store):
    hkey = store.keyring.hmac_key(idx.HMAC_KEY_NAME)
    big = os.urandom(17 * 1024 * 1024 + 5)  # chunk-sealed (16 MiB and more), not a whole number of chunks
    small = b"small part-10 stand-in"
    items = [(STUDY + ".1", STUDY + ".1.1", "CT", CT, big), (STUDY + ".1", STUDY + ".1.2", "CT", CT, small),
             (STUDY + ".2", STUDY + ".2.1", "MR", MR, small)]
    with store.engine.begin() as conn:
        for n, (se, sop, mod, cls, payload) in enumerate(items):
            mid = f"msg{n}"
            blob = store.put_blob(conn, payload, mid)
            idx.index_instance(conn, store, hkey, attrs(se, sop, mod, cls), message_id=mid, blob_id=blob,
                               transfer_syntax=ELE, digest=f"d{n}", size=len(payload))
    with store.engine.connect() as conn:
        found = idx.locate(conn, STUDY + ".1.1", STUDY, STUDY + ".1")
        assert found is not None and found.ref.sop_class_uid == CT and found.ref.transfer_syntax == ELE
        assert found.size == len(big) and not found.revised and found.ref.message_id == "msg0"
        assert idx.locate(conn, STUDY + ".1.1", STUDY, STUDY + ".2") is None  # not in that series
        assert idx.locate(conn, STUDY + ".1.1", "1.2.3", STUDY + ".1") is None  # not in that study
        assert idx.locate(conn, "1.2.3.4") is None
        chunks = idx.instance_chunks(conn, store, found)
    pieces = list(chunks)  # read after the connection is closed: the blob row was read already
    assert len(pieces) > 1 and max(len(p) for p in pieces) <= 1024 * 1024
    assert b"".join(pieces) == big
    with store.engine.connect() as conn:
        small_found = idx.locate(conn, STUDY + ".2.1")
        assert small_found is not None and b"".join(idx.instance_chunks(conn, store, small_found)) == small
        cands = idx.Candidates(conn, store, "STUDY")
        ((pk, _a),) = list(cands.rows(decrypt=False))
        assert cands.derived(pk, "NumberOfStudyRelatedSeries") == 2
        assert cands.derived(pk, "NumberOfStudyRelatedInstances") == 3
        assert cands.derived(pk, "ModalitiesInStudy") == ["CT", "MR"]
        assert cands.derived(pk, "SOPClassesInStudy") == sorted([CT, MR])
        pat = idx.Candidates(conn, store, "PATIENT")
        ((ppk, _p),) = list(pat.rows(decrypt=False))
        assert [pat.derived(ppk, k) for k in ("NumberOfPatientRelatedStudies", "NumberOfPatientRelatedSeries",
                                              "NumberOfPatientRelatedInstances")] == [1, 2, 3]
        ser = idx.Candidates(conn, store, "SERIES")
        counts = sorted(ser.derived(spk, "NumberOfSeriesRelatedInstances") for spk, _s in ser.rows(decrypt=False))
        assert counts == [1, 2]
