"""Hostile and broken DICOM peers (issue 9): declared lengths that would allocate gigabytes,
connections that send one byte or trickle, malformed C-STORE-RQs on both association paths,
rejected associations and retrieves that send nothing as an operator reads them in the log,
and refused instances that must leave no blob file behind.

Peers are raw sockets speaking PS3.8 byte by byte, pynetdicom as an SCU and DCMTK; the
engine is a real one (a `medrelay run` process where memory or CPU is measured).
"""

from __future__ import annotations

import os
import resource
import signal
import socket
import sqlite3
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom.pdu import A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import A_ASSOCIATE, MaximumLengthNotification
from pynetdicom.presentation import build_context
from pynetdicom.sop_class import (
    CTImageStorage,
    MRImageStorage,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
    Verification,
)
from structlog.testing import capture_logs

from listeners import dicom_dimse as dimse
from listeners import dicom_ul as ul
from routes.dicom_scu import RawInstance, send_raw
from tests.conftest import MedrelayProc
from tests.dicom_peers import data_file, dataset_bytes, dicom_yaml, free_port, store_statuses, storescu

pytestmark = pytest.mark.dcmtk

MB = 1024 * 1024
BOMB_RQ = bytes.fromhex("0100FFFFFFFF")  # an A-ASSOCIATE-RQ announcing 4 GiB
BOMB_PDATA = bytes.fromhex("0400FFFFFFFF")  # a P-DATA-TF announcing 4 GiB


# -- raw PS3.8 peers -------------------------------------------------------------------

def associate_rq(*syntaxes: str, calling: str = "TESTSCU", called: str = "MEDRELAY",
                 max_pdu: int = 16384) -> bytes:
    """An A-ASSOCIATE-RQ proposing ``syntaxes`` (context IDs 1, 3, ...), Explicit VR LE."""
    prim = A_ASSOCIATE()
    prim.application_context_name = ul.APPLICATION_CONTEXT
    prim.calling_ae_title = calling
    prim.called_ae_title = called
    contexts = []
    for i, syntax in enumerate(syntaxes or (CTImageStorage,)):
        cx = build_context(syntax, [ExplicitVRLittleEndian])
        cx.context_id = 2 * i + 1
        contexts.append(cx)
    prim.presentation_context_definition_list = contexts
    ml = MaximumLengthNotification()
    ml.maximum_length_received = max_pdu
    prim.user_information = [ml]
    pdu = A_ASSOCIATE_RQ()
    pdu.from_primitive(prim)
    return bytes(pdu.encode())


PLAIN = (CTImageStorage,)  # served by listeners/dicom_ul.py
QR = (CTImageStorage, StudyRootQueryRetrieveInformationModelFind)  # served by pynetdicom


def recv_pdu(sock: socket.socket) -> tuple[int, bytes]:
    """The next PDU as (type, body); (-1, b"") when the connection is closed or reset."""
    def exact(n: int) -> bytes | None:
        out = b""
        while len(out) < n:
            try:
                chunk = sock.recv(n - len(out))
            except (ConnectionResetError, BrokenPipeError):
                return None
            if not chunk:
                return None
            out += chunk
        return out

    head = exact(6)
    if head is None:
        return -1, b""
    body = exact(int.from_bytes(head[2:6], "big"))
    return (head[0], body) if body is not None else (-1, b"")


def connect(port: int, timeout: float = 10) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=timeout)


def associated(port: int, syntaxes: tuple[str, ...], **kw: object) -> socket.socket:
    sock = connect(port)
    sock.sendall(associate_rq(*syntaxes, **kw))  # type: ignore[arg-type]
    kind, _ = recv_pdu(sock)
    assert kind == 0x02, f"expected A-ASSOCIATE-AC, got {kind}"
    return sock


def store_command(sop_class: str, sop_uid: str, *, msg_id: int | None = 1, data_set_type: int = 0x0000) -> bytes:
    el, uid = dimse.element, dimse.ui_value
    body = [el(0x00000002, uid(sop_class)), el(0x00000100, struct.pack("<H", dimse.C_STORE_RQ))]
    if msg_id is not None:
        body.append(el(0x00000110, struct.pack("<H", msg_id)))
    body += [el(0x00000700, struct.pack("<H", 0)), el(0x00000800, struct.pack("<H", data_set_type)),
             el(0x00001000, uid(sop_uid) if sop_uid else b"")]
    rest = b"".join(body)
    return el(0x00000000, struct.pack("<I", len(rest))) + rest


def pdv_pdu(context_id: int, control: int, value: bytes) -> bytes:
    item = struct.pack(">IBB", len(value) + 2, context_id, control) + value
    return struct.pack(">BBI", 0x04, 0, len(item)) + item


def send_store(sock: socket.socket, command: bytes, data: bytes | None) -> None:
    sock.sendall(pdv_pdu(1, 0x03, command) + (pdv_pdu(1, 0x02, data) if data is not None else b""))


def answer(sock: socket.socket) -> tuple[str, object]:
    """What the peer got back: ("rsp", status, raw response) or ("abort", source, reason) or ("closed",)."""
    kind, body = recv_pdu(sock)
    if kind == 0x04:
        from io import BytesIO

        from pydicom.filereader import read_dataset

        raw = body[6:]
        return "rsp", (int(read_dataset(BytesIO(raw), True, True).Status), raw)
    if kind == 0x07:
        return "abort", (body[2], body[3])
    return "closed", kind


def ct_data_set() -> tuple[str, bytes]:
    ds = dcmread(data_file("CT_small.dcm"))
    return str(ds.SOPInstanceUID), dataset_bytes(data_file("CT_small.dcm"))


# -- measuring a `medrelay run` process ----------------------------------------------------

def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def echo_seconds(port: int) -> float:
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(Verification)
    started = time.monotonic()
    assoc = ae.associate("127.0.0.1", port, ae_title="MEDRELAY")
    assert assoc.is_established, "C-ECHO association not established"
    status = assoc.send_c_echo()
    assoc.release()
    assert status.Status == 0x0000
    return time.monotonic() - started


def echo_within(port: int, budget: float) -> float:
    """Seconds until a C-ECHO is answered, retrying a transient refusal (the association limit
    taken by the flood at that instant) until ``budget`` is spent."""
    started = time.monotonic()
    while True:
        try:
            echo_seconds(port)
            return time.monotonic() - started
        except AssertionError:
            if time.monotonic() - started > budget:
                raise
            time.sleep(0.05)


def running(medrelay_proc, extra: str = ""):
    port = free_port()
    p = medrelay_proc(dicom_yaml(port, extra=extra))
    p.start()
    p.wait_port(port)
    time.sleep(0.3)
    return p, port


# -- item 1: lengths a peer declares -----------------------------------------------------

@pytest.mark.parametrize("bomb, extra", [
    ("associate_rq", ""),
    ("associate_rq", "      max_connections: 256\n"),  # all 200 reach the length check, none the cap
    ("p_data_on_qr_association", ""),
], ids=["rq-defaults", "rq-no-cap", "pdata-qr"])
def test_200_length_bombs_allocate_nothing_and_echo_still_answers(medrelay_proc, bomb, extra):
    """200 connections at once, each announcing a 4 GiB PDU (before association, or as the first
    P-DATA-TF of an association that proposes Query/Retrieve and so runs on pynetdicom): the
    engine stays under 300 MB and a C-ECHO answers in under a second while they are open."""
    p, port = running(medrelay_proc, extra)
    pid = p.proc.pid
    payload = BOMB_RQ if bomb == "associate_rq" else associate_rq(*QR) + BOMB_PDATA
    socks = []
    peak = rss_mb(pid)
    try:
        for _ in range(200):
            s = connect(port)
            s.sendall(payload)
            socks.append(s)
        echo = echo_within(port, 1.0)
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            peak = max(peak, rss_mb(pid))
            assert peak < 1024, "runaway allocation"  # stop early on a shared machine
            time.sleep(0.1)
        assert peak < 300, f"engine RSS {peak:.0f} MB"
        assert echo < 1.0, f"C-ECHO took {echo:.2f} s"
        answers = {"abort": 0, "rejected": 0, "closed": 0}
        for s in socks:
            s.settimeout(10)
            kind, body = recv_pdu(s)
            if kind == 0x02:  # associated (pynetdicom): the 4 GiB P-DATA-TF header gets the A-ABORT
                kind, body = recv_pdu(s)
            if kind == 0x07:
                assert body[2:4] == bytes((0x02, ul.INVALID_PARAMETER)), body
                answers["abort"] += 1
            elif kind == 0x03:
                answers["rejected"] += 1  # beyond max_connections / max_associations: A-ASSOCIATE-RJ
            else:
                answers["closed"] += 1
        assert answers["abort"] >= (200 if extra else 16), answers
        assert p.proc.poll() is None
    finally:
        for s in socks:
            s.close()
    assert echo_seconds(port) < 1.0


def test_associate_rq_limit_and_a_large_real_one(engine_factory):
    """An A-ASSOCIATE-RQ just over ASSOCIATE_RQ_MAX is refused from its header; a real one
    with 128 presentation contexts and many transfer syntaxes (larger than one read) is accepted."""
    e = engine_factory(dicom_yaml())
    port = e.address("dcm")[1]
    s = connect(port)
    s.sendall(struct.pack(">BBI", 0x01, 0, ul.ASSOCIATE_RQ_MAX + 1) + b"\0" * 1000)
    assert answer(s) == ("abort", (0x02, ul.INVALID_PARAMETER))
    assert recv_pdu(s)[0] == -1
    from pynetdicom import AllStoragePresentationContexts

    from listeners.dicom_contexts import STORAGE_TRANSFER_SYNTAXES

    ae = AE(ae_title="TESTSCU")
    for cx in AllStoragePresentationContexts[:127]:
        ae.add_requested_context(cx.abstract_syntax, list(STORAGE_TRANSFER_SYNTAXES))
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    assoc = ae.associate("127.0.0.1", port, ae_title="MEDRELAY")
    assert assoc.is_established
    assoc.release()


@pytest.mark.parametrize("first, expected", [
    (BOMB_RQ, ("abort", (0x02, ul.INVALID_PARAMETER))),
    (pdv_pdu(1, 0x03, b"\0" * 8), ("abort", (0x02, ul.UNEXPECTED_PDU))),
    (bytes((0x09, 0, 0, 0, 0, 2, 0, 0)), ("abort", (0x02, ul.UNRECOGNISED_PDU))),
    (bytes.fromhex("07000000000400000000"), ("closed", -1)),
    (bytes.fromhex("0500FFFFFFFF"), ("abort", (0x02, ul.UNEXPECTED_PDU))),
], ids=["rq-4GiB", "p-data", "unknown-type", "a-abort", "release-4GiB"])
def test_first_pdu_that_is_not_an_associate_rq(engine_factory, first, expected):
    """PS3.8 state Sta2: anything but an A-ASSOCIATE-RQ is answered with A-ABORT (an A-ABORT
    just closes), unread past its header."""
    e = engine_factory(dicom_yaml())
    port = e.address("dcm")[1]
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    s = connect(port)
    s.sendall(first)
    assert answer(s) == expected
    assert recv_pdu(s)[0] == -1
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 100 * 1024  # KiB
    assert echo_seconds(port) < 5


@pytest.mark.parametrize("path", ["plain", "qr"])
@pytest.mark.parametrize("bad", ["pdata_over_max", "pdata_4GiB", "release_4GiB", "associate_rq_4GiB",
                                 "abort_4GiB", "unknown_type", "pdv_longer_than_pdu", "command_never_ends"])
def test_established_association_lengths_on_both_paths(engine_factory, path, bad):
    """After association, on our Upper Layer and on pynetdicom's alike: a P-DATA-TF longer
    than our max_pdu, a fixed-size PDU announcing 4 GiB, a PDV item longer than its PDU or
    a command set that never ends is refused with A-ABORT, nothing allocated, and the
    listener serves the next peer."""
    e = engine_factory(dicom_yaml(extra="      max_pdu: 16384\n"))
    port = e.address("dcm")[1]
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    s = associated(port, PLAIN if path == "plain" else QR)
    if bad == "command_never_ends":  # command fragments without the last-fragment bit, past 64 KiB
        for _ in range(6):
            try:
                s.sendall(b"".join(pdv_pdu(1, 0x01, b"\0" * 16000) for _ in range(1)))
            except OSError:
                break
    else:
        s.sendall({
            "pdata_over_max": struct.pack(">BBI", 0x04, 0, 16385),
            "pdata_4GiB": BOMB_PDATA,
            "release_4GiB": bytes.fromhex("0500FFFFFFFF"),
            "associate_rq_4GiB": BOMB_RQ,
            "abort_4GiB": bytes.fromhex("0700FFFFFFFF"),
            "unknown_type": bytes((0x09, 0, 0, 0, 0, 2, 0, 0)),
            "pdv_longer_than_pdu": struct.pack(">BBI", 0x04, 0, 8) + struct.pack(">IBB", 1000, 1, 3) + b"\0\0",
        }[bad])
    got = answer(s)
    if bad == "abort_4GiB":  # the peer aborted: nothing owed, the connection just closes
        assert got[0] in ("closed", "abort"), got
    else:
        assert got[0] == "abort" and got[1][0] == 0x02, got
    if path == "plain":  # pynetdicom waits for the requestor to close (PS3.8 Sta13), as it may
        assert recv_pdu(s)[0] == -1
    s.close()
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 100 * 1024
    assert echo_seconds(port) < 5


def nested(depth: int) -> bytes:
    """Content Sequence (0040,A730) inside itself ``depth`` times, undefined lengths, Explicit VR LE."""
    open_sq = struct.pack("<HH2sHI", 0x0040, 0xA730, b"SQ", 0, 0xFFFFFFFF) + struct.pack("<HHI", 0xFFFE, 0xE000,
                                                                                       0xFFFFFFFF)
    close_sq = struct.pack("<HHI", 0xFFFE, 0xE00D, 0) + struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)
    return open_sq * depth + close_sq * depth


def test_deeply_nested_sequences_are_answered_not_crashed(engine_factory):
    """A data set nested 20 000 sequences deep: a C-STORE of it is refused (0xC000, the index
    scan bounds the depth and no second reader is tried), a C-FIND identifier nested as deep
    gets a failure status; nothing recurses to a crash and the listener lives."""
    e = engine_factory(dicom_yaml())
    port = e.address("dcm")[1]
    ds = dcmread(data_file("CT_small.dcm"))
    ds.SOPInstanceUID = sop_uid = generate_uid()
    head = Dataset()  # the CT's elements before (0040,A730), so the nesting comes before Pixel Data
    for elem in ds:
        if elem.tag < 0x0040A730:
            head.add(elem)
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset

    buf = DicomBytesIO()
    buf.is_little_endian, buf.is_implicit_VR = True, False
    write_dataset(buf, head)
    data = buf.getvalue() + nested(20000)
    s = associated(port, PLAIN, max_pdu=0)
    s.settimeout(30)
    s.sendall(pdv_pdu(1, 0x03, store_command(CTImageStorage, sop_uid)))
    for start in range(0, len(data), 16000):
        chunk = data[start:start + 16000]
        s.sendall(pdv_pdu(1, 0x02 if start + 16000 >= len(data) else 0x00, chunk))
    kind, (status, _raw) = answer(s)
    assert kind == "rsp" and status == 0xC000, hex(status)
    s.close()
    s = associated(port, QR)
    s.settimeout(30)
    el, uid = dimse.element, dimse.ui_value
    rest = b"".join([el(0x00000002, uid(StudyRootQueryRetrieveInformationModelFind)),
                     el(0x00000100, struct.pack("<H", 0x0020)), el(0x00000110, struct.pack("<H", 1)),
                     el(0x00000700, struct.pack("<H", 0)), el(0x00000800, struct.pack("<H", 0))])
    find = el(0x00000000, struct.pack("<I", len(rest))) + rest
    level = struct.pack("<HH2sH", 0x0008, 0x0052, b"CS", 6) + b"STUDY "
    identifier = level + nested(20000)
    s.sendall(pdv_pdu(3, 0x03, find))
    for start in range(0, len(identifier), 16000):
        chunk = identifier[start:start + 16000]
        s.sendall(pdv_pdu(3, 0x02 if start + 16000 >= len(identifier) else 0x00, chunk))
    got = answer(s)
    assert got[0] in ("rsp", "abort"), got
    if got[0] == "rsp":
        assert got[1][0] >= 0xA000, hex(got[1][0])  # a failure status, never a match
    s.close()
    assert echo_seconds(port) < 5


# -- item 2: no busy loops, a connection cap, ARTIM and idle timeouts -----------------------

def test_fifty_one_byte_connections_burn_no_cpu(medrelay_proc):
    p, port = running(medrelay_proc)
    pid = p.proc.pid
    socks = [connect(port) for _ in range(50)]
    try:
        for s in socks:
            s.sendall(b"\x01")
        time.sleep(0.5)
        cpu0 = cpu_seconds(pid)
        time.sleep(3)
        used = cpu_seconds(pid) - cpu0
        assert used < 0.5, f"engine used {used:.2f} s of CPU in 3 s with 50 one-byte connections"
        assert echo_seconds(port) < 1.0
    finally:
        for s in socks:
            s.close()


def test_connection_cap_closes_the_next_one_at_once(engine_factory):
    e = engine_factory(dicom_yaml(extra="      max_connections: 4\n      max_associations: 2\n"))
    port = e.address("dcm")[1]
    server = e.runtime.listener("dcm").server
    held = [connect(port) for _ in range(4)]
    for s in held:
        s.sendall(b"\x01")
    e.wait_for(lambda: server.open_connections == 4)
    extra = connect(port)
    started = time.monotonic()
    kind, body = recv_pdu(extra)  # A-ASSOCIATE-RJ (transient, local limit) or just the close
    assert kind in (-1, 0x03) and time.monotonic() - started < 2
    if kind == 0x03:
        assert tuple(body[1:4]) == (0x02, 0x03, 0x02)
    extra.close()
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(Verification)
    assert not ae.associate("127.0.0.1", port, ae_title="MEDRELAY").is_established
    for s in held:
        s.close()
    e.wait_for(lambda: server.open_connections == 0)
    assert echo_seconds(port) < 5


def test_artim_bounds_the_whole_associate_rq(engine_factory):
    """A peer that trickles its A-ASSOCIATE-RQ a byte at a time is closed acse_timeout after
    it connected, however busy it keeps the line."""
    e = engine_factory(dicom_yaml(extra="      acse_timeout: 1.0\n"))
    port = e.address("dcm")[1]
    rq = associate_rq(*PLAIN)
    s = connect(port)
    started = time.monotonic()
    closed_after = None
    for byte in rq:
        try:
            s.sendall(bytes((byte,)))
        except OSError:
            closed_after = time.monotonic() - started
            break
        s.settimeout(0.2)
        try:
            if s.recv(1) == b"":
                closed_after = time.monotonic() - started
                break
        except TimeoutError:
            pass
        except OSError:
            closed_after = time.monotonic() - started
            break
        if time.monotonic() - started > 10:
            break
    assert closed_after is not None and closed_after < 4, closed_after


@pytest.mark.parametrize("path", ["plain", "qr"])
@pytest.mark.parametrize("how", ["silent", "pdu_begun"])
def test_idle_timeout_on_both_paths(engine_factory, path, how):
    """idle_timeout (formerly network_timeout, still accepted) aborts an established association
    that says nothing, or that began a PDU and stopped, on both paths."""
    e = engine_factory(dicom_yaml(extra="      network_timeout: 1.0\n" if path == "qr" else
                                  "      idle_timeout: 1.0\n"))
    port = e.address("dcm")[1]
    s = associated(port, PLAIN if path == "plain" else QR)
    if how == "pdu_begun":
        s.sendall(struct.pack(">BBI", 0x04, 0, 100) + b"\0" * 10)
    started = time.monotonic()
    s.settimeout(15)
    got = answer(s)
    assert got[0] in ("abort", "closed") and time.monotonic() - started < 8, got
    s.close()


# -- item 7: one answer to a malformed C-STORE-RQ, on both paths -----------------------------

CASES = {
    "empty_instance_uid": (CTImageStorage, "", {}),
    "long_instance_uid": (CTImageStorage, "1.2." + "3" * 70, {}),
    "letters_in_uid": (CTImageStorage, "1.2.3a.4", {}),
    "class_differs_from_context": (MRImageStorage, "1.2.3.4", {}),
    "no_message_id": (CTImageStorage, "1.2.3.4", {"msg_id": None}),
    "no_data_set": (CTImageStorage, "1.2.3.4", {"data_set_type": dimse.NO_DATA_SET}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_malformed_store_gets_the_same_answer_on_both_paths(engine_factory, case):
    """The same raw request on a plain storage association (medrelay's Upper Layer) and on
    one that also proposes Query/Retrieve (pynetdicom): the same bytes come back, and a valid
    C-STORE afterwards is stored (the association is not left hanging)."""
    e = engine_factory(dicom_yaml())
    port = e.address("dcm")[1]
    sop_class, sop_uid, kw = CASES[case]
    good_uid, data = ct_data_set()
    results = {}
    for path, syntaxes in (("plain", PLAIN), ("qr", QR)):
        s = associated(port, syntaxes)
        s.settimeout(10)
        send_store(s, store_command(sop_class, sop_uid, **kw), None if "data_set_type" in kw else data)
        got = answer(s)
        results[path] = got
        if got[0] == "rsp":
            send_store(s, store_command(CTImageStorage, good_uid, msg_id=2), data)
            kind, (status, _raw) = answer(s)
            assert kind == "rsp" and status == 0x0000, (path, hex(status))
        else:
            assert recv_pdu(s)[0] == -1
        s.close()
    assert results["plain"] == results["qr"], results
    kind, detail = results["plain"]
    if kw:
        assert kind == "abort", results
    else:
        assert kind == "rsp" and detail[0] == 0xA900, results
        ds = __import__("pydicom.filereader", fromlist=["read_dataset"]).read_dataset(
            __import__("io").BytesIO(detail[1]), True, True)
        assert "AffectedSOPInstanceUID" not in ds or dimse.valid_uid(str(ds.AffectedSOPInstanceUID))


def test_a_command_inside_a_data_set_is_aborted_on_both_paths_and_nothing_is_stored(engine_factory):
    """A C-STORE's data set begun, then a command fragment: A-ABORT (unexpected PDU) from either
    implementation, and the half-received instance is not stored."""
    e = engine_factory(dicom_yaml())
    port = e.address("dcm")[1]
    uid, data = ct_data_set()
    results = {}
    for path, syntaxes in (("plain", PLAIN), ("qr", QR)):
        s = associated(port, syntaxes)
        s.settimeout(10)
        s.sendall(pdv_pdu(1, 0x03, store_command(CTImageStorage, uid)) + pdv_pdu(1, 0x00, data[:1000])
                  + pdv_pdu(1, 0x03, store_command(CTImageStorage, uid, msg_id=2)))
        results[path] = answer(s)
        s.close()
    assert results == {"plain": ("abort", (0x02, ul.UNEXPECTED_PDU)), "qr": ("abort", (0x02, ul.UNEXPECTED_PDU))}
    from sqlalchemy import func, select

    from engine.store import schema

    with e.store.engine.connect() as c:
        assert c.execute(select(func.count()).select_from(schema.messages)).scalar() == 0


# -- item 17: what an operator reads ----------------------------------------------------------

@pytest.mark.parametrize("path", ["plain", "qr"])
@pytest.mark.parametrize("wrong, diagnostic, reason", [
    ("calling", 0x03, "calling AE title not recognised"),
    ("called", 0x07, "called AE title not recognised"),
])
def test_rejection_says_which_ae_title_was_wrong(engine_factory, path, wrong, diagnostic, reason):
    e = engine_factory(dicom_yaml())
    port = e.address("dcm")[1]
    kw = {"calling": "INTRUDER"} if wrong == "calling" else {"called": "NOTUS"}
    with capture_logs() as logs:
        s = connect(port)
        s.sendall(associate_rq(*(PLAIN if path == "plain" else QR), **kw))
        kind, body = recv_pdu(s)
        s.close()
    assert kind == 0x03 and tuple(body[1:4]) == (0x01, 0x01, diagnostic)
    hits = [r for r in logs if r["event"] == "dicom.association_rejected"]
    assert len(hits) == 1 and hits[0]["reason"] == reason, hits
    assert hits[0]["calling_aet"] == kw.get("calling", "TESTSCU")
    assert hits[0]["called_aet"] == kw.get("called", "MEDRELAY")


def test_move_and_get_logs_count_what_was_sent(engine_factory, tmp_path):
    closed = free_port()  # a configured destination where nothing listens
    e = engine_factory(dicom_yaml(extra=f"""      move_destinations:
        DEAD: {{host: 127.0.0.1, port: {closed}}}
"""))
    port = e.address("dcm")[1]
    f = data_file("CT_small.dcm")
    assert store_statuses(storescu(port, [f]).stdout) == ["Success"]
    study = str(dcmread(f, stop_before_pixels=True).StudyInstanceUID)
    q = Dataset()
    q.QueryRetrieveLevel = "STUDY"
    q.StudyInstanceUID = study

    def move(dest: str) -> list[int]:
        ae = AE(ae_title="TESTSCU")
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
        assoc = ae.associate("127.0.0.1", port, ae_title="MEDRELAY")
        codes = [st.Status for st, _ in assoc.send_c_move(q, dest, StudyRootQueryRetrieveInformationModelMove)]
        assoc.release()
        return codes

    def get(scp_role: bool) -> list[int]:
        from pynetdicom import build_role, evt

        ae = AE(ae_title="GETSCU")
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
        ae.add_requested_context(CTImageStorage)
        roles = [build_role(CTImageStorage, scp_role=True)] if scp_role else []
        assoc = ae.associate("127.0.0.1", port, ae_title="MEDRELAY", ext_neg=roles,
                             evt_handlers=[(evt.EVT_C_STORE, lambda event: 0x0000)])
        codes = [st.Status for st, _ in assoc.send_c_get(q, StudyRootQueryRetrieveInformationModelGet)]
        assoc.release()
        return codes

    with capture_logs() as logs:
        assert move("NOWHERE")[-1] == 0xA801
        assert move("DEAD")[-1] in (0xA801, 0xA702)
        assert get(scp_role=False)[-1] != 0x0000  # no context to send on: the sub-operation fails
        assert get(scp_role=True)[-1] == 0x0000
    unknown = [r for r in logs if r["event"] == "dicom.move_unknown_destination"]
    assert unknown and unknown[0]["destination"] == "NOWHERE"
    moves = [r for r in logs if r["event"] == "dicom.move"]
    assert moves and moves[-1]["destination"] == "DEAD", moves
    assert (moves[-1]["matched"], moves[-1]["sent"], moves[-1]["failed"]) == (1, 0, 1), moves
    gets = [r for r in logs if r["event"] == "dicom.get"]
    assert [(g["sent"], g["failed"]) for g in gets] == [(0, 1), (1, 0)], gets
    assert all("instances" not in r for r in moves + gets)


# -- item 5: a refused instance leaves no blob file ---------------------------------------------

def blob_files(data_dir: Path) -> list[Path]:
    return [p for p in (data_dir / "data" / "blobs").rglob("*") if p.is_file()]


def big_instance(tmp: Path, mb: int = 2) -> Path:
    """CT_small with its pixels replaced by ``mb`` MiB of OB: a blob written to a file, not inline."""
    ds = dcmread(data_file("CT_small.dcm"))
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.add_new(0x00111010, "LO", "medrelay test")
    ds.add_new(0x00111011, "OB", os.urandom(mb * MB))
    out = tmp / f"big-{ds.SOPInstanceUID}.dcm"
    ds.save_as(out, enforce_file_format=True)
    return out


def qr_store(port: int, path: Path) -> int:
    """C-STORE on an association that also proposes Query/Retrieve (pynetdicom's path)."""
    ds = dcmread(path, stop_before_pixels=True)
    inst = RawInstance(str(ds.SOPClassUID), str(ds.SOPInstanceUID), str(ds.file_meta.TransferSyntaxUID),
                       dataset_bytes(path))
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(CTImageStorage, [ExplicitVRLittleEndian, "1.2.840.10008.1.2"])
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    assoc = ae.associate("127.0.0.1", port, ae_title="MEDRELAY")
    assert assoc.is_established
    status = int(send_raw(assoc, inst).Status)
    assoc.release()
    return status


def test_refused_instances_leave_no_blob_file_database_down(engine_factory, tmp_path):
    """The database refuses every insert (a trigger: the committer's statements fail as on a
    full or broken disk): the instances written ahead are refused with 0xA700 on both paths and
    their files deleted; a duplicate's file goes too; once the database is back they store."""
    e = engine_factory(dicom_yaml())
    port = e.address("dcm")[1]
    db = e.data_dir / "data" / "medrelay.db"
    first, second = big_instance(tmp_path), big_instance(tmp_path)
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TRIGGER down BEFORE INSERT ON messages BEGIN "
                     "SELECT RAISE(ABORT, 'database unavailable'); END")
    assert store_statuses(storescu(port, [first]).stdout) == ["Refused: OutOfResources"]
    assert qr_store(port, second) == 0xA700
    assert blob_files(e.data_dir) == []
    with sqlite3.connect(db) as conn:
        conn.execute("DROP TRIGGER down")
    assert store_statuses(storescu(port, [first, first]).stdout) == ["Success", "Success"]
    assert qr_store(port, second) == 0x0000
    assert qr_store(port, second) == 0x0000  # a recognised re-send: its written-ahead file goes
    assert len(blob_files(e.data_dir)) == 2


def test_refused_instance_leaves_no_partial_file_when_the_disk_is_full(tmp_path):
    """The engine may not write files past 2 MiB (RLIMIT_FSIZE: writes fail with EFBIG as on a
    full disk): a 3 MiB instance is refused with 0xA700 on both paths and its half-written file
    removed. Started again without the limit, the same instance stores."""
    port = free_port()
    p = MedrelayProc(dicom_yaml(port), tmp_path)
    limit = 2 * MB
    big = big_instance(tmp_path, mb=3)

    def start(fsize: int | None) -> None:
        def limited() -> None:
            if fsize is not None:
                resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))

        p._log = open(p.log_path, "ab")
        p.proc = subprocess.Popen([sys.executable, "-m", "engine.cli", "run", str(p.config_path)], cwd=p.data_dir,
                                  env=p.env, stdout=p._log, stderr=p._log, preexec_fn=limited)
        p.wait_port(port)

    try:
        start(limit)
        assert store_statuses(storescu(port, [big]).stdout) == ["Refused: OutOfResources"]
        assert qr_store(port, big) == 0xA700
        assert blob_files(p.data_dir) == []
        assert p.proc.poll() is None
        assert p.terminate() == 0
        start(None)
        assert store_statuses(storescu(port, [big]).stdout) == ["Success"]
        assert len(blob_files(p.data_dir)) == 1
    finally:
        if p.proc is not None and p.proc.poll() is None:
            p.terminate()


def test_sigterm_ends_the_engine_while_peers_hold_associations_open(medrelay_proc):
    """Silent associations on both paths (Q/R: pynetdicom's; storage: dicom_ul) do not keep the
    process alive after SIGTERM: each gets A-ABORT and the engine exits within seconds (it stayed
    until the peer closed, 70 s in the probe)."""
    p, port = running(medrelay_proc)
    held = [associated(port, QR), associated(port, QR), associated(port, (CTImageStorage,))]
    try:
        started = time.monotonic()
        p.proc.send_signal(signal.SIGTERM)
        p.proc.wait(15)
        assert time.monotonic() - started < 10
        for s in held:
            s.settimeout(5)
            assert recv_pdu(s)[0] in (0x07, -1)  # A-ABORT (or closed)
    finally:
        for s in held:
            s.close()
    assert "Traceback" not in p.log_path.read_text()
