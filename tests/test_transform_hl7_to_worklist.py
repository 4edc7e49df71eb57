"""hl7_to_worklist + engine.store.dicom.worklist: items created, updated, cancelled, found by MWL C-FIND."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from pydicom import Dataset
from pydicom.sequence import Sequence

from engine.envelope import Drop, Envelope
from engine.store.dicom.worklist import find_worklist, match_value, read_item, register_store_handler, store_worklist
from engine.store.handlers import STORE_HANDLERS
from transforms.hl7_to_worklist import Hl7ToWorklistConfig, build, study_uid_for

MSH = "MSH|^~\\&|RIS|HOSP|MR|HOSP|20261120090000||{t}|{cid}|P|2.5.1"


@pytest.fixture
def store(sqlite_store):  # the transform on one backend; tests/test_engine_store.py covers both
    return sqlite_store


def order(control: str, placer: str, when: str, *, name: str = "Smith^Anna", pid: str = "P123",
          modality: str = "CT", accession: str = "ACC1", t: str = "OMI^O23^OMI_O23") -> bytes:
    segs = [MSH.format(t=t, cid=f"{control}{placer}"), f"PID|1||{pid}^^^HOSP^MR||{name}||19650304|F",
            f"ORC|{control}|{placer}^RIS|||SC"]
    if t.startswith("OMI"):
        segs += [f"TQ1|1||||||{when}", f"OBR|1|{placer}^RIS||X1^{modality} exam^L||||||||||||||||||||{modality}",
                 f"IPC|{accession}|RP-{placer}||SPS-{placer}|{modality}"]
    else:
        segs += [f"OBR|1|{placer}^RIS||X1^{modality} exam^L||||||||||||||{accession}||||||{modality}||||||||||||"
                 f"{when}"]
    return "\r".join(segs).encode()


@pytest.fixture
def send(store):
    t = build(Hl7ToWorklistConfig(type="hl7_to_worklist", station_ae_titles={"CT": "CT01", "MR": "MR01"}))
    ctx = SimpleNamespace(store=store)

    def _send(payload: bytes) -> list[str]:
        out = t(Envelope(channel="orders", kind="hl7v2", payload=payload))
        details = []
        for e in out if isinstance(out, list) else [out]:
            assert e.kind == "dicom" and e.headers["store_as"] == "worklist"
            with store.engine.begin() as conn:
                details.append(STORE_HANDLERS["worklist"](ctx, conn, e))
        return details

    return _send


def q(aet="", modality="", date="", name="", **top) -> Dataset:
    ds = Dataset()
    ds.PatientName = name
    ds.PatientID = ""
    ds.AccessionNumber = top.pop("AccessionNumber", "")
    ds.StudyInstanceUID = ""
    for k, v in top.items():
        setattr(ds, k, v)
    sps = Dataset()
    sps.ScheduledStationAETitle = aet
    sps.Modality = modality
    sps.ScheduledProcedureStepStartDate = date
    sps.ScheduledProcedureStepStartTime = ""
    ds.ScheduledProcedureStepSequence = Sequence([sps])
    return ds


def test_handler_registered():
    register_store_handler()
    assert STORE_HANDLERS["worklist"] is store_worklist


def test_create_update_cancel_lifecycle(store, send):
    assert send(order("NW", "PL1", "20261122093000")) == ["worklist:created"]
    assert send(order("NW", "PL1", "20261122093000")) == ["worklist:updated"]  # re-send: still one item
    [item] = find_worklist(store, q(aet="CT01"))
    assert item.StudyInstanceUID == study_uid_for("P|PL1^RIS")
    uid = item.StudyInstanceUID
    assert send(order("XO", "PL1", "20261125140000")) == ["worklist:updated"]
    [item] = find_worklist(store, q(aet="CT01"))
    assert item.ScheduledProcedureStepSequence[0].ScheduledProcedureStepStartDate == "20261125"
    assert item.StudyInstanceUID == uid  # update keeps the UID the modality will use
    assert send(order("CA", "PL1", "")) == ["worklist:cancelled"]
    assert find_worklist(store, q()) == []
    assert send(order("DC", "PL-unknown", "")) == ["worklist:cancel:unknown"]


def test_orm_o01_source_fields(store, send):
    send(order("NW", "PL9", "202611221000", t="ORM^O01", accession="ACC9", modality="NMR"))
    [item] = find_worklist(store, q(modality="MR", AccessionNumber="ACC9", RequestedProcedureID=""))
    sps = item.ScheduledProcedureStepSequence[0]
    assert sps.ScheduledStationAETitle == "MR01" and sps.ScheduledProcedureStepStartTime == "1000"
    assert item.RequestedProcedureID == "ACC9"


@pytest.fixture
def populated(send):
    send(order("NW", "A", "20261122080000", name="Smith^Anna"))
    send(order("NW", "B", "20261125120000", name="SMYTHE^Bob", modality="MR", pid="P2", accession="ACC2"))
    send(order("NW", "C", "20261201090000", name="Jones^Carl", pid="P3", accession="ACC3"))
    send(order("NW", "D", "20251231090000", name="Old^Dora", pid="P4", accession="ACC4"))


@pytest.mark.parametrize("query, expected", [
    (dict(), {"Smith^Anna", "SMYTHE^Bob", "Jones^Carl", "Old^Dora"}),
    (dict(aet="CT01"), {"Smith^Anna", "Jones^Carl", "Old^Dora"}),
    (dict(aet="MR*"), {"SMYTHE^Bob"}),
    (dict(modality="CT", date="20261122-20261130"), {"Smith^Anna"}),
    (dict(date="20261122-20261130"), {"Smith^Anna", "SMYTHE^Bob"}),
    (dict(date="-20261231"), {"Smith^Anna", "SMYTHE^Bob", "Jones^Carl", "Old^Dora"}),
    (dict(date="20261201-"), {"Jones^Carl"}),
    (dict(date="-2025"), {"Old^Dora"}),
    (dict(date="2026-"), {"Smith^Anna", "SMYTHE^Bob", "Jones^Carl"}),
    (dict(date="20261125"), {"SMYTHE^Bob"}),
    (dict(name="Sm*"), {"Smith^Anna"}),
    (dict(name="Jon?s^*"), {"Jones^Carl"}),
    (dict(name="Smith^Anna"), {"Smith^Anna"}),
    (dict(name="smith*"), set()),
    (dict(PatientID="P3"), {"Jones^Carl"}),
])
def test_find_worklist_matching(store, populated, query, expected):
    assert {str(d.PatientName) for d in find_worklist(store, q(**query))} == expected


def test_case_insensitive_names(store, populated):
    got = find_worklist(store, q(name="sm*"), case_insensitive_names=True)
    assert {str(d.PatientName) for d in got} == {"Smith^Anna", "SMYTHE^Bob"}


def test_only_requested_keys_are_returned(store, populated):
    query = Dataset()
    query.PatientName = "Jones*"
    query.StudyInstanceUID = ""
    sps = Dataset()
    sps.Modality = ""
    query.ScheduledProcedureStepSequence = Sequence([sps])
    [item] = find_worklist(store, query)
    assert {e.keyword for e in item} == {"SpecificCharacterSet", "PatientName", "StudyInstanceUID",
                                         "ScheduledProcedureStepSequence"}
    assert [e.keyword for e in item.ScheduledProcedureStepSequence[0]] == ["Modality"]
    assert item.ScheduledProcedureStepSequence[0].Modality == "CT"


def test_limit(store, populated):
    assert len(find_worklist(store, q(), limit=2)) == 2


def test_names_are_not_stored_in_clear(store, populated, tmp_path):
    store.dispose()
    raw = b"".join(p.read_bytes() for p in tmp_path.glob("db.sqlite*"))
    assert b"Jones" not in raw and b"SMYTHE" not in raw and b"P123" not in raw
    assert b"CT01" in raw  # the matching keys are


def test_non_orders_and_other_controls_are_dropped():
    t = build(Hl7ToWorklistConfig(type="hl7_to_worklist"))
    with pytest.raises(Drop):
        t(Envelope(channel="c", kind="hl7v2", payload=b"MSH|^~\\&|A|B|C|D|2024||ADT^A01|1|P|2.5.1\rPID|1||1"))
    with pytest.raises(Drop):
        t(Envelope(channel="c", kind="hl7v2", payload=order("OK", "PL1", "20261122")))


def test_item_encoding_is_bare_explicit_little_endian():
    t = build(Hl7ToWorklistConfig(type="hl7_to_worklist", station_ae_field="OBR-21"))
    payload = order("NW", "PL1", "20261122", t="ORM^O01").replace(b"ACC1||||||CT", b"ACC1|||STATION9|||CT")
    out = t(Envelope(channel="c", kind="hl7v2", payload=payload))
    assert out.payload[:4] == b"\x08\x00\x05\x00" and out.payload[4:6] == b"CS"  # (0008,0005) explicit VR
    item = read_item(out.payload)
    assert item.PatientName == "Smith^Anna"
    assert item.ScheduledProcedureStepSequence[0].ScheduledStationAETitle == "STATION9"  # from OBR-21


@pytest.mark.parametrize("q_, value, vr, ok", [
    ("", "anything", "PN", True), ("*", "", "PN", True), ("A?C", "ABC", "LO", True), ("A?C", "ABBC", "LO", False),
    ("1.2\\1.3", "1.3", "UI", True), ("1.2*", "1.2.3", "UI", False), ("0800-1200", "093000", "TM", True),
    ("0800-1200", "130000", "TM", False), ("20261122", "20261122", "DA", True), ("a.b", "axb", "LO", False),
])
def test_match_value(q_, value, vr, ok):
    assert match_value(q_, value, vr) is ok
