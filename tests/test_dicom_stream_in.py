"""Large instances streamed in (issue 13 item 3): P-DATA fragments go to the blob as they arrive.

`medrelay run` in a subprocess receives a generated multi-frame instance of several hundred MB
from DCMTK storescu and from pynetdicom; its RSS is read from /proc/<pid>/status. The stored
blob is read back chunk by chunk (``Store.blob_chunks``) and compared with the file sent.
"""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import struct
import subprocess
import threading
import time
from pathlib import Path

import pytest
from pynetdicom import AE, _config
from sqlalchemy import func, select

from bench.large import MF_GRAYSCALE_BYTE_SC, data_set_offset, proc_status, write_large_instance
from engine.security.crypto import IntegrityError, KeyRing
from engine.store import gc, schema
from engine.store.db import STREAM_MIN, Store
from engine.store.dicom import index as idx
from engine.store.dicom.scan import header_length
from listeners import dicom_dimse as dimse
from listeners import dicom_ul as ul
from listeners.dicom_store_stream import LAST_INDEX_TAG
from tests.big_dicom import disk_fills_after
from tests.conftest import IN_CI, _reset_pg
from tests.dicom_peers import ENV, TEST_FILES, data_file, findscu, free_port, store_statuses, tool
from tests.test_blob_s3 import BUCKET, CREDS, _files, _objects, s3  # noqa: F401  (s3: the moto fixture)

pytestmark = [pytest.mark.dcmtk, pytest.mark.slow]

SIZE = 400 << 20
RSS_LIMIT = 300 << 20
MiB = 1 << 20


def _yaml(data: Path, port: int, url: str) -> str:
    return f"""
store: {{url: "{url}", blobs: "{data}/blobs"}}
keys: {{kek_file: "{data}/keys.json"}}
channels:
  dcm:
    source: {{type: dicom, port: {port}, ae_title: MEDRELAY, calling_aets: [TESTSCU]}}
"""


class Engine:
    """`medrelay run` with a sampler of its RSS (VmRSS every 50 ms; VmHWM is the kernel's peak)."""

    def __init__(self, medrelay_proc, tmp_path: Path, url: str | None = None) -> None:
        self.data = tmp_path / "data"
        self.port = free_port()
        self.url = url or f"sqlite:///{self.data}/medrelay.db"
        self.proc = medrelay_proc(_yaml(self.data, self.port, self.url))
        self.proc.start()
        self.proc.wait_port(self.port)
        assert self.proc.proc is not None
        self.pid = self.proc.proc.pid

    def store(self) -> Store:
        return Store(self.url, self.data / "blobs", KeyRing(self.data / "keys.json"))

    def blob_files(self) -> list[Path]:
        return [p for p in (self.data / "blobs").rglob("*") if p.is_file()]

    def rss(self) -> dict[str, int]:
        return proc_status(self.pid)


def _file_data_set_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(data_set_offset(path))
        while piece := f.read(8 << 20):
            h.update(piece)
    return h.hexdigest()


def _stored(store: Store, sop_uid: str) -> tuple[str, str, int]:
    """(message id, blob id, meta_end) of a stored instance; its blob must be chunk-sealed in a file."""
    with store.engine.connect() as conn:
        row = idx.existing_instance(conn, sop_uid)
        assert row is not None, "instance not indexed"
        mid = row["message_id"]
        blob_id = conn.execute(select(schema.messages.c.blob_id).where(schema.messages.c.id == mid)).scalar_one()
        b = conn.execute(select(schema.blobs).where(schema.blobs.c.id == blob_id)).mappings().one()
        assert b["in_file"] == 1 and len(b["nonce"]) == 15, "a streamed blob is chunk-sealed in a file"
        first = next(iter(store.blob_chunks(conn, blob_id)))
    return mid, blob_id, 144 + int.from_bytes(first[140:144], "little")


def _blob_data_set_digest(store: Store, blob_id: str, meta_end: int) -> tuple[str, int]:
    h, skip, n = hashlib.sha256(), meta_end, 0
    with store.engine.connect() as conn:
        for chunk in store.blob_chunks(conn, blob_id):
            view = memoryview(chunk)[skip:]
            skip = max(0, skip - len(chunk))
            h.update(view)
            n += len(chunk)
    return h.hexdigest(), n


def _messages(store: Store) -> int:
    with store.engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(schema.messages)).scalar_one())


@pytest.mark.parametrize("db", ["sqlite", "postgres"])
def test_storescu_large_instance_is_streamed_bounded_and_byte_identical(medrelay_proc, tmp_path, db):
    url = None
    if db == "postgres":
        url = os.environ.get("MEDRELAY_TEST_PG_URL")
        if not url:
            if IN_CI:
                pytest.fail("MEDRELAY_TEST_PG_URL not set: PostgreSQL is required under CI")
            pytest.skip("PostgreSQL not available (run scripts/test.sh)")
        _reset_pg(url)
    src = tmp_path / "large.dcm"
    uids = write_large_instance(src, SIZE, patient_id="STREAM^ONE")
    eng = Engine(medrelay_proc, tmp_path, url)
    idle = eng.rss()["VmRSS"]
    r = subprocess.run([tool("storescu"), "-v", "-aet", "TESTSCU", "-aec", "MEDRELAY", "127.0.0.1", str(eng.port),
                        str(src)], env=ENV, capture_output=True, text=True, timeout=600)
    assert store_statuses(r.stdout + r.stderr) == ["Success"], r.stdout + r.stderr
    rss = eng.rss()
    assert rss["VmHWM"] < RSS_LIMIT, f"peak RSS {rss['VmHWM'] / MiB:.0f} MiB (idle {idle / MiB:.0f})"
    deadline = time.monotonic() + 30  # what the store held is given back: waited for, not slept for
    while (after := eng.rss()["VmRSS"]) >= idle + 100 * MiB and time.monotonic() < deadline:
        time.sleep(0.2)
    assert after < idle + 100 * MiB, f"RSS after the store {after / MiB:.0f} MiB, idle {idle / MiB:.0f}"
    # C-FIND finds it by the attributes of its header
    _, found = findscu(eng.port, "IMAGE", {"PatientID": "STREAM^ONE", "StudyInstanceUID": uids["StudyInstanceUID"],
                                            "SeriesInstanceUID": uids["SeriesInstanceUID"], "SOPInstanceUID": "",
                                            "NumberOfFrames": ""}, out_dir=tmp_path / "find")
    assert [str(ds.SOPInstanceUID) for ds in found] == [uids["SOPInstanceUID"]]
    _, studies = findscu(eng.port, "STUDY", {"AccessionNumber": "LARGE1", "StudyInstanceUID": ""},
                         out_dir=tmp_path / "find2")
    assert [str(ds.StudyInstanceUID) for ds in studies] == [uids["StudyInstanceUID"]]
    store = eng.store()
    _mid, blob_id, meta_end = _stored(store, uids["SOPInstanceUID"])
    digest, n = _blob_data_set_digest(store, blob_id, meta_end)
    assert digest == _file_data_set_digest(src)
    assert n - meta_end == src.stat().st_size - data_set_offset(src)
    assert not [p for p in eng.blob_files() if p.name.endswith(".part")]
    with store.engine.connect() as conn:  # the index keeps the digest of the whole data set
        assert conn.execute(select(func.count()).select_from(schema.audit_events)
                            .where(schema.audit_events.c.action == "message.receive")).scalar_one() == 1
    # the same instance again: a duplicate (Success), its second blob removed, nothing new stored
    r = subprocess.run([tool("storescu"), "-v", "-aet", "TESTSCU", "-aec", "MEDRELAY", "127.0.0.1", str(eng.port),
                        str(src)], env=ENV, capture_output=True, text=True, timeout=600)
    assert store_statuses(r.stdout + r.stderr) == ["Success"]
    assert _messages(store) == 1
    assert [p.name for p in eng.blob_files()] == [blob_id]
    # a tampered chunk in the middle is detected when read, after the good chunks before it
    path = eng.data / "blobs" / blob_id[:2] / blob_id
    with open(path, "r+b") as f:
        f.seek(100 * ((1 << 20) + 16) + 5)
        b = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([b[0] ^ 1]))
    got = 0
    with store.engine.connect() as conn, pytest.raises(IntegrityError, match="chunk 100"):
        for _chunk in store.blob_chunks(conn, blob_id):
            got += 1
    assert got == 100
    store.dispose()


def test_pynetdicom_scu_large_instance_and_a_refused_one_leaves_no_blob(medrelay_proc, tmp_path):
    src = tmp_path / "large.dcm"
    uids = write_large_instance(src, 300 << 20, patient_id="STREAM^PYN")
    bad = tmp_path / "bad.dcm"  # its header holds an invalid Study Instance UID: refused (0xA900)
    write_large_instance(bad, 100 << 20, study_uid="1.2.x")
    eng = Engine(medrelay_proc, tmp_path)
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(MF_GRAYSCALE_BYTE_SC, "1.2.840.10008.1.2.1")
    old = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True  # pynetdicom sends the file in pieces, never whole
    try:
        assoc = ae.associate("127.0.0.1", eng.port, ae_title="MEDRELAY", max_pdu=65536)
        assert assoc.is_established
        st = assoc.send_c_store(src)
        assert st.Status == 0x0000
        st = assoc.send_c_store(bad)
        assert st.Status == 0xA900, hex(st.Status)
        assoc.release()
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = old
    assert eng.rss()["VmHWM"] < RSS_LIMIT
    store = eng.store()
    _mid, blob_id, meta_end = _stored(store, uids["SOPInstanceUID"])
    assert _blob_data_set_digest(store, blob_id, meta_end)[0] == _file_data_set_digest(src)
    assert _messages(store) == 1
    assert [p.name for p in eng.blob_files()] == [blob_id], "the refused instance's blob was removed"
    store.dispose()


def _command(sop_uid: str) -> bytes:
    el, uid = dimse.element, dimse.ui_value
    body = [el(0x00000002, uid(MF_GRAYSCALE_BYTE_SC)), el(0x00000100, struct.pack("<H", 0x0001)),
            el(0x00000110, struct.pack("<H", 1)), el(0x00000700, struct.pack("<H", 0)),
            el(0x00000800, struct.pack("<H", 0x0000)), el(0x00001000, uid(sop_uid))]
    rest = b"".join(body)
    return dimse.element(0x00000000, struct.pack("<I", len(rest))) + rest


def _associate(port: int) -> socket.socket:
    from pydicom.uid import ExplicitVRLittleEndian
    from pynetdicom.pdu import A_ASSOCIATE_RQ
    from pynetdicom.pdu_primitives import A_ASSOCIATE, MaximumLengthNotification
    from pynetdicom.presentation import build_context

    prim = A_ASSOCIATE()
    prim.application_context_name = ul.APPLICATION_CONTEXT
    prim.calling_ae_title, prim.called_ae_title = "TESTSCU", "MEDRELAY"
    cx = build_context(MF_GRAYSCALE_BYTE_SC, [ExplicitVRLittleEndian])
    cx.context_id = 1
    prim.presentation_context_definition_list = [cx]
    ml = MaximumLengthNotification()
    ml.maximum_length_received = 16384
    prim.user_information = [ml]
    pdu = A_ASSOCIATE_RQ()
    pdu.from_primitive(prim)
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.sendall(bytes(pdu.encode()))
    head = b""
    while len(head) < 6 and (got := sock.recv(6 - len(head))):
        head += got
    assert head[:1] == b"\x02", f"expected A-ASSOCIATE-AC, got {head!r}"
    n = int.from_bytes(head[2:6], "big")
    while n:
        n -= len(sock.recv(n))
    return sock


def _send_part(sock: socket.socket, src: Path, upto: int) -> None:
    """The data set of ``src`` as P-DATA-TF fragments (none flagged last) up to ``upto`` bytes."""
    with open(src, "rb") as f:
        f.seek(data_set_offset(src))
        sent = 0
        while sent < upto:
            piece = f.read(min(200_000, upto - sent))
            item = struct.pack(">IBB", len(piece) + 2, 1, 0x00) + piece
            sock.sendall(struct.pack(">BBI", 0x04, 0, len(item)) + item)
            sent += len(piece)


def _wait_part_file(eng: Engine, at_least: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        parts = [p for p in eng.blob_files() if p.name.endswith(".part")]
        if parts and parts[0].stat().st_size >= at_least:
            return
        time.sleep(0.05)
    raise AssertionError("no .part file grew: the data set is not being streamed")


@pytest.mark.parametrize("how", ["a-abort", "closed", "storescu-killed"])
def test_association_ending_mid_instance_commits_nothing_and_leaves_no_file(medrelay_proc, tmp_path, how):
    src = tmp_path / "large.dcm"
    uids = write_large_instance(src, 200 << 20)
    eng = Engine(medrelay_proc, tmp_path)
    answered: list[bytes] = []
    if how == "storescu-killed":
        scu = subprocess.Popen([tool("storescu"), "-v", "-aet", "TESTSCU", "-aec", "MEDRELAY", "127.0.0.1",
                                str(eng.port), str(src)], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        _wait_part_file(eng, 2 * STREAM_MIN)
        scu.send_signal(signal.SIGKILL)
        out = scu.communicate(timeout=30)[0].decode(errors="replace")
        assert "Received Store Response" not in out
    else:
        sock = _associate(eng.port)
        sock.sendall(ul.pdata_pdus(1, _command(uids["SOPInstanceUID"]), 16384))
        _send_part(sock, src, 3 * STREAM_MIN)
        _wait_part_file(eng, 2 * STREAM_MIN)
        if how == "a-abort":
            sock.sendall(ul.abort_pdu(0x00, 0x00))
        sock.settimeout(5)

        def read_rest() -> None:
            try:
                while chunk := sock.recv(65536):
                    answered.append(chunk)
            except OSError:
                pass

        t = threading.Thread(target=read_rest)
        t.start()
        if how == "closed":
            sock.shutdown(socket.SHUT_WR)
        t.join(10)
        sock.close()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and eng.blob_files():
        time.sleep(0.1)
    assert eng.blob_files() == [], "the half-written blob file was removed"
    assert not any(b and b[0] == 0x04 for b in answered), "no C-STORE response for a partial data set"
    store = eng.store()
    assert _messages(store) == 0
    with store.engine.connect() as conn:
        assert idx.existing_instance(conn, uids["SOPInstanceUID"]) is None
    store.dispose()


def test_engine_killed_mid_instance_leaves_a_part_file_that_store_gc_removes(medrelay_proc, tmp_path):
    src = tmp_path / "large.dcm"
    uids = write_large_instance(src, 200 << 20)
    eng = Engine(medrelay_proc, tmp_path)
    sock = _associate(eng.port)
    sock.sendall(ul.pdata_pdus(1, _command(uids["SOPInstanceUID"]), 16384))
    _send_part(sock, src, 3 * STREAM_MIN)
    _wait_part_file(eng, 2 * STREAM_MIN)
    eng.proc.kill9()
    sock.close()
    parts = [p for p in eng.blob_files() if p.name.endswith(".part")]
    assert len(parts) == 1
    store = eng.store()
    store.migrate()
    assert _messages(store) == 0
    assert gc.orphan_files(store, older_than=3600) == []  # young: may belong to a store in flight
    old = time.time() - 7200
    os.utime(parts[0], (old, old))
    assert [n for n, _ in gc.orphan_files(store, older_than=3600)] == [parts[0].name]
    r = eng.proc.cli("store", "gc", "-c", str(eng.proc.config_path))
    assert r.returncode == 0, r.stderr
    assert "removed 1 orphan" in r.stdout
    assert eng.blob_files() == []
    store.dispose()


def test_large_instance_streamed_into_an_s3_bucket(medrelay_proc, tmp_path, s3):  # noqa: F811
    """Blobs on S3 (moto's S3 server, a real HTTP S3 API): the instance goes up as a multipart upload
    of a ``.part`` object while it arrives, renamed to its address; memory stays bounded."""
    endpoint, client = s3
    src = tmp_path / "large.dcm"
    uids = write_large_instance(src, 120 << 20, patient_id="STREAM^S3")
    port = free_port()
    data = tmp_path / "data"
    yaml = f"""
store:
  url: "sqlite:///{data}/medrelay.db"
  blobs: s3://{BUCKET}/streamin
  s3: {{endpoint: "{endpoint}", region: us-east-1, access_key_id: "${{S3_KEY}}",
        secret_access_key: "${{S3_SECRET}}", allow_http: true}}
keys: {{kek_file: "{data}/keys.json"}}
channels:
  dcm:
    source: {{type: dicom, port: {port}, ae_title: MEDRELAY, calling_aets: [TESTSCU]}}
"""
    proc = medrelay_proc(yaml, env={"S3_KEY": CREDS["AWS_ACCESS_KEY_ID"], "S3_SECRET": CREDS["AWS_SECRET_ACCESS_KEY"]})
    proc.start()
    proc.wait_port(port)
    assert proc.proc is not None
    r = subprocess.run([tool("storescu"), "-v", "-aet", "TESTSCU", "-aec", "MEDRELAY", "127.0.0.1", str(port),
                        str(src)], env=ENV, capture_output=True, text=True, timeout=600)
    assert store_statuses(r.stdout + r.stderr) == ["Success"], r.stdout + r.stderr
    assert proc_status(proc.proc.pid)["VmHWM"] < RSS_LIMIT
    # moto keeps its buckets per process, past this server: a prefix of our own, emptied at the end
    store = Store(f"sqlite:///{data}/medrelay.db", _files(endpoint, "streamin"), KeyRing(data / "keys.json"))
    _mid, blob_id, meta_end = _stored(store, uids["SOPInstanceUID"])
    assert _blob_data_set_digest(store, blob_id, meta_end)[0] == _file_data_set_digest(src)
    assert list(_objects(client, "streamin/")) == [blob_id], "one object under its address, no .part left"
    store.files.delete(blob_id)
    store.dispose()


@pytest.mark.parametrize("name", [n for n in TEST_FILES if n not in ("ExplVR_BigEnd.dcm", "image_dfl.dcm")])
def test_header_of_a_data_set_gives_the_index_a_whole_read_gives(name):
    """``header_length`` ends the header where the pixel data begins; the index attributes read
    from the header alone equal those read from the whole data set, and a prefix cut short gives
    None or a header that still holds every indexed attribute (never one missing some)."""
    from pydicom import dcmread

    path = data_file(name)
    ts = str(dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID)
    implicit = ts == "1.2.840.10008.1.2"
    data = path.read_bytes()[data_set_offset(path):]
    n = header_length(data, implicit=implicit, last_wanted=LAST_INDEX_TAG)
    whole = idx.extract(idx.read_index_data_set(data, ts))
    if n is None:  # no pixel data: the header is the whole data set
        assert b"\xe0\x7f\x10\x00" not in data[-1024:] or name in ("rtplan.dcm", "test-SR.dcm")
        n = len(data)
    else:
        assert data[n:n + 4] in (b"\xe0\x7f\x10\x00", b"\xe0\x7f\x08\x00", b"\xe0\x7f\x09\x00")
    assert idx.extract(idx.read_index_data_set(data[:n], ts)) == whole
    # cut short: either None, or the header ends past the last indexed tag with the same index
    for cut in (n - 3, n // 2, 20):
        m = header_length(data[:max(0, cut)], implicit=implicit, last_wanted=LAST_INDEX_TAG)
        if m is not None:
            assert idx.extract(idx.read_index_data_set(data[:m], ts)) == whole, cut
    assert header_length(data[:20], implicit=implicit, last_wanted=LAST_INDEX_TAG) is None


def test_header_ends_at_a_bulk_element_past_the_index_tags():
    """A large non-image value (an encapsulated document) after every indexed tag ends the header even
    when it is cut off; one before an indexed tag does not (its attributes would be missed)."""
    from pydicom.dataset import Dataset

    ds = Dataset()
    ds.SOPInstanceUID = "1.2.3"
    ds.PatientID = "P1"
    body = bytearray()
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset

    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    write_dataset(fp, ds)
    body += fp.getvalue()
    start = len(body)
    body += b"\x42\x00\x11\x00OB\x00\x00" + (10_000_000).to_bytes(4, "little") + b"\x00" * 1000  # cut off
    assert header_length(body, implicit=False, last_wanted=LAST_INDEX_TAG) == start
    assert header_length(body, implicit=False, last_wanted=0x00420012) is None


def test_deflated_large_instance_is_streamed_and_indexed(medrelay_proc, tmp_path):
    """Deflated Explicit VR Little Endian: the header is read from the inflated start of the stream."""
    from pydicom import dcmread
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    plain = tmp_path / "plain.dcm"
    uids = write_large_instance(plain, 24 << 20, patient_id="STREAM^DFL")
    ds = dcmread(plain)
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    src = tmp_path / "deflated.dcm"
    ds.save_as(src, enforce_file_format=True)
    del ds
    assert src.stat().st_size > STREAM_MIN + (4 << 20)  # random pixels do not deflate
    eng = Engine(medrelay_proc, tmp_path)
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(MF_GRAYSCALE_BYTE_SC, str(DeflatedExplicitVRLittleEndian))
    old = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        assoc = ae.associate("127.0.0.1", eng.port, ae_title="MEDRELAY", max_pdu=65536)
        assert assoc.is_established
        assert assoc.send_c_store(src).Status == 0x0000
        assoc.release()
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = old
    _, found = findscu(eng.port, "IMAGE", {"PatientID": "STREAM^DFL", "StudyInstanceUID": uids["StudyInstanceUID"],
                                            "SeriesInstanceUID": uids["SeriesInstanceUID"], "SOPInstanceUID": ""},
                       out_dir=tmp_path / "find")
    assert [str(d.SOPInstanceUID) for d in found] == [uids["SOPInstanceUID"]]
    assert '"streamed": true' in eng.proc.log_path.read_text(), "stored through the streaming path"
    store = eng.store()
    _mid, blob_id, meta_end = _stored(store, uids["SOPInstanceUID"])
    assert _blob_data_set_digest(store, blob_id, meta_end)[0] == _file_data_set_digest(src)
    store.dispose()


def test_disk_failing_mid_instance_is_answered_out_of_resources_and_stores_nothing(engine_factory, tmp_path):
    """The blob folder fails (ENOSPC) after 24 MiB of a streamed data set: the rest is read past, storescu
    gets 0xA700, nothing is committed, no file is left; the next instance is stored (the listener lives)."""
    from tests.dicom_peers import dicom_yaml, storescu

    e = engine_factory(dicom_yaml())
    port = e.address("dcm")[1]
    restore_disk = disk_fills_after(e.store.files, 24 * MiB)
    src = tmp_path / "large.dcm"
    write_large_instance(src, 64 << 20)
    r = storescu(port, [src], extra=("-to", "120"))
    assert store_statuses(r.stdout) == ["Refused: OutOfResources"], r.stdout
    with e.store.engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(schema.messages)).scalar_one() == 0
    blobs = e.data_dir / "data" / "blobs"
    assert not [p for p in blobs.rglob("*") if p.is_file()]
    restore_disk()
    assert store_statuses(storescu(port, [src]).stdout) == ["Success"]


def test_two_large_instances_at_once_stay_bounded(medrelay_proc, tmp_path):
    """Two storescu associations streaming 250 MiB each at the same time: both stored byte-identical,
    the engine's peak stays under the limit (each stream holds about 65 MiB)."""
    srcs = [tmp_path / f"large{i}.dcm" for i in range(2)]
    uids = [write_large_instance(s, 250 << 20, patient_id=f"STREAM^PAR{i}") for i, s in enumerate(srcs)]
    eng = Engine(medrelay_proc, tmp_path)
    scus = [subprocess.Popen([tool("storescu"), "-v", "-aet", "TESTSCU", "-aec", "MEDRELAY", "127.0.0.1",
                              str(eng.port), str(s)], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True) for s in srcs]
    outs = [p.communicate(timeout=600)[0] for p in scus]
    assert [store_statuses(o) for o in outs] == [["Success"], ["Success"]], outs
    assert eng.rss()["VmHWM"] < RSS_LIMIT
    store = eng.store()
    for src, u in zip(srcs, uids, strict=True):
        _mid, blob_id, meta_end = _stored(store, u["SOPInstanceUID"])
        assert _blob_data_set_digest(store, blob_id, meta_end)[0] == _file_data_set_digest(src)
    assert _messages(store) == 2
    store.dispose()


def test_long_header_is_read_whole_and_one_past_the_bound_is_refused(medrelay_proc, tmp_path):
    """A 3 MiB private value before the pixel data: the header is kept past it and the instance indexed.
    One of 40 MiB (over HEADER_MAX): 0xC000, nothing stored, no file."""
    ok, too_long = tmp_path / "ok.dcm", tmp_path / "long.dcm"
    uids = write_large_instance(ok, 40 << 20, patient_id="STREAM^HDR", private_bytes=3 << 20)
    write_large_instance(too_long, 20 << 20, private_bytes=40 << 20)
    eng = Engine(medrelay_proc, tmp_path)
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(MF_GRAYSCALE_BYTE_SC, "1.2.840.10008.1.2.1")
    old = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        assoc = ae.associate("127.0.0.1", eng.port, ae_title="MEDRELAY", max_pdu=65536)
        assert assoc.is_established
        assert assoc.send_c_store(ok).Status == 0x0000
        assert assoc.send_c_store(too_long).Status == 0xC000
        assoc.release()
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = old
    _, found = findscu(eng.port, "IMAGE", {"PatientID": "STREAM^HDR", "StudyInstanceUID": uids["StudyInstanceUID"],
                                            "SeriesInstanceUID": uids["SeriesInstanceUID"], "SOPInstanceUID": ""},
                       out_dir=tmp_path / "find")
    assert [str(d.SOPInstanceUID) for d in found] == [uids["SOPInstanceUID"]]
    store = eng.store()
    _mid, blob_id, meta_end = _stored(store, uids["SOPInstanceUID"])
    assert _blob_data_set_digest(store, blob_id, meta_end)[0] == _file_data_set_digest(ok)
    assert _messages(store) == 1
    assert [p.name for p in eng.blob_files()] == [blob_id]
    store.dispose()


def test_large_instance_on_an_association_pynetdicom_serves_is_streamed_too(medrelay_proc, tmp_path):
    """An association that also proposes Study Root C-FIND is served by pynetdicom
    (listeners/dicom_provider.py); its C-STOREs go through the plain path's storage there too, so
    a 300 MiB instance is streamed to its blob (pynetdicom's DIMSE layer assembled it in memory:
    the engine grew by the instance), stored byte-identical and found on the same association."""
    from pydicom.dataset import Dataset
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind as FIND

    src = tmp_path / "large.dcm"
    uids = write_large_instance(src, 300 << 20, patient_id="STREAM^MIXED")
    small = data_file(TEST_FILES[0])
    eng = Engine(medrelay_proc, tmp_path)
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(MF_GRAYSCALE_BYTE_SC, "1.2.840.10008.1.2.1")
    from pydicom import dcmread

    small_ds = dcmread(small)
    ae.add_requested_context(small_ds.SOPClassUID, small_ds.file_meta.TransferSyntaxUID)
    ae.add_requested_context(FIND)
    old = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True  # pynetdicom sends the file in pieces, never whole
    try:
        assoc = ae.associate("127.0.0.1", eng.port, ae_title="MEDRELAY", max_pdu=65536)
        assert assoc.is_established
        assert assoc.send_c_store(src).Status == 0x0000
        assert assoc.send_c_store(small).Status == 0x0000  # a small one on the same association: in memory
        assert assoc.send_c_store(small).Status == 0x0000  # again: a duplicate, answered success
        q = Dataset()
        q.QueryRetrieveLevel, q.StudyInstanceUID, q.PatientID = "STUDY", uids["StudyInstanceUID"], ""
        found = [ident.PatientID for status, ident in assoc.send_c_find(q, FIND)
                 if status and status.Status in (0xFF00, 0xFF01)]
        assert found == ["STREAM^MIXED"]
        assoc.release()
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = old
    assert eng.rss()["VmHWM"] < RSS_LIMIT, f"peak RSS {eng.rss()['VmHWM'] / MiB:.0f} MiB"
    store = eng.store()
    _mid, blob_id, meta_end = _stored(store, uids["SOPInstanceUID"])
    assert _blob_data_set_digest(store, blob_id, meta_end)[0] == _file_data_set_digest(src)
    assert _messages(store) == 2
    store.dispose()
