"""ORM^O01 / OMI^O23 -> Modality Worklist item (create, update, cancel).

One output envelope per ORC/OBR order group: ``kind="dicom"``, payload the MWL item
(PS3.4 K.6.1.2 attributes) encoded as DICOM Explicit VR Little Endian *without*
preamble or file meta (a bare dataset, read back with ``dcmread(force=True)``:
this is an item for our own store, not a Part 10 file for exchange), headers
``store_as: worklist``, ``action`` (create / update / cancel from ORC-1: NW create,
XO/SC update, CA/DC/OC cancel; others are dropped), ``worklist_key`` (sha256 of
the placer order number, so an update or cancel finds the item NW created); no
PHI, so not the accession number either. Route it to ``{type: store}``.

Field sources (first non-empty wins):
AccessionNumber ``accession_source`` (auto: IPC-1, OBR-18, ORC-3/OBR-3);
RequestedProcedureID IPC-2, OBR-19, accession; ScheduledProcedureStepID IPC-4,
OBR-20, requested procedure id; Modality IPC-5, OBR-24 (table 0074 mapped);
start date/time TQ1-7, ORC-7.4, OBR-27.4, OBR-36; description and code OBR-4;
ScheduledStationAETitle ``station_ae_field`` (an HL7 path such as ``OBR-21``), then
``station_ae_titles[modality]``, then ``default_station_ae_title``;
StudyInstanceUID IPC-3, else ``2.25.<uuid5 of the placer order number>`` so that an
update keeps the UID the modality will put in its images.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Callable
from typing import Any, Literal

import structlog
from pydantic import Field
from pydicom import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.sequence import Sequence

from engine.components import ComponentConfig
from engine.context import ComponentContext
from engine.envelope import Drop, Envelope
from engine.hl7.message import parse_path
from engine.registry import component
from transforms.converter_tables import apply_dicom, code_table_problems, code_table_program
from transforms.hl7_text import Segment, V2Message
from transforms.v2_tables import ORDER_CONTROL_ACTION

log = structlog.get_logger()
_UID_NS = uuid.UUID("0f5c2f0e-7d4b-5a51-8a4e-2f6f3f1d9b77")
# HL7 table 0074 diagnostic service section -> DICOM modality where they differ.
MODALITY_0074 = {"NMR": "MR", "CUS": "US", "RX": "DX", "NMS": "NM", "CTH": "CT", "VUS": "US", "XRC": "XA"}


class Hl7ToWorklistConfig(ComponentConfig):
    """Turn orders (ORM^O01, OMI^O23) into Modality Worklist items for the store."""

    type: Literal["hl7_to_worklist"] = Field(description="Component type.")
    accession_source: Literal["auto", "IPC-1", "OBR-18", "ORC-3", "ORC-2"] = Field(
        "auto", description="Where the accession number comes from (auto: IPC-1, OBR-18, then filler number).")
    station_ae_field: str | None = Field(
        None, description="HL7 path holding the scheduled station AE title (ORC/OBR/TQ1/IPC/PV1), e.g. OBR-21.")
    station_ae_titles: dict[str, str] = Field(
        default_factory=dict, description="Modality -> scheduled station AE title, e.g. {CT: CT01}.")
    default_station_ae_title: str | None = Field(None, description="AE title when nothing else gives one.")
    modality_map: dict[str, str] = Field(
        default_factory=dict, description="Extra OBR-24 / IPC-5 value -> DICOM modality mappings.")
    code_tables: dict[str, str] = Field(
        default_factory=dict, description="Code sequence -> table under top-level `tables:`: a CodeValue found "
        "in the table is replaced by its row (CodeValue, CodeMeaning, CodingSchemeDesignator from target_code, "
        "target_display, target_system), e.g. {RequestedProcedureCodeSequence: procedures}; others are kept.",
        examples=[{"RequestedProcedureCodeSequence": "procedures"}])

    def rule_problems(self, tables: dict[str, Any]) -> list[Any]:
        """`medrelay check`: the code tables (transforms/converter_tables.py)."""
        return code_table_problems("dicom", self.code_tables, tables)


def _order_key(orc: Segment, obr: Segment | None) -> str:
    placer = orc.raw(2) or (obr.raw(2) if obr else "")
    if placer:
        return "P|" + placer
    filler = orc.raw(3) or (obr.raw(3) if obr else "")
    if filler:
        return "F|" + filler
    raise ValueError("order without placer or filler order number: cannot key a worklist item")


def study_uid_for(order_key: str) -> str:
    """2.25 UID (PS3.5 B.2) from a UUIDv5 of the order key: stable across updates."""
    return f"2.25.{uuid.uuid5(_UID_NS, order_key).int}"


def _pn(seg: Segment, n: int, offset: int = 0) -> str:
    """XPN (offset 0) or XCN (offset 1) -> DICOM PN Family^Given^Middle^Prefix^Suffix."""
    c = [seg.get(n, i + offset) for i in range(1, 6)]
    return "^".join([c[0], c[1], c[2], c[4], c[3]]).rstrip("^")


def _first(*values: str) -> str:
    return next((v for v in values if v), "")


def _digits(v: str, n: int) -> str:
    return "".join(ch for ch in v.split("+")[0].split("-")[0] if ch.isdigit() or ch == ".")[:n]


class _Group:
    def __init__(self, orc: Segment) -> None:
        self.orc = orc
        self.obr: Segment | None = None
        self.tq1: Segment | None = None
        self.ipc: Segment | None = None

    def seg(self, name: str, msg: V2Message) -> Segment | None:
        return {"ORC": self.orc, "OBR": self.obr, "TQ1": self.tq1, "IPC": self.ipc}.get(name) or msg.first(name)


def _path_value(path: str, g: _Group, msg: V2Message) -> str:
    seg_name, _occ, fld, rep, comp, sub = parse_path(path)
    seg = g.seg(seg_name, msg)
    return seg.get(fld, comp or 1, sub or 1, rep - 1) if seg is not None else ""


def build_item(msg: V2Message, g: _Group, cfg: Hl7ToWorklistConfig) -> tuple[Dataset, str, str]:
    """(MWL item dataset, action, order key) for one order group."""
    orc, obr, tq1, ipc = g.orc, g.obr, g.tq1, g.ipc
    action = ORDER_CONTROL_ACTION.get(orc.get(1).upper())
    if action is None:
        raise Drop(f"hl7_to_worklist: ORC-1 {orc.get(1)!r} does not change the worklist")
    key = _order_key(orc, obr)
    pid = msg.first("PID")
    if pid is None:
        raise ValueError("order without PID")

    def ob(n: int, c: int = 1) -> str:
        return obr.get(n, c) if obr is not None else ""

    def ip(n: int) -> str:
        return ipc.get(n) if ipc is not None else ""

    filler = _first(orc.get(3), ob(3))
    accession = {"IPC-1": ip(1), "OBR-18": ob(18), "ORC-3": orc.get(3), "ORC-2": orc.get(2),
                 "auto": _first(ip(1), ob(18), filler)}[cfg.accession_source]
    rp_id = _first(ip(2), ob(19), accession)
    raw_mod = _first(ip(5), ob(24)).upper()
    modality = cfg.modality_map.get(raw_mod) or MODALITY_0074.get(raw_mod, raw_mod)
    when = _first(tq1.get(7) if tq1 is not None else "", orc.get(7, 4), ob(27, 4), ob(36))
    aet = _first(_path_value(cfg.station_ae_field, g, msg) if cfg.station_ae_field else "",
                 cfg.station_ae_titles.get(modality, ""), cfg.default_station_ae_title or "")
    ids = pid.reps(3)
    mr = next((r for r in ids if len(r) > 4 and r[4] and r[4][0].upper() == "MR"), ids[0] if ids else [[""]])

    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.AccessionNumber = accession[:16]
    ds.ReferringPhysicianName = _pn(orc, 12, 1) if orc.get(12, 2) else (_pn(obr, 16, 1) if obr else "")
    ds.PatientName = _pn(pid, 5)
    ds.PatientID = mr[0][0][:64] if mr and mr[0] else ""
    ds.IssuerOfPatientID = mr[3][0] if len(mr) > 3 and mr[3] else ""
    ds.PatientBirthDate = _digits(pid.get(7), 8)
    sex = pid.get(8).upper()
    ds.PatientSex = sex if sex in ("M", "F", "O") else ""
    # The order numbers go with the item: a modality copies them into its images and its MPPS
    # (Scheduled Step Attributes), which is how mpps_to_hl7 addresses the order back (ORC-2/3).
    ds.PlacerOrderNumberImagingServiceRequest = _first(orc.get(2), ob(2))[:64]
    ds.FillerOrderNumberImagingServiceRequest = filler[:64]
    ds.StudyInstanceUID = ip(3) or study_uid_for(key)
    ds.RequestedProcedureID = rp_id[:16]
    ds.RequestedProcedureDescription = ob(4, 2)[:64]
    if ob(4):
        code = Dataset()
        code.CodeValue = ob(4)[:16]
        code.CodingSchemeDesignator = ob(4, 3) or "L"
        code.CodeMeaning = ob(4, 2)[:64] or ob(4)[:64]
        ds.RequestedProcedureCodeSequence = Sequence([code])
    sps = Dataset()
    sps.ScheduledStationAETitle = aet[:16]
    sps.Modality = modality[:16]
    sps.ScheduledProcedureStepStartDate = _digits(when, 8)
    sps.ScheduledProcedureStepStartTime = _digits(when[8:], 6) if len(when) > 8 else ""
    sps.ScheduledProcedureStepDescription = ob(4, 2)[:64]
    sps.ScheduledProcedureStepID = _first(ip(4), ob(20), rp_id)[:16]
    sps.ScheduledProcedureStepStatus = "SCHEDULED"
    ds.ScheduledProcedureStepSequence = Sequence([sps])
    return ds, action, key


def encode_item(ds: Dataset) -> bytes:
    """Explicit VR Little Endian, bare dataset (no preamble, no file meta)."""
    fp = DicomBytesIO()
    fp.is_little_endian = True
    fp.is_implicit_VR = False
    write_dataset(fp, ds)
    return fp.getvalue()


def item_key(order_key: str) -> str:
    return hashlib.sha256(order_key.encode("utf-8")).hexdigest()[:32]


@component("transform", "hl7_to_worklist", config=Hl7ToWorklistConfig, kinds=("hl7v2",))
def build(config: Hl7ToWorklistConfig,
          ctx: ComponentContext | None = None) -> Callable[[Envelope], Envelope | list[Envelope]]:
    """ORM^O01 / OMI^O23 -> Modality Worklist items (store_as: worklist)."""
    from engine.mapping.tables import tables_of

    program = code_table_program("dicom", config.code_tables, tables_of(ctx))

    def transform(env: Envelope) -> Envelope | list[Envelope]:
        msg = V2Message.from_bytes(env.payload)
        if msg.message_type not in (("ORM", "O01"), ("OMI", "O23")):
            raise Drop(f"hl7_to_worklist: {'^'.join(msg.message_type)} is not an order")
        groups: list[_Group] = []
        for seg in msg:
            if seg.name == "ORC":
                groups.append(_Group(seg))
            elif seg.name in ("OBR", "TQ1", "IPC") and groups and getattr(groups[-1], seg.name.lower()) is None:
                setattr(groups[-1], seg.name.lower(), seg)
        out: list[Envelope] = []
        for g in groups:
            try:
                ds, action, key = build_item(msg, g, config)
            except Drop:
                continue
            apply_dicom(program, ds)  # code_tables: local procedure codes to the site's standard ones
            out.append(env.derive(kind="dicom", payload=encode_item(ds), headers={
                "store_as": "worklist", "action": action, "worklist_key": item_key(key),
                "MSH-10": env.headers.get("MSH-10", "")}))
        if not out:
            raise Drop("hl7_to_worklist: no order changes the worklist")
        log.debug("hl7_to_worklist.items", message_id=env.id, items=len(out))
        return out[0] if len(out) == 1 else out

    return transform
