"""ContentDate, ContentTime, ImageType and AcquisitionNumber at the IMAGE level (schema v6).

Before v6 the index kept them nowhere, so every C-FIND IMAGE-level and QIDO-RS /instances answer
had them empty and matching on them found nothing. Instances go in by every intake path that
indexes (C-STORE with the header scan, a deflated data set read by pydicom, a large data set
streamed to its blob and indexed from its header, STOW-RS); they are found with DCMTK findscu
and dicomweb-client, peers nobody here wrote.
"""

from __future__ import annotations

import pytest
from dicomweb_client.api import DICOMwebClient
from pydicom import dcmread
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, generate_uid
from sqlalchemy import select

from bench.large import MF_GRAYSCALE_BYTE_SC
from engine.store import schema
from engine.store.db import STREAM_MIN, is_chunked
from engine.store.dicom import index as idx
from tests.dicom_peers import data_file, findscu, storescu_any

pytestmark = pytest.mark.dcmtk

TOKEN = "instance-attrs-token-0123456789"
YAML = """
store: {url: "sqlite:///data/medrelay.db", blobs: data/blobs}
keys: {kek_file: data/keys.json}
channels:
  dcm:
    source: {type: dicom, port: 0, ae_title: MEDRELAY, calling_aets: [TESTSCU]}
    routes: []
  web:
    source: {type: dicomweb, host: 127.0.0.1, port: 0, base_path: /dicom-web,
             auth: {bearer_tokens: ["${DW_TOKEN}"]}}
    routes:
      - {name: archive, to: {type: store}}
"""
STUDY, SERIES = generate_uid(), generate_uid()
# name: (ContentDate, ContentTime, ImageType, AcquisitionNumber); "bare" has none of them
VALUES = {
    "scan": ("20240105", "101500", ["ORIGINAL", "PRIMARY", "AXIAL"], 3),
    "deflated": ("20240110", "143000.5", ["DERIVED", "SECONDARY"], 7),
    "large": ("20240120", "235959", ["ORIGINAL", "PRIMARY", "LOCALIZER"], 12),
    "stow": ("20231231", "080000", ["DERIVED", "PRIMARY"], 1),
    "bare": None,
}


def _instance(name: str):
    ds = dcmread(data_file("CT_small.dcm"))
    for kw in ("ContentDate", "ContentTime", "ImageType", "AcquisitionNumber"):
        if kw in ds:
            delattr(ds, kw)
    if VALUES[name] is not None:
        ds.ContentDate, ds.ContentTime, ds.ImageType, ds.AcquisitionNumber = VALUES[name]
    ds.StudyInstanceUID, ds.SeriesInstanceUID = STUDY, SERIES
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.InstanceNumber = list(VALUES).index(name) + 1
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    if name == "deflated":
        ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    if name == "large":  # more than STREAM_MIN of pixel data: streamed to its blob, indexed from its header
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = MF_GRAYSCALE_BYTE_SC
        ds.Rows = ds.Columns = 1024
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
        ds.NumberOfFrames = STREAM_MIN // (1 << 20) + 1
        ds.PixelData = bytes(ds.NumberOfFrames << 20)
        ds["PixelData"].VR = "OB"
    return ds


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    from tests.conftest import EngineThread

    d = tmp_path_factory.mktemp("attrs")
    e = EngineThread(YAML, d, env={"DW_TOKEN": TOKEN})
    e.port = e.address("dcm")[1]
    host, port = e.address("web")
    e.client = DICOMwebClient(url=f"http://{host}:{port}/dicom-web", headers={"Authorization": f"Bearer {TOKEN}"})
    e.data = {name: _instance(name) for name in VALUES}
    files = []
    for name in ("scan", "deflated", "large", "bare"):
        files.append(d / f"{name}.dcm")
        e.data[name].save_as(files[-1], enforce_file_format=True)
    assert storescu_any(e.port, files) == ["Success"] * len(files)
    stow = e.client.store_instances([e.data["stow"]])
    assert "FailedSOPSequence" not in stow
    e.dir = d
    yield e
    e.stop()


def find(archive, keys):
    proc, res = findscu(archive.port, "IMAGE", {"StudyInstanceUID": STUDY, "SeriesInstanceUID": SERIES,
                                                "SOPInstanceUID": "", **keys}, out_dir=archive.dir / "rsp")
    assert "0x0000" in proc.stdout or "Success" in proc.stdout, proc.stdout
    uid_to_name = {str(ds.SOPInstanceUID): n for n, ds in archive.data.items()}
    return sorted(uid_to_name[str(r.SOPInstanceUID)] for r in res), res


def test_the_large_one_went_the_streamed_path(archive):
    with archive.store.engine.connect() as conn:
        found = idx.locate(conn, str(archive.data["large"].SOPInstanceUID))
        assert found is not None and found.size > STREAM_MIN
        row = conn.execute(select(schema.blobs).where(schema.blobs.c.id == found.payload_blob)).mappings().one()
        assert is_chunked(row)
        assert str(archive.data["deflated"].file_meta.TransferSyntaxUID) == DeflatedExplicitVRLittleEndian
        ts = idx.locate(conn, str(archive.data["deflated"].SOPInstanceUID)).ref.transfer_syntax
        assert ts == DeflatedExplicitVRLittleEndian


def test_universal_matching_returns_the_values_of_every_intake_path(archive):
    names, res = find(archive, {"ContentDate": "", "ContentTime": "", "ImageType": "", "AcquisitionNumber": ""})
    assert names == sorted(VALUES)
    for r in res:
        name = next(n for n, ds in archive.data.items() if ds.SOPInstanceUID == r.SOPInstanceUID)
        want = VALUES[name]
        got = (r.ContentDate or None, r.ContentTime or None, list(r.ImageType) if r.ImageType else None,
               int(r.AcquisitionNumber) if r.AcquisitionNumber != "" and r.AcquisitionNumber is not None else None)
        assert got == (want or (None, None, None, None)), name
        # the attributes are present (empty when the instance has none), as requested: PS3.4 C.4.1.1.3.2
        assert {"ContentDate", "ContentTime", "ImageType", "AcquisitionNumber"} <= set(r.dir()), name


def test_content_date_and_time_single_values_and_ranges(archive):
    assert find(archive, {"ContentDate": "20240110"})[0] == ["deflated"]
    assert find(archive, {"ContentDate": "20240101-20240115"})[0] == ["deflated", "scan"]
    assert find(archive, {"ContentDate": "20240106-"})[0] == ["deflated", "large"]
    assert find(archive, {"ContentDate": "-20231231"})[0] == ["stow"]
    assert find(archive, {"ContentDate": "20250101-"})[0] == []
    assert find(archive, {"ContentTime": "101500"})[0] == ["scan"]
    assert find(archive, {"ContentTime": "100000-150000"})[0] == ["deflated", "scan"]
    assert find(archive, {"ContentTime": "143000.5-"})[0] == ["deflated", "large"]
    assert find(archive, {"ContentTime": "-0900"})[0] == ["stow"]
    both = find(archive, {"ContentDate": "20240101-20240131", "ContentTime": "120000-"})[0]
    assert both == ["deflated", "large"]


def test_a_short_range_bound_narrows_as_it_matches(archive):
    """A bound shorter than YYYYMMDD compares the value's prefix in the matcher; the SQL narrowing
    before it used the bound as it came ("2024" sorts before "20240105"), so it found nothing."""
    assert find(archive, {"ContentDate": "20240101-2024"})[0] == ["deflated", "large", "scan"]
    assert find(archive, {"ContentDate": "-2024"})[0] == ["deflated", "large", "scan", "stow"]
    assert find(archive, {"ContentDate": "-202401"})[0] == ["deflated", "large", "scan", "stow"]
    assert find(archive, {"ContentDate": "-2023"})[0] == ["stow"]


def test_image_type_and_acquisition_number_single_values(archive):
    assert find(archive, {"ImageType": "LOCALIZER"})[0] == ["large"]  # any of its values (PS3.4 C.2.2.2.1)
    assert find(archive, {"ImageType": "DERIVED"})[0] == ["deflated", "stow"]
    assert find(archive, {"ImageType": "PRIMARY"})[0] == ["large", "scan", "stow"]
    assert find(archive, {"ImageType": "SEC*"})[0] == ["deflated"]
    assert find(archive, {"ImageType": "derived"})[0] == []  # CS: case-sensitive
    assert find(archive, {"AcquisitionNumber": "7"})[0] == ["deflated"]
    assert find(archive, {"AcquisitionNumber": "012"})[0] == ["large"]  # IS: compared as numbers
    assert find(archive, {"AcquisitionNumber": "99"})[0] == []
    names, res = find(archive, {"ImageType": "AXIAL", "AcquisitionNumber": ""})
    assert names == ["scan"] and list(res[0].ImageType) == ["ORIGINAL", "PRIMARY", "AXIAL"]
    assert int(res[0].AcquisitionNumber) == 3


def test_qido_instances_match_and_return_them(archive):
    c = archive.client
    fields = ["ContentDate", "ContentTime", "ImageType", "AcquisitionNumber"]

    def names(found):
        uid_to_name = {str(ds.SOPInstanceUID): n for n, ds in archive.data.items()}
        return sorted(uid_to_name[f["00080018"]["Value"][0]] for f in found)

    got = c.search_for_instances(STUDY, SERIES, fields=fields)
    assert names(got) == sorted(VALUES)
    by_uid = {f["00080018"]["Value"][0]: f for f in got}
    scan = by_uid[str(archive.data["scan"].SOPInstanceUID)]
    assert scan["00080023"] == {"vr": "DA", "Value": ["20240105"]}
    assert scan["00080033"] == {"vr": "TM", "Value": ["101500"]}
    assert scan["00080008"] == {"vr": "CS", "Value": ["ORIGINAL", "PRIMARY", "AXIAL"]}
    assert scan["00200012"] == {"vr": "IS", "Value": [3]}
    assert "Value" not in by_uid[str(archive.data["bare"].SOPInstanceUID)].get("00080023", {})
    ranged = c.search_for_instances(search_filters={"ContentDate": "20240101-20240115"}, fields=fields)
    assert names(ranged) == ["deflated", "scan"]
    assert names(c.search_for_instances(STUDY, search_filters={"ContentTime": "230000-"})) == ["large"]
    assert names(c.search_for_instances(search_filters={"ImageType": "SECONDARY"})) == ["deflated"]
    assert names(c.search_for_instances(STUDY, SERIES, search_filters={"AcquisitionNumber": "1"})) == ["stow"]
