"""Issue 13 leftovers: every DICOM refusal before the index is answered, logged and audited alike.

1. A C-GET prefetch instance cut short was refused with 0xA900 (routes/dicom_prefetch.py answered
   0xA900 for anything it could not file) and not audited; now 0xC000 "data set cut short", as
   every other intake path answers, by the same check and the same refusal
   (engine/store/dicom/intake_check.py). The remote archive is pynetdicom (C-FIND and C-GET SCP)
   whose C-GET sends, as C-STORE sub-operations, a whole instance, the same instance's encoded
   data set cut short at the DIMSE level (pynetdicom's own encoding would make it consistent),
   and one without a Series Instance UID.
2. The listener's other refusals before the index (no Study/Series UID 0xA900, undecodable 0xC000,
   data set UIDs that differ from the command 0xA900) were logged but not audited; PS3.15 A.5
   makes a refused receive an audit event: each writes a failed ``message.receive`` now (our Upper
   Layer, pynetdicom's associations, STOW-RS, the streamed path).
3. Explicit VR Big Endian data sets were not walked: one cut short was stored with 0x0000. Now
   0xC000 on C-STORE (raw bytes from pynetdicom) and STOW-RS; whole ones (DCMTK storescu -xb) are
   stored as before.
"""

from __future__ import annotations

import io
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import free_port
from dicom_peers import data_file, store_statuses, storescu
from mllp_peers import RawClient, msa
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import UID, ExplicitVRBigEndian, ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, evt
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.sop_class import (
    CTImageStorage,
    MRImageStorage,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
)
from sqlalchemy import select

from engine.store import schema
from engine.store.dicom import index as idx
from engine.store.dicom import intake_check, walk
from listeners.dicom_status import STORE
from tests.dicom_peers import _ROOTS
from tests.test_dicom_cut_short import _cut, _new_uids, blob_files, c_store, eng, messages, stow  # noqa: F401
from tests.test_dicom_prefetch import LOCAL, finished, order


@pytest.fixture
def web(eng):  # noqa: F811  (the imported fixture, by name)
    """test_dicom_cut_short's engine: channel dcm (DICOM listener) and web (STOW-RS)."""
    return eng


CUT_SHORT = "refused: data set cut short or its lengths do not nest"
NO_SERIES = "refused: Study/Series Instance UID missing or invalid"


def failed_receives(e) -> list[dict]:
    a = schema.audit_events
    with e.store.engine.connect() as c:
        rows = c.execute(select(a.c.actor, a.c.channel, a.c.detail, a.c.entity)
                         .where(a.c.action == "message.receive", a.c.outcome == "failure").order_by(a.c.id))
        return [dict(r._mapping) for r in rows]


def _entity(row: dict) -> dict:
    import json

    e = row["entity"]
    return json.loads(e) if isinstance(e, str) else e


def indexed(e, sop_uid: str) -> bool:
    with e.store.engine.connect() as c:
        return c.execute(select(idx.instances.c.pk).where(idx.instances.c.sop_uid == sop_uid)).first() is not None


def test_intake_check_codes_are_the_status_table():
    """engine/ may not import listeners/: its two codes are held equal to the table here."""
    assert intake_check.MISMATCH == STORE["mismatch"].code
    assert intake_check.CANNOT_UNDERSTAND == STORE["cannot_understand"].code


# -- 1. C-GET prefetch ---------------------------------------------------------------------------

class Archive:
    """A remote archive (pynetdicom): one study for any C-FIND; its C-GET sends ``instances``, the
    encoded data set of those in ``cut`` shortened by 100 bytes at the DIMSE level (every length
    in it unchanged), and records the C-STORE status our side answered for each."""

    def __init__(self, instances: list[Dataset], cut: set[str], study_uid: str,
                 renamed: dict[str, str] | None = None) -> None:
        self.instances, self.cut, self.study_uid = instances, cut, study_uid
        self.renamed = renamed or {}  # data set SOP Instance UID -> the sub-operation command's
        self.statuses: dict[str, list[int]] = {}
        self.lock = threading.Lock()
        ae = AE(ae_title="PACS2")
        ae.add_supported_context(StudyRootQueryRetrieveInformationModelFind)
        ae.add_supported_context(StudyRootQueryRetrieveInformationModelGet)
        ae.add_supported_context(CTImageStorage, [ExplicitVRLittleEndian], scu_role=False, scp_role=True)
        self.port = free_port()
        self.server = ae.start_server(("127.0.0.1", self.port), block=False, evt_handlers=[
            (evt.EVT_C_FIND, self.on_find), (evt.EVT_C_GET, self.on_get)])

    def on_find(self, event):
        m = Dataset()
        m.QueryRetrieveLevel = "STUDY"
        m.PatientID, m.StudyInstanceUID, m.StudyDate, m.StudyTime = "PF1", self.study_uid, "20240105", "120000"
        m.AccessionNumber, m.ModalitiesInStudy = "APRIOR", "CT"
        m.NumberOfStudyRelatedInstances = str(len(self.instances))
        yield 0xFF00, m

    def on_get(self, event):
        assoc = event.assoc
        if not getattr(assoc, "_cutting", False):
            assoc._cutting = True
            send_msg, send_c_store = assoc.dimse.send_msg, assoc.send_c_store

            def cut_send(primitive, context_id):
                if isinstance(primitive, C_STORE) and str(primitive.AffectedSOPInstanceUID) in self.cut:
                    primitive.DataSet = io.BytesIO(primitive.DataSet.getvalue()[:-100])
                if isinstance(primitive, C_STORE) and str(primitive.AffectedSOPInstanceUID) in self.renamed:
                    primitive.AffectedSOPInstanceUID = self.renamed[str(primitive.AffectedSOPInstanceUID)]
                return send_msg(primitive, context_id)

            def recorded(dataset, *args, **kwargs):
                status = send_c_store(dataset, *args, **kwargs)
                with self.lock:
                    self.statuses.setdefault(str(dataset.SOPInstanceUID), []).append(int(status.Status))
                return status

            assoc.dimse.send_msg, assoc.send_c_store = cut_send, recorded
        yield len(self.instances)
        for ds in self.instances:
            yield 0xFF00, ds

    def stop(self) -> None:
        self.server.shutdown()


def _ct(study: str, series: str) -> Dataset:
    ds = dcmread(data_file("CT_small.dcm"))
    ds.PatientID, ds.StudyInstanceUID, ds.SeriesInstanceUID = "PF1", study, series
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


def prefetch_from(engine_factory, archive: Archive) -> tuple[Any, dict]:
    """An order prefetching from ``archive`` by C-GET: the engine and the finished delivery."""
    try:
        eng = engine_factory(LOCAL.format(local=free_port(), remote=archive.port, retrieve="get", extra=""))
        with RawClient(*eng.address("orders")) as c:
            assert msa(c.request(order("C1")))[1] == "AA"
        (row,) = finished(eng, "prefetch", 1)
    finally:
        archive.stop()
    return eng, row


def test_c_get_prefetch_refuses_a_cut_short_instance_with_0xc000_and_audits(engine_factory):
    """The cut instance: 0xC000 to the remote (before: 0xA900), a failed receive audited with its
    UIDs, never indexed; one without a Series UID: 0xA900, audited (before: not); the whole one is
    filed. The retrieve has failed sub-operations: the delivery is retried, then dead."""
    study, series = generate_uid(), generate_uid()
    whole, cut, no_series = _ct(study, series), _ct(study, series), _ct(study, series)
    del no_series.SeriesInstanceUID
    archive = Archive([whole, cut, no_series], {str(cut.SOPInstanceUID)}, study)
    archived, row = prefetch_from(engine_factory, archive)
    assert row["state"] == "dead", row
    assert "2 failed" in (row["last_error"] or ""), row["last_error"]
    got = archive.statuses
    assert got[str(cut.SOPInstanceUID)] == [0xC000, 0xC000], got  # one per attempt
    assert got[str(no_series.SOPInstanceUID)] == [0xA900, 0xA900], got
    assert got[str(whole.SOPInstanceUID)] == [0x0000, 0x0000], got  # the second a recognised re-send
    assert indexed(archived, str(whole.SOPInstanceUID)) and not indexed(archived, str(cut.SOPInstanceUID))
    rows = archived.wait_for(lambda: (lambda r: r if len(r) >= 4 else None)(failed_receives(archived)))
    by_uid: dict[str, list[str]] = {}
    for r in rows:
        headers = _entity(r)["headers"]
        assert r["actor"] == "PACS2" and r["channel"] == "dcm" and headers["CalledAETitle"] == "LOCAL"
        assert headers["SOPClassUID"] == CTImageStorage
        by_uid.setdefault(headers["SOPInstanceUID"], []).append(r["detail"])
    assert by_uid == {str(cut.SOPInstanceUID): [CUT_SHORT] * 2, str(no_series.SOPInstanceUID): [NO_SERIES] * 2}


def test_c_get_prefetch_refuses_a_data_set_other_than_its_command_with_0xa900(engine_factory):
    """A C-STORE sub-operation whose command names another SOP Instance UID than its data set:
    0xA900 as the listener answers it (``intake_check.check_attrs``; before: 0x0000, filed), audited
    with the command's UID, never indexed under either."""
    study, series = generate_uid(), generate_uid()
    whole, other = _ct(study, series), _ct(study, series)
    command_uid = generate_uid()
    archive = Archive([whole, other], set(), study, renamed={str(other.SOPInstanceUID): command_uid})
    archived, row = prefetch_from(engine_factory, archive)
    assert row["state"] == "dead", row
    got = archive.statuses
    assert got[str(other.SOPInstanceUID)] == [0xA900, 0xA900], got
    assert got[str(whole.SOPInstanceUID)] == [0x0000, 0x0000], got
    assert not indexed(archived, str(other.SOPInstanceUID)) and not indexed(archived, command_uid)
    rows = archived.wait_for(lambda: (lambda r: r if len(r) >= 2 else None)(failed_receives(archived)))
    assert [r["detail"] for r in rows] == ["refused: SOP Class/Instance UID differ from the command"] * 2
    assert [_entity(r)["headers"]["SOPInstanceUID"] for r in rows] == [command_uid] * 2
    assert all(r["actor"] == "PACS2" and r["channel"] == "dcm" for r in rows)


# -- 2. the listener's other refusals ----------------------------------------------------------

def _file(ds: Dataset, path: Path) -> Path:
    ds.save_as(path, enforce_file_format=True, implicit_vr=False, little_endian=True)
    return path


def no_series(tmp: Path) -> Path:
    ds = _new_uids(dcmread(data_file("CT_small.dcm")))
    del ds.SeriesInstanceUID
    return _file(ds, tmp / "no-series.dcm")


def other_uid_than_the_command(tmp: Path) -> Path:
    """The file meta (the command's Affected SOP Instance UID, as pynetdicom's chunked send takes
    it) names another instance than the data set."""
    ds = _new_uids(dcmread(data_file("CT_small.dcm")))
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.preamble = b"\0" * 128
    path = tmp / "other-uid.dcm"
    ds.save_as(path, enforce_file_format=False)  # the meta as set (enforcing it would take the data set's UID)
    meta = dcmread(path, stop_before_pixels=True)
    assert meta.file_meta.MediaStorageSOPInstanceUID != meta.SOPInstanceUID
    return path


def nested_too_deep(tmp: Path) -> Path:
    """Sequences 80 deep (the limit is 64): cannot be decoded safely."""
    ds = _new_uids(dcmread(data_file("CT_small.dcm")))
    inner = Dataset()
    inner.CodeValue = "1"
    for _ in range(80):
        outer = Dataset()
        outer.add_new(0x00400275, "SQ", Sequence([inner]))
        inner = outer
    ds.add_new(0x00400275, "SQ", inner[0x00400275].value)
    return _file(ds, tmp / "deep.dcm")


REFUSALS = {"no_series": (no_series, 0xA900, NO_SERIES),
            "other_uid": (other_uid_than_the_command, 0xA900,
                          "refused: SOP Class/Instance UID differ from the command"),
            "too_deep": (nested_too_deep, 0xC000, "refused: data set cannot be decoded")}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_refusals_before_the_index_are_audited(web, tmp_path, case):
    """pynetdicom to our Upper Layer and to pynetdicom's Storage SCP (Q/R proposed too), and STOW-RS
    (but for the command mismatch, which STOW-RS has no command for): the status as before, nothing
    stored, and a failed receive audited for each (before: none)."""
    make, status, detail = REFUSALS[case]
    bad = make(tmp_path)
    port = web.address("dcm")[1]
    assert c_store(port, bad) == status
    assert c_store(port, bad, qr=True) == status
    n = 2
    if case != "other_uid":
        assert stow(web, bad) == (409, [status])
        n = 3
    rows = web.wait_for(lambda: (lambda r: r if len(r) >= n else None)(failed_receives(web)))
    assert [r["detail"] for r in rows] == [detail] * n
    sop_uid = str(dcmread(bad, stop_before_pixels=True).file_meta.MediaStorageSOPInstanceUID)
    assert all(_entity(r)["headers"]["SOPInstanceUID"] == sop_uid for r in rows)
    assert [r["actor"] for r in rows[:2]] == ["TESTSCU", "TESTSCU"]
    assert messages(web) == 0


def test_streamed_instance_without_series_uid_is_audited(web, tmp_path):
    """> 16 MiB (written to its blob as it arrives): 0xA900, its file removed, audited."""
    ds = _new_uids(dcmread(data_file("CT_small.dcm")))
    del ds.SeriesInstanceUID
    ds.Rows = ds.Columns = 3072
    ds.PixelData = np.arange(9 * 1024 * 1024, dtype=np.uint16).tobytes()
    bad = _file(ds, tmp_path / "big-no-series.dcm")
    assert c_store(web.address("dcm")[1], bad) == 0xA900
    assert blob_files(web) == []
    rows = web.wait_for(lambda: failed_receives(web))
    assert [r["detail"] for r in rows] == [NO_SERIES]


def c_store_command(port: int, ds: Dataset, change: Callable[[C_STORE], None], *, qr: bool) -> int:
    """pynetdicom proposing CT Image Storage only (our Upper Layer) or with Study Root FIND too
    (pynetdicom's association): its C-STORE-RQ primitive changed by ``change`` before it is encoded."""
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(CTImageStorage, [str(ds.file_meta.TransferSyntaxUID)])
    if qr:
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    assoc = ae.associate("127.0.0.1", port, ae_title="MEDRELAY")
    assert assoc.is_established
    send_msg = assoc.dimse.send_msg

    def changed(primitive, context_id):
        if isinstance(primitive, C_STORE):
            change(primitive)
        return send_msg(primitive, context_id)

    assoc.dimse.send_msg = changed
    try:
        return int(assoc.send_c_store(ds).Status)
    finally:
        assoc.release()


BAD_UID = "1.2.840.10008.bad"  # letters: not a UID (PS3.5 9.1); pynetdicom sends it unenforced


def _invalid_instance(p: C_STORE) -> None:
    p.AffectedSOPInstanceUID = BAD_UID


def _other_class(p: C_STORE) -> None:
    p.AffectedSOPClassUID = MRImageStorage


COMMAND_REFUSALS = {
    "invalid_instance_uid": (_invalid_instance, "refused: invalid Affected SOP Class/Instance UID"),
    "other_class": (_other_class, "refused: Affected SOP Class UID differs from the presentation context"),
}


@pytest.mark.parametrize("case", sorted(COMMAND_REFUSALS))
def test_command_refusals_are_audited(web, case):
    """A C-STORE-RQ refused on its command (``check_store_rq``), on our Upper Layer and on
    pynetdicom's association: 0xA900 as before, nothing stored, and one failed receive each with
    the command's UIDs as given (before: answered, never audited)."""
    change, detail = COMMAND_REFUSALS[case]
    ds = _new_uids(dcmread(data_file("CT_small.dcm")))
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    port = web.address("dcm")[1]
    assert c_store_command(port, ds, change, qr=False) == 0xA900
    assert c_store_command(port, ds, change, qr=True) == 0xA900
    rows = web.wait_for(lambda: (lambda r: r if len(r) >= 2 else None)(failed_receives(web)))
    assert len(rows) == 2 and [r["detail"] for r in rows] == [detail] * 2
    headers = [_entity(r)["headers"] for r in rows]
    want_uid = BAD_UID if case == "invalid_instance_uid" else str(ds.SOPInstanceUID)
    want_class = MRImageStorage if case == "other_class" else CTImageStorage
    assert [(h["SOPInstanceUID"], h["SOPClassUID"]) for h in headers] == [(want_uid, want_class)] * 2
    assert [(r["actor"], r["channel"]) for r in rows] == [("TESTSCU", "dcm")] * 2
    assert all(h["CallingAETitle"] == "TESTSCU" for h in headers)
    assert messages(web) == 0


# -- 3. Explicit VR Big Endian -----------------------------------------------------------------

def big_endian(tmp: Path) -> Path:
    ds = _new_uids(dcmread(data_file("MR_small_bigendian.dcm")))
    assert ds.file_meta.TransferSyntaxUID == ExplicitVRBigEndian
    path = tmp / f"be-{ds.SOPInstanceUID}.dcm"
    ds.save_as(path, enforce_file_format=True)
    assert dcmread(path).file_meta.TransferSyntaxUID == ExplicitVRBigEndian
    return path


def test_big_endian_cut_short_is_refused_and_whole_is_stored(web, tmp_path):
    """Cut in its pixel data: 0xC000 by C-STORE (both association paths) and STOW-RS, nothing
    stored, audited (before: 0x0000, stored); the whole file by DCMTK storescu -xb: stored as sent."""
    whole = big_endian(tmp_path)
    bad = _cut(whole, 100)
    port = web.address("dcm")[1]
    assert c_store(port, bad) == 0xC000
    assert c_store(port, bad, qr=True) == 0xC000
    assert stow(web, bad) == (409, [0xC000])
    assert messages(web) == 0
    rows = web.wait_for(lambda: (lambda r: r if len(r) >= 3 else None)(failed_receives(web)))
    assert [r["detail"] for r in rows] == [CUT_SHORT] * 3
    r = storescu(port, [whole], extra=("-xb",))
    assert store_statuses(r.stdout) == ["Success"], r.stdout
    uid = str(dcmread(whole, stop_before_pixels=True).SOPInstanceUID)
    with web.store.engine.connect() as c:
        ts = c.execute(select(idx.instances.c.transfer_syntax).where(idx.instances.c.sop_uid == uid)).scalar_one()
    assert ts == ExplicitVRBigEndian
    # a second cut, inside the Study Instance UID's value (big-endian tag (0020,000D)): refused as cut
    # short, not as a data set without a study
    data = whole.read_bytes()
    at = data.index(b"\x00\x20\x00\x0dUI") + 8 + 10
    assert c_store(port, _cut(whole, len(data) - at)) == 0xC000
    assert messages(web) == 1


def bundled_big_endian():
    """(path, data set) of every Explicit VR Big Endian file pydicom ships."""
    for f in sorted(p for root in _ROOTS for p in root.rglob("*.dcm")):
        try:
            ts, body = idx.split_part10(Path(f).read_bytes())
        except Exception:
            continue
        if UID(ts) == ExplicitVRBigEndian:
            yield f, body


def test_walk_takes_every_bundled_big_endian_file_and_refuses_each_cut():
    """Every Explicit VR Big Endian file pydicom ships: walked whole and in pieces of 1, 7 and
    4096 bytes without a refusal, and never left unjudged; each cut by 10 bytes refused."""
    walked = 0
    for f, body in bundled_big_endian():
        walked += 1
        for size in (len(body), 1, 7, 4096):
            w = walk.walker(False, False, little=False)
            for i in range(0, len(body), size):
                w.feed(memoryview(body)[i:i + size])
            w.close()
            assert isinstance(w, walk.StructureWalk) and not w.unsure, f
        with pytest.raises(walk.Malformed):
            walk.check(body[:-10], implicit=False, little=False)
    assert walked >= 10


# -- 4. STOW-RS and the file source: refusals before the Storage SCP (leftovers 3) ---------------

def _stow_raw(e, parts: list[tuple[str | None, bytes]], *, study: str | None = None,
              close: bool = True) -> tuple[int, list[int]]:
    """httpx: one multipart/related body of ``parts`` ((Content-Type or None, bytes)); (HTTP status,
    the Failure Reasons)."""
    import httpx

    from tests.test_dicom_cut_short import TOKEN

    host, port = e.address("web")
    b = "leftoversboundary"
    body = b"".join(f"--{b}\r\n".encode() + (f"Content-Type: {t}\r\n" if t else "").encode() + b"\r\n" + d + b"\r\n"
                    for t, d in parts)
    body += f"--{b}--\r\n".encode() if close else b""
    url = f"http://{host}:{port}/dicom-web/studies" + (f"/{study}" if study else "")
    r = httpx.post(url, content=body, timeout=120, headers={
        "Authorization": f"Bearer {TOKEN}", "Accept": "application/dicom+json",
        "Content-Type": f'multipart/related; type="application/dicom"; boundary={b}'})
    failed = r.json().get("00081198", {}).get("Value", []) if r.content and r.status_code != 400 else []
    return r.status_code, [int(i["00081197"]["Value"][0]) for i in failed]


def _bad_meta_uids(tmp: Path) -> Path:
    """A CT whose file meta and data set both name a SOP Instance UID that is not one (letters)."""
    ds = _new_uids(dcmread(data_file("CT_small.dcm")))
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = BAD_UID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    path = tmp / "bad-uid.dcm"
    ds.save_as(path, enforce_file_format=True, implicit_vr=False, little_endian=True)
    return path


def test_stow_rs_parts_refused_before_the_storage_scp_are_audited(web, tmp_path):
    """Parts refused by the STOW-RS handler itself (no Content-Type, another type, not Part 10, file
    meta without valid UIDs, another study than the URL's): the statuses as before, nothing stored,
    and one failed receive each with the UIDs as given (before: none of them was audited)."""
    other_study = _file(_new_uids(dcmread(data_file("CT_small.dcm"))), tmp_path / "other-study.dcm")
    bad_uid = _bad_meta_uids(tmp_path)
    ct_bytes = other_study.read_bytes()
    url_study = generate_uid()
    got = _stow_raw(web, [(None, ct_bytes), ("text/plain", b"hello"), ("application/dicom", b"\0" * 200),
                          ("application/dicom", bad_uid.read_bytes()), ("application/dicom", ct_bytes)],
                    study=url_study)
    assert got == (409, [0xC000, 0xC000, 0xC000, 0xA900, 0xA900]), got
    assert messages(web) == 0
    rows = web.wait_for(lambda: (lambda r: r if len(r) >= 5 else None)(failed_receives(web)))
    by_detail = {r["detail"]: _entity(r)["headers"] for r in rows}
    assert len(rows) == 5 and all(r["channel"] == "web" for r in rows), rows
    assert set(by_detail) == {
        "refused: part without a Content-Type",
        'refused: part of type text/plain in a type="application/dicom" body is not DICOM',
        "refused: part is not a readable DICOM Part-10 file",
        "refused: file meta lacks a valid SOP Class/Instance UID or transfer syntax",
        "refused: StudyInstanceUID differs from the study of the request URL"}, sorted(by_detail)
    assert by_detail["refused: file meta lacks a valid SOP Class/Instance UID or transfer syntax"][
        "SOPInstanceUID"] == BAD_UID
    h = by_detail["refused: StudyInstanceUID differs from the study of the request URL"]
    meta = dcmread(other_study, stop_before_pixels=True)
    assert (h["SOPClassUID"], h["SOPInstanceUID"], h["TransferSyntaxUID"]) == (
        CTImageStorage, str(meta.SOPInstanceUID), ExplicitVRLittleEndian)
    assert h["CallingAETitle"] == "" and h["CalledAETitle"] == "MEDRELAY"


def test_stow_rs_body_refused_whole_is_audited(web, tmp_path):
    """A body without its close delimiter (its parts are never stored): 400 as before, and one
    failed receive for the body, without UIDs (before: none)."""
    whole = _file(_new_uids(dcmread(data_file("CT_small.dcm"))), tmp_path / "whole.dcm")
    assert _stow_raw(web, [("application/dicom", whole.read_bytes())], close=False)[0] == 400
    rows = web.wait_for(lambda: failed_receives(web))
    assert [r["detail"] for r in rows] == [
        "refused: STOW-RS body refused (HTTP 400): multipart body ends inside a part (no close delimiter)"]
    assert _entity(rows[0])["headers"]["SOPInstanceUID"] == ""
    assert messages(web) == 0


def test_streamed_stow_rs_part_of_another_study_is_audited(web, tmp_path):
    """> 16 MiB (written to its blob as it arrives), posted under another study's URL: 0xA900, its
    file removed, audited (before: answered, never audited)."""
    from tests.test_dicom_cut_short import big_ct

    big = big_ct(tmp_path)
    assert _stow_raw(web, [("application/dicom", big.read_bytes())], study=generate_uid()) == (409, [0xA900])
    assert blob_files(web) == []
    rows = web.wait_for(lambda: failed_receives(web))
    assert [r["detail"] for r in rows] == ["refused: StudyInstanceUID differs from the study of the request URL"]
    assert _entity(rows[0])["headers"]["SOPInstanceUID"] == str(dcmread(big, stop_before_pixels=True).SOPInstanceUID)


def test_file_source_files_refused_before_the_storage_scp_are_audited(web, tmp_path):
    """A file with the DICM prefix whose file meta cannot be read, and one whose meta has no
    Transfer Syntax UID, dropped into the file source's folder: both moved to error/ as before,
    each audited as a failed receive (before: neither was)."""
    garbage = b"\0" * 128 + b"DICM" + b"\x02\x00\x00\x00UL\x02\x00\xff\xff"  # a group length of 2 bytes
    ds = _new_uids(dcmread(data_file("CT_small.dcm")))
    no_ts = tmp_path / "no-ts.dcm"
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.save_as(no_ts, enforce_file_format=True, implicit_vr=False, little_endian=True)
    raw = no_ts.read_bytes()
    at = raw.index(b"\x02\x00\x10\x00UI")  # (0002,0010) Transfer Syntax UID: renamed to a private-looking tag
    no_ts.write_bytes(raw[:at] + b"\x02\x00\x11\x00UI" + raw[at + 6:])
    (web.drop / "garbage.dcm").write_bytes(garbage)
    os.replace(no_ts, web.drop / "no-ts.dcm")
    from tests.conftest import wait_until

    wait_until(lambda: all((web.drop / "error" / n).exists() for n in ("garbage.dcm", "no-ts.dcm")), timeout=60)
    rows = web.wait_for(lambda: (lambda r: r if len(r) >= 2 else None)(failed_receives(web)))
    assert sorted(r["detail"] for r in rows) == ["refused: file meta information unreadable",
                                                 "refused: no Transfer Syntax UID in the file meta"], rows
    assert all(r["channel"] == "drop" for r in rows)
    no_ts_row = next(r for r in rows if "Transfer Syntax" in r["detail"])
    assert _entity(no_ts_row)["headers"]["SOPInstanceUID"] == str(ds.SOPInstanceUID)
    assert messages(web) == 0


# -- 5. Big Endian: a UN of undefined length is walked (leftovers 3) ----------------------------

def _be_with_un(tmp: Path, *, delimiter_le: bool = True) -> Path:
    """The BE MR with a private UN of undefined length (0009,1001) after its creator: two items
    (undefined and defined length) in Implicit VR Little Endian, as PS3.5 6.2.2 has it, and its
    Sequence Delimitation Item little-endian too (``delimiter_le`` False: big-endian)."""
    import struct

    ds = _new_uids(dcmread(data_file("MR_small_bigendian.dcm")))
    ds.add_new(0x00090010, "LO", "MEDRELAY")
    path = tmp / f"be-un-{ds.SOPInstanceUID}.dcm"
    ds.save_as(path, enforce_file_format=True)
    data = path.read_bytes()
    creator = b"\x00\x09\x00\x10LO\x00\x08MEDRELAY"
    at = data.index(creator) + len(creator)

    def el(tag: int, value: bytes) -> bytes:
        return struct.pack("<HHI", tag >> 16, tag & 0xFFFF, len(value)) + value

    item = el(0x00080100, b"CODE01") + el(0x00080102, b"DCM ")
    un = (b"\x00\x09\x10\x01UN\x00\x00\xff\xff\xff\xff" + struct.pack("<HHI", 0xFFFE, 0xE000, 0xFFFFFFFF) + item
          + struct.pack("<HHI", 0xFFFE, 0xE00D, 0) + struct.pack("<HHI", 0xFFFE, 0xE000, len(item)) + item
          + struct.pack("<HHI" if delimiter_le else ">HHI", 0xFFFE, 0xE0DD, 0))
    path.write_bytes(data[:at] + un + data[at:])
    return path


def _uid_of(path: Path) -> str:
    return path.name.removeprefix("be-un-").removesuffix(".dcm")


def _cut_inside_the_un(path: Path) -> Path:
    """4 bytes taken out of the last item's Code Value: every length in it unchanged, so the item
    runs 4 bytes into the delimiter, which is then read as an element: cut short."""
    data = path.read_bytes()
    at = data.index(b"CODE01", data.index(b"CODE01") + 1)
    out = path.with_name("cut-" + path.name)
    out.write_bytes(data[:at] + data[at + 4:])
    return out


def test_big_endian_un_sequence_cut_short_is_refused_and_whole_is_stored(web, tmp_path):
    """A UN of undefined length in a Big Endian data set (Implicit VR Little Endian inside, PS3.5
    6.2.2): cut short inside it, refused 0xC000 as cut short by pynetdicom's C-STORE (both
    association paths) and STOW-RS (before: the walk stopped judging there and pydicom, which cannot
    read such a UN, refused it as undecodable); whole, stored by DCMTK storescu -xb and by pynetdicom
    sending its own bytes (before: refused 0xC000, undecodable)."""
    whole = _be_with_un(tmp_path)
    bad = _cut_inside_the_un(whole)
    port = web.address("dcm")[1]
    assert c_store(port, bad) == 0xC000
    assert c_store(port, bad, qr=True) == 0xC000
    assert stow(web, bad) == (409, [0xC000])
    rows = web.wait_for(lambda: (lambda r: r if len(r) >= 3 else None)(failed_receives(web)))
    assert [r["detail"] for r in rows] == [CUT_SHORT] * 3
    assert messages(web) == 0
    assert c_store(port, whole) == 0x0000
    uid = _uid_of(whole)  # pydicom cannot read the file (it reads the UN's items big-endian)
    with web.store.engine.connect() as c:
        ts = c.execute(select(idx.instances.c.transfer_syntax).where(idx.instances.c.sop_uid == uid)).scalar_one()
    assert ts == ExplicitVRBigEndian
    other = _be_with_un(tmp_path)  # a second instance, through DCMTK
    r = storescu(port, [other], extra=("-xb",))
    assert store_statuses(r.stdout) == ["Success"], r.stdout + r.stderr
    assert indexed(web, _uid_of(other))
    assert messages(web) == 2


def test_walk_and_scan_follow_a_big_endian_un_sequence():
    """The walk (fed whole and in 1/5-byte pieces) and the header scan read a Big Endian data set's
    UN of undefined length as Implicit VR Little Endian: whole, no refusal and judged; cut inside,
    Malformed; its delimiter big-endian (pydicom's reading, not the standard's), left unjudged; and
    the scan gives the index pydicom's attributes for every bundled Big Endian file."""
    import tempfile

    from engine.store.dicom.scan import scan

    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        whole = _be_with_un(tmp)
        _, body = idx.split_part10(whole.read_bytes())
        _, cut = idx.split_part10(_cut_inside_the_un(whole).read_bytes())
        _, be_delim = idx.split_part10(_be_with_un(tmp, delimiter_le=False).read_bytes())
    for size in (len(body), 1, 5):
        w = walk.StructureWalk(implicit=False, little=False)
        for i in range(0, len(body), size):
            w.feed(memoryview(body)[i:i + size])
        w.close()
        assert not w.unsure, size  # before: unsure at the UN
    with pytest.raises(walk.Malformed):
        walk.check(cut, implicit=False, little=False)
    w = walk.StructureWalk(implicit=False, little=False)
    w.feed(be_delim)
    w.close()
    assert w.unsure
    attrs = idx.extract(idx.read_checked(body, ExplicitVRBigEndian))  # before: pydicom's OSError
    assert attrs["PATIENT"]["PatientName"] == "CompressedSamples^MR1"
    compared = 0
    for f, data in bundled_big_endian():
        scanned = scan(data, idx._SCAN_TAGS, implicit=False, little=False)  # never declines a bundled file
        assert idx.extract(scanned) == idx.extract(idx.read_index_data_set(data, ExplicitVRBigEndian,
                                                                           scan_ok=False)), f
        compared += 1
    assert compared >= 10
