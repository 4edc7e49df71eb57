"""`medrelay import` loads folders into a running engine through each channel's own protocol."""

import os
import subprocess
import sys

from dicom_peers import data_file
from mllp_peers import adt
from pydicom import dcmread
from pydicom.uid import generate_uid
from sqlalchemy import func, select

from engine.store import schema

TOKEN = "import-test-token-31c9"
YAML = """
store: {url: "sqlite:///data/medrelay.db", blobs: data/blobs}
keys: {kek_file: data/keys.json}
channels:
  hl7:
    source: {type: mllp, port: 0}
  dcm:
    source: {type: dicom, port: 0, ae_title: MEDRELAY, calling_aets: [MEDRELAY-IMPORT]}
  api:
    source: {type: fhir, port: 0, auth: {bearer_tokens: ["${IMPORT_TOKEN}"]}}
"""


def counts(eng):
    m = schema.messages
    with eng.store.engine.connect() as c:
        return dict(c.execute(select(m.c.channel, func.count()).group_by(m.c.channel)).all())


def medrelay_import(eng, channel, *paths):
    return subprocess.run([sys.executable, "-m", "engine.cli", "import", "-c", str(eng.config_path), "--channel",
                           channel, "--port", str(eng.address(channel)[1]), *map(str, paths)],
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "MEDRELAY_API_TOKEN": TOKEN})


def test_import_hl7_dicom_fhir(engine_factory, tmp_path):
    eng = engine_factory(YAML, env={"IMPORT_TOKEN": TOKEN})
    hl7 = tmp_path / "hl7"
    hl7.mkdir()
    # one file with two messages as text lines, one MLLP-framed file, one duplicate
    (hl7 / "a.hl7").write_bytes((adt("IMP1") + adt("IMP2")).replace(b"\r", b"\n"))
    (hl7 / "b.mllp").write_bytes(b"\x0b" + adt("IMP3") + b"\x1c\r")
    (hl7 / "c.hl7").write_bytes(adt("IMP1"))
    r = medrelay_import(eng, "hl7", hl7)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "4 of 4 accepted" in r.stdout
    dcm = tmp_path / "dcm"
    dcm.mkdir()
    base = dcmread(data_file("CT_small.dcm"))
    for i in range(3):
        base.SOPInstanceUID = generate_uid()
        base.file_meta.MediaStorageSOPInstanceUID = base.SOPInstanceUID
        base.save_as(dcm / f"{i}.dcm", enforce_file_format=True)
    (dcm / "notes.txt").write_text("not dicom")
    r = medrelay_import(eng, "dcm", dcm)
    assert r.returncode == 1 and "3 of 4 accepted" in r.stdout and "not DICOM=1" in r.stdout, r.stdout
    fhir = tmp_path / "fhir"
    fhir.mkdir()
    (fhir / "p.json").write_text('{"resourceType": "Patient", "name": [{"family": "Import"}]}')
    r = medrelay_import(eng, "api", fhir)
    assert r.returncode == 0 and "1 of 1 accepted" in r.stdout, r.stdout + r.stderr
    assert counts(eng) == {"hl7": 3, "dcm": 3, "api": 1}  # the re-sent IMP1 was recognised
