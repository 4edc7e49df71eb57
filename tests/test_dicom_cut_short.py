"""A data set cut short inside, but complete by its protocol, is refused on every intake path (issue 13).

The last PDV carries its last-fragment bit, the STOW-RS part is closed by its delimiter, the file
is whole on disk: yet the Pixel Data (or an item, a fragment, a sequence) declares more bytes than
the data set holds. The index reads only the header, so before this fix every path stored such an
instance with success. Now the structural walk (engine/store/dicom/walk.py) refuses it with 0xC000,
nothing is stored (no message row, no blob file), and a failed ``message.receive`` is audited.

Peers: pynetdicom sending the file's own bytes (our Upper Layer; an association that also proposes
Query/Retrieve goes to pynetdicom's), a streamed > 16 MiB instance, raw HTTP STOW-RS (small and
streamed parts), the file source, ``medrelay import``. The walk itself is checked against every
bundled pydicom test file (none refused but the three truncated ones) and fed in pieces of 1 byte.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.filereader import read_file_meta_info
from pydicom.sequence import Sequence
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    generate_uid,
)
from pynetdicom import AE
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind
from sqlalchemy import func, select

from engine.store import schema
from engine.store.dicom import index as idx
from engine.store.dicom import walk
from engine.store.dicom.scan import NestingTooDeep
from tests.conftest import wait_until
from tests.dicom_peers import _ROOTS, data_file
from tests.test_dicom_uid_conflicts import _yaml  # its channels: dcm, dcmr, drop (file), web (STOW-RS)

TOKEN = "cut-short-token-0123456789abcdef"
MB = 1 << 20


@pytest.fixture
def eng(engine_factory, store_url, tmp_path):
    data = tmp_path / "data"
    (data / "drop").mkdir(parents=True)
    e = engine_factory(_yaml(store_url, data), env={"DW_TOKEN": TOKEN})
    e.data, e.drop = data, data / "drop"
    return e


# -- cut-short files ----------------------------------------------------------------------------

def _new_uids(ds: Dataset) -> Dataset:
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    return ds


def _saved(ds: Dataset, out: Path, ts: str | None = None) -> Path:
    if ts is not None:
        ds.file_meta.TransferSyntaxUID = ts
    ds.save_as(out, enforce_file_format=True, implicit_vr=UID(ds.file_meta.TransferSyntaxUID).is_implicit_VR,
               little_endian=True)
    return out


def _cut(path: Path, n: int) -> Path:
    """The file without its last ``n`` bytes: every length in it unchanged."""
    data = path.read_bytes()
    out = path.with_name("cut-" + path.name)
    out.write_bytes(data[:-n])
    return out


def ct(tmp: Path, *, ts: str = ExplicitVRLittleEndian, pixels: bytes | None = None, rows: int = 0) -> Path:
    ds = _new_uids(dcmread(data_file("CT_small.dcm")))
    if pixels is not None:
        ds.Rows = ds.Columns = rows
        ds.PixelData = pixels
    return _saved(ds, tmp / f"ct-{ds.SOPInstanceUID}.dcm", ts)


def cut_in_pixels(tmp: Path) -> Path:
    return _cut(ct(tmp), 100)


def cut_in_pixels_implicit(tmp: Path) -> Path:
    return _cut(ct(tmp, ts=ImplicitVRLittleEndian), 3)


def cut_in_an_item(tmp: Path) -> Path:
    """The last element is an undefined-length sequence; the file ends inside its item."""
    ds = _new_uids(dcmread(data_file("CT_small.dcm")))
    del ds.PixelData
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = "1", "99X", "a long meaning " * 4
    ds.add_new(0x00400275, "SQ", Sequence([item]))  # Request Attributes Sequence: sorts last here
    for el in ds.iterall():
        if el.VR == "SQ":
            el.is_undefined_length = True
    for it in ds[0x00400275].value:
        it.is_undefined_length_sequence_item = True
    path = _saved(ds, tmp / f"item-{ds.SOPInstanceUID}.dcm")
    return _cut(path, 16 + 10)  # item and sequence delimiters, and 10 bytes of the Code Meaning


def cut_in_fragments(tmp: Path) -> Path:
    """JPEG 2000: the file ends inside the last encapsulated fragment."""
    ds = _new_uids(dcmread(data_file("emri_small_jpeg_2k_lossless.dcm")))
    return _cut(_saved(ds, tmp / f"j2k-{ds.SOPInstanceUID}.dcm"), 8 + 200)


def cut_deflated(tmp: Path) -> Path:
    """Deflated Explicit VR LE: the deflate stream ends inside the pixel data (walked inflated)."""
    return _cut(ct(tmp, ts=DeflatedExplicitVRLittleEndian), 50)


CASES = {"pixels": cut_in_pixels, "pixels_implicit": cut_in_pixels_implicit, "item": cut_in_an_item,
         "fragments": cut_in_fragments, "deflated": cut_deflated}


# -- peers --------------------------------------------------------------------------------------

def c_store(port: int, path: Path, *, qr: bool = False) -> int:
    """pynetdicom sending the file's encoded data set as it is on disk (its own bytes, no re-encoding);
    ``qr``: the association also proposes Query/Retrieve, so pynetdicom's Storage SCP serves it."""
    from pynetdicom import _config

    meta = read_file_meta_info(path)
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(str(meta.MediaStorageSOPClassUID), [str(meta.TransferSyntaxUID)])
    if qr:
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    assoc = ae.associate("127.0.0.1", port, ae_title="MEDRELAY")
    assert assoc.is_established
    old = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        status = assoc.send_c_store(path)
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = old
        assoc.release()
    return int(status.Status)


def stow(eng, path: Path) -> tuple[int, list[int]]:
    """A raw STOW-RS body of one part, closed properly: (HTTP status, the Failure Reasons)."""
    host, port = eng.address("web")
    boundary = "cutshortboundary"
    body = (f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + path.read_bytes()
            + f"\r\n--{boundary}--\r\n".encode())
    r = httpx.post(f"http://{host}:{port}/dicom-web/studies", content=body, timeout=120,
                   headers={"Authorization": f"Bearer {TOKEN}", "Accept": "application/dicom+json",
                            "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}'})
    failed = r.json().get("00081198", {}).get("Value", []) if r.content else []
    return r.status_code, [int(i["00081197"]["Value"][0]) for i in failed]


def messages(eng) -> int:
    with eng.store.engine.connect() as c:
        return int(c.execute(select(func.count()).select_from(schema.messages)).scalar_one())


def refusal_audits(eng) -> int:
    with eng.store.engine.connect() as c:
        return int(c.execute(select(func.count()).select_from(schema.audit_events).where(
            schema.audit_events.c.action == "message.receive", schema.audit_events.c.outcome == "failure",
            schema.audit_events.c.detail.like("refused: data set cut short%"))).scalar_one())


def blob_files(eng) -> list[Path]:
    return [p for p in (eng.data / "blobs").rglob("*") if p.is_file()]


def big_ct(tmp: Path) -> Path:
    """> 16 MiB: the streamed path (C-STORE and STOW-RS write it to its blob as it arrives)."""
    return ct(tmp, pixels=np.arange(9 * 1024 * 1024, dtype=np.uint16).tobytes(), rows=3072)


# -- tests --------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", sorted(CASES))
def test_cut_short_is_refused_by_c_store_and_stow(eng, tmp_path, case):
    """Our Upper Layer, pynetdicom's Storage SCP and STOW-RS answer 0xC000; nothing is stored;
    each refusal is audited. The whole file goes in afterwards (nothing was remembered of it)."""
    port = eng.address("dcm")[1]
    bad = CASES[case](tmp_path)
    blobs = len(blob_files(eng))
    assert c_store(port, bad) == 0xC000
    assert c_store(port, bad, qr=True) == 0xC000
    assert stow(eng, bad) == (409, [0xC000])
    assert messages(eng) == 0
    assert len(blob_files(eng)) == blobs
    wait_until(lambda: refusal_audits(eng) == 3, timeout=30)
    whole = bad.with_name(bad.name.removeprefix("cut-"))
    assert c_store(port, whole) == 0x0000
    assert messages(eng) == 1


def test_cut_short_large_instance_is_refused_streamed(eng, tmp_path):
    """A 18 MiB instance cut in its pixel data, by C-STORE and STOW-RS (both streamed to a blob as
    it arrives, the walk fed the same pieces), and a deflated one by C-STORE: 0xC000, its file
    removed, nothing stored."""
    port = eng.address("dcm")[1]
    whole = big_ct(tmp_path)
    bad = _cut(whole, 5000)
    assert c_store(port, bad) == 0xC000
    assert stow(eng, bad) == (409, [0xC000])
    assert messages(eng) == 0
    assert blob_files(eng) == []
    wait_until(lambda: refusal_audits(eng) == 2, timeout=30)
    assert c_store(port, whole) == 0x0000
    assert messages(eng) == 1
    # deflated: the walk inflates the pieces as they go to the blob (random pixels: 18 MiB deflated)
    noise = np.random.default_rng(7).integers(0, 1 << 16, 9 * 1024 * 1024, dtype=np.uint16).tobytes()
    deflated = _cut(ct(tmp_path, ts=DeflatedExplicitVRLittleEndian, pixels=noise, rows=3072), 5000)
    assert deflated.stat().st_size > 17 * MB
    assert c_store(port, deflated) == 0xC000
    assert messages(eng) == 1
    assert len(blob_files(eng)) == 1
    wait_until(lambda: refusal_audits(eng) == 3, timeout=30)


def test_cut_short_file_source_and_import(eng, tmp_path):
    """The file source moves a cut-short file to error/, ``medrelay import`` reports it rejected
    with 0xC000; the whole files of the same folder go in."""
    bad = cut_in_pixels(tmp_path)
    os.replace(bad, eng.drop / "cut.dcm")
    wait_until(lambda: (eng.drop / "error" / "cut.dcm").exists(), timeout=60)
    folder = tmp_path / "import"
    folder.mkdir()
    os.replace(cut_in_fragments(tmp_path), folder / "cut.dcm")
    os.replace(ct(tmp_path), folder / "whole.dcm")
    r = subprocess.run([sys.executable, "-m", "engine.cli", "import", "-c", str(eng.config_path), "--channel", "dcm",
                        "--port", str(eng.address("dcm")[1]), "--calling-aet", "TESTSCU", str(folder)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1, r.stdout + r.stderr
    assert f"rejected: {folder / 'cut.dcm'}: status 0xC000" in r.stdout, r.stdout
    assert "1 accepted, 1 rejected" in r.stdout
    assert messages(eng) == 1
    wait_until(lambda: refusal_audits(eng) == 2, timeout=30)


# -- the walk itself ----------------------------------------------------------------------------

def _walk_pieces(data: bytes, ts: UID, size: int) -> None:
    w = walk.walker(bool(ts.is_deflated), bool(ts.is_implicit_VR))
    for i in range(0, len(data), size):
        w.feed(memoryview(data)[i:i + size])
    w.close()


def test_walk_takes_every_bundled_file_but_the_truncated_ones():
    """Every pydicom test file in a Little Endian (or deflated) syntax that pydicom reads whole is
    walked without a refusal, whole and in pieces of 1, 7 and 4096 bytes; the three files pydicom
    ships truncated are refused in every piece size."""
    refused, walked = set(), 0
    for f in sorted(p for root in _ROOTS for p in root.rglob("*.dcm")):
        try:
            ts_uid, body = idx.split_part10(Path(f).read_bytes())
        except Exception:
            continue  # no file meta of the kind medrelay writes
        ts = UID(ts_uid)
        if not (ts.is_little_endian or ts.is_deflated):
            continue
        walked += 1
        outcomes = set()
        for size in (len(body) or 1, 7, 4096) + ((1,) if len(body) < 200_000 else ()):
            try:
                _walk_pieces(body, ts, size)
                outcomes.add("ok")
            except (walk.Malformed, NestingTooDeep):
                outcomes.add("refused")
        assert len(outcomes) == 1, (f, outcomes)  # the piece size never changes the verdict
        if outcomes == {"refused"}:
            refused.add(Path(f).name)
    assert walked > 80
    assert refused == {"rtplan_truncated.dcm", "MR_truncated.dcm", "emri_small_jpeg_2k_lossless_too_short.dcm"}


@pytest.mark.parametrize("case", sorted(CASES))
def test_walk_refuses_each_cut_and_the_whole_file_passes(tmp_path, case):
    bad = CASES[case](tmp_path)
    whole = bad.with_name(bad.name.removeprefix("cut-"))
    for path, ok in ((whole, True), (bad, False)):
        ts_uid, body = idx.split_part10(path.read_bytes())
        for size in (len(body), 1, 5, 16384):
            if ok:
                _walk_pieces(body, UID(ts_uid), size)
            else:
                with pytest.raises(walk.Malformed):
                    _walk_pieces(body, UID(ts_uid), size)


def test_walk_takes_trailing_zero_padding_not_a_cut_header(tmp_path):
    """A few zero bytes after the last element (padding some writers add; pydicom reads past them)
    pass; the same number of bytes of a real element header do not."""
    _, body = idx.split_part10(ct(tmp_path).read_bytes())
    for size in (len(body) + 3, 1, 7):
        _walk_pieces(body + b"\0\0\0", UID(ExplicitVRLittleEndian), size)
        with pytest.raises(walk.Malformed):
            _walk_pieces(body + b"\x08\x00\x20", UID(ExplicitVRLittleEndian), size)
