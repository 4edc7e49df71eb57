"""A number outside IS's 32-bit range (PS3.5 6.2) in an indexed integer attribute: stored and
answered, not indexed (helper finding, session 8). Before, on PostgreSQL an InstanceNumber or
SeriesNumber above 2147483647 made the index insert fail, so the C-STORE was refused
(0xA700/0xC000) though the instance is readable; SQLite took it. storescu and findscu, both stores.
"""

from __future__ import annotations

import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid

from tests.dicom_peers import data_file, dicom_yaml, findscu, storescu_any

pytestmark = pytest.mark.dcmtk


def test_out_of_range_numbers_are_stored_and_found(engine_factory, store_url, tmp_path):
    eng = engine_factory(dicom_yaml().replace("sqlite:///data/medrelay.db", store_url))
    port = eng.address("dcm")[1]
    ds = dcmread(data_file("CT_small.dcm"))
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.InstanceNumber, ds.SeriesNumber = "4294967296", "-99999999999"
    path = tmp_path / "big-numbers.dcm"
    ds.save_as(path, enforce_file_format=True)
    assert storescu_any(port, [path]) == ["Success"]
    proc, found = findscu(port, "IMAGE", {"StudyInstanceUID": ds.StudyInstanceUID,
                                          "SeriesInstanceUID": ds.SeriesInstanceUID, "SOPInstanceUID": "",
                                          "InstanceNumber": ""}, out_dir=tmp_path / "rsp")
    assert [str(r.SOPInstanceUID) for r in found] == [str(ds.SOPInstanceUID)], proc.stdout
    assert found[0].get("InstanceNumber") in (None, "")  # not indexed: outside the column's range
