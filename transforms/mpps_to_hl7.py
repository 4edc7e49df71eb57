"""Performed procedure step (MPPS) -> HL7 v2.5.1 order status for the RIS: ORM^O01 or OMI^O23.

The DICOM listener turns each MPPS N-CREATE / N-SET into a message (``event: mpps``); this
transform tells the order filler how its order is progressing, as interface engines in front
of RIS systems do (IHE SWF leaves the RIS its own DICOM MPPS; many RIS only speak HL7):

- ORC-1 ``SC`` (status changed), ORC-5 the order status of HL7 table 0038 from the step's
  state: IN PROGRESS -> ``IP``, COMPLETED -> ``CM``, DISCONTINUED -> ``DC``;
- one ORC/OBR group per Scheduled Step Attributes item (a step may perform several requested
  procedures): ORC-2/OBR-2 placer and ORC-3/OBR-3 filler order numbers (the filler falls back
  to the accession number, as IHE SWF equates them), OBR-4 the procedure (Procedure Code
  Sequence, the requested procedure's code, else the step's description), OBR-7 / OBR-8 the
  step's start and end, OBR-18 accession, OBR-19 requested procedure id, OBR-20 scheduled step
  id (IHE SWF's use of these fields), OBR-24 the modality; OMI^O23 adds the IPC segment
  (accession, requested procedure id, study UID, scheduled step id, modality);
- PID from the step's patient attributes, the same way ``dicom_to_hl7`` writes it.

Values are escaped; MSH-10 is new per message; the message is validated with hl7apy.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Literal

import structlog
from pydantic import Field
from pydicom import Dataset

from engine.components import ComponentConfig
from engine.context import ComponentContext
from engine.envelope import Drop, Envelope
from engine.registry import component
from transforms.dicom_common import first_code, read_dataset, text
from transforms.dicom_to_hl7 import CODECS, MESSAGES, D, _e, _seg
from transforms.fhir_time import now_v2
from transforms.hl7_validate import validate_v2
from transforms.patient import identity_fields, pid_from_dicom, rules_from

log = structlog.get_logger()
_id = identity_fields()
ORDER_STATUS = {"IN PROGRESS": "IP", "COMPLETED": "CM", "DISCONTINUED": "DC"}  # HL7 table 0038


class MppsToHl7Config(ComponentConfig):
    """Tell the RIS how an order is progressing, from the modality's performed procedure step."""

    type: Literal["mpps_to_hl7"] = Field(description="Component type.")
    message: Literal["ORM^O01", "OMI^O23"] = Field("ORM^O01", description="Message type to build.")
    states: list[Literal["IN PROGRESS", "COMPLETED", "DISCONTINUED"]] = Field(
        default_factory=lambda: ["IN PROGRESS", "COMPLETED", "DISCONTINUED"],
        description="step states that are sent on (others are dropped as filtered)")
    only_changes: bool = Field(True, description="send an N-SET only when it changes the state (an "
                               "IN PROGRESS step updated while in progress is not news to the RIS)")
    sending_application: str = Field("MEDRELAY", description="MSH-3 (HD namespace id; escaped).")
    sending_facility: str = Field("", description="MSH-4.")
    receiving_application: str = Field("", description="MSH-5.")
    receiving_facility: str = Field("", description="MSH-6.")
    processing_id: Literal["P", "T", "D"] = Field("P", description="MSH-11.")
    charset: Literal["UNICODE UTF-8", "8859/1", "ASCII"] = Field(
        "UNICODE UTF-8", description="MSH-18 and the bytes' encoding.")
    patient_class: str = Field("O", description="PV1-2 patient class (HL7 table 0004).")
    patient_identifier_system: str | None = _id["patient_identifier_system"]
    identifier_systems: dict[str, str] = _id["identifier_systems"]
    default_identifier_system: str = _id["default_identifier_system"]
    timezone: str = Field("UTC", description="IANA zone of MSH-7.")
    validate_output: bool = Field(True, description="Validate with hl7apy before sending.")


def _dtm(da: str, tm: str) -> str:
    tm = tm.replace(":", "").split(".")[0]
    if not (len(da) == 8 and da.isdigit()):
        return ""
    return da + (tm if tm.isdigit() else "")


def _procedure(ds: Dataset, item: Dataset) -> str:
    code = first_code(ds, "ProcedureCodeSequence") or first_code(item, "RequestedProcedureCodeSequence")
    if code is not None and code[0]:
        return D.component.join([_e(code[0]), _e(code[2]), _e(code[1])]).rstrip(D.component)
    desc = (text(ds, "PerformedProcedureStepDescription") or text(item, "RequestedProcedureDescription")
            or text(item, "ScheduledProcedureStepDescription") or f"{text(ds, 'Modality') or 'Imaging'} procedure")
    return D.component + _e(desc)


def build_message(ds: Dataset, cfg: MppsToHl7Config, control_id: str | None = None,
                  timestamp: str | None = None) -> tuple[str, str]:
    """The step's data set -> (message text with CR separators, MSH-10)."""
    msg_type, event, structure = MESSAGES[cfg.message]
    state = text(ds, "PerformedProcedureStepStatus").upper()
    if state not in ORDER_STATUS:
        raise ValueError(f"not a performed procedure step state: {state[:20]!r}")
    items = list(ds.get("ScheduledStepAttributesSequence") or [])
    if not items:
        raise ValueError("performed procedure step without Scheduled Step Attributes")
    control_id = control_id or uuid.uuid4().hex[:20]
    msh = D.field.join(["MSH", D.encoding_characters, _e(cfg.sending_application), _e(cfg.sending_facility),
                        _e(cfg.receiving_application), _e(cfg.receiving_facility), timestamp or now_v2(cfg.timezone),
                        "", D.component.join((msg_type, event, structure)), control_id, cfg.processing_id,
                        "2.5.1", "", "", "", "", "", cfg.charset])
    segs = [msh, pid_from_dicom(ds, rules_from(cfg), D), _seg("PV1", "1", _e(cfg.patient_class) or "U")]
    start = _dtm(text(ds, "PerformedProcedureStepStartDate"), text(ds, "PerformedProcedureStepStartTime"))
    end = _dtm(text(ds, "PerformedProcedureStepEndDate"), text(ds, "PerformedProcedureStepEndTime"))
    modality = text(ds, "Modality")
    for n, item in enumerate(items, start=1):
        accession = text(item, "AccessionNumber")
        placer = text(item, "PlacerOrderNumberImagingServiceRequest")
        filler = text(item, "FillerOrderNumberImagingServiceRequest") or accession
        rp_id, sps_id = text(item, "RequestedProcedureID"), text(item, "ScheduledProcedureStepID")
        segs.append(_seg("ORC", "SC", _e(placer), _e(filler), "", ORDER_STATUS[state]))
        obr = ["OBR", str(n), _e(placer), _e(filler), _procedure(ds, item), "", "", start, end] + [""] * 9
        obr += [_e(accession), _e(rp_id), _e(sps_id), "", "", "", _e(modality)]
        segs.append(_seg(*obr))
        if msg_type == "OMI":
            acc = accession or filler or text(ds, "StudyID")
            rp = rp_id or acc
            segs.append(_seg("IPC", _e(acc), _e(rp), _e(text(item, "StudyInstanceUID")), _e(sps_id or rp),
                             _e(modality)))
    msg = "\r".join(segs)
    if cfg.validate_output:
        validate_v2(msg, structure)
    return msg, control_id


def is_step(env: Envelope) -> bool:
    return env.headers.get("event") == "mpps"


@component("transform", "mpps_to_hl7", config=MppsToHl7Config, kinds=("dicom",))
def build(config: MppsToHl7Config, ctx: ComponentContext | None = None) -> Callable[[Envelope], Envelope]:
    """MPPS (event: mpps) -> HL7 v2.5.1 ORM^O01 / OMI^O23 order status (ORC-1 SC, ORC-5 IP/CM/DC)."""
    msg_type, event, _structure = MESSAGES[config.message]
    codec = CODECS[config.charset]

    def transform(env: Envelope) -> Envelope:
        if not is_step(env):
            raise Drop("mpps_to_hl7: not a performed procedure step (route it with when: {event: mpps})")
        ds = read_dataset(env.payload)
        state = text(ds, "PerformedProcedureStepStatus").upper()
        if state not in config.states:
            raise Drop(f"mpps_to_hl7: state {state} is not sent")
        if config.only_changes and env.headers.get("mpps_previous_state") == state:
            raise Drop("mpps_to_hl7: the step's state did not change")
        msg, control_id = build_message(ds, config)
        log.debug("mpps_to_hl7.built", message_id=env.id, msh_10=control_id, state=state)
        return env.derive(kind="hl7v2", payload=msg.encode(codec, errors="replace"), headers={
            "MSH-9.1": msg_type, "MSH-9.2": event, "MSH-10": control_id, "MSH-12": "2.5.1",
            "mpps_uid": env.headers.get("mpps_uid", ""), "mpps_state": state})

    return transform
