"""Large instances streamed in over DICOM TLS (issue 13 item 3): a storage-only association over
TLS takes medrelay's own Upper Layer after the handshake, as one over plain TCP does.

`medrelay run` in a subprocess with a mutual-TLS DICOM listener receives several hundred MB from
DCMTK storescu (+tls) and from pynetdicom with an SSL context; its peak RSS is read from
/proc/<pid>/status and the stored blob is compared with the file sent. The hostile peers speak TLS
through an ``ssl.SSLObject`` over memory BIOs, so they can stop inside a TLS record.
"""

from __future__ import annotations

import socket
import ssl
import struct
import subprocess
import time
from io import BytesIO
from pathlib import Path

import pytest
from pydicom.filereader import read_dataset
from pynetdicom import AE, _config
from tls_certs import make_pki

from bench.large import MF_GRAYSCALE_BYTE_SC, write_large_instance
from tests.dicom_peers import ENV, free_port, run, store_statuses, tool
from tests.test_dicom_hostile import PLAIN, associate_rq, cpu_seconds
from tests.test_dicom_stream_in import (
    RSS_LIMIT,
    MiB,
    _blob_data_set_digest,
    _file_data_set_digest,
    _messages,
    _stored,
)

pytestmark = [pytest.mark.dcmtk, pytest.mark.slow]


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_pki(tmp_path_factory.mktemp("pki"))


class TLSEngine:
    """`medrelay run` with a mutual-TLS DICOM listener (the test_dicom_stream_in Engine, over TLS)."""

    def __init__(self, medrelay_proc, tmp_path: Path, pki, extra: str = "") -> None:
        from engine.security.crypto import KeyRing
        from engine.store.db import Store

        self.data = tmp_path / "data"
        self.port = free_port()
        self.url = f"sqlite:///{self.data}/medrelay.db"
        self.proc = medrelay_proc(f"""
store: {{url: "{self.url}", blobs: "{self.data}/blobs"}}
keys: {{kek_file: "{self.data}/keys.json"}}
channels:
  dcm:
    source:
      type: dicom
      port: {self.port}
      ae_title: MEDRELAY
      calling_aets: [TESTSCU]
      tls: {{cert: "{pki.server.cert}", key: "{pki.server.key}", ca: "{pki.ca}", require_client_cert: true}}
{extra}
""")
        self.proc.start()
        self.proc.wait_port(self.port)
        assert self.proc.proc is not None
        self.pid = self.proc.proc.pid
        self._store = lambda: Store(self.url, self.data / "blobs", KeyRing(self.data / "keys.json"))

    def store(self):
        return self._store()

    def blob_files(self) -> list[Path]:
        return [p for p in (self.data / "blobs").rglob("*") if p.is_file()]

    def peak(self) -> int:
        from bench.large import proc_status

        return proc_status(self.pid)["VmHWM"]


def _client_tls(pki) -> list[str]:
    return ["+tls", str(pki.client.key), str(pki.client.cert), "+cf", str(pki.ca)]


def _storescu(port: int, src: Path, *tls: str) -> str:
    r = subprocess.run([tool("storescu"), "-v", "-aet", "TESTSCU", "-aec", "MEDRELAY", *tls, "127.0.0.1",
                        str(port), str(src)], env=ENV, capture_output=True, text=True, timeout=600)
    return (r.stdout or "") + (r.stderr or "")


def _find_over_tls(pki, port: int, out_dir: Path, keys: dict[str, str]) -> list:
    from pydicom import dcmread

    args = ["-S", "-v", "-aet", "TESTSCU", "-aec", "MEDRELAY", *_client_tls(pki), "-k", "QueryRetrieveLevel=IMAGE"]
    for k, v in keys.items():
        args += ["-k", f"{k}={v}" if v else k]
    out_dir.mkdir(parents=True, exist_ok=True)
    r = run("findscu", *args, "-X", "-od", str(out_dir), "127.0.0.1", str(port), timeout=120)
    assert r.returncode == 0, r.stdout
    return [dcmread(f) for f in sorted(out_dir.glob("rsp*.dcm"))]


def test_storescu_tls_large_instance_is_streamed_bounded_and_byte_identical(medrelay_proc, tmp_path, pki):
    """400 MiB from storescu +tls: peak RSS under 300 MB (in memory it was over 1 GiB), the blob is
    the file's data set, C-FIND over TLS finds it; an anonymous TLS client (no certificate) sending
    the same file under mutual TLS is still refused at the handshake, with nothing stored."""
    src = tmp_path / "large.dcm"
    uids = write_large_instance(src, 400 << 20, patient_id="STREAM^TLS")
    eng = TLSEngine(medrelay_proc, tmp_path, pki)
    out = _storescu(eng.port, src, "+tla", "+cf", str(pki.ca))
    assert "Success" not in store_statuses(out), out
    out = _storescu(eng.port, src, *_client_tls(pki))
    assert store_statuses(out) == ["Success"], out
    peak = eng.peak()
    assert peak < RSS_LIMIT, f"peak RSS {peak / MiB:.0f} MiB"
    found = _find_over_tls(pki, eng.port, tmp_path / "find", {
        "PatientID": "STREAM^TLS", "StudyInstanceUID": uids["StudyInstanceUID"], "SOPInstanceUID": ""})
    assert [str(ds.SOPInstanceUID) for ds in found] == [uids["SOPInstanceUID"]]
    store = eng.store()
    try:
        _mid, blob_id, meta_end = _stored(store, uids["SOPInstanceUID"])
        digest, n = _blob_data_set_digest(store, blob_id, meta_end)
        assert digest == _file_data_set_digest(src)
        assert _messages(store) == 1
        assert [p.name for p in eng.blob_files()] == [blob_id]  # no .part file, nothing of the refused send
    finally:
        store.dispose()


def test_pynetdicom_ssl_context_large_instance_is_streamed(medrelay_proc, tmp_path, pki):
    """300 MiB from pynetdicom with an SSL context (client certificate), sent in pieces."""
    src = tmp_path / "large.dcm"
    uids = write_large_instance(src, 300 << 20, patient_id="STREAM^PYTLS")
    eng = TLSEngine(medrelay_proc, tmp_path, pki)
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(pki.ca))
    ctx.load_cert_chain(pki.client.cert, pki.client.key)
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(MF_GRAYSCALE_BYTE_SC, "1.2.840.10008.1.2.1")
    old = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        assoc = ae.associate("127.0.0.1", eng.port, ae_title="MEDRELAY", max_pdu=65536,
                             tls_args=(ctx, "localhost"))
        assert assoc.is_established
        assert assoc.send_c_store(src).Status == 0x0000
        assoc.release()
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = old
    peak = eng.peak()
    assert peak < RSS_LIMIT, f"peak RSS {peak / MiB:.0f} MiB"
    found = _find_over_tls(pki, eng.port, tmp_path / "find", {"PatientID": "STREAM^PYTLS", "SOPInstanceUID": ""})
    assert [str(ds.SOPInstanceUID) for ds in found] == [uids["SOPInstanceUID"]]
    store = eng.store()
    try:
        _mid, blob_id, meta_end = _stored(store, uids["SOPInstanceUID"])
        assert _blob_data_set_digest(store, blob_id, meta_end)[0] == _file_data_set_digest(src)
    finally:
        store.dispose()


# -- hostile TLS peers (issue 9's checks, over TLS) -------------------------------------------

class RawTLS:
    """A TLS client over a plain socket through memory BIOs: it can send the first bytes of a TLS
    record and stop, which an ``ssl.SSLSocket`` never does."""

    def __init__(self, port: int, pki) -> None:
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(pki.ca))
        ctx.load_cert_chain(pki.client.cert, pki.client.key)
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=20)
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = ctx.wrap_bio(self.incoming, self.outgoing, server_hostname="localhost")
        while True:
            try:
                self.tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                self._flush()
                data = self.sock.recv(65536)
                assert data, "closed during the handshake"
                self.incoming.write(data)
        self._flush()

    def _flush(self) -> None:
        out = self.outgoing.read()
        if out:
            self.sock.sendall(out)

    def send(self, data: bytes, *, record_bytes: int | None = None) -> None:
        """``data`` as TLS records; with ``record_bytes`` only that many bytes of them go out."""
        self.tls.write(data)
        out = self.outgoing.read()
        self.sock.sendall(out if record_bytes is None else out[:record_bytes])

    def sendall(self, data: bytes) -> None:  # for the PS3.8 helpers of test_dicom_hostile
        self.send(data)

    def recv_pdu(self) -> int:
        """The type of the next PDU; -1 when the connection ended."""
        return self.recv_whole_pdu()[0]

    def recv_whole_pdu(self) -> tuple[int, bytes]:
        """The next PDU as (type, body); (-1, b"") when the connection ended first."""
        buf = b""
        while len(buf) < 6 or len(buf) < 6 + int.from_bytes(buf[2:6], "big"):
            try:
                buf += self.tls.read(65536)
                continue
            except ssl.SSLWantReadError:
                pass
            except ssl.SSLError:
                return -1, b""
            try:
                data = self.sock.recv(65536)
            except OSError:
                return -1, b""
            if not data:
                return -1, b""
            self.incoming.write(data)
        return buf[0], buf[6:6 + int.from_bytes(buf[2:6], "big")]

    def ended_within(self, seconds: float) -> float | None:
        """Seconds until the engine closed the connection (None: still open after ``seconds``)."""
        started = time.monotonic()
        self.sock.settimeout(0.5)
        while time.monotonic() - started < seconds:
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return time.monotonic() - started
            if not data:
                return time.monotonic() - started
        return None

    def close(self) -> None:
        self.sock.close()


def test_stalled_tls_peers_burn_no_cpu_and_are_closed_by_their_timeouts(medrelay_proc, tmp_path, pki):
    """Peers that stop at each stage of a TLS storage association: one byte of a ClientHello
    (handshake), the first bytes of the record holding the A-ASSOCIATE-RQ (ARTIM), and, once
    associated on our Upper Layer, one byte of a P-DATA-TF or the first bytes of its record (idle
    timeout). Together they cost the engine no CPU, a TLS store still succeeds at once beside them,
    and each is closed by its timeout."""
    eng = TLSEngine(medrelay_proc, tmp_path, pki, extra="      acse_timeout: 8.0\n      idle_timeout: 8.0\n")
    hello = [socket.create_connection(("127.0.0.1", eng.port), timeout=20) for _ in range(16)]
    for s in hello:
        s.sendall(b"\x16")
    rq = associate_rq(*PLAIN)
    in_rq = [RawTLS(eng.port, pki) for _ in range(8)]
    for t in in_rq:
        t.send(rq, record_bytes=3)  # the record header only: OpenSSL waits for the rest
    in_pdata = [RawTLS(eng.port, pki) for _ in range(8)]
    pdata_head = struct.pack(">BBI", 0x04, 0, 100)
    for i, t in enumerate(in_pdata):
        t.send(rq)
        assert t.recv_pdu() == 0x02, "A-ASSOCIATE-AC expected"
        if i % 2:
            t.send(pdata_head[:1])  # one byte of a P-DATA-TF, in a whole record
        else:
            t.send(pdata_head + b"\0" * 10, record_bytes=5)  # a record begun and stopped
    time.sleep(0.5)
    cpu0 = cpu_seconds(eng.pid)
    time.sleep(3)
    used = cpu_seconds(eng.pid) - cpu0
    assert used < 0.5, f"engine used {used:.2f} s of CPU in 3 s with 32 stalled TLS peers"
    small = tmp_path / "small.dcm"
    write_large_instance(small, 1 << 20, patient_id="STREAM^SMALL")
    started = time.monotonic()
    out = _storescu(eng.port, small, *_client_tls(pki))
    assert store_statuses(out) == ["Success"], out
    assert time.monotonic() - started < 15
    for t in in_rq + in_pdata:
        assert t.ended_within(30) is not None, "a stalled TLS association was not closed"
    for s in hello:
        s.settimeout(30)
        try:
            assert s.recv(1) == b""  # the handshake timed out: closed, no ServerHello
        except OSError:
            pass
    for s in hello:
        s.close()
    for t in in_rq + in_pdata:
        t.close()


@pytest.mark.parametrize("wrong, diagnostic, reason", [
    ("calling", 0x03, "calling AE title not recognised"),
    ("called", 0x07, "called AE title not recognised"),
])
def test_tls_storage_association_keeps_the_ae_allow_list_and_takes_our_upper_layer(engine_factory, pki, wrong,
                                                                                   diagnostic, reason):
    """Over mutual TLS, a storage-only association still gets A-ASSOCIATE-RJ naming the wrong AE
    title (audited), a client certificate of another CA still fails the handshake, and an accepted
    one is a session of our Upper Layer (``storage_sessions``), not pynetdicom's, until it is
    released; a C-STORE on it is answered and stored."""
    from engine.store.dicom import index as idx
    from tests.test_dicom_hostile import ct_data_set, send_store, store_command
    from tests.test_tls_dicom import n_messages, yaml

    e = engine_factory(yaml(pki, mutual=True))
    port = e.address("dcm")[1]
    kw = {"calling": "INTRUDER"} if wrong == "calling" else {"called": "NOTUS"}
    t = RawTLS(port, pki)
    t.send(associate_rq(*PLAIN, **kw))
    kind, body = t.recv_whole_pdu()
    t.close()
    assert kind == 0x03 and tuple(body[1:4]) == (0x01, 0x01, diagnostic)
    e.wait_for(lambda: _audited(e, reason), timeout=10)
    rogue = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(pki.ca))
    rogue.load_cert_chain(pki.rogue_client.cert, pki.rogue_client.key)
    with pytest.raises((ssl.SSLError, OSError)):
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
                rogue.wrap_socket(raw, server_hostname="localhost") as s:
            s.sendall(associate_rq(*PLAIN))
            assert s.recv(6) == b""  # TLS 1.3: the refusal can arrive after the client's Finished
    server = e.runtime.listener("dcm").server
    t = RawTLS(port, pki)
    t.send(associate_rq(*PLAIN))
    assert t.recv_pdu() == 0x02
    assert len(server.storage_sessions) == 1, "a TLS storage association is ours"
    uid, data = ct_data_set()
    send_store(t, store_command("1.2.840.10008.5.1.4.1.1.2", uid), data)
    kind, body = t.recv_whole_pdu()
    assert kind == 0x04 and int(read_dataset(BytesIO(body[6:]), True, True).Status) == 0x0000
    t.send(bytes((0x05, 0, 0, 0, 0, 4, 0, 0, 0, 0)))  # A-RELEASE-RQ
    assert t.recv_pdu() == 0x06
    t.close()
    e.wait_for(lambda: not server.storage_sessions, timeout=10)
    assert n_messages(e) == 1
    with e.store.engine.connect() as c:
        assert idx.existing_instance(c, uid) is not None


def _audited(e, reason: str) -> bool:
    from sqlalchemy import select

    from engine.store import schema

    with e.store.engine.connect() as c:
        details = c.execute(select(schema.audit_events.c.detail)
                            .where(schema.audit_events.c.action == "dicom.association")).scalars().all()
    return any(reason in (d or "") for d in details)
