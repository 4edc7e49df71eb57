"""A study pushed instance by instance becomes ONE ImagingStudy bundle and ONE ORU after its
quiet period (route `debounce`), listing every instance, with DCMTK storescu as the modality."""

import json

from conftest import delivered_files
from dicom_peers import data_file, store_statuses, storescu
from pydicom import dcmread
from pydicom.uid import generate_uid

YAML = """
store: {url: "sqlite:///data/medrelay.db", blobs: data/blobs}
keys: {kek_file: data/keys.json}
channels:
  ct:
    source: {type: dicom, port: 0, ae_title: MEDRELAY, calling_aets: [TESTSCU]}
    routes:
      - {name: archive, to: {type: store}}
      - name: imaging-study
        debounce: {key: StudyInstanceUID, seconds: 1.5}
        transforms: [{type: dicom_to_fhir}]
        to: {type: file, path: out/fhir}
      - name: notify-ris
        debounce: {key: StudyInstanceUID, seconds: 1.5}
        transforms: [{type: dicom_to_hl7, message: "ORU^R01"}]
        to: {type: file, path: out/ris}
"""


def test_one_study_one_imaging_study_after_quiet_period(engine_factory, tmp_path):
    eng = engine_factory(YAML)
    base = dcmread(data_file("CT_small.dcm"))
    files = []
    series = [generate_uid(), generate_uid()]
    for i in range(6):
        base.SOPInstanceUID = generate_uid()
        base.file_meta.MediaStorageSOPInstanceUID = base.SOPInstanceUID
        base.SeriesInstanceUID = series[i % 2]
        base.SeriesNumber = 1 + i % 2
        base.InstanceNumber = i + 1
        f = tmp_path / f"ct{i}.dcm"
        base.save_as(f, enforce_file_format=True)
        files.append(f)
    r = storescu(eng.address("ct")[1], files)
    assert store_statuses((r.stdout or "") + (r.stderr or "")) == ["Success"] * 6
    out = eng.data_dir / "out"
    eng.wait_for(lambda: len(delivered_files(out / "fhir")) == 1 and len(delivered_files(out / "ris")) == 1,
                 timeout=30)
    bundle = json.loads(delivered_files(out / "fhir")[0].read_text())
    study = next(e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == "ImagingStudy")
    assert study["numberOfSeries"] == 2 and study["numberOfInstances"] == 6
    assert sorted(len(s["instance"]) for s in study["series"]) == [3, 3]
    ris = delivered_files(out / "ris")[0].read_bytes()
    assert b"ORU^R01" in ris and str(base.StudyInstanceUID).encode() in ris
