"""Modality Performed Procedure Step SCP (PS3.4 F.7) end to end, pynetdicom as the modality.

An order arrives over MLLP and becomes a worklist item; the modality finds it with DCMTK's
findscu -W, reports the step with N-CREATE / N-SET, and the step is stored, audited, routed
(ORM^O01 status to an MLLP receiver, a FHIR transaction to a folder), and its worklist item
follows it until findscu no longer offers it. DCMTK 3.6.7 has no MPPS SCU (no tool sends
N-CREATE / N-SET for MPPS), so pynetdicom plays the modality; its N-CREATE with a malformed
attribute list is sent with pynetdicom's own DIMSE layer.
"""

from __future__ import annotations

import json
import subprocess
import time
from io import BytesIO
from pathlib import Path

import hl7.client
import pytest
from conftest import need_tool
from mllp_peers import MLLPReceiver, segment
from pydicom import Dataset, dcmread
from pydicom.sequence import Sequence
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.dimse_primitives import N_CREATE
from pynetdicom.sop_class import CTImageStorage, ModalityPerformedProcedureStep
from sqlalchemy import select

from engine.store import schema

GOLDEN = Path(__file__).resolve().parent.parent / "conformance" / "golden" / "hl7"
STUDY = "1.2.826.0.1.3680043.8.498.100"  # the order's IPC-3

YAML = """
store: {{url: "sqlite:///data/medrelay.db", blobs: data/blobs}}
keys: {{kek_file: data/keys.json}}
channels:
  orders:
    source: {{type: mllp, port: 0}}
    routes:
      - name: mwl
        transforms: [{{type: hl7_to_worklist, station_ae_titles: {{CT: CT01}}}}]
        to: {{type: store}}
  modalities:
    source: {{type: dicom, port: 0, ae_title: MEDRELAY, calling_aets: [CT01, FINDSCU]}}
    routes:
      - name: archive
        to: {{type: store}}
      - name: ris
        when: {{event: mpps}}
        transforms: [{{type: mpps_to_hl7, receiving_application: RIS}}]
        to: {{type: mllp, host: 127.0.0.1, port: {rx}, timeout: 5}}
        retry: {{max_attempts: 5, initial_delay: 0.05, max_delay: 0.2}}
      - name: fhir
        when: {{event: mpps}}
        transforms: [{{type: mpps_to_fhir}}]
        to: {{type: file, path: {out}}}
"""


def step(study=STUDY, *, acc="ACC100", station="CT01") -> Dataset:
    """What a CT sends in its N-CREATE (PS3.4 Table F.7.2-1, Type 1 and 2)."""
    item = Dataset()
    item.StudyInstanceUID = study
    item.ReferencedStudySequence = Sequence()
    item.AccessionNumber = acc
    item.PlacerOrderNumberImagingServiceRequest = "PL100"
    item.RequestedProcedureID = "RP100"
    item.RequestedProcedureDescription = "CT Abdomen & Pelvis"
    item.ScheduledProcedureStepID = "SPS100"
    item.ScheduledProcedureStepDescription = ""
    item.ScheduledProtocolCodeSequence = Sequence()
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.ScheduledStepAttributesSequence = Sequence([item])
    ds.PatientName = "Smith^Anna"
    ds.PatientID = "P123"
    ds.PatientBirthDate = "19650304"
    ds.PatientSex = "F"
    ds.ReferencedPatientSequence = Sequence()
    ds.PerformedProcedureStepID = "PPS1"
    ds.PerformedStationAETitle = station
    ds.PerformedStationName = "CT ROOM 1"
    ds.PerformedLocation = ""
    ds.PerformedProcedureStepStartDate = "20261122"
    ds.PerformedProcedureStepStartTime = "093500"
    ds.PerformedProcedureStepStatus = "IN PROGRESS"
    ds.PerformedProcedureStepDescription = "CT Abdomen"
    ds.PerformedProcedureTypeDescription = ""
    ds.ProcedureCodeSequence = Sequence()
    ds.PerformedProcedureStepEndDate = ""
    ds.PerformedProcedureStepEndTime = ""
    ds.Modality = "CT"
    ds.StudyID = "1"
    ds.PerformedProtocolCodeSequence = Sequence()
    ds.PerformedSeriesSequence = Sequence()
    return ds


def completed(series_uid: str, sop_uid: str, state: str = "COMPLETED") -> Dataset:
    ref = Dataset()
    ref.ReferencedSOPClassUID = CTImageStorage
    ref.ReferencedSOPInstanceUID = sop_uid
    s = Dataset()
    s.PerformingPhysicianName = ""
    s.ProtocolName = "ABD"
    s.OperatorsName = ""
    s.SeriesInstanceUID = series_uid
    s.SeriesDescription = ""
    s.RetrieveAETitle = ""
    s.ReferencedImageSequence = Sequence([ref])
    s.ReferencedNonImageCompositeSOPInstanceSequence = Sequence()
    mods = Dataset()
    mods.PerformedProcedureStepStatus = state
    mods.PerformedProcedureStepEndDate = "20261122"
    mods.PerformedProcedureStepEndTime = "095000"
    mods.PerformedSeriesSequence = Sequence([s])
    return mods


def modality(port: int, aet: str = "CT01"):
    ae = AE(ae_title=aet)
    ae.add_requested_context(ModalityPerformedProcedureStep)
    assoc = ae.associate("127.0.0.1", port, ae_title="MEDRELAY")
    assert assoc.is_established
    return assoc


def findscu_w(port: int, tmp: Path, name: str) -> list[Dataset]:
    findscu = need_tool("/usr/bin/findscu")
    out = tmp / name
    out.mkdir()
    proc = subprocess.run(
        [findscu, "-W", "-aet", "FINDSCU", "-aec", "MEDRELAY", "-X", "-od", str(out),
         "-k", "PatientName", "-k", "AccessionNumber", "-k", "StudyInstanceUID",
         "-k", "ScheduledProcedureStepSequence[0].ScheduledStationAETitle=CT01",
         "-k", "ScheduledProcedureStepSequence[0].ScheduledProcedureStepStatus",
         "127.0.0.1", str(port)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return [dcmread(f) for f in sorted(out.glob("rsp*.dcm"))]


def rows(eng, table):
    with eng.store.engine.connect() as c:
        return [dict(r) for r in c.execute(select(table)).mappings()]


@pytest.fixture
def rx():
    r = MLLPReceiver().start()
    yield r
    r.stop()


@pytest.fixture
def eng(engine_factory, rx, tmp_path):
    (tmp_path / "fhir").mkdir()
    e = engine_factory(YAML.format(rx=rx.port, out=tmp_path / "fhir"))
    with hl7.client.MLLPClient(*e.address("orders")) as c:
        ack = c.send_message((GOLDEN / "omi_o23_new_251.hl7").read_bytes().replace(b"\n", b"\r").strip())
        assert b"MSA|AA|" in ack
    return e


@pytest.mark.dcmtk
def test_mpps_lifecycle_worklist_ris_fhir_and_audit(eng, rx, tmp_path):
    port = eng.address("modalities")[1]
    offered = eng.wait_for(lambda: findscu_w(port, tmp_path, "before") or None)
    assert [str(i.AccessionNumber) for i in offered] == ["ACC100"]
    assert offered[0].ScheduledProcedureStepSequence[0].ScheduledProcedureStepStatus == "SCHEDULED"
    uid = generate_uid()
    assoc = modality(port)
    try:
        status, _ = assoc.send_n_create(step(), ModalityPerformedProcedureStep, uid)
        assert status.Status == 0x0000
        # started: still offered (a crashed modality can resume it), with its new status
        started = findscu_w(port, tmp_path, "started")
        assert [i.ScheduledProcedureStepSequence[0].ScheduledProcedureStepStatus for i in started] == ["STARTED"]
        # the RIS hears IN PROGRESS (ORC-5 IP) for the order the step performs
        first = rx.wait_for(1)[0]
        assert segment(first, "MSH")[8] == "ORM^O01^ORM_O01" and segment(first, "MSH")[4] == "RIS"
        orc, obr = segment(first, "ORC"), segment(first, "OBR")
        assert orc[1] == "SC" and orc[2] == "PL100" and orc[3] == "ACC100" and orc[5] == "IP"
        assert obr[18] == "ACC100" and obr[19] == "RP100" and obr[20] == "SPS100" and obr[24] == "CT"
        assert segment(first, "PID")[5] == "Smith^Anna"
        series_uid, sop_uid = generate_uid(), generate_uid()
        status, _ = assoc.send_n_set(completed(series_uid, sop_uid), ModalityPerformedProcedureStep, uid)
        assert status.Status == 0x0000
        # final: no more change (PS3.4 F.7.2.2.4: 0x0110, Error ID 0xA710) ...
        mods = Dataset()
        mods.PerformedProcedureStepDescription = "changed afterwards"
        status, _ = assoc.send_n_set(mods, ModalityPerformedProcedureStep, uid)
        assert status.Status == 0x0110 and status.ErrorID == 0xA710
        # ... but a retry of the N-SET that completed it changes nothing and succeeds
        status, _ = assoc.send_n_set(completed(series_uid, sop_uid), ModalityPerformedProcedureStep, uid)
        assert status.Status == 0x0000
    finally:
        assoc.release()
    assert findscu_w(port, tmp_path, "after") == []  # a completed step is no longer offered
    done = rx.wait_for(2)[1]
    assert segment(done, "ORC")[5] == "CM" and segment(done, "OBR")[8] == "20261122095000"
    # FHIR: the Procedure completed, the ImagingStudy available with the step's series
    def bundles():
        found = [json.loads(p.read_text()) for p in (tmp_path / "fhir").glob("*.json")]
        return found if len(found) == 2 else None
    got = eng.wait_for(bundles)
    res = [{e["resource"]["resourceType"]: e["resource"] for e in b["entry"]} for b in got]
    final = next(r for r in res if r["Procedure"]["status"] == "completed")
    assert {r["Procedure"]["status"] for r in res} == {"in-progress", "completed"}
    assert final["Procedure"]["identifier"][0]["value"] == f"urn:oid:{uid}"
    assert final["ImagingStudy"]["status"] == "available"
    assert final["ImagingStudy"]["series"][0]["uid"] == series_uid
    assert final["ImagingStudy"]["series"][0]["instance"][0]["uid"] == sop_uid
    # stored: the step, its messages (never routed to the archive route, which has no `when: {event}`)
    (row,) = rows(eng, schema.metadata.tables["dicom_mpps"])
    assert row["state"] == "COMPLETED" and row["version"] == 2 and row["study_uid"] == STUDY
    msgs = [m for m in rows(eng, schema.messages) if m["channel"] == "modalities"]
    assert [m["headers"]["dimse"] for m in msgs] == ["N-CREATE", "N-SET"]
    assert all("P123" not in json.dumps(m["headers"]) and "Smith" not in json.dumps(m["headers"]) for m in msgs)
    routed = {(d["message_id"], d["route"]) for d in rows(eng, schema.deliveries)}
    assert {r for m in msgs for (mid, r) in routed if mid == m["id"]} == {"ris", "fhir"}
    audit = [(a["action"], a["outcome"]) for a in rows(eng, schema.audit_events)
             if a["action"].startswith("dicom.mpps")]
    assert audit == [("dicom.mpps.create", "success"), ("dicom.mpps.update", "success"),
                     ("dicom.mpps.update", "failure")]


def test_mpps_refusals_follow_ps3_4(eng):
    port = eng.address("modalities")[1]
    assoc = modality(port)
    try:
        def create(ds, uid=None):
            return assoc.send_n_create(ds, ModalityPerformedProcedureStep, uid or generate_uid())[0]

        ds = step()
        del ds.PerformedStationAETitle
        st = create(ds)
        assert st.Status == 0x0120 and "PerformedStationAETitle" in st.ErrorComment
        ds = step()
        ds.PerformedProcedureStepStartDate = ""
        assert create(ds).Status == 0x0121
        ds = step()
        ds.PerformedProcedureStepStatus = "COMPLETED"
        assert create(ds).Status == 0x0106
        uid = generate_uid()
        assert create(step(), uid).Status == 0x0000
        assert create(step(), uid).Status == 0x0111  # duplicate SOP instance
        unknown = assoc.send_n_set(completed(generate_uid(), generate_uid()), ModalityPerformedProcedureStep,
                                   generate_uid())[0]
        assert unknown.Status == 0x0112
        mods = Dataset()
        mods.PatientName = "Other^Name"  # "Not allowed" in N-SET (PS3.4 Table F.7.2-1)
        st = assoc.send_n_set(mods, ModalityPerformedProcedureStep, uid)[0]
        assert st.Status == 0x0106 and "PatientName" in st.ErrorComment
        mods = Dataset()
        mods.PerformedProcedureStepStatus = "COMPLETED"  # without end date/time and series
        assert assoc.send_n_set(mods, ModalityPerformedProcedureStep, uid)[0].Status == 0x0120
        mods = Dataset()
        mods.PerformedProcedureStepStatus = "PAUSED"
        assert assoc.send_n_set(mods, ModalityPerformedProcedureStep, uid)[0].Status == 0x0106
        # DISCONTINUED needs its end, not series
        mods = completed(generate_uid(), generate_uid(), "DISCONTINUED")
        del mods.PerformedSeriesSequence
        assert assoc.send_n_set(mods, ModalityPerformedProcedureStep, uid)[0].Status == 0x0000
        # no Affected SOP Instance UID: the SCP creates one and returns it (PS3.7 10.1.5.1.4)
        st, _ = assoc.send_n_create(step(acc="ACC999"), ModalityPerformedProcedureStep)
        assert st.Status == 0x0000
        # bytes that are not a data set: 0x0110, and the association goes on
        req = N_CREATE()
        req.MessageID = 77
        req.AffectedSOPClassUID = ModalityPerformedProcedureStep
        req.AffectedSOPInstanceUID = generate_uid()
        # a Scheduled Step Attributes Sequence of undefined length that ends mid-way
        req.AttributeList = BytesIO(b"\x40\x00\x70\x02\xff\xff\xff\xff\x00\x00\x00\x00")
        cx = assoc._get_valid_context(ModalityPerformedProcedureStep, "", "scu")
        assoc._reactor_checkpoint.clear()  # as pynetdicom's own send_*: the reactor must not take the answer
        paused_by = time.monotonic() + 30  # bounded: a reactor that never pauses fails here, not at the suite timeout
        while not assoc._is_paused:
            assert time.monotonic() < paused_by, "pynetdicom's reactor did not pause"
            time.sleep(0.001)
        try:
            assoc.dimse.send_msg(req, cx.context_id)
            _cx, rsp = assoc.dimse.get_msg(block=True)
        finally:
            assoc._reactor_checkpoint.set()
        assert rsp is not None and rsp.Status == 0x0110
        assert create(step(acc="ACC998")).Status == 0x0000
    finally:
        assoc.release()
    steps = {r["state"] for r in rows(eng, schema.metadata.tables["dicom_mpps"])}
    assert steps == {"DISCONTINUED", "IN PROGRESS"} and len(rows(eng, schema.metadata.tables["dicom_mpps"])) == 3
    # refused requests stored nothing; each refusal is audited
    msgs = [m for m in rows(eng, schema.messages) if m["channel"] == "modalities"]
    assert len(msgs) == 4  # three N-CREATEs and the DISCONTINUED N-SET
    failures = [a for a in rows(eng, schema.audit_events) if a["action"].startswith("dicom.mpps")
                and a["outcome"] == "failure"]
    assert len(failures) == 9
