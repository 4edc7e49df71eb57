"""DICOMweb findings 1, 6 and 7 of probe session 5b (docs/notes/probe-session-5b.md), over HTTP.

A running engine's dicomweb source, filled by dicomweb-client's STOW-RS, asked with httpx and
dicomweb-client as a viewer, a research export or a careless client would:

- WADO-URI ``anonymize=yes`` gave the identified instance; it is now the PS3.15 Basic Profile
  de-identification (new stable UIDs, pseudonyms, PatientIdentityRemoved), refused (403) for an
  instance that may carry burned-in text, 400 for any other value or a rendered contentType, and
  400 on the RESTful services, which do not de-identify.
- QIDO-RS invalid DA/TM/DT (and IS/DS) values and reversed ranges matched nothing (204); they are
  400 naming the attribute. Huge ``limit``/``offset`` were 400 "must be a non-negative integer";
  they are clamped.
- STOW-RS took DICOM parts in a ``type="application/dicom+json"`` body, JSON parts in a
  ``type="application/dicom"`` body and parts without Content-Type as instances, and answered
  ``Accept: application/dicom+xml`` with JSON; byte ranges of bulk data were only honoured with
  an explicit single-part Accept, and an invalid range (``bytes=5-3``) was 416.
"""

from __future__ import annotations

import io
import json
import uuid

import httpx
import pytest
from conftest import EngineThread
from dicomweb_client.api import DICOMwebClient
from pydicom import dcmread
from requests import HTTPError
from test_dicomweb import fresh, part10
from test_dicomweb_stow_json import AUTH, TOKEN, YAML  # the same plain dicomweb channel


@pytest.fixture(scope="module")
def web(tmp_path_factory):
    e = EngineThread(YAML, tmp_path_factory.mktemp("probe5b"), env={"DW_TOKEN": TOKEN})
    host, port = e.address("web")
    e.url = f"http://{host}:{port}/dicom-web"
    e.client = DICOMwebClient(url=e.url, headers=AUTH)
    e.ct, e.sc = fresh("CT_small.dcm"), fresh("SC_rgb_jpeg_dcmtk.dcm")
    stow = e.client.store_instances([e.ct, e.sc])
    assert "FailedSOPSequence" not in stow
    yield e
    e.stop()


def _uri(ds, **extra) -> dict:
    return {
        "requestType": "WADO",
        "studyUID": ds.StudyInstanceUID,
        "seriesUID": ds.SeriesInstanceUID,
        "objectUID": ds.SOPInstanceUID,
        **extra,
    }


def _rs(web, ds) -> str:
    return f"{web.url}/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}/instances/{ds.SOPInstanceUID}"


def _stored(web, sop_uid: str) -> bool:
    return bool(web.client.search_for_instances(search_filters={"SOPInstanceUID": sop_uid}))


# -- finding 1: WADO-URI anonymize --------------------------------------------------------------


def test_wado_uri_anonymize_yes_gives_the_instance_de_identified_with_stable_new_uids(web):
    """Before: 200 with PatientName CompressedSamples^CT1, byte for byte the identified instance."""
    ct = web.ct
    got = []
    for ts in (None, None, "1.2.840.10008.1.2"):
        params = _uri(ct, contentType="application/dicom", anonymize="yes")
        if ts:
            params["transferSyntax"] = ts
        r = httpx.get(web.url, params=params, headers=AUTH, timeout=30)
        assert r.status_code == 200, r.text[:300]
        assert r.headers["content-type"] == "application/dicom"
        assert b"CompressedSamples" not in r.content and b"1CT1" not in r.content
        ds = dcmread(io.BytesIO(r.content))
        assert ds.PatientIdentityRemoved == "YES" and "DeidentificationMethodCodeSequence" in ds
        assert str(ds.PatientName) != str(ct.PatientName) and ds.PatientID != ct.PatientID
        assert ds.SOPInstanceUID != ct.SOPInstanceUID and ds.StudyInstanceUID != ct.StudyInstanceUID
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        assert ds.file_meta.TransferSyntaxUID == (ts or "1.2.840.10008.1.2.1")
        assert ds.PixelData == ct.PixelData  # CT: no burned-in risk, pixels as stored
        got.append((ds.SOPInstanceUID, ds.StudyInstanceUID, ds.PatientID))
    assert got[0] == got[1] == got[2]  # PS3.18 9.4.2.3: one new SOP Instance UID per source instance
    plain = httpx.get(web.url, params=_uri(ct, contentType="application/dicom"), headers=AUTH)
    assert dcmread(io.BytesIO(plain.content)).PatientID == ct.PatientID  # without it: as stored


def test_wado_uri_anonymize_refuses_what_it_cannot_de_identify(web):
    """A Secondary Capture may carry burned-in text: the deidentify transform quarantines it, so
    WADO-URI refuses it (403) rather than give it identified. Before: 200, identified."""
    r = httpx.get(web.url, params=_uri(web.sc, contentType="application/dicom", anonymize="yes"), headers=AUTH)
    assert r.status_code == 403 and "burned-in" in r.text
    assert r.headers["content-type"].startswith("text/plain")


@pytest.mark.parametrize(
    "extra",
    [
        {"contentType": "application/dicom", "anonymize": "no"},
        {"contentType": "application/dicom", "anonymize": "YES"},
        {"contentType": "application/dicom", "anonymize": ""},
        {"contentType": "image/jpeg", "anonymize": "yes"},  # PS3.18 9.4.2.3: application/dicom only
        {"anonymize": "yes"},  # the default contentType is image/jpeg
        {"contentType": "application/dicom", "presentationUID": "1.2.3"},  # a change we do not make
    ],
)
def test_wado_uri_anonymize_other_values_and_rendered_are_400(web, extra):
    r = httpx.get(web.url, params=_uri(web.ct, **extra), headers=AUTH)
    assert r.status_code == 400, (extra, r.status_code)


def test_anonymize_on_the_restful_services_is_400_not_ignored(web):
    """WADO-RS has no anonymize parameter; a client that sends one must not get PHI as if it had
    worked. Before: 200 (instance, metadata, rendered)."""
    base = _rs(web, web.ct)
    for path in ("", "/metadata", "/rendered", "/bulkdata/7FE00010", "/frames/1"):
        r = httpx.get(base + path, params={"anonymize": "yes"}, headers=AUTH)
        assert r.status_code == 400 and "WADO-URI" in r.text, (path, r.status_code)
    assert httpx.get(f"{web.url}/studies", params={"anonymize": "yes"}, headers=AUTH).status_code == 400


# -- finding 6: QIDO-RS values ------------------------------------------------------------------


@pytest.mark.parametrize(
    "path,key,value",
    [
        ("/studies", "StudyDate", "abc"),
        ("/studies", "StudyDate", "20261301"),  # month 13
        ("/studies", "StudyDate", "20260230"),  # 30 February
        ("/studies", "StudyDate", "2026-2025"),  # years are not dates
        ("/studies", "StudyDate", "20261231-20260101"),  # PS3.4 C.2.2.2.5: start <= end
        ("/studies", "StudyDate", "-"),
        ("/studies", "00080020", "abc"),  # by tag
        ("/studies", "StudyTime", "2500"),
        ("/studies", "StudyTime", "1261"),
        ("/studies", "StudyTime", "1700-0800"),  # ranges do not cross midnight
        ("/studies", "PatientBirthDate", "19xx0101"),
        ("/series", "SeriesDate", "2004011"),
        ("/series", "PerformedProcedureStepStartTime", "12:61"),
        ("/instances", "AcquisitionDateTime", "2026130112"),
        ("/instances", "AcquisitionDateTime", "20270101-20260101"),
        ("/instances", "InstanceNumber", "abc"),
    ],
)
def test_qido_invalid_date_time_and_number_values_are_400(web, path, key, value):
    """Before: 204 (no match), which a client cannot tell from "no such study"."""
    r = httpx.get(web.url + path, params={key: value}, headers=AUTH)
    assert r.status_code == 400, (key, value, r.status_code)
    assert "must be" in r.text or "range starts after it ends" in r.text


def test_qido_valid_values_still_match_and_huge_limit_offset_are_clamped(web):
    c = web.client
    ct = web.ct.StudyInstanceUID
    for value in ("20040119", "20040101-", "-20041231", "20040119-20040119", "20040119\\20050101", "*"):
        found = [s["0020000D"]["Value"][0] for s in c.search_for_studies(search_filters={"StudyDate": value})]
        assert ct in found, value
    for value in ("072730", "0700-", "07:00-23:59:59.5", "000000-235960"):  # CT_small: StudyTime 072730
        found = [
            s["0020000D"]["Value"][0]
            for s in c.search_for_studies(search_filters={"StudyDate": "20040119", "StudyTime": value})
        ]
        assert found == [ct], value
    with pytest.raises(HTTPError) as e:
        c.search_for_studies(search_filters={"StudyDate": "20041301"})
    assert e.value.response.status_code == 400
    # before: 400 "must be a non-negative integer" for values that are non-negative integers
    r = httpx.get(f"{web.url}/studies", params={"limit": "99999999999999999999"}, headers=AUTH)
    assert r.status_code == 200 and len(r.json()) == 2
    r = httpx.get(f"{web.url}/studies", params={"offset": "99999999999"}, headers=AUTH)
    assert r.status_code == 204  # past every result
    r = httpx.get(f"{web.url}/studies", params={"offset": "9" * 5000}, headers=AUTH)
    assert r.status_code == 204
    for bad in ("abc", "-1", "1.5", ""):
        r = httpx.get(f"{web.url}/studies", params={"limit": bad}, headers=AUTH)
        assert r.status_code == 400 and "non-negative integer" in r.text, bad


# -- finding 7: STOW-RS / WADO-RS negotiation -----------------------------------------------------


def _post(web, parts: list[tuple[dict, bytes]], declared: str = "application/dicom", **headers) -> httpx.Response:
    boundary = uuid.uuid4().hex
    body = b""
    for head, data in parts:
        lines = "".join(f"{k}: {v}\r\n" for k, v in head.items())
        body += f"--{boundary}\r\n{lines}\r\n".encode() + data + b"\r\n"
    body += f"--{boundary}--\r\n".encode()
    ctype = f'multipart/related; type="{declared}"; boundary={boundary}'
    return httpx.post(
        f"{web.url}/studies", content=body, timeout=30, headers={**AUTH, "Content-Type": ctype, **headers}
    )


def _failures(r: httpx.Response) -> list[int]:
    return [i["00081197"]["Value"][0] for i in r.json().get("00081198", {}).get("Value", [])]


def test_stow_dicom_parts_in_a_dicom_json_body_are_not_stored(web):
    """Before: 200, the instance stored although the body said it was metadata. A body with no
    metadata part is 400; an application/dicom part beside metadata is its own failure (0xC000)."""
    ds = fresh("CT_small.dcm")
    r = _post(web, [({"Content-Type": "application/dicom"}, part10(ds))], "application/dicom+json")
    assert r.status_code == 400 and "no application/dicom+json part" in r.text  # no metadata at all
    assert not _stored(web, ds.SOPInstanceUID)
    meta = ds.to_json_dict(bulk_data_threshold=1 << 30)
    other = fresh("CT_small.dcm")
    r = _post(
        web,
        [
            ({"Content-Type": "application/dicom+json"}, json.dumps([meta]).encode()),
            ({"Content-Type": "application/dicom"}, part10(other)),
        ],
        "application/dicom+json",
    )
    assert r.status_code == 202 and _failures(r) == [0xC000]  # the metadata is stored, the DICOM part not
    assert _stored(web, ds.SOPInstanceUID) and not _stored(web, other.SOPInstanceUID)
    r = _post(web, [({"Content-Type": "application/octet-stream"}, b"\0" * 64)], "application/dicom+json")
    assert r.status_code == 400 and "no application/dicom+json part" in r.text


def test_stow_json_parts_in_a_dicom_body_are_not_taken_as_instances(web):
    """Before: a type="application/dicom" body with an application/dicom+json part was rebuilt and
    stored as if it had been declared metadata (200)."""
    ds = fresh("CT_small.dcm")
    meta = ds.to_json_dict(bulk_data_threshold=1 << 30)
    r = _post(web, [({"Content-Type": "application/dicom+json"}, json.dumps([meta]).encode())])
    assert r.status_code == 409 and _failures(r) == [0xC000], r.text[:300]
    assert not _stored(web, ds.SOPInstanceUID)


def test_stow_part_without_content_type_is_that_instances_failure(web):
    """PS3.18 10.5.1.2: every part has a Content-Type. Before: taken as application/dicom, stored."""
    lost, good = fresh("CT_small.dcm"), fresh("CT_small.dcm")
    r = _post(web, [({}, part10(lost)), ({"Content-Type": "application/dicom"}, part10(good))])
    assert r.status_code == 202 and _failures(r) == [0xC000], r.text[:300]
    assert not _stored(web, lost.SOPInstanceUID) and _stored(web, good.SOPInstanceUID)
    meta = lost.to_json_dict(bulk_data_threshold=1 << 30)  # the same in a metadata body
    r = _post(
        web,
        [
            ({"Content-Type": "application/dicom+json"}, json.dumps([meta]).encode()),
            ({"Content-Location": "http://x/bulk/1"}, b"\0" * 16),
        ],
        "application/dicom+json",
    )
    assert r.status_code == 202 and _failures(r) == [0xC000]


def test_stow_accept_xml_is_406_and_stores_nothing(web):
    """The response is DICOM JSON only. Before: 200 with JSON to a client that asked for XML."""
    ds = fresh("CT_small.dcm")
    for accept in ("application/dicom+xml", 'multipart/related; type="application/dicom+xml"', "text/html"):
        r = _post(web, [({"Content-Type": "application/dicom"}, part10(ds))], Accept=accept)
        assert r.status_code == 406, (accept, r.status_code)
    assert not _stored(web, ds.SOPInstanceUID)
    for accept in ("application/dicom+json", "application/json", "*/*", "application/dicom+xml;q=0.5, */*;q=0.1"):
        r = _post(web, [({"Content-Type": "application/dicom"}, part10(ds))], Accept=accept)
        assert r.status_code == 200, (accept, r.status_code)


def test_bulk_data_byte_ranges_with_any_accept_and_ignored_invalid_ranges(web):
    """Bulk data is the resource with byte ranges (PS3.18 8.3.5.2): a Range is served from the
    single part whenever Accept allows it (no Accept is */*), an unsatisfiable one is 416, an
    invalid one (RFC 9110 14.1.1) is ignored. Before: no Accept gave the multipart body and
    ignored every Range (bytes=999999999- was 200); bytes=5-3 was 416. Resources without ranges
    (an instance) ignore Range: 200, the whole body."""
    url = _rs(web, web.ct) + "/bulkdata/7FE00010"
    pixels = bytes(web.ct.PixelData)
    r = httpx.get(url, headers={**AUTH, "Range": "bytes=0-9"})
    assert r.status_code == 206 and r.content == pixels[:10]
    assert r.headers["content-range"] == f"bytes 0-9/{len(pixels)}"
    r = httpx.get(url, headers={**AUTH, "Range": "bytes=-4", "Accept": "*/*"})
    assert r.status_code == 206 and r.content == pixels[-4:]
    for unsatisfiable in ("bytes=999999999-", f"bytes={len(pixels)}-", "bytes=-0"):
        r = httpx.get(url, headers={**AUTH, "Range": unsatisfiable})
        assert r.status_code == 416 and r.headers["content-range"] == f"bytes */{len(pixels)}", unsatisfiable
    for invalid in ("bytes=5-3", "bytes=+1-2", "bytes=-", "items=0-1", "bytes=0-1,4-5"):
        r = httpx.get(url, headers={**AUTH, "Range": invalid, "Accept": "application/octet-stream"})
        assert r.status_code == 200 and r.content == pixels, invalid
    multipart = 'multipart/related; type="application/octet-stream"'
    r = httpx.get(url, headers={**AUTH, "Range": "bytes=999999999-", "Accept": multipart})
    assert r.status_code == 200 and r.headers["content-type"].startswith("multipart/related")
    r = httpx.get(_rs(web, web.ct), headers={**AUTH, "Range": "bytes=999999999-", "Accept": "application/dicom"})
    assert r.status_code == 200 and "content-range" not in r.headers and dcmread(io.BytesIO(r.content))


# -- links: a forged Host is not put into RetrieveURL / BulkDataURI (as FHIR, probe 5b finding 5) --


def test_retrieve_urls_do_not_follow_a_forged_host(web):
    """Before: any well-formed Host went into every RetrieveURL and BulkDataURI, so a caching
    proxy in front would hand evil.example links to other viewers."""
    port = int(web.url.split(":")[2].split("/")[0])
    path = f"/dicom-web/studies/{web.ct.StudyInstanceUID}/series/{web.ct.SeriesInstanceUID}/instances"
    for forged in ("evil.example", f"evil.example:{port}", "127.0.0.1:1", "a" * 300, "x y"):
        r = httpx.get(f"http://127.0.0.1:{port}{path}", headers={**AUTH, "Host": forged}, timeout=30)
        assert r.status_code == 200, (forged, r.status_code)
        urls = [v["Value"][0] for d in r.json() for k, v in d.items() if k == "00081190"]
        assert urls and all(u.startswith(f"http://127.0.0.1:{port}/dicom-web/") for u in urls), (forged, urls)
        meta = httpx.get(f"http://127.0.0.1:{port}{path}/{web.ct.SOPInstanceUID}/metadata",
                         headers={**AUTH, "Host": forged}, timeout=30)
        assert "evil" not in meta.text and ":1/" not in meta.text
    for own in (f"localhost:{port}", "localhost", f"127.0.0.1:{port}"):  # names of this server stay
        r = httpx.get(f"http://127.0.0.1:{port}{path}", headers={**AUTH, "Host": own}, timeout=30)
        name = own.split(":")[0]
        assert all(v["Value"][0].startswith(f"http://{name}:{port}/dicom-web/")
                   for d in r.json() for k, v in d.items() if k == "00081190")
