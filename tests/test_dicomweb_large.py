"""A large instance out over DICOMweb (issue 13 item 3, WADO part): WADO-RS instance and study
retrieval and WADO-URI send a chunk-sealed stored instance from its blob's chunks as they are
decrypted (multipart/related written part by part), byte-identical, while `medrelay run`'s peak
RSS stays under 300 MB.

The instance (random pixels, MEDRELAY_TEST_BIG_MB, default 400 MB) is stored with DCMTK
storescu by a first engine process; a second process on the same data serves it, so its VmHWM
(peak RSS, from /proc) is the retrieval alone. The client is httpx streaming the body to disk;
the data set after the file meta (which the listener writes itself) is compared by SHA-256.
A second test changes one byte in the middle of a stored chunk-sealed blob: the stream is
cut after the chunks before it (httpx sees an incomplete body) and audited as failed.
"""

from __future__ import annotations

import hashlib
import os
import re
import struct
import time
from pathlib import Path

import httpx
import pytest
from big_dicom import ct_header, store_with_a_first_process
from dicom_peers import free_port
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian

pytestmark = pytest.mark.dcmtk

TOKEN = "dicomweb-large-token-0123456789"
LIMIT = 300 * 1024 * 1024


def make_big(path: Path, megabytes: int) -> Dataset:
    """A CT instance of about ``megabytes`` MB of random 16-bit pixels, written to ``path``: the
    header by pydicom, the Pixel Data element appended in pieces (never whole in memory)."""
    side = int((megabytes * 1024 * 1024 / 2) ** 0.5) // 2 * 2
    ds = ct_header(ExplicitVRLittleEndian, None, side, side, "BIGWEB1", name="Large^Web")
    ds.save_as(path, enforce_file_format=True)
    size = side * side * 2
    with open(path, "ab") as f:  # (7FE0,0010) OW, explicit VR little endian
        f.write(struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OW", 0, size))
        for off in range(0, size, 8 << 20):
            f.write(os.urandom(min(8 << 20, size - off)))
    return ds


def data_set_sha(path: Path, start: int = 0, end: int | None = None) -> str:
    """SHA-256 of the encoded data set of the Part-10 bytes in ``path[start:end]`` (after its file
    meta, whose group length element comes first), read in pieces."""
    end = path.stat().st_size if end is None else end
    with open(path, "rb") as f:
        f.seek(start)
        head = f.read(144)
        assert head[128:132] == b"DICM" and head[132:136] == b"\x02\x00\x00\x00", head[:160]
        pos = start + 144 + int.from_bytes(head[140:144], "little")
        f.seek(pos)
        h = hashlib.sha256()
        while pos < end:
            piece = f.read(min(1 << 20, end - pos))
            assert piece
            h.update(piece)
            pos += len(piece)
    return h.hexdigest()


def fetch_to(url: str, out: Path, accept: str) -> httpx.Headers:
    """GET ``url`` streaming the body into ``out`` (never the whole body in this process)."""
    headers = {"Authorization": f"Bearer {TOKEN}", "Accept": accept}
    with httpx.stream("GET", url, headers=headers, timeout=120) as r, open(out, "wb") as f:
        assert r.status_code == 200, r.read()[:300]
        for piece in r.iter_bytes(1 << 20):
            f.write(piece)
        return r.headers


def one_part(path: Path, content_type: str) -> tuple[str, int, int]:
    """(part Content-Type, start, end) of the single part of a multipart/related body in ``path``."""
    boundary = content_type.split("boundary=")[1].split(";")[0].strip().strip('"')
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(4096)
        tail = f"\r\n--{boundary}--\r\n".encode()
        f.seek(size - len(tail))
        assert f.read() == tail, "the body does not end with the closing delimiter"
    assert head.startswith(f"--{boundary}\r\n".encode())
    header_end = head.index(b"\r\n\r\n") + 4
    part_type = head[:header_end].decode().split("Content-Type:")[1].split("\r\n")[0].strip()
    return part_type, header_end, size - len(tail)


def peak_rss(pid: int) -> int:
    """VmHWM of a process, in bytes."""
    return int(re.search(r"^VmHWM:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text(), re.M)[1]) * 1024


@pytest.mark.slow
def test_large_instance_streamed_by_wado_rs_and_wado_uri_under_300_mb(medrelay_proc, tmp_path):
    dport, wport = free_port(), free_port()
    yaml = f"""
store: {{url: "sqlite:///data/medrelay.db", blobs: data/blobs}}
keys: {{kek_file: data/keys.json}}
channels:
  dcm:
    source: {{type: dicom, port: {dport}, ae_title: MEDRELAY, calling_aets: [TESTSCU]}}
    routes: []
  web:
    source: {{type: dicomweb, host: 127.0.0.1, port: {wport}, base_path: /dicom-web,
             auth: {{bearer_tokens: ["${{DW_TOKEN}}"]}}}}
    routes: []
"""
    proc = medrelay_proc(yaml, env={"DW_TOKEN": TOKEN})
    src = tmp_path / "big.dcm"
    ds = make_big(src, int(os.environ.get("MEDRELAY_TEST_BIG_MB", "400")))
    want = data_set_sha(src)
    store_with_a_first_process(proc, dport, src)
    proc.start()  # a fresh process: its peak RSS is the retrievals alone
    try:
        proc.wait_port(wport, 60)
        pid = proc.proc.pid
        base = f"http://127.0.0.1:{wport}/dicom-web/studies/{ds.StudyInstanceUID}"
        instance = f"{base}/series/{ds.SeriesInstanceUID}/instances/{ds.SOPInstanceUID}"
        body = tmp_path / "body"
        t0 = time.monotonic()
        for url in (instance, base):  # one instance; the whole study
            got = fetch_to(url, body, 'multipart/related; type="application/dicom"; transfer-syntax=*')
            part_type, start, end = one_part(body, got["content-type"])
            assert part_type == f"application/dicom; transfer-syntax={ExplicitVRLittleEndian}"
            assert data_set_sha(body, start, end) == want
        uri = (f"http://127.0.0.1:{wport}/dicom-web/wado?requestType=WADO&studyUID={ds.StudyInstanceUID}"
               f"&seriesUID={ds.SeriesInstanceUID}&objectUID={ds.SOPInstanceUID}&contentType=application/dicom")
        got = fetch_to(uri, body, "application/dicom")
        assert got["content-type"] == "application/dicom" and data_set_sha(body) == want
        peak = peak_rss(pid)
        print(f"3 retrievals of {src.stat().st_size >> 20} MiB in {time.monotonic() - t0:.1f}s, "
              f"engine peak RSS {peak >> 20} MiB")
        assert peak < LIMIT, f"peak RSS {peak >> 20} MiB"
    finally:
        proc.terminate(60)


def test_a_chunk_that_fails_its_check_cuts_the_stream_and_is_audited_as_failed(tmp_path):
    """A stored instance whose blob file was changed in the middle: the chunks before it go out,
    then the connection is cut (never a complete-looking body), and the audit row says failed."""
    from conftest import EngineThread
    from sqlalchemy import select

    from engine.store import schema
    from engine.store.dicom import index as idx

    e = EngineThread("""
channels:
  web:
    source: {type: dicomweb, host: 127.0.0.1, port: 0, base_path: /dicom-web,
             auth: {bearer_tokens: ["${DW_TOKEN}"]}}
    routes: []
""", tmp_path, env={"DW_TOKEN": TOKEN})
    try:
        host, port = e.address("web")
        src = tmp_path / "mid.dcm"
        ds = make_big(src, 20)  # chunk-sealed: 16 MiB and more
        boundary = "b0undary"
        body = (f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + src.read_bytes()
                + f"\r\n--{boundary}--\r\n".encode())
        r = httpx.post(f"http://{host}:{port}/dicom-web/studies", content=body, timeout=60, headers={
            "Authorization": f"Bearer {TOKEN}",
            "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}'})
        assert r.status_code == 200, r.text[:300]
        with e.store.engine.connect() as conn:
            found = idx.locate(conn, str(ds.SOPInstanceUID))
        assert found is not None and found.size > 16 * 1024 * 1024
        (blob_file,) = [p for p in tmp_path.rglob(found.payload_blob) if p.is_file()]
        with open(blob_file, "r+b") as f:  # one byte of the ciphertext, mid-file (chunk ~10 of ~20)
            f.seek(blob_file.stat().st_size // 2)
            b = f.read(1)
            f.seek(-1, 1)
            f.write(bytes([b[0] ^ 0x01]))
        url = (f"http://{host}:{port}/dicom-web/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}"
               f"/instances/{ds.SOPInstanceUID}")
        got = 0
        with pytest.raises(httpx.HTTPError):  # incomplete chunked read: the peer closed mid-body
            with httpx.stream("GET", url, timeout=60, headers={
                    "Authorization": f"Bearer {TOKEN}",
                    "Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'}) as resp:
                assert resp.status_code == 200
                for piece in resp.iter_bytes():
                    got += len(piece)
        assert 0 < got < found.size  # what was sent before the bad chunk, not the whole instance
        a = schema.audit_events
        end = time.monotonic() + 30
        while time.monotonic() < end:
            with e.store.engine.connect() as conn:
                rows = conn.execute(select(a.c.outcome, a.c.entity).where(a.c.action == "dicomweb.retrieve")).all()
            if rows:
                break
            time.sleep(0.05)
        assert [(o, ent["failed"]) for o, ent in rows] == [("failure", 1)]
    finally:
        e.stop()
