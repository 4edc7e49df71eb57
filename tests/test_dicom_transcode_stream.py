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
import itertools
import mmap
import os
import re
import struct
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from big_dicom import ct_header, store_with_a_first_process
from dicom_peers import StoreSCP, data_file, free_port, run, storescu
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filereader import read_dataset
from pydicom.pixels import get_encoder, pixel_array
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian, RLELossless, generate_uid
from test_dicom_stream_out import _storescp_on, _yaml, deliveries

from engine.security.crypto import KeyRing
from engine.store.db import Store

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
    ds = ct_header(RLELossless, frames, rows, cols, "RLE1")
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


def getscu_uncompressed(port: int, study: str, out: Path) -> Path:
    """DCMTK getscu proposing only uncompressed syntaxes (+xe) retrieves the study's one instance."""
    out.mkdir()
    g = run("getscu", "-v", "-S", "+B", "+xe", "-aet", "GETSCU", "-aec", "MEDRELAY", "-od", str(out),
            "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study}", "127.0.0.1", str(port), timeout=600)
    assert g.returncode == 0 and re.search(r"Completed Suboperations\s*:\s*1\b", g.stdout), g.stdout[-3000:]
    (got,) = list(out.iterdir())
    return got


def wait_delivered(proc, seconds: float = 600) -> None:
    """The engine's route ``fwd`` delivered its one instance (its store read beside the running engine)."""
    db = Store(f"sqlite:///{proc.data_dir}/data/medrelay.db", proc.data_dir / "data" / "blobs",
               KeyRing(proc.data_dir / "data" / "keys.json"))
    try:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and [d[0] for d in deliveries(db, "fwd")] != ["done"]:
            time.sleep(0.5)
        assert [d[0] for d in deliveries(db, "fwd")] == ["done"], deliveries(db, "fwd")
    finally:
        db.dispose()


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
        got_file = getscu_uncompressed(dport, ds.StudyInstanceUID, tmp_path / "got")
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

        # byte ranges of the decoded Pixel Data (PS3.18 8.3.5.2): 206 of only those bytes, decoded frame
        # by frame from the blob (before: the whole instance joined and decoded, 406 past 512 MiB)
        size = ROWS * COLS * 2
        bulk = f"{url}/bulkdata/7FE00010"
        octets = {"Authorization": f"Bearer {TOKEN}", "Accept": "application/octet-stream"}
        n = frames // 2
        both = want[pattern(n)].tobytes() + want[pattern(n + 1)].tobytes()
        end_of_last = want[pattern(frames - 1)].tobytes()[-10:]
        for spec, first, last, value in [(f"bytes={n * size + 1000}-{(n + 1) * size + 500}", n * size + 1000,
                                          (n + 1) * size + 500, both[1000:size + 501]),
                                         ("bytes=-10", native - 10, native - 1, end_of_last)]:
            r = httpx.get(bulk, headers={**octets, "Range": spec}, timeout=300)
            assert r.status_code == 206, (spec, r.status_code, r.text[:300])
            assert r.headers["content-range"] == f"bytes {first}-{last}/{native}"
            assert r.content == value, spec
        r = httpx.get(bulk, headers={**octets, "Range": f"bytes={native}-"}, timeout=300)
        assert r.status_code == 416 and r.headers["content-range"] == f"bytes */{native}"

        wait_delivered(proc)  # the route: delivered once storescp answered
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


# -- issue 13 leftovers: native -> encapsulated frame by frame; JPEG frames found by markers ------------

ENCAPSULATED = ["1.2.840.10008.1.2.5", "1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.80"]  # RLE, J2K lossless, JLS


def make_native(path: Path, frames: int, *, rows: int = ROWS, cols: int = COLS, implicit: bool = False) -> Dataset:
    """A multi-frame native 16-bit CT written piece by piece (the header by pydicom, then the Pixel
    Data value a frame at a time, frame i = distinct_frames()[pattern(i)]), never whole in memory."""
    distinct = distinct_frames(rows, cols)
    ds = ct_header(ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian, frames, rows, cols, "NAT1")
    ds.save_as(path, implicit_vr=implicit, little_endian=True, enforce_file_format=True)
    length = frames * rows * cols * 2
    with open(path, "ab") as f:
        f.write(struct.pack("<HHI", 0x7FE0, 0x0010, length) if implicit else
                struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OW", 0, length))
        for i in range(frames):
            f.write(distinct[pattern(i)].tobytes())
    return ds


def _without_bot(ds: Dataset, frames: int) -> list[bytes]:
    from pydicom.encaps import generate_frames

    return list(generate_frames(ds.PixelData, number_of_frames=frames))


def _read(raw: bytes, ts: str) -> Dataset:
    ds = read_dataset(io.BytesIO(raw), UID(ts).is_implicit_VR, True)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = UID(ts)
    return ds


def _part10(path: Path, ds_head: Dataset, ts: str, body: bytes) -> Path:
    from listeners.dicom_store import file_meta

    path.write_bytes(file_meta(str(ds_head.SOPClassUID), str(ds_head.SOPInstanceUID), ts) + body)
    return path


@pytest.mark.parametrize("target", ENCAPSULATED)
@pytest.mark.parametrize("source", ["explicit", "implicit", "SC_rgb_2frame.dcm", "CT_small.dcm"])
def test_native_encoded_frame_by_frame_as_the_whole_conversion_encodes(tmp_path, source, target):
    """Native -> RLE / JPEG 2000 lossless / JPEG-LS lossless: an undefined-length Pixel Data with an
    empty Basic Offset Table and one fragment per frame; each fragment is byte-identical to the
    whole conversion's (pydicom's encoder, same options), the header identical, and the pixels
    decode to the original's byte for byte."""
    from transforms import dicom_codec as codec
    from transforms import dicom_transcode_stream as ts_stream

    if source in ("explicit", "implicit"):
        src = tmp_path / "native.dcm"
        make_native(src, 11, rows=64, cols=64, implicit=source == "implicit")
    else:
        src = data_file(source)
    stored, data = _split(src)
    plan = ts_stream.plan(_opener(data, 1000), stored, target)
    assert plan is not None and plan.encapsulated
    pieces = list(plan.open())
    assert max(len(p) for p in pieces) <= plan.frame_length + 4096  # a frame at a time (and the header)
    out = b"".join(pieces)
    assert b"".join(plan.open()) == out
    got, whole = _read(out, target), _read(codec.convert(data, stored, target), target)
    assert got["PixelData"].is_undefined_length
    assert out[out.index(b"\xe0\x7f\x10\x00OB\x00\x00\xff\xff\xff\xff") + 12:][:8] == \
        struct.pack("<HHI", 0xFFFE, 0xE000, 0)  # an empty Basic Offset Table
    assert [e for e in got if e.tag != 0x7FE00010] == [e for e in whole if e.tag != 0x7FE00010]
    assert got.SOPInstanceUID == dcmread(src, stop_before_pixels=True).SOPInstanceUID  # lossless: the same image
    assert _without_bot(got, plan.frames) == _without_bot(whole, plan.frames)
    original = dcmread(src)
    assert got.pixel_array.tobytes() == original.pixel_array.tobytes()

    part10 = _part10(tmp_path / "out.dcm", got, target, out)  # DCMTK reads it
    d = run("dcmdump", "+E", "-q", str(part10))
    assert d.returncode == 0 and "PixelSequence" in d.stdout, d.stdout[-800:]
    tool = {"1.2.840.10008.1.2.5": "dcmdrle", "1.2.840.10008.1.2.4.80": "dcmdjpls"}.get(target)
    if tool:  # DCMTK decodes RLE and JPEG-LS (not JPEG 2000): its pixels are the original's
        plain = tmp_path / "plain.dcm"
        r = run(tool, str(part10), str(plain))
        assert r.returncode == 0, r.stdout
        assert dcmread(plain).PixelData == original.pixel_array.astype("<" + original.pixel_array.dtype.str[1:]) \
            .tobytes()


def test_native_to_lossy_jpeg_2000_frame_by_frame_marks_it_and_gives_a_new_uid(tmp_path):
    from transforms import dicom_codec as codec
    from transforms import dicom_transcode_stream as ts_stream

    src = tmp_path / "native.dcm"
    make_native(src, 4, rows=64, cols=64)
    stored, data = _split(src)
    target = "1.2.840.10008.1.2.4.91"
    with pytest.raises(codec.TranscodeError, match="lossy"):
        ts_stream.plan(_opener(data), stored, target)
    plan = ts_stream.plan(_opener(data), stored, target, lossy=codec.Lossy(10))
    assert plan is not None
    got = _read(b"".join(plan.open()), target)
    whole = _read(codec.convert(data, stored, target, lossy=codec.Lossy(10)), target)
    assert got.SOPInstanceUID == plan.sop_instance_uid != dcmread(src, stop_before_pixels=True).SOPInstanceUID
    assert b"".join(plan.open()).count(plan.sop_instance_uid.encode()) == 1  # the same UID on every open
    assert (got.LossyImageCompression, list(got.LossyImageCompressionMethod), got.LossyImageCompressionRatio) == \
        (whole.LossyImageCompression, list(whole.LossyImageCompressionMethod), whole.LossyImageCompressionRatio)
    assert _without_bot(got, 4) == _without_bot(whole, 4)


def make_jpeg_fragmented(path: Path, repeat: int = 1, pieces: int = 3) -> tuple[Dataset, int]:
    """pydicom's color3d_jpeg_baseline.dcm (120 YBR_FULL_422 JPEG frames) with every frame in
    ``pieces`` fragments, an empty Basic Offset Table and no Extended Offset Table, its frames
    ``repeat`` times (frame i is the original's i % 120); written frame by frame."""
    from pydicom.encaps import generate_frames, itemize_fragment

    orig = dcmread(data_file("color3d_jpeg_baseline.dcm"))
    n = int(orig.NumberOfFrames)
    encoded = list(generate_frames(orig.PixelData, number_of_frames=n))
    ds = dcmread(data_file("color3d_jpeg_baseline.dcm"), stop_before_pixels=True)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.NumberOfFrames = n * repeat
    ds.save_as(path, enforce_file_format=True)
    with open(path, "ab") as f:
        f.write(struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OB", 0, 0xFFFFFFFF) + _item(b""))
        for i in range(n * repeat):
            frame = encoded[i % n]
            cut = [len(frame) * k // pieces // 2 * 2 for k in range(pieces + 1)]
            for a, b in itertools.pairwise(cut):
                f.write(itemize_fragment(frame[a:b]))
        f.write(struct.pack("<HHI", 0xFFFE, 0xE0DD, 0))
    return ds, n


def test_jpeg_frames_in_several_fragments_without_offset_table_found_by_markers(tmp_path):
    """The EOI marker ends a frame (pydicom's rule), each frame starting with its SOI: streamed, and
    the output equals the whole conversion byte for byte; a fragment boundary that the markers
    do not explain (a frame without its SOI) falls back."""
    from transforms import dicom_codec as codec
    from transforms import dicom_transcode_stream as ts_stream

    src = tmp_path / "jpeg.dcm"
    make_jpeg_fragmented(src, pieces=3)
    stored, data = _split(src)
    for target in (ExplicitVRLittleEndian, "1.2.840.10008.1.2.5"):
        plan = ts_stream.plan(_opener(data, 65536), stored, target)
        assert plan is not None and plan.frames == 120, target
        out = b"".join(plan.open())
        whole = codec.convert(data, stored, target)
        if target == ExplicitVRLittleEndian:
            assert out == whole
        else:
            assert _without_bot(_read(out, target), 120) == _without_bot(_read(whole, target), 120)
    # a frame cut off its SOI: the markers disagree with the fragments, the whole path
    broken = bytearray(data)
    first = broken.index(b"\xff\xd8\xff", broken.index(b"\xe0\x7f\x10\x00"))
    broken[first:first + 2] = b"\x00\x00"
    assert ts_stream.plan(_opener(bytes(broken)), stored, ExplicitVRLittleEndian) is None


def test_byte_range_of_the_decoded_value_reads_only_its_frames(tmp_path, monkeypatch):
    from transforms import dicom_transcode_stream as ts_stream

    src = tmp_path / "rle.dcm"
    make_rle(src, 11, table="bot", rows=64, cols=64)
    stored, data = _split(src)
    plan = ts_stream.plan(_opener(data, 1000), stored, ExplicitVRLittleEndian)
    assert plan is not None
    value = b"".join(plan.pixel_value())
    assert len(value) == plan.length == 11 * 8192
    for start, end in [(0, 0), (100, 9000), (8192, 8192 * 2 - 1), (8191 * 11, None), (5, 10 ** 9)]:
        want = value[start:None if end is None else end + 1]
        assert b"".join(plan.pixel_value(start, end)) == want, (start, end)
    decodes = []
    real = ts_stream._decode
    monkeypatch.setattr(ts_stream, "_decode", lambda *a: decodes.append(1) or real(*a))
    assert b"".join(plan.pixel_value(8192 * 5 + 3, 8192 * 6 + 2)) == value[8192 * 5 + 3:8192 * 6 + 3]
    assert len(decodes) == 2  # frames 6 and 7 only


def _frames_equal(path: Path, frames: int, want: list[bytes], photometric: str) -> str:
    """The native Part-10 file at ``path`` holds ``frames`` frames, frame i == want[i % len(want)],
    read frame by frame (mmap); returns its transfer syntax."""
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        meta_end = 144 + int.from_bytes(m[140:144], "little")
        meta = read_dataset(io.BytesIO(m[132:meta_end]), False, True)
        ts = UID(meta.TransferSyntaxUID)
        at = m.find(b"\xe0\x7f\x10\x00", meta_end, meta_end + (1 << 20))
        head = read_dataset(io.BytesIO(m[meta_end:at]), ts.is_implicit_VR, True)
        assert head.PhotometricInterpretation == photometric and int(head.NumberOfFrames) == frames
        pos = at + (8 if ts.is_implicit_VR else 12)
        size = len(want[0])
        for i in range(frames):
            assert m[pos + i * size:pos + (i + 1) * size] == want[i % len(want)], f"frame {i}"
    return str(ts)


@pytest.mark.dcmtk
@pytest.mark.slow
def test_large_native_instance_routed_as_rle_frame_by_frame_under_300_mb(medrelay_proc, tmp_path):
    """A native instance (MEDRELAY_TEST_TRANSCODE_MB, default 400 MiB) stored by storescu, sent by a
    route with ``transfer_syntax: RLE Lossless`` to a storescp (+xr) and retrieved by WADO-RS with
    ``transfer-syntax=RLE Lossless``: encoded frame by frame, the engine's VmHWM under 300 MB;
    DCMTK's dcmdrle decodes what the route and WADO-RS gave to the original frames."""
    dport, route_port, wport = free_port(), free_port(), free_port()
    rle = "1.2.840.10008.1.2.5"
    yaml = _yaml(dport, free_port(), route_port).replace(
        "called_ae_title: STORESCP}", f"called_ae_title: STORESCP, transfer_syntax: {rle}}}")
    yaml += f"""  web:
    source: {{type: dicomweb, host: 127.0.0.1, port: {wport}, base_path: /dicom-web,
             auth: {{bearer_tokens: ["${{DW_TOKEN}}"]}}}}
    routes: []
"""
    proc = medrelay_proc(yaml, env={"DW_TOKEN": TOKEN})
    native_mb = int(os.environ.get("MEDRELAY_TEST_TRANSCODE_MB", "400"))
    frames = native_mb * 1024 * 1024 // (ROWS * COLS * 2)
    src = tmp_path / "native.dcm"
    ds = make_native(src, frames)
    store_with_a_first_process(proc, dport, src)  # the route's peer is not up: its delivery waits
    src.unlink()
    routed = tmp_path / "routed"
    routed.mkdir()
    import subprocess

    from dicom_peers import ENV, tool, wait_port

    scp = StoreSCP.__new__(StoreSCP)
    scp.out_dir, scp.port = routed, route_port
    scp.proc = subprocess.Popen([tool("storescp"), "-aet", "STORESCP", "+xr", "-od", str(routed), "+B", "-uf",
                                 str(route_port)], env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_port(route_port)
    proc.start()
    try:
        proc.wait_port(dport, 60)
        pid = proc.proc.pid
        t0 = time.monotonic()
        wait_delivered(proc, 900)
        took = time.monotonic() - t0
        proc.wait_port(wport, 60)
        body = tmp_path / "body"
        url = (f"http://127.0.0.1:{wport}/dicom-web/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}"
               f"/instances/{ds.SOPInstanceUID}")
        accept = f'multipart/related; type="application/dicom"; transfer-syntax={rle}'
        with httpx.stream("GET", url, headers={"Authorization": f"Bearer {TOKEN}", "Accept": accept},
                          timeout=300) as r, open(body, "wb") as f:
            assert r.status_code == 200, r.read()[:300]
            for piece in r.iter_bytes(1 << 20):
                f.write(piece)
            boundary = r.headers["content-type"].split("boundary=")[1].split(";")[0].strip().strip('"')
        peak = _status(pid, "VmHWM")
    finally:
        proc.terminate(60)
        scp.stop()
    with open(body, "rb") as f, open(tmp_path / "wado.dcm", "wb") as out:  # the part: a Part-10 file
        head = f.read(4096)
        part_end = head.index(b"\r\n\r\n") + 4
        assert f"transfer-syntax={rle}".encode() in head[:part_end]
        left = body.stat().st_size - len(f"\r\n--{boundary}--\r\n") - part_end
        f.seek(part_end)
        while left:
            piece = f.read(min(left, 1 << 20))
            left -= len(piece)
            out.write(piece)
    body.unlink()
    assert dcmread(tmp_path / "wado.dcm", stop_before_pixels=True).file_meta.TransferSyntaxUID == rle
    assert run("dcmdrle", str(tmp_path / "wado.dcm"), str(tmp_path / "wado-plain.dcm"), timeout=600).returncode == 0
    (tmp_path / "wado.dcm").unlink()
    distinct = distinct_frames()
    _frames_equal(tmp_path / "wado-plain.dcm", frames, [distinct[pattern(i)].tobytes() for i in range(DISTINCT)],
                  "MONOCHROME2")
    (tmp_path / "wado-plain.dcm").unlink()
    (routed_file,) = list(routed.iterdir())
    head = dcmread(routed_file, stop_before_pixels=True)
    assert head.file_meta.TransferSyntaxUID == rle and head.SOPInstanceUID == ds.SOPInstanceUID
    plain = tmp_path / "plain.dcm"
    r = run("dcmdrle", str(routed_file), str(plain), timeout=600)
    assert r.returncode == 0, r.stdout
    routed_file.unlink()
    _frames_equal(plain, frames, [distinct[pattern(i)].tobytes() for i in range(DISTINCT)], "MONOCHROME2")
    print(f"route and WADO-RS to RLE: {frames} frames, {frames * ROWS * COLS * 2 >> 20} MiB native in {took:.1f}s; "
          f"engine peak RSS {peak >> 20} MiB")
    assert peak < LIMIT, f"peak RSS {peak >> 20} MiB"


@pytest.mark.dcmtk
@pytest.mark.slow
def test_jpeg_without_offset_table_retrieved_uncompressed_frame_by_frame(medrelay_proc, tmp_path):
    """A large (16 MiB+) JPEG baseline multi-frame with 3 fragments per frame and an empty Basic
    Offset Table, stored by storescu -xy, retrieved by getscu proposing only uncompressed syntaxes:
    its frames found by their EOI markers and decoded one at a time (VmHWM under 300 MB for
    MEDRELAY_TEST_JPEG_REPEAT x 110 MiB of native output, default 3), each equal to pydicom's decoding."""
    dport = free_port()
    proc = medrelay_proc(_yaml(dport, free_port(), free_port()))
    repeat = int(os.environ.get("MEDRELAY_TEST_JPEG_REPEAT", "3"))
    src = tmp_path / "jpeg.dcm"
    ds, n = make_jpeg_fragmented(src, repeat=repeat)
    assert src.stat().st_size > 16 * 1024 * 1024
    arr = pixel_array(data_file("color3d_jpeg_baseline.dcm"))  # RGB, as the whole decode gives
    want = [arr[i].tobytes() for i in range(n)]
    del arr
    proc.start()
    try:
        proc.wait_port(dport, 60)
        r = storescu(dport, [src], extra=("-xy",))
        assert "Success" in r.stdout, r.stdout[-2000:]
        pid = proc.proc.pid
        got_file = getscu_uncompressed(dport, ds.StudyInstanceUID, tmp_path / "got")
        peak = _status(pid, "VmHWM")
    finally:
        proc.terminate(60)
    assert _frames_equal(got_file, n * repeat, want, "RGB") == ExplicitVRLittleEndian
    print(f"JPEG by markers: {n * repeat} frames, engine peak RSS {peak >> 20} MiB")
    assert peak < LIMIT, f"peak RSS {peak >> 20} MiB"
