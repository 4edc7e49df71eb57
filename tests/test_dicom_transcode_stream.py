"""A large encapsulated instance converted to an uncompressed syntax frame by frame (issue 13 item 3):
C-GET, C-MOVE, a C-STORE route with ``transfer_syntax:`` and WADO-RS with
``transfer-syntax=1.2.840.10008.1.2.1`` decode one frame at a time as the blob's chunks are read
(transforms/dicom_transcode_stream.py), never the whole instance in memory.

The unit tests run the converter in process on instances built here (RLE frames from pydicom's
encoder, with a Basic Offset Table, an Extended Offset Table or none; pydicom's own JPEG
test files) and compare its output with the whole-instance conversion (dicom_codec.convert),
byte for byte. The engine test stores a multi-frame RLE instance (MEDRELAY_TEST_TRANSCODE_MB of
native pixel data, default 400 MiB; about half that encapsulated) with DCMTK storescu in a first
`medrelay run` process; a second process serves it to getscu and movescu (a storescp taking only
uncompressed syntaxes), to a route set to Explicit VR Little Endian and to httpx streaming
WADO-RS. Its VmHWM (peak RSS, /proc) must stay under 300 MB and well below the native size, and
every frame received must equal pydicom's decoding of the original's frame.
"""

from __future__ import annotations

import io
import mmap
import os
import re
import struct
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from dicom_peers import StoreSCP, data_file, free_port, run, storescu
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filereader import read_dataset
from pydicom.pixels import get_encoder, pixel_array
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian, RLELossless, generate_uid
from test_dicom_stream_out import _storescp_on, _yaml, deliveries

from engine.security.crypto import KeyRing
from engine.store.db import Store

CT = "1.2.840.10008.5.1.4.1.1.2"
TOKEN = "transcode-stream-token-0123456789"
LIMIT = 300 * 1024 * 1024
ROWS = COLS = 512
DISTINCT = 8  # distinct frames; frame i is DISTINCT frame pattern(i), so a reordering shows


def pattern(i: int) -> int:
    return (i * 3) % DISTINCT


def distinct_frames(rows: int = ROWS, cols: int = COLS) -> list[np.ndarray]:
    """16-bit frames of random values in runs of 4 pixels: RLE halves them."""
    rng = np.random.default_rng(13)
    return [np.repeat(rng.integers(0, 65535, (rows, cols // 4), dtype=np.uint16), 4, axis=1)
            for _ in range(DISTINCT)]


def _rle(arr: np.ndarray) -> bytes:
    rows, cols = arr.shape
    return get_encoder(RLELossless).encode(arr, rows=rows, columns=cols, samples_per_pixel=1, bits_allocated=16,
                                           bits_stored=16, pixel_representation=0,
                                           photometric_interpretation="MONOCHROME2", number_of_frames=1)


def _item(data: bytes) -> bytes:
    return struct.pack("<HHI", 0xFFFE, 0xE000, len(data)) + data


def make_rle(path: Path, frames: int, *, table: str = "bot", split: bool = False, trailer: bool = False,
             rows: int = ROWS, cols: int = COLS) -> Dataset:
    """A multi-frame RLE Lossless CT of ``frames`` frames written to ``path`` piece by piece: the
    header by pydicom, the encapsulated Pixel Data appended (``table``: bot, eot or none;
    ``split``: each frame in two fragments; ``trailer``: Data Set Trailing Padding after it)."""
    encoded = [_rle(a) for a in distinct_frames(rows, cols)]
    fragments = [[e[:len(e) // 2 // 2 * 2], e[len(e) // 2 // 2 * 2:]] if split else [e] for e in encoded]
    sizes = [sum(8 + len(f) for f in frs) for frs in fragments]
    offsets = [0]
    for i in range(frames - 1):
        offsets.append(offsets[-1] + sizes[pattern(i)])
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = RLELossless
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = CT
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.update({"PatientID": "RLE1", "PatientName": "Multi^Frame", "Modality": "CT", "Rows": rows,
               "Columns": cols, "BitsAllocated": 16, "BitsStored": 16, "HighBit": 15, "PixelRepresentation": 0,
               "SamplesPerPixel": 1, "PhotometricInterpretation": "MONOCHROME2", "NumberOfFrames": frames})
    if table == "eot":
        ds.ExtendedOffsetTable = struct.pack(f"<{frames}Q", *offsets)
        ds.ExtendedOffsetTableLengths = struct.pack(f"<{frames}Q", *(len(encoded[pattern(i)])
                                                                    for i in range(frames)))
    ds.save_as(path, enforce_file_format=True)
    bot = struct.pack(f"<{frames}I", *offsets) if table == "bot" else b""
    with open(path, "ab") as f:
        f.write(struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OB", 0, 0xFFFFFFFF) + _item(bot))
        for i in range(frames):
            f.write(b"".join(_item(x) for x in fragments[pattern(i)]))
        f.write(struct.pack("<HHI", 0xFFFE, 0xE0DD, 0))
        if trailer:
            f.write(struct.pack("<HH2sHI", 0xFFFC, 0xFFFC, b"OB", 0, 4) + b"\x00" * 4)
    return ds


def decoded_distinct(src: Path) -> list[np.ndarray]:
    """pydicom's decoding of the original's frames, by distinct frame (frame i is pattern(i))."""
    out: list[np.ndarray] = [np.empty(0)] * DISTINCT
    for i in range(DISTINCT):
        out[pattern(i)] = pixel_array(src, index=i)
    return out


def _split(path: Path) -> tuple[str, bytes]:
    from transforms.dicom_transcode import split

    return split(path.read_bytes())


def _opener(data: bytes, piece: int = 65536):
    return lambda: iter([data[i:i + piece] for i in range(0, len(data), piece)])


# -- the converter in process ----------------------------------------------------------------------

@pytest.mark.parametrize("table,split,trailer", [("bot", False, False), ("eot", False, True), ("none", False, False),
                                                 ("bot", True, True)])
@pytest.mark.parametrize("target", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
def test_frames_stream_to_what_the_whole_conversion_gives(tmp_path, table, split, trailer, target):
    from transforms import dicom_codec as codec
    from transforms import dicom_transcode_stream as ts_stream

    src = tmp_path / "rle.dcm"
    make_rle(src, 11, table=table, split=split, trailer=trailer, rows=64, cols=64)
    stored, data = _split(src)
    plan = ts_stream.plan(_opener(data, 1000), stored, target)
    assert plan is not None and plan.frames == 11
    pieces = list(plan.open())
    assert max(len(p) for p in pieces) <= 64 * 64 * 2 + 4096  # a frame at a time (and the header)
    out = b"".join(pieces)
    assert b"".join(plan.open()) == out  # open() again: a retry gets the same
    whole = codec.convert(data, stored, target)
    got = read_dataset(io.BytesIO(out), UID(target).is_implicit_VR, True)
    assert "ExtendedOffsetTable" not in got and "ExtendedOffsetTableLengths" not in got
    assert out == whole
    want = decoded_distinct(src)
    for i in range(11):
        assert got.PixelData[i * 8192:(i + 1) * 8192] == want[pattern(i)].tobytes()


@pytest.mark.parametrize("name", ["color3d_jpeg_baseline.dcm", "emri_small_jpeg_2k_lossless.dcm",
                                  "emri_small_jpeg_ls_lossless.dcm", "SC_rgb_rle_2frame.dcm", "CT_small.dcm"])
def test_pydicom_test_files_stream_byte_identical_to_the_whole_conversion(name):
    """Colour JPEG (YBR_FULL_422 decoded to RGB: the header says so, each frame decoded as stored),
    JPEG 2000, JPEG-LS, RGB RLE, and native explicit -> implicit VR."""
    from transforms import dicom_codec as codec
    from transforms import dicom_transcode_stream as ts_stream

    stored, data = _split(data_file(name))
    for target in codec.UNCOMPRESSED:
        if target == stored:
            continue
        plan = ts_stream.plan(_opener(data, 4096), stored, target)
        assert plan is not None
        assert b"".join(plan.open()) == codec.convert(data, stored, target), (name, target)


def test_fragments_that_are_not_frames_fall_back_to_the_capped_whole_conversion(tmp_path, monkeypatch):
    from transforms import dicom_codec as codec
    from transforms import dicom_transcode_stream as ts_stream

    src = tmp_path / "split.dcm"
    make_rle(src, 5, table="none", split=True, rows=64, cols=64)  # 10 fragments, 5 frames, no table
    stored, data = _split(src)
    assert ts_stream.plan(_opener(data), stored, ExplicitVRLittleEndian) is None
    assert ts_stream.joined(_opener(data)) == data  # under the cap: converted whole
    monkeypatch.setattr(codec, "MAX_WHOLE_BYTES", len(data) - 1)
    with pytest.raises(codec.TranscodeError, match="larger than"):
        ts_stream.joined(_opener(data))


# -- the engine: `medrelay run`, DCMTK and httpx peers ---------------------------------------------

def _status(pid: int, key: str) -> int:
    return int(re.search(rf"^{key}:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text(), re.M)[1]) * 1024


def check_native(path: Path, frames: int, want: list[np.ndarray], start: int = 0, end: int | None = None) -> str:
    """The Part-10 bytes at ``path[start:end]`` hold ``frames`` native frames, frame i equal to
    ``want[pattern(i)]``, read frame by frame; returns the transfer syntax."""
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        end = len(m) if end is None else end
        assert m[start + 128:start + 132] == b"DICM"
        meta_end = start + 144 + int.from_bytes(m[start + 140:start + 144], "little")
        meta = read_dataset(io.BytesIO(m[start + 132:meta_end]), False, True)
        ts = UID(meta.TransferSyntaxUID)
        assert ts in (ExplicitVRLittleEndian, ImplicitVRLittleEndian), ts
        at = m.find(b"\xe0\x7f\x10\x00", meta_end, meta_end + (1 << 20))
        assert at > 0
        head = read_dataset(io.BytesIO(m[meta_end:at]), ts.is_implicit_VR, True)
        assert head.PhotometricInterpretation == "MONOCHROME2" and int(head.NumberOfFrames) == frames
        size = ROWS * COLS * 2
        if ts.is_implicit_VR:
            length, pos = struct.unpack_from("<I", m, at + 4)[0], at + 8
        else:
            assert m[at + 4:at + 6] == b"OW"
            length, pos = struct.unpack_from("<I", m, at + 8)[0], at + 12
        assert length == frames * size and pos + length == end, (length, pos, end)
        for i in range(frames):
            assert m[pos + i * size:pos + (i + 1) * size] == want[pattern(i)].tobytes(), f"frame {i}"
    return str(ts)


@pytest.mark.dcmtk
@pytest.mark.slow
def test_large_rle_instance_converted_frame_by_frame_under_300_mb(medrelay_proc, tmp_path):
    dport, wport, route_port = free_port(), free_port(), free_port()
    moved = StoreSCP(tmp_path / "moved")  # DCMTK storescp: uncompressed syntaxes only
    yaml = _yaml(dport, moved.port, route_port).replace(  # the route converts: transfer_syntax set
        "called_ae_title: STORESCP}", f"called_ae_title: STORESCP, transfer_syntax: {ExplicitVRLittleEndian}}}")
    yaml += f"""  web:
    source: {{type: dicomweb, host: 127.0.0.1, port: {wport}, base_path: /dicom-web,
             auth: {{bearer_tokens: ["${{DW_TOKEN}}"]}}}}
    routes: []
"""
    proc = medrelay_proc(yaml, env={"DW_TOKEN": TOKEN})
    native_mb = int(os.environ.get("MEDRELAY_TEST_TRANSCODE_MB", "400"))
    frames = native_mb * 1024 * 1024 // (ROWS * COLS * 2)
    src = tmp_path / "rle.dcm"
    ds = make_rle(src, frames)
    native = frames * ROWS * COLS * 2
    want = decoded_distinct(src)
    assert all((w == a).all() for w, a in zip(want, distinct_frames(), strict=True))
    proc.start()  # a first process stores it (RLE proposed); the route's peer is not up: its delivery waits
    try:
        proc.wait_port(dport, 60)
        r = storescu(dport, [src], extra=("-xr",))
        assert "Success" in r.stdout, r.stdout[-2000:]
    finally:
        assert proc.terminate(60) == 0
    routed = tmp_path / "routed"
    routed.mkdir()
    route_scp = _storescp_on(route_port, routed)
    proc.start()
    try:
        proc.wait_port(dport, 60)
        proc.wait_port(wport, 60)
        pid = proc.proc.pid
        t0 = time.monotonic()
        got = tmp_path / "got"
        got.mkdir()
        g = run("getscu", "-v", "-S", "+B", "+xe", "-aet", "GETSCU", "-aec", "MEDRELAY", "-od", str(got),
                "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={ds.StudyInstanceUID}",
                "127.0.0.1", str(dport), timeout=600)
        assert g.returncode == 0 and re.search(r"Completed Suboperations\s*:\s*1\b", g.stdout), g.stdout[-3000:]
        (got_file,) = list(got.iterdir())
        assert check_native(got_file, frames, want) == ExplicitVRLittleEndian
        assert dcmread(got_file, stop_before_pixels=True).SOPInstanceUID == ds.SOPInstanceUID
        got_file.unlink()

        mv = run("movescu", "-v", "-S", "-aet", "TESTSCU", "-aec", "MEDRELAY", "-aem", "STORESCP",
                 "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={ds.StudyInstanceUID}",
                 "127.0.0.1", str(dport), timeout=600)
        assert "Final Move Response (Success)" in mv.stdout, mv.stdout[-3000:]
        (moved_file,) = moved.files()
        check_native(moved_file, frames, want)
        moved_file.unlink()

        body = tmp_path / "body"
        url = (f"http://127.0.0.1:{wport}/dicom-web/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}"
               f"/instances/{ds.SOPInstanceUID}")
        accept = f'multipart/related; type="application/dicom"; transfer-syntax={ExplicitVRLittleEndian}'
        with httpx.stream("GET", url, headers={"Authorization": f"Bearer {TOKEN}", "Accept": accept},
                          timeout=300) as r, open(body, "wb") as f:
            assert r.status_code == 200, r.read()[:300]
            for piece in r.iter_bytes(1 << 20):
                f.write(piece)
            ctype = r.headers["content-type"]
        boundary = ctype.split("boundary=")[1].split(";")[0].strip().strip('"')
        head = body.read_bytes()[:4096]
        part_end = head.index(b"\r\n\r\n") + 4
        assert f"transfer-syntax={ExplicitVRLittleEndian}".encode() in head[:part_end]
        tail = f"\r\n--{boundary}--\r\n".encode()
        assert check_native(body, frames, want, part_end, body.stat().st_size - len(tail)) == ExplicitVRLittleEndian
        body.unlink()

        db = Store(f"sqlite:///{proc.data_dir}/data/medrelay.db", proc.data_dir / "data" / "blobs",
                   KeyRing(proc.data_dir / "data" / "keys.json"))
        try:  # the route: delivered once storescp answered
            deadline = time.monotonic() + 600
            while time.monotonic() < deadline and [d[0] for d in deliveries(db, "fwd")] != ["done"]:
                time.sleep(0.5)
            assert [d[0] for d in deliveries(db, "fwd")] == ["done"], deliveries(db, "fwd")
        finally:
            db.dispose()
        (routed_file,) = list(routed.iterdir())
        assert check_native(routed_file, frames, want) == ExplicitVRLittleEndian
        peak, rss = _status(pid, "VmHWM"), _status(pid, "VmRSS")
        print(f"getscu, movescu, WADO-RS and the route: {frames} frames, {native >> 20} MiB native "
              f"({src.stat().st_size >> 20} MiB RLE) in {time.monotonic() - t0:.1f}s; engine peak RSS "
              f"{peak >> 20} MiB, {rss >> 20} MiB after")
        assert peak < LIMIT and peak < native // 2, f"peak RSS {peak >> 20} MiB"
    finally:
        proc.terminate(60)
        moved.stop()
        route_scp.stop()
