"""DICOM correctness leftovers of issue 13 (docs/notes/issue-13-dicom-edges.md): `medrelay import`
of a file whose meta names another SOP Instance UID, the transfer syntax a retrieve sends a
compressed instance in, and MPPS code strings sent in lower case.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
from pydicom import Dataset, dcmread
from pydicom.uid import generate_uid
from sqlalchemy import select

from engine.store.dicom import index as idx
from tests.dicom_peers import data_file
from tests.test_dicom_uid_conflicts import _yaml  # its channels: dcm, dcmr, drop (file), web (STOW-RS)

TOKEN = "dicom-edges-token-0123456789abcdef"


@pytest.fixture
def eng(engine_factory, store_url, tmp_path):
    data = tmp_path / "data"
    (data / "drop").mkdir(parents=True)
    return engine_factory(_yaml(store_url, data), env={"DW_TOKEN": TOKEN})


def indexed_sop_uids(eng) -> list[str]:
    with eng.store.engine.connect() as c:
        return sorted(str(u) for u in c.execute(select(idx.instances.c.sop_uid)).scalars())


def test_import_sends_a_file_under_its_data_sets_uids(eng, tmp_path):
    """A pydicom-edited file (new SOPInstanceUID, file meta kept from its source) is imported under
    the data set's UID, as STOW-RS and the file source store it (before: 0xA900, the command named
    the meta's UID); a file whose meta and data set agree goes in as before."""
    folder = tmp_path / "import"
    folder.mkdir()
    edited = dcmread(data_file("CT_small.dcm"))
    edited.SOPInstanceUID = generate_uid()  # the meta still names CT_small's own UID
    edited.save_as(folder / "edited.dcm", enforce_file_format=False)
    plain = dcmread(data_file("MR_small.dcm"))
    plain.SOPInstanceUID = plain.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    plain.save_as(folder / "plain.dcm", enforce_file_format=True)
    assert dcmread(folder / "edited.dcm").file_meta.MediaStorageSOPInstanceUID != edited.SOPInstanceUID
    r = subprocess.run([sys.executable, "-m", "engine.cli", "import", "-c", str(eng.config_path), "--channel", "dcm",
                        "--port", str(eng.address("dcm")[1]), "--calling-aet", "TESTSCU", str(folder)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "2 accepted, 0 rejected" in r.stdout, r.stdout
    assert indexed_sop_uids(eng) == sorted([str(edited.SOPInstanceUID), str(plain.SOPInstanceUID)])



# -- MPPS: a lower-case Performed Procedure Step Status -------------------------------------------

@pytest.fixture
def mpps_eng(engine_factory, tmp_path):
    from tests.mllp_peers import MLLPReceiver
    from tests.test_dicom_mpps import YAML

    rx = MLLPReceiver().start()
    (tmp_path / "fhir").mkdir()
    try:
        yield engine_factory(YAML.format(rx=rx.port, out=tmp_path / "fhir"))
    finally:
        rx.stop()


def stored_step(eng, uid: str) -> tuple[str, str]:
    """(the row's state, the stored data set's Performed Procedure Step Status)."""
    from engine.store.dicom import mpps as steps
    from listeners.dicom_mpps import read_step

    with eng.store.engine.connect() as conn:
        seen = steps.get(conn, uid)
        assert seen is not None
        return seen.state, str(read_step(steps.dataset_bytes(eng.store, conn, seen)).PerformedProcedureStepStatus)


def test_mpps_lower_case_status_is_stored_upper_case(mpps_eng):
    """pynetdicom as the modality: N-CREATE with ``in progress`` and N-SET with ``completed `` are
    accepted, and the step's stored data set says IN PROGRESS / COMPLETED as its row does (before:
    the data set kept the lower case). The same status again in another case is no change."""
    from pynetdicom.sop_class import ModalityPerformedProcedureStep

    from tests.test_dicom_mpps import completed, modality, step

    assoc = modality(mpps_eng.address("modalities")[1])
    try:
        uid = generate_uid()
        ds = step()
        ds.PerformedProcedureStepStatus = "in progress"
        assert assoc.send_n_create(ds, ModalityPerformedProcedureStep, uid)[0].Status == 0x0000
        assert stored_step(mpps_eng, uid) == ("IN PROGRESS", "IN PROGRESS")
        again = Dataset()
        again.PerformedProcedureStepStatus = "In Progress"
        assert assoc.send_n_set(again, ModalityPerformedProcedureStep, uid)[0].Status == 0x0000
        assert stored_step(mpps_eng, uid) == ("IN PROGRESS", "IN PROGRESS")
        mods = completed(generate_uid(), generate_uid(), state="completed ")
        assert assoc.send_n_set(mods, ModalityPerformedProcedureStep, uid)[0].Status == 0x0000
        assert stored_step(mpps_eng, uid) == ("COMPLETED", "COMPLETED")
    finally:
        assoc.release()
