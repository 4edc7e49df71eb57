"""DICOMweb and transcoding probed from outside, as a viewer or an AI gateway would (issue 13).

The archive is filled the way a modality does (DCMTK storescu, several transfer syntaxes);
then dicomweb-client and plain httpx talk to the dicomweb source with tricky but valid
headers, and getscu proposes only uncompressed syntaxes. Each fix found by the probe has
its test here: malformed UIDs are 400 (not "no such study" / an empty search), the
``viewport`` source region of PS3.18 8.3.5.1.3 and WADO-URI ``region`` are honoured, and a
study/series retrieve where no instance can be given is 406 (not an empty 200). The rest
locks in what the probe found working without change.
"""

from __future__ import annotations

import io
import re
from email.parser import BytesParser
from email.policy import HTTP

import httpx
import numpy as np
import pytest
from conftest import EngineThread, fresh_pg_url
from dicom_peers import dicom_yaml, run, storescu_any
from dicomweb_client.api import DICOMwebClient
from PIL import Image
from pydicom import dcmread
from pydicom.encaps import encapsulate
from test_dicomweb import fresh

pytestmark = pytest.mark.dcmtk

TOKEN = "dicomweb-probe-token-0123456789"
WEB = """
  web:
    source: {type: dicomweb, host: 127.0.0.1, port: 0, base_path: /dicom-web,
             auth: {bearer_tokens: ["${DW_TOKEN}"]}, cors: {allow_origins: ["https://viewer.example"]}}
    routes:
      - {name: archive, to: {type: store}}
"""
# stored syntaxes beyond test_dicom_transcode's: JPEG Extended 12-bit, JPEG Lossless SV1, RLE 32-bit
# two-frame, Deflated Explicit VR LE, JPEG 2000 lossless YBR_RCT colour, Big Endian, Implicit VR LE,
# JPEG-LS near-lossless (16-bit grey, 8-bit colour)
FILES = ["CT_small.dcm", "MR_small.dcm", "SC_rgb_jpeg_dcmtk.dcm", "JPGExtended.dcm", "SC_rgb_jpeg_gdcm.dcm",
         "SC_rgb_rle_32bit_2frame.dcm", "image_dfl.dcm", "GDCMJ2K_TextGBR.dcm", "emri_small_jpeg_2k_lossless.dcm",
         "MR_small_bigendian.dcm", "MR_small_implicit.dcm", "JPEGLSNearLossless_16.dcm", "SC_rgb_jls_lossy_line.dcm"]
BAD_JPEG = "bad_jpeg"  # JPEG Baseline whose pixel data is no JPEG stream: cannot be decoded
ECG = "waveform_ecg.dcm"  # WaveformData (290 KB) inside WaveformSequence items
BIG = "big"  # 6 MiB Explicit VR LE: past dicomweb_wado.STREAM_FROM, streamed from its blob
UNCOMPRESSED = ("1.2.840.10008.1.2.1", "1.2.840.10008.1.2", "1.2.840.10008.1.2.2")
ELE = "1.2.840.10008.1.2.1"


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def arc(request, tmp_path_factory):
    """The archive on SQLite and on PostgreSQL (MEDRELAY_TEST_PG_URL), as a deployment runs it."""
    d = tmp_path_factory.mktemp("probe")
    yaml = dicom_yaml(calling="[TESTSCU, GETSCU]") + WEB
    if request.param == "postgres":
        yaml = yaml.replace("sqlite:///data/medrelay.db", fresh_pg_url())
    (d / "in").mkdir()
    data, paths = {}, []
    for name in FILES:
        ds = fresh(name)
        p = d / "in" / name
        ds.save_as(p, enforce_file_format=True)
        data[name], _ = ds, paths.append(p)
    bad = fresh("SC_rgb_jpeg_dcmtk.dcm")
    bad.PixelData = encapsulate([b"\xff\xd8\xff\xe0 not a JPEG stream \xff\xd9" * 4])
    bad.save_as(d / "in" / "bad.dcm", enforce_file_format=True)
    data[BAD_JPEG] = bad
    paths.append(d / "in" / "bad.dcm")
    ecg = fresh(ECG)
    ecg.save_as(d / "in" / ECG, enforce_file_format=True)
    data[ECG] = ecg
    paths.append(d / "in" / ECG)
    big = fresh("CT_small.dcm")
    big.Rows = big.Columns = 1792
    big.PixelData = np.arange(1792 * 1792, dtype="<u2").tobytes()
    big.save_as(d / "in" / "big.dcm", enforce_file_format=True)
    data[BIG] = big
    paths.append(d / "in" / "big.dcm")
    e = EngineThread(yaml, d, env={"DW_TOKEN": TOKEN})
    try:
        e.dcm_port = e.address("dcm")[1]
        assert storescu_any(e.dcm_port, paths) == ["Success"] * len(paths)
        host, port = e.address("web")
        e.url = f"http://{host}:{port}/dicom-web"
        e.client = DICOMwebClient(url=e.url, headers={"Authorization": f"Bearer {TOKEN}"})
        e.data = data
        e.tmp = d
        yield e
    finally:
        e.stop()


def auth(**extra) -> dict:
    return {"Authorization": f"Bearer {TOKEN}", **extra}


def _base(ds) -> str:
    return f"/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}/instances/{ds.SOPInstanceUID}"


def _parts(r: httpx.Response) -> list[tuple[str, bytes]]:
    """The parts of a multipart/related response, parsed by the standard library's MIME parser."""
    msg = BytesParser(policy=HTTP).parsebytes(b"Content-Type: " + r.headers["content-type"].encode() +
                                              b"\r\n\r\n" + r.content)
    return [(str(p.get("Content-Type")).replace('"', ""), p.get_payload(decode=True)) for p in msg.iter_parts()]


# -- fixes ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", ["1.2.3.", "1..2", ".1.2", "1.2.a", "1." + "2" * 70])
def test_malformed_uids_are_400_not_404_or_empty(arc, bad):
    """PS3.5 9.1: a UID has no empty component. Before the fix "1.2.3." was "no such study" (404)
    in WADO-RS and an empty 204 in QIDO-RS, so a client could not tell a typo from a missing study."""
    for path in (f"/studies/{bad}", f"/studies/{bad}/metadata", f"/studies/{bad}/series",
                 f"/studies/1.2.3/series/{bad}/instances"):
        r = httpx.get(arc.url + path, headers=auth())
        assert r.status_code == 400 and b"UID" in r.content, (path, r.status_code)
    r = httpx.get(f"{arc.url}/studies", params={"StudyInstanceUID": f"1.2.3,{bad}"}, headers=auth())
    assert r.status_code == 400 and b"StudyInstanceUID" in r.content


def test_unknown_but_valid_uids_are_404_with_a_body(arc):
    ct = arc.data["CT_small.dcm"]
    for path in ("/studies/1.2.3.4.5", "/studies/1.2.3.4.5/metadata", _base(ct).replace(ct.SOPInstanceUID, "1.2.3")):
        r = httpx.get(arc.url + path, headers=auth())
        assert r.status_code == 404 and r.content.startswith(b"no such"), path
    assert httpx.get(f"{arc.url}/studies", params={"StudyInstanceUID": "1.2.3.4.5"},
                     headers=auth()).status_code == 204  # a search with no match is empty, not an error


def _png(arc, ds, **params) -> np.ndarray:
    r = httpx.get(arc.url + _base(ds) + "/rendered", params={"window": "600,1600", **params},
                  headers=auth(Accept="image/png"))
    assert r.status_code == 200, r.text
    return np.asarray(Image.open(io.BytesIO(r.content)))


def test_rendered_viewport_source_region_and_flip(arc):
    """viewport=vw,vh,sx,sy,sw,sh (PS3.18 8.3.5.1.3): before the fix the six-value form was 400."""
    mr = arc.data["MR_small.dcm"]  # 64 x 64
    full = _png(arc, mr)
    assert full.shape == (64, 64)
    assert np.array_equal(_png(arc, mr, viewport="32,32,0,0,32,32"), full[:32, :32])  # top-left quarter
    assert np.array_equal(_png(arc, mr, viewport="16,16,16,8,16,16"), full[8:24, 16:32])
    assert np.array_equal(_png(arc, mr, viewport="64,64,0,0,-64,64"), full[:, ::-1])  # sw < 0: flipped
    assert np.array_equal(_png(arc, mr, viewport="64,64,0,0,64,-64"), full[::-1, :])
    assert _png(arc, mr, viewport="128,128,,,32,32").shape == (128, 128)  # empty sx,sy: 0,0; scaled to fit
    assert _png(arc, mr, viewport="100,50").shape == (50, 50)  # aspect kept
    for bad in ("64,64,100,100,8,8", "64,64,0,0,0,8", "64,64,1", "0,64", "64,64,-1,0,8,8"):
        r = httpx.get(arc.url + _base(mr) + "/rendered", params={"viewport": bad}, headers=auth())
        assert r.status_code == 400, bad


def test_wado_uri_region(arc):
    mr = arc.data["MR_small.dcm"]
    q = {"requestType": "WADO", "studyUID": mr.StudyInstanceUID, "seriesUID": mr.SeriesInstanceUID,
         "objectUID": mr.SOPInstanceUID, "contentType": "image/png", "windowCenter": "600", "windowWidth": "1600"}
    full = np.asarray(Image.open(io.BytesIO(httpx.get(arc.url + "/wado", params=q, headers=auth()).content)))
    r = httpx.get(arc.url + "/wado", params={**q, "region": "0.5,0.0,1.0,0.25"}, headers=auth())
    assert r.status_code == 200
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(r.content))), full[:16, 32:])
    assert httpx.get(arc.url + "/wado", params={**q, "region": "0.5,0.5,0.2,1"}, headers=auth()).status_code == 400


def test_study_retrieve_with_nothing_convertible_is_406_not_an_empty_200(arc):
    """Before the fix the headers went out before the first conversion: a study none of whose
    instances converts to an Accept-ed syntax was a 200 with an empty multipart body."""
    jpeg, bad = arc.data["SC_rgb_jpeg_dcmtk.dcm"], arc.data[BAD_JPEG]
    unknown = 'multipart/related; type="application/dicom"; transfer-syntax=1.2.3.4'
    for ds in (jpeg, bad):
        r = httpx.get(f"{arc.url}/studies/{ds.StudyInstanceUID}", headers=auth(Accept=unknown))
        assert r.status_code == 406 and r.content, r.status_code
        r = httpx.get(f"{arc.url}/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}",
                      headers=auth(Accept=unknown))
        assert r.status_code == 406
    as_ele = f'multipart/related; type="application/dicom"; transfer-syntax={ELE}'
    assert httpx.get(f"{arc.url}/studies/{bad.StudyInstanceUID}", headers=auth(Accept=as_ele)).status_code == 406
    stored = httpx.get(f"{arc.url}/studies/{bad.StudyInstanceUID}", headers=auth(Accept=as_ele + ", " +
                       'multipart/related; type="application/dicom"; transfer-syntax=*; q=0.5'))
    assert stored.status_code == 200  # as stored is always possible
    got = _parts(stored)
    assert len(got) == 1 and "transfer-syntax=1.2.840.10008.1.2.4.50" in got[0][0]
    ok = httpx.get(f"{arc.url}/studies/{jpeg.StudyInstanceUID}", headers=auth(Accept=as_ele))
    assert ok.status_code == 200 and len(_parts(ok)) == 1


# -- worked without change: locked in ------------------------------------------------------------


@pytest.mark.parametrize("name", FILES)
def test_wado_as_explicit_le_and_as_stored(arc, name):
    ds = arc.data[name]
    uids = (ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
    plain = arc.client.retrieve_instance(*uids, media_types=(("application/dicom", ELE),))
    assert plain.file_meta.TransferSyntaxUID == ELE and plain.SOPInstanceUID == ds.SOPInstanceUID
    assert np.array_equal(plain.pixel_array, ds.pixel_array), name
    assert arc.client.retrieve_instance(*uids).file_meta.TransferSyntaxUID == ds.file_meta.TransferSyntaxUID


@pytest.mark.parametrize("accept", [
    'multipart/related; type="application/dicom"; transfer-syntax=1.2.840.10008.1.2.1',
    "multipart/related; type=application/dicom; transfer-syntax=1.2.840.10008.1.2.1",
    'multipart/related; type="application/dicom"; transfer-syntax=1.2.840.10008.1.2.4.90; q=0.4, '
    'multipart/related; type="application/dicom"; transfer-syntax=1.2.840.10008.1.2.1; q=0.9',
    "text/html, */*;q=0.1",
])
def test_accept_lists_with_q_values(arc, accept):
    ds = arc.data["SC_rgb_jpeg_gdcm.dcm"]
    r = httpx.get(arc.url + _base(ds), headers=auth(Accept=accept))
    assert r.status_code == 200
    (ctype, body), = _parts(r)
    assert ctype == f"application/dicom; transfer-syntax={ELE}"
    assert np.array_equal(dcmread(io.BytesIO(body)).pixel_array, ds.pixel_array)


def test_frames_several_numbers_compressed_as_stored(arc):
    ds = arc.data["SC_rgb_rle_32bit_2frame.dcm"]
    from pydicom.encaps import generate_frames

    stored = list(generate_frames(ds.PixelData, number_of_frames=2))
    got = arc.client.retrieve_instance_frames(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID,
                                              frame_numbers=[2, 1], media_types=(("image/dicom-rle", "*"),))
    assert got == [stored[1], stored[0]]
    decoded = arc.client.retrieve_instance_frames(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID,
                                                  frame_numbers=[1, 2])
    assert decoded[1] == ds.pixel_array[1].tobytes()


def test_head_cors_and_auth_headers(arc):
    ct = arc.data["CT_small.dcm"]
    head = httpx.head(arc.url + _base(ct), headers=auth())
    assert head.status_code == 200 and head.content == b"" and head.headers["content-type"].startswith("multipart")
    pre = httpx.options(f"{arc.url}/studies", headers={
        "Origin": "https://viewer.example", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type"})
    assert pre.status_code == 200 and pre.headers["access-control-allow-origin"] == "https://viewer.example"
    r = httpx.get(f"{arc.url}/studies", headers={"Origin": "https://viewer.example", "Authorization": "Bearer no"})
    assert r.status_code == 401 and 'error="invalid_token"' in r.headers["www-authenticate"]
    assert r.headers["access-control-allow-origin"] == "https://viewer.example"  # the browser can read the 401
    for accept in ("application/json", "application/dicom+json; charset=utf-8", ""):
        assert httpx.get(f"{arc.url}/studies", params={"limit": "1"}, headers=auth(Accept=accept)).status_code == 200
    assert httpx.get(f"{arc.url}/studies", headers=auth(Accept="application/dicom+xml")).status_code == 406


def test_getscu_uncompressed_only_more_syntaxes(arc, tmp_path):
    names = [n for n in FILES if str(arc.data[n].file_meta.TransferSyntaxUID) not in UNCOMPRESSED]
    studies = "\\".join(str(arc.data[n].StudyInstanceUID) for n in names)
    g = run("getscu", "-v", "-S", "-aet", "GETSCU", "-aec", "MEDRELAY", "-od", str(tmp_path),
            "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={studies}", "127.0.0.1", str(arc.dcm_port))
    assert g.returncode == 0, g.stdout
    by_uid = {str(arc.data[n].SOPInstanceUID): n for n in names}
    got = {str(dcmread(p).SOPInstanceUID): dcmread(p) for p in tmp_path.iterdir()}
    assert set(got) == set(by_uid)
    for uid, ds in got.items():
        assert str(ds.file_meta.TransferSyntaxUID) in UNCOMPRESSED
        assert np.array_equal(ds.pixel_array, arc.data[by_uid[uid]].pixel_array), by_uid[uid]
    assert re.search(r"Number of Failed Suboperations\s*:\s*0\b", g.stdout or ""), g.stdout


def test_single_part_application_dicom_for_one_instance(arc):
    """Accept: application/dicom (PS3.18 Table 8.7.4-1 single part; the Microsoft DICOM client's default
    for one instance): before the fix 406, now the Part-10 bytes alone, negotiated as multipart is."""
    ds = arc.data["SC_rgb_jpeg_dcmtk.dcm"]
    url = arc.url + _base(ds)
    r = httpx.get(url, headers=auth(Accept="application/dicom"))
    assert r.status_code == 200 and r.headers["content-type"] == f"application/dicom; transfer-syntax={ELE}"
    got = dcmread(io.BytesIO(r.content))
    assert got.SOPInstanceUID == ds.SOPInstanceUID and np.array_equal(got.pixel_array, ds.pixel_array)
    r = httpx.get(url, headers=auth(Accept="application/dicom; transfer-syntax=*"))
    assert r.headers["content-type"].endswith("transfer-syntax=1.2.840.10008.1.2.4.50")
    assert dcmread(io.BytesIO(r.content)).PixelData == ds.PixelData  # as stored
    multi = 'multipart/related; type="application/dicom"'
    assert httpx.get(url, headers=auth(Accept=f"application/dicom, {multi}")).headers["content-type"].startswith(
        "application/dicom;")
    assert httpx.get(url, headers=auth(Accept=f"{multi}, application/dicom")).headers["content-type"].startswith(
        "multipart/related")
    assert httpx.get(url, headers=auth(Accept=f"application/dicom;q=0.5, {multi}")).headers[
        "content-type"].startswith("multipart/related")  # q decides, not the order
    r = httpx.get(url, headers=auth(Accept="application/dicom; transfer-syntax=1.2.3.4"))
    assert r.status_code == 406 and r.content
    assert httpx.get(f"{arc.url}/studies/{ds.StudyInstanceUID}",
                     headers=auth(Accept="application/dicom")).status_code == 406  # a study is multipart only
    big = arc.data[BIG]
    r = httpx.get(arc.url + _base(big), headers=auth(Accept="application/dicom; transfer-syntax=*"))
    assert r.status_code == 200 and "content-length" not in r.headers  # streamed from the blob
    assert dcmread(io.BytesIO(r.content)).PixelData == big.PixelData


def test_metadata_bulk_data_inside_sequences(arc):
    """Binary values inside sequence items (an ECG's WaveformData) were inlined as base64: a 290 KB
    waveform made 400 KB of metadata. Now BulkDataURI .../bulkdata/54000100/{item}/54001010."""
    ecg = arc.data[ECG]
    uids = (ecg.StudyInstanceUID, ecg.SeriesInstanceUID, ecg.SOPInstanceUID)
    r = httpx.get(arc.url + _base(ecg) + "/metadata", headers=auth())
    assert r.status_code == 200 and len(r.content) < 64 * 1024
    md = arc.client.retrieve_instance_metadata(*uids)
    items = md["54000100"]["Value"]
    assert len(items) == len(ecg.WaveformSequence)
    for n, item in enumerate(items):
        uri = item["54001010"]["BulkDataURI"]
        assert uri.endswith(f"/bulkdata/54000100/{n}/54001010") and "InlineBinary" not in item["54001010"]
        got = arc.client.retrieve_bulkdata(uri, media_types=("application/octet-stream",))[0]
        assert got == ecg.WaveformSequence[n].WaveformData
        assert item["003A0005"]["Value"] == [ecg.WaveformSequence[n].NumberOfWaveformChannels]  # rest inline
    base = arc.url + _base(ecg) + "/bulkdata/"
    for bad in ("54000100/9/54001010", "54000100/x/54001010", "54000100/0", "54000100", "00100010/0/54001010",
                "54000100/0/54001010/0/54001010"):
        assert httpx.get(base + bad, headers=auth(Accept="application/octet-stream")).status_code == 404, bad
