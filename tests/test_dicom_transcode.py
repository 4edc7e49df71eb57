"""Transcoding on retrieve and forward (issue 13 item 2) against DCMTK peers that take only
uncompressed syntaxes: getscu and movescu (to storescp) on JPEG Baseline (single and
120-frame), JPEG 2000, JPEG-LS and RLE instances from pydicom's test files, the pixel
data received checked against the decoded original; an instance whose pixel data cannot
be decoded is a failed sub-operation, not a sent one; a C-STORE destination with
``transfer_syntax:`` sends what it says.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
from dicom_peers import StoreSCP, dicom_yaml, run, storescu_any
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.encaps import encapsulate
from pydicom.uid import generate_uid

pytestmark = pytest.mark.dcmtk

FILES = {
    "SC_rgb_jpeg_dcmtk.dcm": "1.2.840.10008.1.2.4.50",
    "color3d_jpeg_baseline.dcm": "1.2.840.10008.1.2.4.50",  # 120 frames, the multi-frame case
    "US1_J2KR.dcm": "1.2.840.10008.1.2.4.90",
    "JPEG2000.dcm": "1.2.840.10008.1.2.4.91",
    "MR_small_jpeg_ls_lossless.dcm": "1.2.840.10008.1.2.4.80",
    "MR_small_RLE.dcm": "1.2.840.10008.1.2.5",
}
UNCOMPRESSED = ("1.2.840.10008.1.2.1", "1.2.840.10008.1.2", "1.2.840.10008.1.2.2")
MOVE_DEST = """      move_destinations:
        STORESCP: {{host: 127.0.0.1, port: {port}}}
"""


def fresh_copies(tmp, names=FILES) -> dict:
    """Each test file with new UIDs (several share theirs), saved as sent; name -> (path, dataset)."""
    tmp.mkdir(parents=True, exist_ok=True)
    out = {}
    for name in names:
        ds = dcmread(get_testdata_file(name))
        assert str(ds.file_meta.TransferSyntaxUID) == FILES.get(name, ds.file_meta.TransferSyntaxUID)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        path = tmp / name
        ds.save_as(path, enforce_file_format=True)
        out[name] = (path, ds)
    return out


def check_received(received: list, originals: dict) -> None:
    by_uid = {str(ds.SOPInstanceUID): (name, ds) for name, (_p, ds) in originals.items()}
    got = {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID): p for p in received}
    assert set(got) == set(by_uid)
    for uid, p in got.items():
        name, original = by_uid[uid]
        ds = dcmread(p)
        assert str(ds.file_meta.TransferSyntaxUID) in UNCOMPRESSED, name
        assert np.array_equal(ds.pixel_array, original.pixel_array), name  # the decoded original
        assert str(ds.get("LossyImageCompression", "00")) == ("01" if name in (
            "SC_rgb_jpeg_dcmtk.dcm", "color3d_jpeg_baseline.dcm", "JPEG2000.dcm") else
            str(original.get("LossyImageCompression", "00"))), name


@pytest.fixture
def archive(engine_factory, tmp_path):
    scp = StoreSCP(tmp_path / "scp")  # DCMTK storescp: uncompressed syntaxes only (its default)
    e = engine_factory(dicom_yaml(calling="[TESTSCU, GETSCU]", extra=MOVE_DEST.format(port=scp.port)))
    files = fresh_copies(tmp_path / "in")
    port = e.address("dcm")[1]
    assert storescu_any(port, [p for p, _ds in files.values()]) == ["Success"] * len(files)
    yield e, port, files, scp
    scp.stop()


def test_getscu_uncompressed_only_gets_every_compressed_instance(archive, tmp_path):
    e, port, files, _scp = archive
    out = tmp_path / "got"
    out.mkdir()
    studies = "\\".join(str(ds.StudyInstanceUID) for _p, ds in files.values())
    g = run("getscu", "-v", "-S", "-aet", "GETSCU", "-aec", "MEDRELAY", "-od", str(out),
            "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={studies}", "127.0.0.1", str(port))
    assert g.returncode == 0, g.stdout
    check_received(sorted(out.iterdir()), files)


def test_movescu_to_uncompressed_storescp(archive):
    e, port, files, scp = archive
    studies = "\\".join(str(ds.StudyInstanceUID) for _p, ds in files.values())
    mv = run("movescu", "-v", "-S", "-aet", "TESTSCU", "-aec", "MEDRELAY", "-aem", "STORESCP",
             "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={studies}", "127.0.0.1", str(port))
    assert mv.returncode == 0, mv.stdout
    check_received(scp.files(), files)


def test_undecodable_pixel_data_is_a_failed_suboperation(engine_factory, tmp_path):
    e = engine_factory(dicom_yaml(calling="[TESTSCU, GETSCU]"))
    port = e.address("dcm")[1]
    good = fresh_copies(tmp_path / "in", ["SC_rgb_jpeg_dcmtk.dcm"])
    bad_path, bad = fresh_copies(tmp_path / "bad", ["SC_rgb_jpeg_dcmtk.dcm"])["SC_rgb_jpeg_dcmtk.dcm"]
    bad.StudyInstanceUID = good["SC_rgb_jpeg_dcmtk.dcm"][1].StudyInstanceUID
    bad.PixelData = encapsulate([b"\xff\xd8\xff\xe0 not a JPEG stream \xff\xd9" * 4])  # stored as is
    bad.save_as(bad_path, enforce_file_format=True)
    assert storescu_any(port, [good["SC_rgb_jpeg_dcmtk.dcm"][0], bad_path]) == ["Success", "Success"]
    out = tmp_path / "got"
    out.mkdir()
    g = run("getscu", "-v", "-S", "-aet", "GETSCU", "-aec", "MEDRELAY", "-od", str(out),
            "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={bad.StudyInstanceUID}",
            "127.0.0.1", str(port))
    text = (g.stdout or "") + (g.stderr or "")
    got = [str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in out.iterdir()]
    assert got == [str(good["SC_rgb_jpeg_dcmtk.dcm"][1].SOPInstanceUID)]  # the bad one was not sent
    assert "SubOperationsCompleteOneOrMoreFailures" in text, text  # 0xB000: counted as failed, not sent
    assert re.search(r"Number of Completed Suboperations\s*:\s*1\b", text), text
    assert re.search(r"Number of Failed Suboperations\s*:\s*1\b", text), text


def test_route_sends_the_configured_transfer_syntax(engine_factory, tmp_path):
    scp = StoreSCP(tmp_path / "scp", extra=("+xa",))  # accepts every syntax: only our choice decides
    try:
        routes = ("\n      - {name: pacs, to: {type: dicom, host: 127.0.0.1, port: " + str(scp.port) +
                  ", called_ae_title: STORESCP, transfer_syntax: 1.2.840.10008.1.2.4.90}}")
        e = engine_factory(dicom_yaml(routes=routes))
        port = e.address("dcm")[1]
        files = fresh_copies(tmp_path / "in", ["SC_rgb_jpeg_dcmtk.dcm", "MR_small_RLE.dcm"])
        assert storescu_any(port, [p for p, _ds in files.values()]) == ["Success"] * 2
        def received() -> bool:  # two files, both written out (storescp writes as it receives)
            try:
                return len(scp.files()) == 2 and all(dcmread(p, stop_before_pixels=True) for p in scp.files())
            except Exception:
                return False

        e.wait_for(received, timeout=60)
        for p in scp.files():
            ds = dcmread(p)
            assert str(ds.file_meta.TransferSyntaxUID) == "1.2.840.10008.1.2.4.90"
            original = next(o for _p, o in files.values() if o.SOPInstanceUID == ds.SOPInstanceUID)
            assert np.array_equal(ds.pixel_array, original.pixel_array)
    finally:
        scp.stop()


def test_route_lossy_syntax_sends_the_new_instance_under_its_own_uid(engine_factory, tmp_path):
    """A lossy copy is a new instance (PS3.3 C.7.6.1.1.5): the C-STORE command's Affected SOP
    Instance UID must be the data set's new UID. Before, a small instance (the whole-in-memory
    conversion) went out with the original UID in the command and the new one in the data set,
    so storescp named and filed it under a UID the data set does not carry."""
    scp = StoreSCP(tmp_path / "scp", extra=("+xa",))
    try:
        routes = ("\n      - {name: pacs, to: {type: dicom, host: 127.0.0.1, port: " + str(scp.port) +
                  ", called_ae_title: STORESCP, transfer_syntax: 1.2.840.10008.1.2.4.91, lossy_ratio: 10}}")
        e = engine_factory(dicom_yaml(routes=routes))
        port = e.address("dcm")[1]
        (path, original), = fresh_copies(tmp_path / "in", ["MR_small_RLE.dcm"]).values()
        assert storescu_any(port, [path]) == ["Success"]

        def received() -> bool:
            try:
                return len(scp.files()) == 1 and bool(dcmread(scp.files()[0], stop_before_pixels=True))
            except Exception:
                return False

        e.wait_for(received, timeout=60)
        got = scp.files()[0]
        ds = dcmread(got)
        assert str(ds.file_meta.TransferSyntaxUID) == "1.2.840.10008.1.2.4.91"
        assert ds.LossyImageCompression == "01"
        assert ds.SOPInstanceUID != original.SOPInstanceUID  # a new image
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID  # storescp took it from the command
        assert got.name.endswith(str(ds.SOPInstanceUID)), got.name
    finally:
        scp.stop()
