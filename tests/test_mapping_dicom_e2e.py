"""End to end: DCMTK storescu sends two CT instances to an engine whose route has a dicom_map; the files
the route writes carry the mapped attributes and consistently regenerated UIDs."""

from __future__ import annotations

import pytest
from conftest import delivered_files, need_tool
from dicom_peers import data_file, storescu
from pydicom import dcmread
from pydicom.uid import generate_uid

CONFIG = """
store: {url: "sqlite:///data/m.db", blobs: data/blobs}
keys: {kek_file: data/keys.json}
tables:
  stations: {values: {CT01: {target_code: Radiology, institution: General Hospital}}}
channels:
  dcm:
    source: {type: dicom, host: 127.0.0.1, port: 0, ae_title: MEDRELAY, calling_aets: [TESTSCU]}
    routes:
      - name: pacs
        transforms:
          - type: dicom_map
            rules:
              - lookup: {field: StationName, table: stations,
                         set: {InstitutionName: institution, InstitutionalDepartmentName: target_code}}
              - delete: ['(0009,"ACME 1.0",10)']
              - regenerate_uids: [StudyInstanceUID, SeriesInstanceUID, SOPInstanceUID]
        to: {type: file, path: out}
"""


@pytest.mark.dcmtk
def test_storescu_through_dicom_map(engine_factory, tmp_path):
    need_tool("/usr/bin/storescu")
    files, originals = [], []
    base = dcmread(data_file("CT_small.dcm"))
    for i in range(2):
        base.SOPInstanceUID = generate_uid()
        base.file_meta.MediaStorageSOPInstanceUID = base.SOPInstanceUID
        base.StationName = "CT01"
        base.InstitutionName = "general hosp."
        base.private_block(0x0009, "ACME 1.0", create=True).add_new(0x10, "LO", "DOE JANE")
        f = tmp_path / f"ct{i}.dcm"
        base.save_as(f, enforce_file_format=True)
        files.append(f)
        originals.append(str(base.SOPInstanceUID))
    e = engine_factory(CONFIG)
    r = storescu(e.address("dcm")[1], files)
    assert r.returncode == 0, r.stdout
    out = e.wait_for(lambda: (lambda got: got if len(got) == 2 else None)(delivered_files(e.data_dir / "out")))
    got = [dcmread(p) for p in out]
    for ds in got:
        assert ds.InstitutionName == "General Hospital" and ds.InstitutionalDepartmentName == "Radiology"
        assert 0x00091010 not in ds
        assert str(ds.SOPInstanceUID).startswith("2.25.") and str(ds.SOPInstanceUID) not in originals
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        assert ds.PixelData == base.PixelData
    assert got[0].StudyInstanceUID == got[1].StudyInstanceUID != base.StudyInstanceUID
    assert got[0].SeriesInstanceUID == got[1].SeriesInstanceUID
    assert got[0].SOPInstanceUID != got[1].SOPInstanceUID
