"""Storage associations on listeners/dicom_ul.py: which path serves them, reassembly of
fragmented P-DATA, and protocol errors answered with A-ABORT (never a dead listener)."""

from __future__ import annotations

import socket
import struct
import time

import pytest
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.pdu import A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import A_ASSOCIATE, MaximumLengthNotification
from pynetdicom.presentation import build_context
from pynetdicom.sop_class import CTImageStorage, StudyRootQueryRetrieveInformationModelFind, Verification
from sqlalchemy import select

from engine.store import schema
from listeners import dicom_dimse as dimse
from listeners import dicom_ul as ul
from routes.dicom_scu import RawInstance, send_raw
from tests.dicom_peers import data_file, dicom_yaml, store_statuses, storescu

pytestmark = pytest.mark.dcmtk


def _raw_instance(name: str = "CT_small.dcm") -> RawInstance:
    raw = data_file(name).read_bytes()
    from pydicom import dcmread

    ds = dcmread(data_file(name))
    meta_end = 144 + int.from_bytes(raw[140:144], "little")
    return RawInstance(str(ds.SOPClassUID), str(ds.SOPInstanceUID), str(ds.file_meta.TransferSyntaxUID),
                       raw[meta_end:])


def _associate_rq(calling: str = "TESTSCU", called: str = "MEDRELAY", max_pdu: int = 16384) -> bytes:
    prim = A_ASSOCIATE()
    prim.application_context_name = ul.APPLICATION_CONTEXT
    prim.calling_ae_title = calling
    prim.called_ae_title = called
    cx = build_context(CTImageStorage, [ExplicitVRLittleEndian])
    cx.context_id = 1
    prim.presentation_context_definition_list = [cx]
    ml = MaximumLengthNotification()
    ml.maximum_length_received = max_pdu
    prim.user_information = [ml]
    pdu = A_ASSOCIATE_RQ()
    pdu.from_primitive(prim)
    return bytes(pdu.encode())


def _recv_pdu(sock: socket.socket) -> tuple[int, bytes]:
    head = b""
    while len(head) < 6:
        chunk = sock.recv(6 - len(head))
        if not chunk:
            return -1, b""
        head += chunk
    length = int.from_bytes(head[2:6], "big")
    body = b""
    while len(body) < length:
        body += sock.recv(length - len(body))
    return head[0], body


def _raw_association(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(_associate_rq())
    kind, _ = _recv_pdu(sock)
    assert kind == 0x02, "expected A-ASSOCIATE-AC"
    return sock


def test_storage_association_is_served_by_the_upper_layer(engine_factory):
    """A plain storage association runs on dicom_ul (fragmented into 4 KiB PDUs here, C-ECHO
    on it too); one proposing Query/Retrieve runs on pynetdicom."""
    e = engine_factory(dicom_yaml(extra="      max_pdu: 4096\n"))
    port = e.address("dcm")[1]
    server = e.runtime.listener("dcm").server
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(CTImageStorage, [ExplicitVRLittleEndian])
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title="MEDRELAY")
    assert assoc.is_established
    assert len(server.storage_sessions) == 1
    assert assoc.acceptor.maximum_length == 4096
    assert assoc.send_c_echo().Status == 0x0000
    inst = _raw_instance("693_UNCI.dcm")  # 0.5 MB in ~130 P-DATA-TF PDUs
    assert send_raw(assoc, inst).Status == 0x0000
    assoc.release()
    e.wait_for(lambda: not server.storage_sessions)
    with e.store.engine.connect() as conn:
        assert conn.execute(select(schema.messages.c.id)).all()
    qr = AE(ae_title="TESTSCU")
    qr.add_requested_context(CTImageStorage, [ExplicitVRLittleEndian])
    qr.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    assoc = qr.associate("127.0.0.1", port, ae_title="MEDRELAY")
    assert assoc.is_established and not server.storage_sessions
    assoc.release()


@pytest.mark.parametrize("bad", [
    "unaccepted_context", "unknown_pdu", "oversized_pdu", "data_before_command", "truncated_command",
    "huge_release",
])
def test_protocol_errors_get_a_abort_and_the_listener_lives(engine_factory, bad):
    e = engine_factory(dicom_yaml(extra="      max_pdu: 16384\n"))
    port = e.address("dcm")[1]
    sock = _raw_association(port)
    pdv = {
        "unaccepted_context": struct.pack(">IBB", 4, 99, 0x03) + b"\0\0",
        "data_before_command": struct.pack(">IBB", 4, 1, 0x02) + b"\0\0",
        "truncated_command": struct.pack(">IBB", 12, 1, 0x03) + struct.pack("<HHI", 0, 0x100, 200) + b"\1\0",
    }
    if bad == "unknown_pdu":
        sock.sendall(bytes((0x09, 0, 0, 0, 0, 2, 0, 0)))
    elif bad == "oversized_pdu":  # announces 1 GiB: refused from the header alone
        sock.sendall(struct.pack(">BBI", 0x04, 0, 1 << 30))
    elif bad == "huge_release":  # an A-RELEASE-RQ is 4 bytes long; 4 GiB is refused unread
        sock.sendall(struct.pack(">BBI", 0x05, 0, 0xFFFFFFFF))
    else:
        sock.sendall(struct.pack(">BBI", 0x04, 0, len(pdv[bad])) + pdv[bad])
    kind, body = _recv_pdu(sock)
    assert kind == 0x07 and body[2] == 0x02, (kind, body)  # A-ABORT from the service provider
    assert _recv_pdu(sock)[0] == -1  # and the connection is closed
    sock.close()
    f = data_file("CT_small.dcm")
    assert store_statuses(storescu(port, [f]).stdout) == ["Success"]


def test_peer_closing_mid_data_set_stores_nothing(engine_factory):
    e = engine_factory(dicom_yaml())
    port = e.address("dcm")[1]
    sock = _raw_association(port)
    inst = _raw_instance()
    el, uid = dimse.element, dimse.ui_value
    body = [el(0x00000002, uid(str(inst.SOPClassUID))), el(0x00000100, struct.pack("<H", 0x0001)),
            el(0x00000110, struct.pack("<H", 1)), el(0x00000700, struct.pack("<H", 0)),
            el(0x00000800, struct.pack("<H", 0x0000)), el(0x00001000, uid(str(inst.SOPInstanceUID)))]
    rest = b"".join(body)
    cmd = dimse.element(0x00000000, struct.pack("<I", len(rest))) + rest
    sock.sendall(ul.pdata_pdus(1, cmd, 0))
    half = inst.raw[: len(inst.raw) // 2]
    item = struct.pack(">IBB", len(half) + 2, 1, 0x00) + half
    sock.sendall(struct.pack(">BBI", 0x04, 0, len(item)) + item)
    sock.close()
    time.sleep(0.5)
    with e.store.engine.connect() as conn:
        assert conn.execute(select(schema.messages.c.id)).all() == []
    assert not [p for p in (e.data_dir / "data" / "blobs").rglob("*") if p.is_file()]
    assert store_statuses(storescu(port, [data_file("CT_small.dcm")]).stdout) == ["Success"]


def test_association_limit_counts_both_paths(engine_factory):
    e = engine_factory(dicom_yaml(extra="      max_associations: 1\n"))
    port = e.address("dcm")[1]
    first = AE(ae_title="TESTSCU")
    first.add_requested_context(CTImageStorage, [ExplicitVRLittleEndian])
    held = first.associate("127.0.0.1", port, ae_title="MEDRELAY")
    assert held.is_established
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(_associate_rq())
    kind, body = _recv_pdu(sock)
    assert kind == 0x03 and tuple(body[1:4]) == (0x02, 0x03, 0x02)  # transient, local limit exceeded
    sock.close()
    qr = AE(ae_title="TESTSCU")  # pynetdicom's path counts the storage association too
    qr.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    assert qr.associate("127.0.0.1", port, ae_title="MEDRELAY").is_rejected
    held.release()
    with e.store.engine.connect() as conn:
        rows = conn.execute(select(schema.audit_events.c.detail)
                            .where(schema.audit_events.c.action == "dicom.association")).all()
    assert ("A-ASSOCIATE-RJ: association limit reached",) in rows


def test_silent_connection_is_closed_after_the_acse_timeout(engine_factory):
    e = engine_factory(dicom_yaml(extra="      acse_timeout: 0.5\n"))
    port = e.address("dcm")[1]
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    started = time.monotonic()
    assert sock.recv(1) == b""  # closed by us, no PDU
    assert time.monotonic() - started < 5
    sock.close()


def test_file_meta_and_responses_decode_as_pynetdicom_and_pydicom_would():
    """The hand-encoded file meta is byte for byte pynetdicom's; the command sets we write
    are what pydicom reads back (Implicit VR Little Endian, group length right)."""
    from io import BytesIO

    from pydicom.filereader import read_dataset
    from pynetdicom.dsutils import create_file_meta, encode_file_meta

    from listeners.dicom_store import file_meta

    for sop_class, sop_uid, ts in (("1.2.840.10008.5.1.4.1.1.2", "1.2.3.4", "1.2.840.10008.1.2.1"),
                                   ("1.2.840.10008.5.1.4.1.1.4", "1.2.34", "1.2.840.10008.1.2.4.50")):
        theirs = encode_file_meta(create_file_meta(sop_class_uid=sop_class, sop_instance_uid=sop_uid,
                                                   transfer_syntax=ts))
        assert file_meta(sop_class, sop_uid, ts) == b"\0" * 128 + b"DICM" + theirs
    rsp = dimse.encode_response(dimse.C_STORE_RSP, 7, "1.2.840.10008.5.1.4.1.1.2", 0xA900, sop_uid="1.2.3",
                                comment="odd")
    ds = read_dataset(BytesIO(rsp), True, True)
    assert ds.CommandGroupLength == len(rsp) - 12
    assert (ds.CommandField, ds.MessageIDBeingRespondedTo, ds.Status) == (0x8001, 7, 0xA900)
    assert (ds.AffectedSOPClassUID, ds.AffectedSOPInstanceUID, ds.ErrorComment) == \
        ("1.2.840.10008.5.1.4.1.1.2", "1.2.3", "odd")
    assert ds.CommandDataSetType == 0x0101
    assert dimse.decode_command(rsp)[0x00000900] == (0xA900).to_bytes(2, "little")
    with pytest.raises(ValueError):
        dimse.decode_command(rsp[:-3])
