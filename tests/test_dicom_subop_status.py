"""The final C-GET / C-MOVE response when C-STORE sub-operations fail (PS3.4 C.4.2.3.1, C.4.3.3.1).

Success when all were stored, Warning 0xB000 when some failed and some were stored, a Failure
(0xC000 "Unable to process", Error Comment "all N sub-operations failed") when every attempted one
failed; never 0xA702 "Refused: Out of Resources - Unable to perform sub-operations" (what pynetdicom
sends), which says the sub-operations could not be started. The causes tried here: an instance no
decoder reads (pydicom's 12-bit ``JPEG-lossy.dcm``) for a requestor that takes only uncompressed
syntaxes, and a requestor with no storage context for the class. Peers: DCMTK getscu, movescu and
storescp, and pynetdicom as a C-GET SCU (it reads the response's identifier and releases).
"""

from __future__ import annotations

import re

import pytest
from dicom_peers import StoreSCP, dicom_yaml, run, storescu_any
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, build_role, evt
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelGet
from structlog.testing import capture_logs

pytestmark = pytest.mark.dcmtk

MOVE_DEST = """      move_destinations:
        STORESCP: {{host: 127.0.0.1, port: {port}}}
"""


def copy(tmp, name, study=None):
    """A copy of a pydicom test file with new UIDs (in ``study`` when given): (path, dataset)."""
    ds = dcmread(get_testdata_file(name))
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study or generate_uid(), generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    tmp.mkdir(parents=True, exist_ok=True)
    p = tmp / f"{name}.{str(ds.SOPInstanceUID)[-8:]}"
    ds.save_as(p, enforce_file_format=True)
    return p, ds


@pytest.fixture
def archive(engine_factory, tmp_path):
    """An engine holding study A (one JPEG-lossy.dcm, which cannot be decoded) and study B (the same
    plus one CT that needs no conversion), and a DCMTK storescp (uncompressed only) as STORESCP."""
    scp = StoreSCP(tmp_path / "scp")
    e = engine_factory(dicom_yaml(calling="[TESTSCU, GETSCU]", extra=MOVE_DEST.format(port=scp.port)))
    port = e.address("dcm")[1]
    bad_a, a = copy(tmp_path / "in", "JPEG-lossy.dcm")
    assert str(a.file_meta.TransferSyntaxUID) == "1.2.840.10008.1.2.4.51"
    bad_b, b = copy(tmp_path / "in", "JPEG-lossy.dcm")
    good, g = copy(tmp_path / "in", "CT_small.dcm", study=b.StudyInstanceUID)
    assert storescu_any(port, [bad_a, bad_b, good]) == ["Success"] * 3
    yield e, port, scp, {"A": a, "B": b, "good": g}
    scp.stop()


def getscu(port, study, out):
    out.mkdir(parents=True, exist_ok=True)
    g = run("getscu", "-d", "-S", "-aet", "GETSCU", "-aec", "MEDRELAY", "-od", str(out),
            "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study}", "127.0.0.1", str(port))
    return g, (g.stdout or "") + (g.stderr or "")


def counters(text, completed, failed):
    """The final response's counters, as getscu / movescu -d print them."""
    assert re.search(rf"\bCompleted Suboperations\s*:\s*{completed}\b", text), text[-3000:]
    assert re.search(rf"\bFailed Suboperations\s*:\s*{failed}\b", text), text[-3000:]


def final_get_response(text):
    """The part of getscu's debug log from the last C-GET response on: what came after it."""
    return text[text.rindex("Received C-GET Response"):]


def final_move_response(text):
    return text[text.rindex("Received Final Move Response"):]


def test_getscu_all_failed_is_a_failure_with_counters(archive, tmp_path):
    e, port, _scp, ds = archive
    with capture_logs() as logs:
        g, text = getscu(port, ds["A"].StudyInstanceUID, tmp_path / "got")
    assert list((tmp_path / "got").iterdir()) == []  # never sent
    assert "0xa702" not in text.lower(), text[-3000:]
    last = final_get_response(text)
    assert re.search(r"DIMSE Status\s*:\s*0xc000", last), last
    assert "ErrorComment" in last and "all 1 sub-operations failed" in last, last
    counters(last, 0, 1)
    assert text.count("Received C-GET Response") == 2  # one Pending, one final
    assert "Received C-STORE Request" not in last  # nothing after the final response
    # DCMTK 3.6.7 getscu (DcmSCU::handleCGETSession) never reads the data set of a C-GET-RSP, here the
    # Failed SOP Instance UID List PS3.4 C.4.3.1.3 requires, and finds it unread when it releases; the
    # same happens on every 0xB000. pynetdicom below reads it and releases cleanly.
    assert re.search(r"Data Set\s*:\s*present", last), last
    done = [r for r in logs if r["event"] == "dicom.get"]
    assert done and done[-1]["failed"] == 1 and done[-1]["sent"] == 0 and done[-1]["outcome"] == "failed"


def test_getscu_some_failed_is_a_warning(archive, tmp_path):
    e, port, _scp, ds = archive
    g, text = getscu(port, ds["B"].StudyInstanceUID, tmp_path / "got")
    got = [str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in (tmp_path / "got").iterdir()]
    assert got == [str(ds["good"].SOPInstanceUID)]
    last = final_get_response(text)
    assert re.search(r"DIMSE Status\s*:\s*0xb000", last), last
    counters(last, 1, 1)


def test_movescu_all_failed_and_some_failed(archive):
    e, port, scp, ds = archive
    with capture_logs() as logs:
        mv = run("movescu", "-d", "-S", "-aet", "TESTSCU", "-aec", "MEDRELAY", "-aem", "STORESCP",
                 "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={ds['A'].StudyInstanceUID}",
                 "127.0.0.1", str(port))
    text = (mv.stdout or "") + (mv.stderr or "")
    assert "OutOfResourcesSubOperations" not in text, text
    last = final_move_response(text)
    assert re.search(r"DIMSE Status\s*:\s*0xc000", last) and "all 1 sub-operations failed" in last, last
    # movescu exits nonzero (69) on a Failure status; the association is released normally
    assert mv.returncode != 0 and "Releasing Association" in last, text
    assert "Release Failed" not in text and "Aborting" not in text, text
    counters(last, 0, 1)
    assert scp.files() == []
    done = [r for r in logs if r["event"] == "dicom.move"]
    assert done and done[-1]["failed"] == 1 and done[-1]["sent"] == 0

    mv = run("movescu", "-d", "-S", "-aet", "TESTSCU", "-aec", "MEDRELAY", "-aem", "STORESCP",
             "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={ds['B'].StudyInstanceUID}",
             "127.0.0.1", str(port))
    text = (mv.stdout or "") + (mv.stderr or "")
    last = final_move_response(text)
    assert re.search(r"DIMSE Status\s*:\s*0xb000", last), last
    assert "Release Failed" not in text and "Aborting" not in text, text
    counters(last, 1, 1)
    assert len(scp.files()) == 1


def pynetdicom_get(port, study, sop_class, *, role=True):
    """A C-GET by pynetdicom taking ``sop_class`` in Explicit VR Little Endian only (or no storage
    context at all): every response (status, identifier) and whether the release completed."""
    ae = AE(ae_title="GETSCU")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    stored = []
    roles = []
    if role:
        ae.add_requested_context(sop_class, ExplicitVRLittleEndian)
        roles = [build_role(sop_class, scp_role=True)]
    assoc = ae.associate("127.0.0.1", port, ae_title="MEDRELAY", ext_neg=roles,
                         evt_handlers=[(evt.EVT_C_STORE, lambda event: stored.append(event) or 0x0000)])
    assert assoc.is_established
    q = StudyRootQueryRetrieveInformationModelGet
    ident = Dataset()
    ident.QueryRetrieveLevel = "STUDY"
    ident.StudyInstanceUID = study
    rsps = list(assoc.send_c_get(ident, q))
    assoc.release()
    return rsps, assoc.is_released, stored


@pytest.mark.parametrize("role", [True, False], ids=["not-convertible", "no-storage-context"])
def test_pynetdicom_get_all_failed_reads_the_list_and_releases(archive, role):
    e, port, _scp, ds = archive
    a = ds["A"]
    rsps, released, stored = pynetdicom_get(port, str(a.StudyInstanceUID), str(a.SOPClassUID), role=role)
    assert stored == []
    status, identifier = rsps[-1]
    assert status.Status == 0xC000 and status.ErrorComment == "all 1 sub-operations failed"
    assert (status.NumberOfCompletedSuboperations, status.NumberOfFailedSuboperations) == (0, 1)
    assert identifier is not None and identifier.FailedSOPInstanceUIDList == str(a.SOPInstanceUID)
    assert released  # nothing came after the final response


def test_damaged_blob_all_failed_and_one_of_two(engine_factory, tmp_path):
    """A stored instance whose blob no longer opens (its AES-GCM tag broken) is a failed
    sub-operation: 0xC000 when it is all there is, 0xB000 next to one that is sent."""
    from sqlalchemy import select

    from engine.store import schema

    e = engine_factory(dicom_yaml(calling="[TESTSCU, GETSCU]"), subdir="dmg")
    port = e.address("dcm")[1]
    p, bad = copy(tmp_path / "in", "CT_small.dcm")
    assert storescu_any(port, [p]) == ["Success"]
    with e.store.engine.begin() as c:  # the one instance stored so far: inline, under INLINE_MAX
        rows = c.execute(select(schema.blobs.c.id, schema.blobs.c.data).where(schema.blobs.c.in_file == 0)).all()
        assert rows
        for blob_id, data in rows:
            c.execute(schema.blobs.update().where(schema.blobs.c.id == blob_id)
                      .values(data=bytes(data[:-1]) + bytes([data[-1] ^ 0xFF])))
    study, cls = str(bad.StudyInstanceUID), str(bad.SOPClassUID)
    with capture_logs() as logs:
        rsps, released, stored = pynetdicom_get(port, study, cls)
    status, identifier = rsps[-1]
    assert stored == [] and released
    assert (status.Status, status.NumberOfCompletedSuboperations, status.NumberOfFailedSuboperations) == (0xC000, 0, 1)
    assert identifier.FailedSOPInstanceUIDList == str(bad.SOPInstanceUID)
    assert any(r["event"] == "dicom.retrieve_load_failed" for r in logs)
    p2, _good = copy(tmp_path / "in", "CT_small.dcm", study=study)
    assert storescu_any(port, [p2]) == ["Success"]
    rsps, released, stored = pynetdicom_get(port, study, cls)
    status, identifier = rsps[-1]
    assert len(stored) == 1 and released
    assert (status.Status, status.NumberOfCompletedSuboperations, status.NumberOfFailedSuboperations) == (0xB000, 1, 1)
    assert identifier.FailedSOPInstanceUIDList == str(bad.SOPInstanceUID)
