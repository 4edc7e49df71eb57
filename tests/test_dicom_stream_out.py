"""Large instances streamed OUT over DIMSE (issue 13 item 3): C-GET, C-MOVE sub-operations and
the C-STORE route send a chunk-sealed stored instance from its blob's chunks as they are
decrypted (engine/dimse/stream_send.py), byte-identical, without the data set whole in memory.

Peers: DCMTK getscu / movescu / storescp, a pynetdicom Storage SCP that can abort mid-instance.
The memory test runs `medrelay run` in a subprocess and reads its VmHWM (peak RSS): the
instance is stored by a first engine process, retrieved from a second one.
"""

from __future__ import annotations

import hashlib
import os
import re
import socket
import time
from pathlib import Path

import pytest
from big_dicom import store_with_a_first_process
from dicom_peers import StoreSCP, free_port, run, storescu
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, evt
from pynetdicom.sop_class import CTImageStorage
from sqlalchemy import select
from test_dicom_reconcile import TOKEN, adt
from test_dicom_reconcile import YAML as RECONCILE_YAML

from engine.dimse import stream_send
from engine.security.crypto import KeyRing
from engine.store import schema
from engine.store.db import Store

pytestmark = pytest.mark.dcmtk

CT = "1.2.840.10008.5.1.4.1.1.2"


def big_instance(path: Path, megabytes: int) -> tuple[str, str]:
    """A CT instance of about ``megabytes`` MB (random 16-bit pixels); (SOP Instance UID, data set SHA-256)."""
    side = int((megabytes * 1024 * 1024 / 2) ** 0.5) // 2 * 2
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = CT
    ds.SOPClassUID = CT
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientID, ds.PatientName, ds.Modality = "BIG1", "Large^Instance", "CT"
    ds.Rows = ds.Columns = side
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.PixelData = os.urandom(side * side * 2)
    ds.save_as(path, enforce_file_format=True)
    uid = str(ds.SOPInstanceUID)
    del ds
    return uid, dataset_sha(path)


def dataset_sha(path: Path) -> str:
    """SHA-256 of a Part-10 file's encoded data set (after the file meta), read in pieces."""
    with open(path, "rb") as f:
        head = f.read(132)
        assert head[128:132] == b"DICM"
        end = 132
        while True:
            f.seek(end)
            el = f.read(12)
            if el[:2] != b"\x02\x00":
                break
            vr = el[4:6]
            end += (12 + int.from_bytes(el[8:12], "little")) if vr in (b"OB", b"OW", b"UN", b"SQ", b"UT") \
                else (8 + int.from_bytes(el[6:8], "little"))
        f.seek(end)
        h = hashlib.sha256()
        while piece := f.read(1 << 20):
            h.update(piece)
    return h.hexdigest()


class StoreSCPeer:
    """A pynetdicom Storage SCP that hashes what it receives; ``abort_after`` P-DATA PDUs of the
    data set it sends an A-ABORT and drops the connection, mid-instance."""

    def __init__(self, ssl_context=None, port: int = 0) -> None:
        self.received: list[tuple[str, str, int]] = []  # (SOP Instance UID, SHA-256, bytes)
        self.abort_after: int | None = None
        self.aborted = 0
        self.pdata: dict[int, int] = {}  # P-DATA PDUs per association
        ae = AE(ae_title="PEER")
        ae.maximum_pdu_size = 65536
        ae.add_supported_context(CTImageStorage, [ExplicitVRLittleEndian, "1.2.840.10008.1.2"])
        self.server = ae.start_server(("127.0.0.1", port), block=False, ssl_context=ssl_context, evt_handlers=[
            (evt.EVT_C_STORE, self._store), (evt.EVT_PDU_RECV, self._pdu)])
        self.port = self.server.server_address[1]

    def _pdu(self, event) -> None:
        if type(event.pdu).__name__ != "P_DATA_TF":
            return
        n = self.pdata[id(event.assoc)] = self.pdata.get(id(event.assoc), 0) + 1
        if self.abort_after is not None and n == self.abort_after:
            self.aborted += 1
            sock = event.assoc.dul.socket.socket
            sock.sendall(b"\x07\x00\x00\x00\x00\x04\x00\x00\x00\x00")  # A-ABORT, service user
            sock.shutdown(socket.SHUT_RDWR)

    def _store(self, event) -> int:
        data = event.request.DataSet.getvalue()
        self.received.append((str(event.request.AffectedSOPInstanceUID), hashlib.sha256(data).hexdigest(),
                              len(data)))
        return 0x0000

    def stop(self) -> None:
        self.server.shutdown()


def _yaml(port: int, move_port: int, route_port: int, *, retry: str = "{max_attempts: 20, initial_delay: 0.5, "
          "max_delay: 1}", route_ae: str = "STORESCP", store_url: str = "sqlite:///data/medrelay.db",
          more_destinations: str = "") -> str:
    return f"""
store: {{url: "{store_url}", blobs: data/blobs}}
keys: {{kek_file: data/keys.json}}
channels:
  dcm:
    source:
      type: dicom
      port: {port}
      ae_title: MEDRELAY
      calling_aets: [TESTSCU, GETSCU]
      move_destinations:
        STORESCP: {{host: 127.0.0.1, port: {move_port}}}
{more_destinations}
    routes:
      - name: fwd
        to: {{type: dicom, host: 127.0.0.1, port: {route_port}, called_ae_title: {route_ae}}}
        retry: {retry}
"""


def deliveries(store, route: str) -> list[tuple[str, int, str | None]]:
    d = schema.deliveries
    with store.engine.connect() as c:
        return [tuple(r) for r in c.execute(select(d.c.state, d.c.attempts, d.c.last_error)
                                            .where(d.c.route == route).order_by(d.c.id))]


def sent_audits(store) -> int:
    a = schema.audit_events
    with store.engine.connect() as c:
        return len(c.execute(select(a.c.id).where(a.c.action == "message.send")).all())


def getscu(port: int, study: str, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    g = run("getscu", "-v", "-S", "+B", "-aet", "GETSCU", "-aec", "MEDRELAY", "-od", str(out),
            "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study}", "127.0.0.1", str(port),
            timeout=300)
    assert g.returncode == 0 and re.search(r"Completed Suboperations\s*:\s*1\b", g.stdout), g.stdout[-3000:]


def movescu(port: int, study: str, dest: str = "STORESCP", *, ok: bool = True) -> str:
    mv = run("movescu", "-v", "-S", "-aet", "TESTSCU", "-aec", "MEDRELAY", "-aem", dest,
             "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study}", "127.0.0.1", str(port),
             timeout=300)
    assert (mv.returncode == 0) == ok and ("Final Move Response (Success)" in mv.stdout) == ok, mv.stdout[-3000:]
    return mv.stdout


# -- the PDV cutting itself ------------------------------------------------------------------------

def test_fragments_cut_any_chunking_into_pdvs_with_the_last_marked():
    data = os.urandom(10_000)
    for pieces in ([data], [data[:1], data[1:4096], data[4096:]], [data[i:i + 333] for i in range(0, 10_000, 333)]):
        out = list(stream_send.fragments(pieces, 1000))
        assert [last for last, _ in out] == [False] * 9 + [True]
        assert all(len(p) == 1000 for _l, p in out)
        assert b"".join(p for _l, p in out) == data
    assert list(stream_send.fragments([b"abc"], 1000)) == [(True, b"abc")]
    assert [(last, bytes(p)) for last, p in stream_send.fragments([data[:1000], b"", data[1000:2000]], 1000)] == \
        [(False, data[:1000]), (True, data[1000:2000])]  # chunks on the boundaries: the last is still marked
    assert list(stream_send.fragments([], 1000)) == [(True, b"")]
    assert stream_send.fragment_size(16384) == 16378 and stream_send.fragment_size(0) == (1 << 20) - 6
    assert stream_send.fragment_size(4097) % 2 == 0


# -- C-GET, C-MOVE, the route, an aborting peer (engine in this process, 40 MB) ------------------

def test_stream_out_byte_identical_and_aborted_peer_is_a_retried_failure(engine_factory, tmp_path, store_url):
    peer = StoreSCPeer()
    scp = StoreSCP(tmp_path / "moved")
    implicit = StoreSCP(tmp_path / "implicit", aet="IMPLICIT", extra=("+xi",))  # refuses the stored syntax
    more = (f"        IMPLICIT: {{host: 127.0.0.1, port: {implicit.port}}}\n"
            f"        PEER: {{host: 127.0.0.1, port: {peer.port}}}")
    try:
        peer.abort_after = 20  # the route's first attempts end mid-instance
        e = engine_factory(_yaml(0, scp.port, peer.port, route_ae="PEER", store_url=store_url,
                                 more_destinations=more))
        port = e.address("dcm")[1]
        src = tmp_path / "big.dcm"
        uid, sha = big_instance(src, 40)
        r = storescu(port, [src])
        assert "Success" in r.stdout, r.stdout[-2000:]
        with e.store.engine.connect() as c:  # it is stored chunk-sealed: the streamed path is the one tested
            nonce = c.execute(select(schema.blobs.c.nonce).where(schema.blobs.c.size > 30_000_000)).scalar()
        assert nonce is not None and nonce[:4] == b"MRS1"

        e.wait_for(lambda: deliveries(e.store, "fwd") and deliveries(e.store, "fwd")[0][1] >= 2, timeout=60)
        state, attempts, error = deliveries(e.store, "fwd")[0]
        assert state == "pending" and error, (state, error)
        assert peer.aborted >= 2 and peer.received == []
        assert sent_audits(e.store) == 0  # nothing reported as sent
        peer.abort_after = None
        e.wait_for(lambda: deliveries(e.store, "fwd")[0][0] == "done", timeout=60)
        assert peer.received == [(uid, sha, peer.received[0][2])]
        assert sent_audits(e.store) == 1

        study = _study(src)
        getscu(port, study, tmp_path / "got")
        got = list((tmp_path / "got").iterdir())
        assert len(got) == 1 and dataset_sha(got[0]) == sha
        movescu(port, study)
        assert len(scp.files()) == 1 and dataset_sha(scp.files()[0]) == sha

        # a destination that does not take the stored syntax: decoded whole, converted, same pixels
        movescu(port, study, "IMPLICIT")
        [conv] = implicit.files()
        got_ds, src_ds = dcmread(conv), dcmread(src)
        assert str(got_ds.file_meta.TransferSyntaxUID) == "1.2.840.10008.1.2"
        assert got_ds.PixelData == src_ds.PixelData and str(got_ds.SOPInstanceUID) == uid
        del got_ds, src_ds

        # a C-MOVE destination that aborts mid-instance: a failed sub-operation, not a sent one
        peer.abort_after = 20
        before = list(peer.received)
        out = movescu(port, study, "PEER", ok=False)
        assert peer.received == before
        assert "Final Move Response (Failed: UnableToProcess)" in out, out[-2000:]  # 0xC000: all failed
    finally:
        peer.stop()
        scp.stop()
        implicit.stop()


def test_route_over_tls_streams_through_the_dul_queue(engine_factory, tmp_path):
    """TLS: the data set PDUs go through pynetdicom's DUL (an SSL object is written by one thread)."""
    import ssl

    from tls_certs import make_pki

    pki = make_pki(tmp_path / "pki")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(pki.server.cert, pki.server.key)
    ctx.load_verify_locations(pki.ca)
    ctx.verify_mode = ssl.CERT_REQUIRED
    peer = StoreSCPeer(ssl_context=ctx)
    try:
        tls = (f'{{host: 127.0.0.1, port: {peer.port}, called_ae_title: PEER, tls: {{ca: "{pki.ca}", '
               f'cert: "{pki.client.cert}", key: "{pki.client.key}", server_name: localhost}}}}')
        yaml = _yaml(0, peer.port, peer.port, route_ae="PEER").replace(
            f"{{type: dicom, host: 127.0.0.1, port: {peer.port}, called_ae_title: PEER}}", "{type: dicom, " + tls[1:])
        e = engine_factory(yaml)
        src = tmp_path / "big.dcm"
        uid, sha = big_instance(src, 24)
        assert "Success" in storescu(e.address("dcm")[1], [src]).stdout
        e.wait_for(lambda: deliveries(e.store, "fwd")[0][0] == "done", timeout=60)
        assert [(u, h) for u, h, _n in peer.received] == [(uid, sha)]
    finally:
        peer.stop()


def test_damaged_large_blob_is_a_failed_suboperation_and_a_quarantined_delivery(engine_factory, tmp_path):
    """A chunk-sealed blob whose tag no longer matches its address fails before anything is sent:
    C-GET counts a failed sub-operation on an association that goes on, the route dead-letters the
    delivery as an integrity failure (retrying cannot help) and the peer gets nothing."""
    route_port = free_port()
    e = engine_factory(_yaml(0, free_port(), route_port, route_ae="PEER",
                             retry="{max_attempts: 20, initial_delay: 0.3, max_delay: 0.5}"))
    port = e.address("dcm")[1]
    src = tmp_path / "big.dcm"
    big_instance(src, 24)
    assert "Success" in storescu(port, [src]).stdout
    e.wait_for(lambda: deliveries(e.store, "fwd")[0][1] >= 1, timeout=30)  # nobody listens yet
    with e.store.engine.connect() as c:
        blob_id = c.execute(select(schema.blobs.c.id).where(schema.blobs.c.size > 20_000_000)).scalar()
    path = e.store.blob_path(blob_id)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF  # the final tag: the address check fails before the first chunk
    path.write_bytes(bytes(data))
    del data
    out = tmp_path / "got"
    out.mkdir()
    g = run("getscu", "-v", "-S", "-aet", "GETSCU", "-aec", "MEDRELAY", "-od", str(out),
            "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={_study(src)}", "127.0.0.1", str(port))
    assert re.search(r"Failed Suboperations\s*:\s*1\b", g.stdout) and "Releasing Association" in g.stdout, \
        g.stdout[-2000:]
    assert list(out.iterdir()) == []
    peer = StoreSCPeer(port=route_port)
    try:
        e.wait_for(lambda: deliveries(e.store, "fwd")[0][0] == "dead", timeout=30)
        assert (deliveries(e.store, "fwd")[0][2] or "").startswith("integrity:")
        assert peer.received == [] and sent_audits(e.store) == 0
    finally:
        peer.stop()


def test_reconciled_patient_streams_with_a_rewritten_header(engine_factory, tmp_path, monkeypatch):
    """After ADT A08 changed the patient, a large instance goes out with the new Patient module
    (only the header re-encoded) and its Pixel Data unchanged."""
    from mllp_peers import RawClient, msa

    from engine.store.dicom import reconcile
    from listeners import dicom_stored_stream

    rewritten: list[int] = []  # sizes of what was handed to rewrite_patient: the header only
    original = reconcile.rewrite_patient

    def spy(part10, attrs):
        rewritten.append(len(part10))
        return original(part10, attrs)

    monkeypatch.setattr(dicom_stored_stream.reconcile, "rewrite_patient", spy)
    monkeypatch.setenv("RECONCILE_TOKEN", TOKEN)
    e = engine_factory(RECONCILE_YAML % {"delete": "false"})  # test_dicom_reconcile's channels
    src = tmp_path / "big.dcm"
    big_instance(src, 24)
    ds = dcmread(src)
    ds.IssuerOfPatientID = "HOSP"
    ds.save_as(src, enforce_file_format=True)
    pixels = hashlib.sha256(ds.PixelData).hexdigest()
    del ds
    assert "Success" in storescu(e.address("dcm")[1], [src]).stdout
    with RawClient(*e.address("adt")) as c:
        assert msa(c.request(adt("A08-1", "A08", "PID|1||BIG1^^^HOSP^MR||Renamed^Patient||19700215|F")))[1] == "AA"
    e.wait_for(lambda: _all_done(e.store))
    getscu(e.address("dcm")[1], _study(src), tmp_path / "got")
    [f] = list((tmp_path / "got").iterdir())
    got = dcmread(f)
    assert str(got.PatientName) == "Renamed^Patient" and str(got.PatientBirthDate) == "19700215"
    assert hashlib.sha256(got.PixelData).hexdigest() == pixels
    assert rewritten and max(rewritten) < 64 * 1024, rewritten


def _all_done(store) -> bool:
    d = schema.deliveries
    with store.engine.connect() as c:
        states = c.execute(select(d.c.state)).scalars().all()
    return bool(states) and all(s == "done" for s in states)


def _study(path: Path) -> str:
    return str(dcmread(path, stop_before_pixels=True).StudyInstanceUID)


# -- the memory bound: `medrelay run` in a subprocess, a 400 MB instance --------------------------

def _status(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


@pytest.mark.slow
def test_large_instance_retrieved_and_forwarded_under_300_mb(medrelay_proc, tmp_path):
    port, route_port = free_port(), free_port()
    moved = StoreSCP(tmp_path / "moved")
    yaml = _yaml(port, moved.port, route_port)
    first = medrelay_proc(yaml)
    src = tmp_path / "big.dcm"
    uid, sha = big_instance(src, int(os.environ.get("MEDRELAY_TEST_BIG_MB", "400")))
    study = _study(src)
    store_with_a_first_process(first, port, src)
    # the second process serves it (the route's destination is up now): its peak RSS is retrieval only
    routed = tmp_path / "routed"
    routed.mkdir()
    route_scp = _storescp_on(route_port, routed)
    second = first
    second.start()
    try:
        second.wait_port(port, 60)
        pid = second.proc.pid
        t0 = time.monotonic()
        getscu(port, study, tmp_path / "got")
        got = list((tmp_path / "got").iterdir())
        assert len(got) == 1 and dataset_sha(got[0]) == sha
        movescu(port, study)
        assert len(moved.files()) == 1 and dataset_sha(moved.files()[0]) == sha
        # storescp writes the file as the data arrives and answers once it is whole: the route's
        # delivery is done only after that answer (a size that stays put for a while proves nothing
        # on a loaded machine, where the sender can pause longer than that)
        db = Store(f"sqlite:///{second.data_dir}/data/medrelay.db", second.data_dir / "data" / "blobs",
                   KeyRing(second.data_dir / "data" / "keys.json"))
        try:
            deadline = time.monotonic() + 300
            while time.monotonic() < deadline and [d[0] for d in deliveries(db, "fwd")] != ["done"]:
                time.sleep(0.5)
            assert [d[0] for d in deliveries(db, "fwd")] == ["done"], deliveries(db, "fwd")
        finally:
            db.dispose()
        files = list(routed.iterdir())
        assert len(files) == 1 and dataset_sha(files[0]) == sha
        peak = _status(pid, "VmHWM")
        print(f"retrieval and forward of {src.stat().st_size >> 20} MiB in {time.monotonic() - t0:.1f}s, "
              f"engine peak RSS {peak >> 20} MiB")
        assert peak < 300 * 1024 * 1024, f"peak RSS {peak >> 20} MiB"
    finally:
        second.terminate(60)
        moved.stop()
        route_scp.stop()
    del uid


def _storescp_on(port: int, out: Path) -> StoreSCP:
    scp = StoreSCP.__new__(StoreSCP)
    import subprocess

    from dicom_peers import ENV, tool, wait_port

    scp.out_dir, scp.port = out, port
    scp.proc = subprocess.Popen([tool("storescp"), "-aet", "STORESCP", "-od", str(out), "+B", "-uf", str(port)],
                                env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    wait_port(port)
    return scp

