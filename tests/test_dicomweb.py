"""The dicomweb source with a client nobody here wrote (dicomweb-client, PyPI) and raw httpx.

STOW-RS stores through the C-STORE intake (the instances are found by C-FIND-style
matching afterwards, and the intake's message.receive rows exist); QIDO-RS matches like
C-FIND (wildcards, ranges, UID lists), WADO-RS gives the stored bytes for
``transfer-syntax=*`` and a decoded Explicit VR Little Endian copy (pixels equal to the
decoded original) otherwise; metadata, bulk data, frames, rendered images, WADO-URI,
auth, CORS and the audit rows are each checked over HTTP.
"""

from __future__ import annotations

import io
import json
import time

import httpx
import numpy as np
import pytest
from conftest import EngineThread
from dicomweb_client.api import DICOMwebClient
from PIL import Image
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid
from sqlalchemy import select

from engine.store import schema

TOKEN = "dicomweb-test-token-0123456789"
YAML = """
channels:
  web:
    source: {type: dicomweb, host: 127.0.0.1, port: 0, base_path: /dicom-web,
             auth: {bearer_tokens: ["${DW_TOKEN}"]}, cors: {allow_origins: ["https://viewer.example"]}}
    routes:
      - {name: archive, to: {type: store}}
"""
FILES = ["CT_small.dcm", "MR_small.dcm", "SC_rgb_jpeg_dcmtk.dcm", "emri_small_jpeg_2k_lossless.dcm",
         "MR_small_RLE.dcm", "MR_small_jpeg_ls_lossless.dcm"]
EXPLICIT_LE = "1.2.840.10008.1.2.1"


def fresh(name: str):
    """A pydicom test file with new Study/Series/SOP Instance UIDs (several share theirs)."""
    ds = dcmread(get_testdata_file(name))
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    return ds


def part10(ds) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


@pytest.fixture(scope="module")
def web(tmp_path_factory):
    d = tmp_path_factory.mktemp("dicomweb")
    e = EngineThread(YAML, d, env={"DW_TOKEN": TOKEN})
    host, port = e.address("web")
    e.url = f"http://{host}:{port}/dicom-web"
    e.client = DICOMwebClient(url=e.url, headers={"Authorization": f"Bearer {TOKEN}"})
    e.data = {name: fresh(name) for name in FILES}
    e.stow = e.client.store_instances(list(e.data.values()))
    yield e
    e.stop()


def auth(**extra) -> dict:
    return {"Authorization": f"Bearer {TOKEN}", **extra}


def test_stow_response_lists_every_stored_instance(web):
    refs = web.stow.ReferencedSOPSequence
    assert {str(r.ReferencedSOPInstanceUID) for r in refs} == {str(d.SOPInstanceUID) for d in web.data.values()}
    assert "FailedSOPSequence" not in web.stow
    for r in refs:  # the RetrieveURL is a working WADO-RS URL
        got = httpx.get(r.RetrieveURL, headers=auth(Accept='multipart/related; type="application/dicom"; '
                                                            "transfer-syntax=*"))
        assert got.status_code == 200
    with web.store.engine.connect() as conn:  # through the intake: one message.receive row each
        rows = conn.execute(select(schema.audit_events.c.action).where(
            schema.audit_events.c.action == "message.receive")).all()
    assert len(rows) >= len(FILES)


def test_qido_studies_series_instances(web):
    studies = web.client.search_for_studies()
    assert len(studies) == len(FILES)
    ct = web.data["CT_small.dcm"]
    found = web.client.search_for_studies(search_filters={"PatientName": "compressedsamples^ct*"})
    assert [s["0020000D"]["Value"][0] for s in found] == [ct.StudyInstanceUID]
    assert found[0]["00100010"]["Value"][0]["Alphabetic"] == "CompressedSamples^CT1"
    assert found[0]["00080061"]["Value"] == ["CT"]  # ModalitiesInStudy, derived like C-FIND
    assert found[0]["00201208"]["Value"] == [1]
    series = web.client.search_for_series(ct.StudyInstanceUID)
    assert [s["0020000E"]["Value"][0] for s in series] == [ct.SeriesInstanceUID]
    inst = web.client.search_for_instances(ct.StudyInstanceUID, ct.SeriesInstanceUID)
    assert inst[0]["00080018"]["Value"] == [ct.SOPInstanceUID]
    assert inst[0]["00081190"]["Value"][0].endswith(f"/instances/{ct.SOPInstanceUID}")
    assert len(web.client.search_for_instances()) == len(FILES)
    assert len(web.client.search_for_series(search_filters={"Modality": "MR"})) == 4


def test_qido_ranges_uid_lists_limit_offset_includefield(web):
    c = web.client
    dated = c.search_for_studies(search_filters={"StudyDate": "20040101-20041231"})
    assert len(dated) == 4  # CT_small (20040119) and the three MR_small copies (20040826)
    mr = [web.data[n].StudyInstanceUID for n in ("MR_small.dcm", "MR_small_RLE.dcm")]
    listed = c.search_for_studies(search_filters={"StudyInstanceUID": ",".join(mr)})
    assert sorted(s["0020000D"]["Value"][0] for s in listed) == sorted(mr)
    everything = [s["0020000D"]["Value"][0] for s in c.search_for_studies()]
    page = [s["0020000D"]["Value"][0] for s in c.search_for_studies(limit=2, offset=1)]
    assert page == everything[1:3]
    with_desc = c.search_for_studies(fields=["StudyDescription"], search_filters={"PatientID": "1CT1"})
    assert "00081030" in with_desc[0]
    r = httpx.get(f"{web.url}/studies", params={"PatientID": "1CT1", "fuzzymatching": "true"}, headers=auth())
    assert r.status_code == 200 and "fuzzymatching" in r.headers["warning"]
    assert r.headers["content-type"] == "application/dicom+json"
    assert httpx.get(f"{web.url}/studies", params={"PatientID": "nobody"}, headers=auth()).status_code == 204
    assert httpx.get(f"{web.url}/studies", params={"NoSuchKeyword": "x"}, headers=auth()).status_code == 400
    assert httpx.get(f"{web.url}/studies", params={"limit": "-1"}, headers=auth()).status_code == 400


@pytest.mark.parametrize("name", FILES)
def test_wado_instance_as_stored_and_as_explicit_le(web, name):
    ds = web.data[name]
    uids = (ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
    stored = web.client.retrieve_instance(*uids)  # dicomweb-client asks transfer-syntax=* by default
    assert stored.file_meta.TransferSyntaxUID == ds.file_meta.TransferSyntaxUID
    assert stored.PixelData == ds.PixelData  # the stored bytes, not re-encoded
    plain = web.client.retrieve_instance(*uids, media_types=(("application/dicom", EXPLICIT_LE),))
    assert plain.file_meta.TransferSyntaxUID == EXPLICIT_LE
    assert plain.SOPInstanceUID == ds.SOPInstanceUID  # the same image: the same instance
    assert np.array_equal(plain.pixel_array, ds.pixel_array)  # pixel data = the decoded original


def test_wado_study_and_series_are_multipart(web):
    ds = web.data["emri_small_jpeg_2k_lossless.dcm"]
    got = web.client.retrieve_study(ds.StudyInstanceUID)
    assert [g.SOPInstanceUID for g in got] == [ds.SOPInstanceUID]
    got = web.client.retrieve_series(ds.StudyInstanceUID, ds.SeriesInstanceUID,
                                     media_types=(("application/dicom", EXPLICIT_LE),))
    assert np.array_equal(got[0].pixel_array, ds.pixel_array)
    r = httpx.get(f"{web.url}/studies/1.2.3.4", headers=auth())
    assert r.status_code == 404
    r = httpx.get(f"{web.url}/studies/{ds.StudyInstanceUID}", headers=auth(Accept="application/json"))
    assert r.status_code == 406


def test_metadata_has_bulkdata_uris_that_work(web):
    ds = web.data["SC_rgb_jpeg_dcmtk.dcm"]
    md = web.client.retrieve_instance_metadata(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
    assert md["00080018"]["Value"] == [ds.SOPInstanceUID]
    uri = md["7FE00010"]["BulkDataURI"]
    assert "InlineBinary" not in md["7FE00010"]
    value = web.client.retrieve_bulkdata(uri, media_types=("application/octet-stream",))[0]
    native = ds.pixel_array.tobytes()  # encapsulated (JPEG Baseline): octet-stream is the decoded pixels
    assert value == native
    r = httpx.get(uri, headers=auth(Accept="application/octet-stream", Range="bytes=0-99"))
    assert r.status_code == 206 and r.content == native[:100]
    assert r.headers["content-range"] == f"bytes 0-99/{len(native)}"
    study_md = web.client.retrieve_study_metadata(ds.StudyInstanceUID)
    assert len(study_md) == 1


def test_frames_decoded_and_as_stored(web):
    ds = web.data["emri_small_jpeg_2k_lossless.dcm"]
    uids = (ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
    arr = ds.pixel_array
    frames = web.client.retrieve_instance_frames(*uids, frame_numbers=[2, 5])  # octet-stream, decoded
    assert frames[0] == arr[1].astype("<u2").tobytes() and frames[1] == arr[4].astype("<u2").tobytes()
    from pydicom.encaps import generate_frames

    stored = list(generate_frames(ds.PixelData, number_of_frames=10))
    j2k = web.client.retrieve_instance_frames(*uids, frame_numbers=[3], media_types=(("image/jp2", "*"),))
    assert j2k[0] == stored[2]
    r = httpx.get(f"{web.url}/studies/{uids[0]}/series/{uids[1]}/instances/{uids[2]}/frames/11", headers=auth())
    assert r.status_code == 404


def test_rendered_and_thumbnail(web):
    ds = web.data["MR_small.dcm"]
    uids = (ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
    png = web.client.retrieve_instance_rendered(*uids, media_types=("image/png",))
    img = Image.open(io.BytesIO(png))
    assert img.format == "PNG" and img.size == (ds.Columns, ds.Rows)
    jpeg = web.client.retrieve_instance_rendered(*uids, params={"window": "600,1600"})
    assert Image.open(io.BytesIO(jpeg)).format == "JPEG"
    narrow = web.client.retrieve_instance_rendered(*uids, media_types=("image/png",), params={"window": "0,2"})
    assert np.asarray(Image.open(io.BytesIO(narrow))).min() == 255  # every pixel above the window
    base = f"{web.url}/studies/{uids[0]}/series/{uids[1]}/instances/{uids[2]}"
    thumb = httpx.get(f"{base}/thumbnail", headers=auth(Accept="image/jpeg"))
    assert thumb.status_code == 200 and max(Image.open(io.BytesIO(thumb.content)).size) <= 128
    color = web.data["SC_rgb_jpeg_dcmtk.dcm"]
    r = httpx.get(f"{web.url}/studies/{color.StudyInstanceUID}/series/{color.SeriesInstanceUID}/instances/"
                  f"{color.SOPInstanceUID}/frames/1/rendered", headers=auth(Accept="image/png"))
    assert Image.open(io.BytesIO(r.content)).mode == "RGB"
    assert httpx.get(f"{base}/rendered", params={"window": "a,b"}, headers=auth()).status_code == 400


def test_wado_uri(web):
    ds = web.data["SC_rgb_jpeg_dcmtk.dcm"]
    q = {"requestType": "WADO", "studyUID": ds.StudyInstanceUID, "seriesUID": ds.SeriesInstanceUID,
         "objectUID": ds.SOPInstanceUID}
    r = httpx.get(web.url, params={**q, "contentType": "application/dicom"}, headers=auth())
    got = dcmread(io.BytesIO(r.content))
    assert got.file_meta.TransferSyntaxUID == EXPLICIT_LE and np.array_equal(got.pixel_array, ds.pixel_array)
    r = httpx.get(f"{web.url}/wado", params=q, headers=auth())
    assert r.headers["content-type"] == "image/jpeg" and Image.open(io.BytesIO(r.content)).size == (100, 100)
    assert httpx.get(web.url, params={"requestType": "WADO"}, headers=auth()).status_code == 400


def test_auth_cors_and_audit(web):
    r = httpx.get(f"{web.url}/studies")
    assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Bearer")
    assert httpx.get(f"{web.url}/studies", headers={"Authorization": "Bearer wrong"}).status_code == 401
    pre = httpx.options(f"{web.url}/studies", headers={
        "Origin": "https://viewer.example", "Access-Control-Request-Method": "GET",
        "Access-Control-Request-Headers": "authorization"})
    assert pre.status_code == 200 and pre.headers["access-control-allow-origin"] == "https://viewer.example"
    r = httpx.get(f"{web.url}/studies", headers=auth(Origin="https://viewer.example"))
    assert r.headers["access-control-allow-origin"] == "https://viewer.example"
    r = httpx.get(f"{web.url}/studies", headers=auth(Origin="https://evil.example"))
    assert "access-control-allow-origin" not in r.headers
    a = schema.audit_events
    end = time.monotonic() + 10
    while True:  # read rows are group-committed just after the response (Audit.record_soon)
        with web.store.engine.connect() as conn:
            rows = conn.execute(select(a.c.action, a.c.entity, a.c.actor).where(
                a.c.action.in_(["dicomweb.query", "dicomweb.retrieve", "login.failure"]))).all()
        actions = {r.action for r in rows}
        if {"dicomweb.query", "dicomweb.retrieve", "login.failure"} <= actions or time.monotonic() > end:
            break
        time.sleep(0.05)
    assert {"dicomweb.query", "dicomweb.retrieve", "login.failure"} <= actions
    for row in rows:  # no UIDs or names in the audit entity
        text = json.dumps(row.entity)
        assert "CompressedSamples" not in text and "1.2.840" not in text


def test_stow_failures_are_reported_per_instance(web):
    good = fresh("CT_small.dcm")
    other_study = fresh("MR_small.dcm")
    boundary = "b0undary"

    def body(parts):
        out = b""
        for ctype, data in parts:
            out += f"--{boundary}\r\nContent-Type: {ctype}\r\n\r\n".encode() + data + b"\r\n"
        return out + f"--{boundary}--\r\n".encode()

    headers = auth(**{"Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}'})
    url = f"{web.url}/studies/{good.StudyInstanceUID}"
    r = httpx.post(url, content=body([("application/dicom", part10(good)),
                                      ("application/dicom", part10(other_study)),
                                      ("application/dicom", b"not dicom at all")]), headers=headers)
    assert r.status_code == 202, r.text
    res = r.json()
    reasons = sorted(item["00081197"]["Value"][0] for item in res["00081198"]["Value"])
    assert reasons == [0xA900, 0xC000]  # study mismatch, undecodable part
    assert [i["00081155"]["Value"][0] for i in res["00081199"]["Value"]] == [good.SOPInstanceUID]
    # a re-send of a stored instance is stored (de-duplicated like C-STORE), an all-failed request is 409
    r = httpx.post(url, content=body([("application/dicom", part10(good))]), headers=headers)
    assert r.status_code == 200
    r = httpx.post(url, content=body([("application/dicom", b"x" * 200)]), headers=headers)
    assert r.status_code == 409
    assert httpx.post(f"{web.url}/studies", content=b"x", headers=auth(**{"Content-Type": "application/json"})
                      ).status_code == 415
    with web.store.engine.connect() as conn:
        n = conn.execute(select(schema.messages.c.id).where(
            schema.messages.c.channel == "web")).all()
    assert len(n) == len(FILES) + 1  # the duplicate made no second message


def test_stow_body_without_its_close_delimiter_is_400_and_stores_nothing(web):
    """A multipart body cut short (Content-Length or chunking complete, the close delimiter
    missing: a sender or proxy that lost the tail) was parsed as if its last part had ended, so
    an instance cut inside its pixel data was stored and answered 200. RFC 2046 5.1.1 requires
    the close delimiter: 400, nothing of the body stored."""
    ds = fresh("CT_small.dcm")
    boundary = "cutb0undary"
    headers = auth(**{"Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}'})
    data = part10(ds)
    opening = f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
    for body in (opening + data + b"\r\n", opening + data[:-1000],
                 opening + data + f"\r\n--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()):
        r = httpx.post(f"{web.url}/studies", content=body, headers=headers)
        assert r.status_code == 400, r.text[:300]
    assert web.client.search_for_instances(search_filters={"SOPInstanceUID": ds.SOPInstanceUID}) == []
    r = httpx.post(f"{web.url}/studies", content=b"", headers=headers)  # no part at all: as before
    assert r.status_code != 500


def test_conformance_statement_lists_dicomweb_and_conversions():
    from conformance.gen_dicom_statement import render
    from listeners.dicom_contexts import STORAGE_TRANSFER_SYNTAXES

    text = render()
    for service in ("QIDO-RS", "WADO-RS", "STOW-RS", "WADO-URI", "/frames/{list}", "/bulkdata/{tag}", "/rendered"):
        assert service in text
    section = text.split("### 3.8 Transfer syntax conversion")[1].split("## 4 Configuration")[0]
    for ts in STORAGE_TRANSFER_SYNTAXES:  # every stored syntax has its row, each decodable one goes to ELE
        row = next(line for line in section.splitlines() if line.startswith("| ") and f"(`{ts}`) |" in line)
        if ts != EXPLICIT_LE:
            assert f"`{EXPLICIT_LE}`" in row
    assert "*lossy, only when configured*" in section


def test_dicom_to_fhir_endpoint_points_at_the_dicomweb_source(tmp_path):
    from engine.config import parse_settings
    from engine.context import ComponentContext
    from engine.envelope import Envelope
    from transforms.dicom_to_fhir import DicomToFhirConfig, build

    yaml = YAML.replace("cors:", "public_url: https://pacs.example/dicom-web, cors:")
    path = tmp_path / "channels.yaml"
    path.write_text(yaml)
    settings = parse_settings(yaml, path, env={"DW_TOKEN": TOKEN})
    ctx = ComponentContext(settings=settings, store=None, keyring=None, audit=None)  # type: ignore[arg-type]
    transform = build(DicomToFhirConfig(type="dicom_to_fhir"), ctx)
    out = transform(Envelope(channel="web", kind="dicom", payload=part10(fresh("CT_small.dcm"))))
    bundle = json.loads(out.payload)
    endpoint = next(e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == "Endpoint")
    assert endpoint["address"] == "https://pacs.example/dicom-web"
    without = build(DicomToFhirConfig(type="dicom_to_fhir"), None)(
        Envelope(channel="web", kind="dicom", payload=part10(fresh("CT_small.dcm"))))
    assert all(e["resource"]["resourceType"] != "Endpoint" for e in json.loads(without.payload)["entry"])
