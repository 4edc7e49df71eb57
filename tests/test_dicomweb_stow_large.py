"""A large STOW-RS body (issue 13 item 3): parts of 16 MiB and more stream to their blob.

`medrelay run` in a subprocess takes a multipart/related body of several hundred MB that httpx
uploads from a generator (chunked, never whole in the test either). The listener's
``max_body_bytes`` keeps its default (256 MiB), so the body only goes in when its large parts
are streamed; the engine's VmHWM (peak RSS, /proc) must stay under 300 MB. The stored blob is
read back chunk by chunk (``Store.blob_chunks``) and compared with the file sent.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from sqlalchemy import func, select

from bench.large import data_set_offset, write_large_instance
from engine.security.crypto import KeyRing
from engine.store import schema
from engine.store.db import Store
from tests import test_dicom_stream_in as si
from tests.big_dicom import disk_fills_after
from tests.conftest import fresh_pg_url
from tests.dicom_peers import free_port
from tests.test_blob_s3 import BUCKET, CREDS, _files, _objects, s3  # noqa: F401  (s3: the moto fixture)

pytestmark = pytest.mark.slow

MiB = 1 << 20
TOKEN = "stow-large-token-0123456789abc"
BOUNDARY = "stow-large-boundary-7f3a"
CTYPE = f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'


class WebEngine(si.Engine):
    """`medrelay run` with a DICOMweb source only (default max_body_bytes: 256 MiB)."""

    def __init__(self, medrelay_proc, tmp_path: Path, url: str | None = None, store: str | None = None,
                 env: dict[str, str] | None = None) -> None:
        self.data = tmp_path / "data"
        self.port = free_port()
        self.url = url or f"sqlite:///{self.data}/medrelay.db"
        store = store or f'{{url: "{self.url}", blobs: "{self.data}/blobs"}}'
        yaml = f"""
store: {store}
keys: {{kek_file: "{self.data}/keys.json"}}
channels:
  web:
    source: {{type: dicomweb, host: 127.0.0.1, port: {self.port}, auth: {{bearer_tokens: ["${{DW_TOKEN}}"]}}}}
"""
        self.proc = medrelay_proc(yaml, env={"DW_TOKEN": TOKEN, **(env or {})})
        self.proc.start()
        self.proc.wait_port(self.port)
        assert self.proc.proc is not None
        self.pid = self.proc.proc.pid

    def stow_url(self, study: str | None = None) -> str:
        return f"http://127.0.0.1:{self.port}/dicom-web/studies" + (f"/{study}" if study else "")


def _body(parts: list[Path | bytes]) -> Iterator[bytes]:
    """A multipart/related body, files read in 1 MiB pieces."""
    for p in parts:
        yield f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode()
        if isinstance(p, bytes):
            yield p
        else:
            with open(p, "rb") as f:
                while piece := f.read(MiB):
                    yield piece
        yield b"\r\n"
    yield f"--{BOUNDARY}--\r\n".encode()


def _post(url: str, parts: list[Path | bytes]) -> httpx.Response:
    return httpx.post(url, content=_body(parts), timeout=600,
                      headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": CTYPE})


def _reasons(res: dict) -> list[int]:
    return sorted(i["00081197"]["Value"][0] for i in res.get("00081198", {}).get("Value", []))


def _stored_uids(res: dict) -> list[str]:
    return [i["00081155"]["Value"][0] for i in res.get("00081199", {}).get("Value", [])]


@pytest.mark.parametrize("db", ["sqlite", "postgres"])
def test_large_stow_body_is_streamed_bounded_byte_identical_with_failures_per_instance(medrelay_proc, tmp_path, db):
    url = fresh_pg_url() if db == "postgres" else None
    size = int(os.environ.get("MEDRELAY_TEST_BIG_MB", "400")) * MiB
    big = tmp_path / "big.dcm"
    uids = write_large_instance(big, size, patient_id="STOW^BIG")
    other = tmp_path / "other.dcm"  # 40 MiB of another study: streamed too, then refused 0xA900
    write_large_instance(other, 40 * MiB, patient_id="STOW^OTHER")
    small_other = tmp_path / "small.dcm"  # under STREAM_MIN: the in-memory path, refused 0xA900 as well
    write_large_instance(small_other, 2 * MiB, patient_id="STOW^SMALL")
    junk = os.urandom(20 * MiB)  # 20 MiB that are not DICOM: 0xC000, read past, never held
    eng = WebEngine(medrelay_proc, tmp_path, url)
    idle = eng.rss()["VmRSS"]
    t0 = time.monotonic()
    r = _post(eng.stow_url(uids["StudyInstanceUID"]), [big, other, small_other, junk])
    took = time.monotonic() - t0
    assert r.status_code == 202, r.text[:500]
    res = r.json()
    assert _stored_uids(res) == [uids["SOPInstanceUID"]]
    assert _reasons(res) == [0xA900, 0xA900, 0xC000]
    ref = res["00081199"]["Value"][0]["00081190"]["Value"][0]
    assert ref.endswith(f"/studies/{uids['StudyInstanceUID']}/series/{uids['SeriesInstanceUID']}"
                        f"/instances/{uids['SOPInstanceUID']}")
    rss = eng.rss()
    print(f"STOW of {(big.stat().st_size + 62 * MiB) / MiB:.0f} MiB in {took:.1f}s, peak RSS "
          f"{rss['VmHWM'] / MiB:.0f} MiB (idle {idle / MiB:.0f})")
    assert rss["VmHWM"] < si.RSS_LIMIT, f"peak RSS {rss['VmHWM'] / MiB:.0f} MiB (idle {idle / MiB:.0f})"
    store = eng.store()
    _mid, blob_id, meta_end = si._stored(store, uids["SOPInstanceUID"])
    digest, n = si._blob_data_set_digest(store, blob_id, meta_end)
    assert digest == si._file_data_set_digest(big)
    assert n - meta_end == big.stat().st_size - data_set_offset(big)
    assert [p.name for p in eng.blob_files()] == [blob_id], "refused parts leave no blob (nor a .part file)"
    assert si._messages(store) == 1
    with store.engine.connect() as conn:
        a = schema.audit_events
        outcomes = conn.execute(select(a.c.outcome, func.count()).where(a.c.action == "message.receive")
                                .group_by(a.c.outcome)).all()
        assert dict(outcomes) == {"success": 1, "failure": 3}  # each refused part audited (issue-13-leftovers-3)
    # the same instance again: stored (a duplicate, as C-STORE), no second message, its blob removed
    r = _post(eng.stow_url(), [big])
    assert r.status_code == 200, r.text[:500]
    assert _stored_uids(r.json()) == [uids["SOPInstanceUID"]]
    assert si._messages(store) == 1
    assert [p.name for p in eng.blob_files()] == [blob_id]
    assert eng.rss()["VmHWM"] < si.RSS_LIMIT
    store.dispose()


def test_stow_body_cut_mid_part_commits_nothing_and_leaves_no_file(medrelay_proc, tmp_path):
    big = tmp_path / "big.dcm"
    write_large_instance(big, 200 * MiB, patient_id="STOW^CUT")
    eng = WebEngine(medrelay_proc, tmp_path)
    total = big.stat().st_size
    head = (f"POST /dicom-web/studies HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {TOKEN}\r\n"
            f"Content-Type: {CTYPE}\r\nContent-Length: {total + 200}\r\n\r\n"
            f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n").encode()
    with socket.create_connection(("127.0.0.1", eng.port), timeout=30) as s, open(big, "rb") as f:
        s.sendall(head)
        sent = 0
        while sent < 80 * MiB:  # well past STREAM_MIN: the part is streaming to a .part file
            piece = f.read(MiB)
            s.sendall(piece)
            sent += len(piece)
        deadline = time.monotonic() + 60
        while not [p for p in eng.blob_files() if p.name.endswith(".part")]:
            assert time.monotonic() < deadline, "the part was not streamed to a file"
            time.sleep(0.1)
    deadline = time.monotonic() + 60  # the connection closed mid-part: the file goes, nothing is committed
    while eng.blob_files():
        assert time.monotonic() < deadline, f"left behind: {eng.blob_files()}"
        time.sleep(0.2)
    store = eng.store()
    assert si._messages(store) == 0
    # the listener still serves: a small instance goes in
    small = tmp_path / "small.dcm"
    uids = write_large_instance(small, 1 * MiB, patient_id="STOW^AFTER")
    r = _post(eng.stow_url(), [small])
    assert r.status_code == 200, r.text[:300]
    assert _stored_uids(r.json()) == [uids["SOPInstanceUID"]]
    assert si._messages(store) == 1
    # a declared body over max_stream_bytes (16 GiB): 413 before any byte of it is read
    with socket.create_connection(("127.0.0.1", eng.port), timeout=30) as s:
        s.sendall(head.replace(f"Content-Length: {total + 200}".encode(), f"Content-Length: {(16 << 30) + 1}".encode()))
        assert s.recv(4096).startswith(b"HTTP/1.1 413 ")
    store.dispose()


def test_large_stow_part_streamed_into_an_s3_bucket(medrelay_proc, tmp_path, s3):  # noqa: F811
    """Blobs on S3 (moto's S3 server): a streamed part goes up as a multipart upload of a ``.part``
    object renamed to its address; a refused streamed part leaves no object."""
    endpoint, client = s3
    big = tmp_path / "big.dcm"
    uids = write_large_instance(big, 120 * MiB, patient_id="STOW^S3")
    other = tmp_path / "other.dcm"
    write_large_instance(other, 30 * MiB, patient_id="STOW^S3OTHER")
    store = (f'{{url: "sqlite:///{tmp_path}/data/medrelay.db", blobs: "s3://{BUCKET}/stowlarge", s3: {{endpoint: '
             f'"{endpoint}", region: us-east-1, access_key_id: "${{S3_KEY}}", secret_access_key: "${{S3_SECRET}}", '
             "allow_http: true}}")
    eng = WebEngine(medrelay_proc, tmp_path, store=store,
                    env={"S3_KEY": CREDS["AWS_ACCESS_KEY_ID"], "S3_SECRET": CREDS["AWS_SECRET_ACCESS_KEY"]})
    r = _post(eng.stow_url(uids["StudyInstanceUID"]), [big, other])
    assert r.status_code == 202, r.text[:500]
    assert _stored_uids(r.json()) == [uids["SOPInstanceUID"]] and _reasons(r.json()) == [0xA900]
    assert eng.rss()["VmHWM"] < si.RSS_LIMIT
    st = Store(eng.url, _files(endpoint, "stowlarge"), KeyRing(eng.data / "keys.json"))
    _mid, blob_id, meta_end = si._stored(st, uids["SOPInstanceUID"])
    assert si._blob_data_set_digest(st, blob_id, meta_end)[0] == si._file_data_set_digest(big)
    assert list(_objects(client, "stowlarge/")) == [blob_id], "one object under its address, no .part left"
    st.files.delete(blob_id)
    st.dispose()


def test_disk_failing_mid_part_is_that_instances_failure_and_the_rest_is_stored(engine_factory, tmp_path):
    """The blob folder fails (ENOSPC) after 24 MiB of a streamed part (an in-process engine, its
    folder's ``open_stream`` wrapped): that instance is in FailedSOPSequence with 0xA700, nothing
    of it is committed or left on disk, the small part after it is stored (202); once the disk is
    back the same instance is stored."""
    e = engine_factory("""
store: {url: "sqlite:///data/medrelay.db", blobs: data/blobs}
keys: {kek_file: data/keys.json}
channels:
  web:
    source: {type: dicomweb, host: 127.0.0.1, port: 0, auth: {bearer_tokens: ["${DW_TOKEN}"]}}
""", env={"DW_TOKEN": TOKEN})
    url = f"http://127.0.0.1:{e.address('web')[1]}/dicom-web/studies"
    restore_disk = disk_fills_after(e.store.files, 24 * MiB)
    big, small = tmp_path / "big.dcm", tmp_path / "small.dcm"
    write_large_instance(big, 64 * MiB, patient_id="STOW^FULL")
    small_uids = write_large_instance(small, 2 * MiB, patient_id="STOW^FULLSMALL")
    r = _post(url, [big, small])
    assert r.status_code == 202, r.text[:500]
    assert _reasons(r.json()) == [0xA700] and _stored_uids(r.json()) == [small_uids["SOPInstanceUID"]]
    assert si._messages(e.store) == 1
    blobs = [p for p in (e.data_dir / "data" / "blobs").rglob("*") if p.is_file()]
    assert len(blobs) == 1 and not blobs[0].name.endswith(".part"), blobs  # the small part's blob only
    restore_disk()
    r = _post(url, [big])
    assert r.status_code == 200, r.text[:500]
    assert si._messages(e.store) == 2
