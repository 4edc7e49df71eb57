"""STOW-RS metadata + bulk data (PS3.18 10.5.1.2.2) over HTTP against a running engine: a
``multipart/related; type="application/dicom+json"`` body whose JSON (made by pydicom's
``to_json_dict``, not by the code under test) references bulk data parts by BulkDataURI.
Stored instances are read back by WADO-RS as stored: the same attributes, pixel data equal
(uncompressed as Explicit VR Little Endian; a JPEG 2000 frame kept compressed). A URI that
names no part, and JSON that is not JSON, are per-instance failures (0xC000), never a 500.
"""

from __future__ import annotations

import io
import json
import uuid

import httpx
import numpy as np
import pytest
from conftest import EngineThread
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.encaps import encapsulate, generate_frames
from pydicom.uid import generate_uid

TOKEN = "stow-json-token-0123456789abcdef"
YAML = """
channels:
  web:
    source: {type: dicomweb, host: 127.0.0.1, port: 0, base_path: /dicom-web,
             auth: {bearer_tokens: ["${DW_TOKEN}"]}}
    routes:
      - {name: archive, to: {type: store}}
"""
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def web(tmp_path_factory):
    e = EngineThread(YAML, tmp_path_factory.mktemp("stowjson"), env={"DW_TOKEN": TOKEN})
    host, port = e.address("web")
    e.url = f"http://{host}:{port}/dicom-web"
    yield e
    e.stop()


def fresh(name: str):
    ds = dcmread(get_testdata_file(name))
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    return ds


def metadata_and_bulk(ds, base: str, pixel_type: str = "application/octet-stream"):
    """(DICOM JSON of ``ds`` with every binary value > 64 bytes as a BulkDataURI, the bulk parts)."""
    bulk: list[tuple[dict, bytes]] = []

    def handler(elem) -> str:
        uri = f"{base}/bulk/{uuid.uuid4().hex}"
        value = elem.value
        ctype = "application/octet-stream"
        if elem.tag == 0x7FE00010 and ds.file_meta.TransferSyntaxUID.is_compressed:
            value = next(generate_frames(value, number_of_frames=1))  # the one frame, as a client sends it
            ctype = pixel_type
        bulk.append(({"Content-Type": ctype, "Content-Location": uri}, bytes(value)))
        return uri

    return ds.to_json_dict(bulk_data_threshold=64, bulk_data_element_handler=handler), bulk


def multipart(parts: list[tuple[dict, bytes]]) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    out = b""
    for headers, data in parts:
        head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        out += f"--{boundary}\r\n{head}\r\n".encode() + data + b"\r\n"
    return out + f"--{boundary}--\r\n".encode(), f'multipart/related; type="application/dicom+json"; ' \
                                                  f"boundary={boundary}"


def post(web, parts) -> httpx.Response:
    body, ctype = multipart(parts)
    return httpx.post(f"{web.url}/studies", content=body, timeout=60,
                      headers={**AUTH, "Content-Type": ctype, "Accept": "application/dicom+json"})


def as_stored(web, ds):
    url = (f"{web.url}/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}/instances/"
           f"{ds.SOPInstanceUID}")
    r = httpx.get(url, timeout=30, headers={**AUTH, "Accept": 'multipart/related; type="application/dicom"; '
                                                                'transfer-syntax=*'})
    assert r.status_code == 200, r.text[:300]
    body = r.content
    return dcmread(io.BytesIO(body[body.index(b"\r\n\r\n") + 4:body.rindex(b"\r\n--")]))


def test_metadata_and_bulk_data_parts_are_stored_as_instances(web):
    ct, mr = fresh("CT_small.dcm"), fresh("MR_small.dcm")
    meta_ct, bulk_ct = metadata_and_bulk(ct, web.url)
    meta_mr, bulk_mr = metadata_and_bulk(mr, web.url)
    j2k_single = fresh("emri_small_jpeg_2k_lossless.dcm")  # 10 frames in the file: keep the first only
    frame = next(generate_frames(j2k_single.PixelData, number_of_frames=int(j2k_single.NumberOfFrames)))
    j2k_single.PixelData, j2k_single.NumberOfFrames = encapsulate([frame]), 1
    meta_j2k, bulk_j2k = metadata_and_bulk(j2k_single, web.url, "image/jp2; transfer-syntax=1.2.840.10008.1.2.4.90")
    parts = [({"Content-Type": "application/dicom+json"}, json.dumps([meta_ct, meta_mr]).encode()),
             *bulk_ct, *bulk_mr,
             ({"Content-Type": "application/dicom+json"}, json.dumps([meta_j2k]).encode()), *bulk_j2k]
    r = post(web, parts)
    assert r.status_code == 200, r.text
    stored = {i["00081155"]["Value"][0] for i in r.json()["00081199"]["Value"]}
    assert stored == {str(ct.SOPInstanceUID), str(mr.SOPInstanceUID), str(j2k_single.SOPInstanceUID)}
    for original in (ct, mr):
        got = as_stored(web, original)
        assert str(got.file_meta.TransferSyntaxUID) == "1.2.840.10008.1.2.1"
        assert got.PatientName == original.PatientName and got.Modality == original.Modality
        assert np.array_equal(got.pixel_array, original.pixel_array)
    got = as_stored(web, j2k_single)
    assert str(got.file_meta.TransferSyntaxUID) == "1.2.840.10008.1.2.4.90"  # kept compressed, as sent
    assert np.array_equal(got.pixel_array, j2k_single.pixel_array)


def test_unresolved_bulk_data_and_bad_json_are_per_instance_failures(web):
    good, lost = fresh("CT_small.dcm"), fresh("MR_small.dcm")
    meta_good, bulk_good = metadata_and_bulk(good, web.url)
    meta_lost, _bulk_lost = metadata_and_bulk(lost, web.url)  # its bulk parts are not sent
    parts = [({"Content-Type": "application/dicom+json"}, json.dumps([meta_good, meta_lost]).encode()),
             *bulk_good, ({"Content-Type": "application/dicom+json"}, b"[{not json")]
    r = post(web, parts)
    assert r.status_code == 202, r.text
    res = r.json()
    assert [i["00081155"]["Value"][0] for i in res["00081199"]["Value"]] == [str(good.SOPInstanceUID)]
    failed = res["00081198"]["Value"]
    assert sorted(i["00081197"]["Value"][0] for i in failed) == [0xC000, 0xC000]
    assert str(lost.SOPInstanceUID) in {i.get("00081155", {}).get("Value", [""])[0] for i in failed}
    r = post(web, [({"Content-Type": "application/dicom+json"}, b"{}")])
    assert r.status_code == 409, r.text  # no SOP Class/Instance UID: nothing stored


@pytest.mark.parametrize("bad", [
    {"00081115": {"vr": "SQ", "Value": [5]}},  # a sequence item that is not an object (AttributeError inside)
    {"00280010": {"vr": "US", "Value": [70000]}},  # out of range for US (pydicom fails writing it)
    {"00280010": {"vr": "US", "Value": ["abc"]}},
    {"00100010": {"vr": "PN", "Value": [{"Alphabetic": 5}]}},
])
def test_hostile_metadata_values_fail_the_instance_never_the_request(web, bad):
    obj = {"00080016": {"vr": "UI", "Value": ["1.2.840.10008.5.1.4.1.1.7"]},
           "00080018": {"vr": "UI", "Value": [generate_uid()]}, **bad}
    r = post(web, [({"Content-Type": "application/dicom+json"}, json.dumps([obj]).encode())])
    assert r.status_code == 409, r.text
    assert [i["00081197"]["Value"][0] for i in r.json()["00081198"]["Value"]] == [0xC000]
