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


# -- retrieve of an instance stored compressed: sent as stored ------------------------------------

J2K_LOSSLESS = "1.2.840.10008.1.2.4.90"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
US_IMAGE = "1.2.840.10008.5.1.4.1.1.6.1"


@pytest.fixture
def j2k_archive(engine_factory, tmp_path):
    """US1_J2KR (Ultrasound, JPEG 2000 lossless) stored as received, a STORESCP move destination
    that prefers JPEG 2000 lossless (+xv: it accepts it and the uncompressed syntaxes)."""
    from tests.dicom_peers import StoreSCP, dicom_yaml, storescu_any

    scp = StoreSCP(tmp_path / "scp", extra=("+xv",))
    e = engine_factory(dicom_yaml(calling="[TESTSCU, GETSCU]", extra=(
        f"      move_destinations:\n        STORESCP: {{host: 127.0.0.1, port: {scp.port}}}\n")))
    ds = dcmread(data_file("US1_J2KR.dcm"))
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    src = tmp_path / "us-j2k.dcm"
    ds.save_as(src, enforce_file_format=True)
    port = e.address("dcm")[1]
    assert storescu_any(port, [src]) == ["Success"]
    yield port, ds, scp
    scp.stop()


def _as_stored(path, original) -> bool:
    got = dcmread(path)
    return str(got.file_meta.TransferSyntaxUID) == J2K_LOSSLESS and got.PixelData == original.PixelData


def test_getscu_preferring_the_stored_syntax_gets_it_as_stored(j2k_archive, tmp_path):
    """DCMTK getscu +xv proposes, for each storage class, one SCP-role context [JPEG 2000 lossless,
    Explicit LE, Big Endian, Implicit LE]; the listener accepted Explicit LE (its own first) and
    decompressed. Now the SCP-role context takes the requestor's order: the instance arrives as
    stored, its encapsulated pixel data byte for byte."""
    from tests.dicom_peers import run

    port, ds, _scp = j2k_archive
    out = tmp_path / "got"
    out.mkdir()
    g = run("getscu", "-v", "+xv", "-S", "-aet", "GETSCU", "-aec", "MEDRELAY", "-od", str(out),
            "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={ds.StudyInstanceUID}", "127.0.0.1", str(port))
    assert g.returncode == 0, g.stdout
    files = sorted(out.iterdir())
    assert len(files) == 1 and _as_stored(files[0], ds), dcmread(files[0]).file_meta.TransferSyntaxUID
    # getscu's default (+x=: uncompressed only) still gets it decoded
    out2 = tmp_path / "got2"
    out2.mkdir()
    g = run("getscu", "-v", "-S", "-aet", "GETSCU", "-aec", "MEDRELAY", "-od", str(out2),
            "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={ds.StudyInstanceUID}", "127.0.0.1", str(port))
    assert g.returncode == 0, g.stdout
    assert str(dcmread(next(out2.iterdir())).file_meta.TransferSyntaxUID) == EXPLICIT_LE
    # an instance stored uncompressed, to getscu +xv: sent in what was accepted (JPEG 2000 lossless,
    # encoded losslessly), its pixels unchanged
    from tests.dicom_peers import storescu_any

    ct = dcmread(data_file("CT_small.dcm"))
    ct.StudyInstanceUID, ct.SOPInstanceUID = generate_uid(), generate_uid()
    ct.file_meta.MediaStorageSOPInstanceUID = ct.SOPInstanceUID
    ct.save_as(tmp_path / "ct.dcm", enforce_file_format=True)
    assert storescu_any(port, [tmp_path / "ct.dcm"]) == ["Success"]
    out3 = tmp_path / "got3"
    out3.mkdir()
    g = run("getscu", "-v", "+xv", "-S", "-aet", "GETSCU", "-aec", "MEDRELAY", "-od", str(out3),
            "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={ct.StudyInstanceUID}", "127.0.0.1", str(port))
    assert g.returncode == 0, g.stdout
    got = dcmread(next(out3.iterdir()))
    assert str(got.file_meta.TransferSyntaxUID) == J2K_LOSSLESS
    assert (got.pixel_array == ct.pixel_array).all()


@pytest.mark.parametrize("proposal", ["one_context", "two_contexts"])
def test_pynetdicom_c_get_gets_the_stored_syntax(j2k_archive, tmp_path, proposal):
    """pynetdicom as the C-GET SCU: JPEG 2000 lossless and Explicit LE in one SCP-role context
    (its preference first) or in a context each: the instance comes in the stored syntax."""
    from pynetdicom import AE, build_role, evt
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelGet

    port, ds, _scp = j2k_archive
    got: list[tuple[str, bytes]] = []

    def on_store(event):
        got.append((str(event.context.transfer_syntax), event.dataset.PixelData))
        return 0x0000

    ae = AE(ae_title="GETSCU")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    if proposal == "one_context":
        ae.add_requested_context(US_IMAGE, [J2K_LOSSLESS, EXPLICIT_LE])
    else:
        ae.add_requested_context(US_IMAGE, [EXPLICIT_LE])
        ae.add_requested_context(US_IMAGE, [J2K_LOSSLESS])
    assoc = ae.associate("127.0.0.1", port, ae_title="MEDRELAY", ext_neg=[build_role(US_IMAGE, scp_role=True)],
                         evt_handlers=[(evt.EVT_C_STORE, on_store)])
    assert assoc.is_established
    try:
        q = Dataset()
        q.QueryRetrieveLevel, q.StudyInstanceUID = "STUDY", ds.StudyInstanceUID
        statuses = [int(st.Status) for st, _ in assoc.send_c_get(q, StudyRootQueryRetrieveInformationModelGet)]
    finally:
        assoc.release()
    assert statuses[-1] == 0x0000, statuses
    assert got == [(J2K_LOSSLESS, ds.PixelData)]


def test_c_move_to_a_peer_accepting_the_stored_syntax_sends_it_as_stored(j2k_archive):
    """movescu to STORESCP (+xv): the sub-association proposes the stored syntax in a context of
    its own and an uncompressed fallback; the stored one is used."""
    from tests.conftest import wait_until
    from tests.dicom_peers import run

    port, ds, scp = j2k_archive
    mv = run("movescu", "-v", "-S", "-aet", "TESTSCU", "-aec", "MEDRELAY", "-aem", "STORESCP",
             "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={ds.StudyInstanceUID}", "127.0.0.1", str(port))
    assert mv.returncode == 0, mv.stdout
    wait_until(lambda: len(scp.files()) == 1, timeout=30)
    assert _as_stored(scp.files()[0], ds)
