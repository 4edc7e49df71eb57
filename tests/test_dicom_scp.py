"""The DICOM listener against real peers: DCMTK echoscu/storescu/findscu/movescu/getscu/storescp."""

from __future__ import annotations

import socket
import zlib
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pynetdicom import AE, evt
from pynetdicom.sop_class import (
    CTImageStorage,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)
from sqlalchemy import func, select

from engine.store import schema
from engine.store.dicom import index as idx
from routes.dicom_scu import RawInstance, send_raw
from tests.dicom_peers import (
    StoreSCP,
    data_file,
    dataset_bytes,
    dicom_yaml,
    echoscu,
    findscu,
    run,
    store_statuses,
    storescu,
    storescu_any,
    unique_files,
)

pytestmark = pytest.mark.dcmtk

MOVE_DESTS = """      move_destinations:
        STORESCP: {{host: 127.0.0.1, port: {port}}}
"""


def stored(e, sop_uid: str, inflate: bool = True) -> bytes:
    """The data set medrelay holds for ``sop_uid`` (decrypted, after the file meta)."""
    with e.store.engine.connect() as conn:
        row = idx.existing_instance(conn, sop_uid)
        assert row is not None, sop_uid
        ref = idx.InstanceRef(sop_uid, row["sop_class_uid"], row["transfer_syntax"], row["message_id"],
                              row["blob_id"])
        ts, body = idx.split_part10(idx.load_instance(conn, e.store, ref))
    return zlib.decompress(body, -15) if inflate and ts == "1.2.840.10008.1.2.1.99" else body


def count(e, table) -> int:
    with e.store.engine.connect() as conn:
        return conn.execute(select(func.count()).select_from(table)).scalar_one()


@pytest.fixture
def scp_out(tmp_path):
    scps: list[StoreSCP] = []

    def make(name: str = "scp") -> StoreSCP:
        s = StoreSCP(tmp_path / name, extra=("+xa",))
        scps.append(s)
        return s

    yield make
    for s in scps:
        s.stop()


def test_echo_and_rejected_aes(engine_factory):
    e = engine_factory(dicom_yaml())
    port = e.address("dcm")[1]
    assert echoscu(port).returncode == 0
    bad_calling = echoscu(port, aet="STRANGER")
    assert bad_calling.returncode != 0 and "Rejected" in (bad_calling.stdout)
    bad_called = echoscu(port, aec="NOTUS")
    assert bad_called.returncode != 0 and "Rejected" in (bad_called.stdout)
    def rejections():
        with e.store.engine.connect() as conn:
            return conn.execute(select(schema.audit_events.c.outcome)
                                .where(schema.audit_events.c.action == "dicom.association")).scalars().all()

    assert e.wait_for(lambda: len(rejections()) == 2) and set(rejections()) == {"failure"}


def test_store_all_files_and_move_byte_identical(engine_factory, scp_out, tmp_path):
    scp = scp_out()
    e = engine_factory(dicom_yaml(extra=MOVE_DESTS.format(port=scp.port)))
    port = e.address("dcm")[1]
    files = unique_files(tmp_path / "in")
    assert storescu_any(port, files) == ["Success"] * len(files)
    originals = {str(dcmread(f, stop_before_pixels=True).SOPInstanceUID): f for f in files}
    assert count(e, idx.instances) == len(files)
    # What we hold decodes to the original data set (DCMTK may re-encode on the way in).
    for uid, f in originals.items():
        ours = dcmread(__import__("io").BytesIO(stored_part10(e, uid)))
        theirs = dcmread(f)
        for elem in theirs:
            if elem.tag.element != 0 and elem.tag not in (0x7FE00010, 0xFFFCFFFC):
                assert ours[elem.tag].value == elem.value, (f.name, elem.tag)
    # C-MOVE everything (a list of Study Instance UIDs) to DCMTK storescp.
    studies = sorted({str(dcmread(f, stop_before_pixels=True).StudyInstanceUID) for f in files})
    mv = run("movescu", "-S", "-aet", "TESTSCU", "-aec", "MEDRELAY", "-aem", "STORESCP",
             "-k", "QueryRetrieveLevel=STUDY", "-k", "StudyInstanceUID=" + "\\".join(studies),
             "127.0.0.1", str(port))
    assert mv.returncode == 0, mv.stdout
    got = {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID): p for p in scp.files()}
    assert set(got) == set(originals)
    for uid, p in got.items():
        assert dataset_bytes(p) == stored(e, uid), p.name  # byte-identical data set


def stored_part10(e, sop_uid: str) -> bytes:
    with e.store.engine.connect() as conn:
        row = idx.existing_instance(conn, sop_uid)
        ref = idx.InstanceRef(sop_uid, row["sop_class_uid"], row["transfer_syntax"], row["message_id"], None)
        return idx.load_instance(conn, e.store, ref)


def test_get_with_pynetdicom_and_getscu(engine_factory, tmp_path):
    e = engine_factory(dicom_yaml())
    port = e.address("dcm")[1]
    files = unique_files(tmp_path / "in")
    assert storescu_any(port, files) == ["Success"] * len(files)
    # pynetdicom C-GET SCU proposing every stored (SOP class, transfer syntax) with the SCP role
    received: dict[str, bytes] = {}

    def on_store(event):
        received[str(event.request.AffectedSOPInstanceUID)] = event.encoded_dataset(include_meta=False)
        return 0x0000

    ae = AE(ae_title="GETSCU")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    pairs = set()
    for f in files:
        ds = dcmread(f, stop_before_pixels=True)
        pairs.add((ds.SOPClassUID, ds.file_meta.TransferSyntaxUID))
    from pynetdicom import build_role

    roles = []
    for sop, ts in sorted(pairs):
        ae.add_requested_context(sop, [ts])
        roles.append(build_role(sop, scp_role=True))
    assoc = ae.associate("127.0.0.1", port, ae_title="MEDRELAY", ext_neg=list({r.sop_class_uid: r for r in
                                                                               roles}.values()),
                         evt_handlers=[(evt.EVT_C_STORE, on_store)])
    assert assoc.is_established
    q = Dataset()
    q.QueryRetrieveLevel = "PATIENT"
    q.PatientID = "*"
    statuses = [s.Status for s, _ in assoc.send_c_get(q, StudyRootQueryRetrieveInformationModelGet)]
    assoc.release()
    assert statuses[-1] == 0xA900  # PATIENT is not a Study Root level
    assoc = ae.associate("127.0.0.1", port, ae_title="MEDRELAY", ext_neg=list({r.sop_class_uid: r for r in
                                                                               roles}.values()),
                         evt_handlers=[(evt.EVT_C_STORE, on_store)])
    q.QueryRetrieveLevel = "IMAGE"
    del q.PatientID
    q.SOPInstanceUID = [str(dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files]
    statuses = [s.Status for s, _ in assoc.send_c_get(q, StudyRootQueryRetrieveInformationModelGet)]
    assoc.release()
    assert statuses[-1] == 0x0000, [hex(s) for s in statuses]
    assert len(received) == len(files)
    for uid, data in received.items():
        assert data == stored(e, uid, inflate=False)
    # DCMTK getscu for the CT (uncompressed) series
    ct = dcmread(data_file("CT_small.dcm"), stop_before_pixels=True)
    out = tmp_path / "getscu"
    out.mkdir()
    g = run("getscu", "-S", "-aet", "GETSCU", "-aec", "MEDRELAY", "+B", "-od", str(out),
            "-k", "QueryRetrieveLevel=SERIES", "-k", f"SeriesInstanceUID={ct.SeriesInstanceUID}",
            "127.0.0.1", str(port))
    assert g.returncode == 0, g.stdout
    got = list(out.iterdir())
    assert len(got) == 1 and dataset_bytes(got[0]) == stored(e, str(ct.SOPInstanceUID))


def test_move_unknown_destination(engine_factory):
    e = engine_factory(dicom_yaml())
    port = e.address("dcm")[1]
    storescu(port, [data_file("CT_small.dcm")])
    mv = run("movescu", "-v", "-S", "-aet", "TESTSCU", "-aec", "MEDRELAY", "-aem", "NOWHERE",
             "-k", "QueryRetrieveLevel=STUDY", "-k", "StudyInstanceUID=1.2.3", "127.0.0.1", str(port))
    assert "Refused: MoveDestinationUnknown" in mv.stdout  # DCMTK's name for 0xA801
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
    assoc = ae.associate("127.0.0.1", port, ae_title="MEDRELAY")
    q = Dataset()
    q.QueryRetrieveLevel = "STUDY"
    q.StudyInstanceUID = "1.2.3"
    codes = [s.Status for s, _ in assoc.send_c_move(q, "NOWHERE", StudyRootQueryRetrieveInformationModelMove)]
    assoc.release()
    assert codes == [0xA801]


def _hostile(uid: str, ts) -> RawInstance:
    from pydicom import config
    from pynetdicom.dsutils import encode

    ds = dcmread(data_file("CT_small.dcm"))
    old = config.settings.writing_validation_mode
    config.settings.writing_validation_mode = config.IGNORE
    try:
        ds.SOPInstanceUID = uid
        raw = encode(ds, ts.is_implicit_VR, ts.is_little_endian)
    finally:
        config.settings.writing_validation_mode = old
    return RawInstance(CTImageStorage, uid, ts, raw)


def test_hostile_uids_and_garbage(engine_factory):
    from pydicom.uid import ExplicitVRLittleEndian as ELE

    e = engine_factory(dicom_yaml())
    port = e.address("dcm")[1]
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(CTImageStorage, [ELE])
    assoc = ae.associate("127.0.0.1", port, ae_title="MEDRELAY")
    assert assoc.is_established
    for uid in ("../../etc/x", "1.2." + "3" * 70, "1.2.3/../../4", "1.2.3\\4", "1.2. 3", "/etc/passwd"):
        inst = _hostile(uid, ELE)
        if len(uid) > 64 or "\\" in uid:  # pynetdicom refuses it in the command; the data set has it
            inst = RawInstance(CTImageStorage, "1.2.3.9", ELE, inst.raw)
        status = send_raw(assoc, inst)
        assert status.Status == 0xA900, (uid, hex(status.Status))
    # dataset UID differs from the command's Affected SOP Instance UID
    good = _hostile("1.2.3.4.5", ELE)
    mismatch = RawInstance(CTImageStorage, "1.2.3.4.6", ELE, good.raw)
    assert send_raw(assoc, mismatch).Status == 0xA900
    garbage = RawInstance(CTImageStorage, "1.2.3.4.7", ELE, b"\x08\x00\x18\x00UI\xff\xff" + b"\x01" * 100)
    assert send_raw(assoc, garbage).Status in (0xC000, 0xA900)
    assert send_raw(assoc, good).Status == 0x0000
    assoc.release()
    assert count(e, schema.messages) == 1
    names = [p.name for p in e.data_dir.rglob("*")]
    assert not any("etc" in n or "passwd" in n or "1.2.3" in n for n in names)


def test_duplicates_keep_first_and_replace(engine_factory):
    e = engine_factory(dicom_yaml())
    port = e.address("dcm")[1]
    f = data_file("CT_small.dcm")
    for _ in range(2):
        assert store_statuses(storescu(port, [f]).stdout) == ["Success"]
    assert count(e, schema.messages) == 1 and count(e, idx.instances) == 1
    r = engine_factory(dicom_yaml(extra="      duplicates: replace\n"), subdir="r")
    rport = r.address("dcm")[1]
    assert store_statuses(storescu(rport, [f, f]).stdout) == ["Success", "Success"]
    assert count(r, schema.messages) == 1  # an identical re-send is still recognised
    changed = Path(r.data_dir) / "changed.dcm"
    ds = dcmread(f)
    ds.StudyDescription = "corrected"
    ds.save_as(changed)
    assert store_statuses(storescu(rport, [changed]).stdout) == ["Success"]
    assert count(r, schema.messages) == 2 and count(r, idx.instances) == 1
    assert dcmread(__import__("io").BytesIO(stored_part10(r, str(ds.SOPInstanceUID)))).StudyDescription \
        == "corrected"


def test_abort_mid_association_stores_nothing_half(engine_factory):
    from pydicom.uid import ExplicitVRLittleEndian as ELE

    e = engine_factory(dicom_yaml())
    port = e.address("dcm")[1]
    small = RawInstance(CTImageStorage, *_uids_and_raw("CT_small.dcm"))
    big = RawInstance(CTImageStorage, *_uids_and_raw("693_UNCI.dcm"))
    data_pdus = {"n": 0}

    def on_sent(event):
        if event.pdu.pdu_type == 0x04:
            data_pdus["n"] += 1
            if data_pdus["n"] == 4:  # command + first fragment of the second instance
                event.assoc.dul.socket.socket.shutdown(socket.SHUT_RDWR)

    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(CTImageStorage, [ELE])
    assoc = ae.associate("127.0.0.1", port, ae_title="MEDRELAY", evt_handlers=[(evt.EVT_PDU_SENT, on_sent)])
    assert send_raw(assoc, small).Status == 0x0000
    try:
        send_raw(assoc, big)
    except Exception:  # the connection is gone: expected
        pass
    assoc.abort()
    assert count(e, schema.messages) == 1 and count(e, idx.instances) == 1
    assert echoscu(port).returncode == 0  # and the listener is still fine


def _uids_and_raw(name: str):
    ds = dcmread(data_file(name), stop_before_pixels=True)
    return str(ds.SOPInstanceUID), ds.file_meta.TransferSyntaxUID, dataset_bytes(data_file(name))


def test_phi_not_in_data_folder(engine_factory, tmp_path):
    e = engine_factory(dicom_yaml())
    port = e.address("dcm")[1]
    f = data_file("CT_small.dcm")
    assert store_statuses(storescu(port, [f]).stdout) == ["Success"]
    _, res = findscu(port, "STUDY", {"PatientName": "CompressedSamples^CT1", "PatientID": ""},
                     out_dir=tmp_path / "q")
    assert len(res) == 1 and res[0].PatientID == "1CT1"
    ds = dcmread(f, stop_before_pixels=True)
    e.stop()
    needles = [str(ds.PatientName).encode(), str(ds.PatientID).encode(), b"CompressedSamples"]
    for p in Path(e.data_dir).rglob("*"):
        if p.is_file():
            blob = p.read_bytes()
            for n in needles:
                assert n not in blob, (p, n)


def test_no_phi_in_info_logs(engine_factory, tmp_path):
    """Store, query, retrieve and a refused association: nothing at info or above names the patient."""
    from structlog.testing import capture_logs

    e = engine_factory(dicom_yaml())
    port = e.address("dcm")[1]
    f = data_file("CT_small.dcm")
    with capture_logs() as logs:
        assert store_statuses(storescu(port, [f]).stdout) == ["Success"]
        findscu(port, "STUDY", {"PatientName": "Compressed*", "PatientID": ""}, out_dir=tmp_path / "q")
        findscu(port, "STUDY", {"PatientName": "Compressed*"}, aet="NOTALLOWED", out_dir=tmp_path / "q2")
    ds = dcmread(f, stop_before_pixels=True)
    info = [x for x in logs if x.get("log_level") != "debug"]
    assert any(x["event"] == "dicom.stored" for x in info)
    text = repr(info)
    for needle in (str(ds.PatientName), str(ds.PatientID), "CompressedSamples", str(ds.PatientBirthDate or "")):
        if needle:
            assert needle not in text, needle
