"""DICOMweb findings 1 and 2 of probe session 7 (docs/notes/probe-session-7.md), over HTTP.

One engine with a DICOM channel (filled by DCMTK storescu in the stored compressed syntaxes) and a
dicomweb channel on the same archive, asked with httpx and dicomweb-client:

- WADO-RS bulk data of an encapsulated Pixel Data was the stored OB value (item tags, offset table,
  fragments) as untyped application/octet-stream whatever Accept said. application/octet-stream is
  now the decoded native pixel data (Explicit VR Little Endian, compared with pydicom's decode), a
  compressed media type (or ``type="*/*"; transfer-syntax=*``) the frames as stored, one part per
  frame with its transfer-syntax (as /frames), and anything else 406.
- QIDO-RS ``/series`` and ``/instances`` (all studies) and ``/studies/{s}/instances`` left out the
  default attributes of the levels above (PS3.18 10.6.3.3.2/3).
"""

from __future__ import annotations

import hashlib
import re

import httpx
import pytest
from conftest import EngineThread
from dicomweb_client.api import DICOMwebClient
from pydicom import dcmread
from pydicom.encaps import generate_frames
from pydicom.uid import generate_uid
from test_dicomweb_stow_json import AUTH, TOKEN
from test_dicomweb_stow_json import YAML as WEB_YAML  # the plain dicomweb channel, + a DICOM one

from tests.dicom_peers import data_file, storescu_any

pytestmark = pytest.mark.dcmtk

YAML = WEB_YAML + """  dcm:
    source: {type: dicom, port: 0, ae_title: MEDRELAY, calling_aets: [TESTSCU]}
    routes:
      - {name: archive, to: {type: store}}
"""
J2K = "emri_small_jpeg_2k_lossless.dcm"  # JPEG 2000 lossless, 10 frames 64x64 MONOCHROME2
JPEG_MF = "color3d_jpeg_baseline.dcm"  # JPEG Baseline, 120 frames 640x480 YBR_FULL_422
OCTET_LE = 'multipart/related; type="application/octet-stream"; transfer-syntax=1.2.840.10008.1.2.1'


@pytest.fixture(scope="module")
def web(tmp_path_factory):
    d = tmp_path_factory.mktemp("probe7")
    files, data = [], {}
    for n, name in enumerate((J2K, JPEG_MF, J2K, J2K)):
        ds = dcmread(data_file(name))
        if n == 3:  # past STREAM_MIN (16 MiB) by a private value before Pixel Data: decoded as it is read
            ds.private_block(0x0009, "MEDRELAY PROBE7", create=True).add_new(0x10, "OB", bytes(17 << 20))
        ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.PatientName, ds.PatientID = f"PROBE7^N{n}", f"P7-{n}"
        ds.StudyDate, ds.AccessionNumber, ds.SeriesNumber = "20261202", f"ACC7{n}", 7
        f = d / f"in{n}.dcm"
        ds.save_as(f, enforce_file_format=True)
        files.append(f)
        data[f"{name}#{n}"] = ds
    e = EngineThread(YAML, d, env={"DW_TOKEN": TOKEN})
    assert storescu_any(e.address("dcm")[1], files) == ["Success"] * len(files)
    host, port = e.address("web")
    e.url = f"http://{host}:{port}/dicom-web"
    e.client = DICOMwebClient(url=e.url, headers=AUTH)
    e.j2k, e.jpeg, e.other, e.big = data[f"{J2K}#0"], data[f"{JPEG_MF}#1"], data[f"{J2K}#2"], data[f"{J2K}#3"]
    yield e
    e.stop()


def _inst(web, ds) -> str:
    return f"{web.url}/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}/instances/{ds.SOPInstanceUID}"


def _get(url: str, accept: str | None = None, **headers) -> httpx.Response:
    if accept is not None:
        headers["Accept"] = accept
    return httpx.get(url, headers={**AUTH, **headers}, timeout=120)


def _parts(r: httpx.Response) -> list[tuple[str, bytes]]:
    """(part Content-Type, body) of a multipart/related response."""
    m = re.search(r'boundary="?([^";]+)"?', r.headers["content-type"])
    assert m, r.headers["content-type"]
    sep = b"--" + m.group(1).encode()
    out = []
    for chunk in r.content.split(sep)[1:]:
        if chunk.startswith(b"--"):
            break
        head, _, body = chunk[2:].partition(b"\r\n\r\n")
        ctype = next(line.split(b":", 1)[1].strip().decode() for line in head.split(b"\r\n")
                     if line.lower().startswith(b"content-type:"))
        out.append((ctype, body[:-2]))
    return out


def _native(ds) -> bytes:
    arr = ds.pixel_array
    return arr.astype(arr.dtype.newbyteorder("<")).tobytes()


# -- finding 1: bulk data of encapsulated Pixel Data ---------------------------------------------


@pytest.mark.parametrize("accept", [None, OCTET_LE, "multipart/related; type=\"application/octet-stream\""])
def test_pixel_bulk_data_as_octet_stream_is_the_decoded_native_pixel_data(web, accept):
    """Before: 200, one part application/octet-stream without transfer-syntax, 37 964 bytes
    starting fffe00e0 (the encapsulated value as stored)."""
    r = _get(_inst(web, web.j2k) + "/bulkdata/7FE00010", accept)
    assert r.status_code == 200, r.text[:300]
    parts = _parts(r)
    assert len(parts) == 1
    ctype, body = parts[0]
    assert ctype == "application/octet-stream; transfer-syntax=1.2.840.10008.1.2.1"
    assert not body.startswith(b"\xfe\xff\x00\xe0")
    assert body == _native(web.j2k)


def test_metadata_bulk_data_uri_of_pixel_data_gives_decoded_pixels_to_dicomweb_client(web):
    """A viewer follows the metadata's BulkDataURI with dicomweb-client (before: the item-tag stream)."""
    ds = web.jpeg
    meta = web.client.retrieve_instance_metadata(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
    uri = meta["7FE00010"]["BulkDataURI"]
    assert uri.endswith("/bulkdata/7FE00010")
    got = web.client.retrieve_bulkdata(uri)
    assert len(got) == 1
    want = _native(ds)
    assert len(got[0]) == 120 * 480 * 640 * 3 == len(want)
    assert hashlib.sha256(got[0]).digest() == hashlib.sha256(want).digest()


@pytest.mark.parametrize("accept", ['multipart/related; type="image/jp2"',
                                    'multipart/related; type="image/jp2"; transfer-syntax=1.2.840.10008.1.2.4.90',
                                    'multipart/related; type="*/*"; transfer-syntax=*'])
def test_pixel_bulk_data_in_a_compressed_media_type_is_one_part_per_frame(web, accept):
    """Before: the one untyped item-tag part, whatever the Accept."""
    r = _get(_inst(web, web.j2k) + "/bulkdata/7FE00010", accept)
    assert r.status_code == 200, r.text[:300]
    parts = _parts(r)
    frames = list(generate_frames(web.j2k.PixelData, number_of_frames=10))
    assert [c for c, _ in parts] == ["image/jp2; transfer-syntax=1.2.840.10008.1.2.4.90"] * 10
    assert [b for _, b in parts] == frames
    assert 'type="image/jp2"' in r.headers["content-type"]


def test_jpeg_multiframe_bulk_data_as_image_jpeg_is_its_120_frames(web):
    r = _get(_inst(web, web.jpeg) + "/bulkdata/7FE00010", 'multipart/related; type="image/jpeg"')
    assert r.status_code == 200, r.text[:300]
    parts = _parts(r)
    assert len(parts) == 120
    assert {c for c, _ in parts} == {"image/jpeg; transfer-syntax=1.2.840.10008.1.2.4.50"}
    assert [b for _, b in parts] == list(generate_frames(web.jpeg.PixelData, number_of_frames=120))


def test_pixel_bulk_data_that_cannot_be_given_as_asked_is_406(web):
    """Before: 200 with the item-tag stream for an octet-stream part in a compressed syntax (the
    compressed media types were refused, as every non-octet-stream type was)."""
    url = _inst(web, web.j2k) + "/bulkdata/7FE00010"
    for accept in ('multipart/related; type="application/octet-stream"; transfer-syntax=1.2.840.10008.1.2.4.90',
                   'multipart/related; type="image/jpeg"', "image/jp2"):
        r = _get(url, accept)
        assert r.status_code == 406, (accept, r.status_code, r.headers.get("content-type"))


def test_single_part_and_byte_range_of_encapsulated_pixel_data_are_of_the_decoded_value(web):
    """Before: the bytes of the encapsulated value (fffe00e0...)."""
    want = _native(web.j2k)
    url = _inst(web, web.j2k) + "/bulkdata/7FE00010"
    r = _get(url, "application/octet-stream")
    assert r.status_code == 200 and r.headers["content-type"] == "application/octet-stream"
    assert r.content == want
    r = _get(url, "application/octet-stream", Range="bytes=100-199")
    assert r.status_code == 206
    assert r.headers["content-range"] == f"bytes 100-199/{len(want)}"
    assert r.content == want[100:200]


def test_large_encapsulated_pixel_data_is_decoded_frame_by_frame_as_it_is_read(web):
    """A 17 MiB JPEG 2000 instance (STREAM_MIN): the decoded value streamed (chunked, not read
    whole), single-part with its length; before: the item-tag stream."""
    url = _inst(web, web.big) + "/bulkdata/7FE00010"
    want = _native(web.big)
    r = _get(url, OCTET_LE)
    assert r.status_code == 200, r.text[:300]
    assert r.headers.get("transfer-encoding") == "chunked"  # a StreamingResponse: part by part
    assert _parts(r) == [("application/octet-stream; transfer-syntax=1.2.840.10008.1.2.1", want)]
    r = _get(url, "application/octet-stream")
    assert r.status_code == 200 and r.headers["content-length"] == str(len(want)) and r.content == want
    r = _get(url, 'multipart/related; type="image/jp2"')  # as stored: read whole, one part per frame
    assert [b for _, b in _parts(r)] == list(generate_frames(web.big.PixelData, number_of_frames=10))


# -- finding 2: QIDO-RS default attributes of the levels above ----------------------------------

STUDY_KEYS = {"0020000D", "00080020", "00100010", "00100020", "00080050"}  # Study UID, Date, Name, ID, Accession
SERIES_KEYS = {"00080060", "0020000E", "00200011"}  # Modality, Series UID, Series Number


def _search(web, path: str, **params) -> list[dict]:
    r = httpx.get(f"{web.url}{path}", params=params, headers=AUTH, timeout=30)
    assert r.status_code == 200, (r.status_code, r.text[:300])
    return r.json()


def test_all_series_returns_the_study_level_attributes(web):
    """Before: 00080060, 0008103E, 00081190, 0020000D, 0020000E, 00200011, 00201209 only."""
    ds = web.j2k
    (row,) = _search(web, "/series", SeriesInstanceUID=ds.SeriesInstanceUID)
    assert STUDY_KEYS | SERIES_KEYS <= set(row)
    assert row["00100010"]["Value"] == [{"Alphabetic": "PROBE7^N0"}]
    assert row["00100020"]["Value"] == ["P7-0"] and row["00080050"]["Value"] == ["ACC70"]
    assert row["00080020"]["Value"] == ["20261202"]
    assert row["00201206"]["Value"] == [1]  # NumberOfStudyRelatedSeries
    # a study's series: the study is the path's, not repeated (10.6.3.3.2)
    (row,) = _search(web, f"/studies/{ds.StudyInstanceUID}/series")
    assert "00100010" not in row and SERIES_KEYS <= set(row)


def test_all_instances_returns_the_study_and_series_level_attributes(web):
    """Before: SOP Class/Instance, Availability, RetrieveURL, Study/Series UID, Instance Number,
    Frames, Rows, Columns only: no Modality, no patient."""
    ds = web.jpeg
    (row,) = _search(web, "/instances", SOPInstanceUID=ds.SOPInstanceUID)
    assert STUDY_KEYS | SERIES_KEYS <= set(row)
    assert row["00080060"]["Value"] == [ds.Modality] and row["00200011"]["Value"] == [7]
    assert row["00100010"]["Value"] == [{"Alphabetic": "PROBE7^N1"}]
    assert {"00080016", "00080018", "00200013", "00280008"} <= set(row)  # the instance level's, as before


def test_a_studys_instances_return_the_series_level_attributes_only(web):
    ds = web.other
    (row,) = _search(web, f"/studies/{ds.StudyInstanceUID}/instances")
    assert SERIES_KEYS <= set(row)
    assert "00100010" not in row and "00080050" not in row
    (row,) = _search(web, f"/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}/instances")
    assert "00080060" not in row and "00100010" not in row


def test_includefield_and_paging_still_work_on_all_instances(web):
    rows = _search(web, "/instances", PatientName="PROBE7*", includefield="00080008,PatientSex")
    assert len(rows) == 4
    assert all({"00080008", "00100040"} <= set(r) and STUDY_KEYS <= set(r) for r in rows)
    pages = [_search(web, "/instances", PatientName="PROBE7*", limit="2", offset=str(o)) for o in (0, 2)]
    assert [len(p) for p in pages] == [2, 2]
    uids = {r["00080018"]["Value"][0] for p in pages for r in p}
    assert uids == {web.j2k.SOPInstanceUID, web.jpeg.SOPInstanceUID, web.other.SOPInstanceUID,
                    web.big.SOPInstanceUID}
