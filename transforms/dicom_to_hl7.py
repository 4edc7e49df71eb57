"""DICOM instance -> HL7 v2.5.1 ORU^R01 (default), ORM^O01 or OMI^O23 "study available".

Segments: MSH, PID (from the Patient module via transforms.patient: PN components
reordered into XPN), PV1 (patient class only), ORC, OBR, then per message type:

- ORU^R01: ORC-1 RE; OBX-1 ``110180^Study Instance UID^DCM`` (ST) with the UID and,
  when ``retrieve_url_template`` is set, OBX-2 of type RP with the retrieve URL.
- ORM^O01: ORC-1 SC, ORC-5 CM (the order's study has been performed).
- OMI^O23: as ORM, plus IPC (accession, requested procedure id, study UID,
  scheduled step id, modality), which v2.5.1 OMI requires.

Order numbers: ORC-2/OBR-2 placer from PlacerOrderNumberImagingServiceRequest,
ORC-3/OBR-3 filler from FillerOrderNumberImagingServiceRequest or else the accession
number; OBR-18 accession, OBR-19 requested procedure id, OBR-20 scheduled step id
(IHE SWF's use of these fields). OBR-4 from RequestedProcedureCodeSequence /
ProcedureCodeSequence, else StudyDescription as text.

Every value is escaped (``\\F\\ \\S\\ \\R\\ \\E\\ \\T\\``), MSH-10 is a fresh random id and
the message is validated with hl7apy (transforms.hl7_validate) before it leaves.

``code_tables`` (``{OBR-4: procedures}``) replace local codes in coded fields through the
top-level tables, with the rule engine's lookups (transforms/converter_tables.py), before
validation.
"""

from __future__ import annotations

import string
import uuid
from collections.abc import Callable
from typing import Any, Literal

import structlog
from pydantic import Field, field_validator
from pydicom import Dataset

from engine.components import ComponentConfig
from engine.context import ComponentContext
from engine.envelope import Envelope
from engine.hl7.message import Delimiters
from engine.registry import component
from transforms.converter_tables import apply_hl7, code_table_problems, code_table_program
from transforms.dicom_common import first_code, read_dataset, request_attr, text
from transforms.fhir_time import now_v2
from transforms.hl7_escape import escape
from transforms.hl7_validate import validate_v2
from transforms.patient import identity_fields, pid_from_dicom, rules_from

log = structlog.get_logger()
_id = identity_fields()
D = Delimiters()

MESSAGES: dict[str, tuple[str, str, str]] = {  # message -> (MSH-9.1, MSH-9.2, MSH-9.3)
    "ORU^R01": ("ORU", "R01", "ORU_R01"),
    "ORM^O01": ("ORM", "O01", "ORM_O01"),
    "OMI^O23": ("OMI", "O23", "OMI_O23"),
}
TEMPLATE_KEYS = frozenset({"StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "AccessionNumber"})
CODECS = {"UNICODE UTF-8": "utf-8", "8859/1": "iso8859-1", "ASCII": "ascii"}


class DicomToHl7Config(ComponentConfig):
    """Announce a DICOM study to a RIS/EHR as an HL7 v2.5.1 message."""

    type: Literal["dicom_to_hl7"] = Field(description="Component type.")
    message: Literal["ORU^R01", "ORM^O01", "OMI^O23"] = Field("ORU^R01", description="Message type to build.")
    sending_application: str = Field("MEDRELAY", description="MSH-3 (HD namespace id; escaped).")
    sending_facility: str = Field("", description="MSH-4.")
    receiving_application: str = Field("", description="MSH-5.")
    receiving_facility: str = Field("", description="MSH-6.")
    processing_id: Literal["P", "T", "D"] = Field("P", description="MSH-11 (production, training, debugging).")
    charset: Literal["UNICODE UTF-8", "8859/1", "ASCII"] = Field(
        "UNICODE UTF-8", description="MSH-18 and the bytes' encoding (characters outside it become '?').")
    retrieve_url_template: str | None = Field(
        None, description="Retrieve location put in an RP OBX; placeholders {StudyInstanceUID}, "
        "{SeriesInstanceUID}, {SOPInstanceUID}, {AccessionNumber}.",
        examples=["https://pacs.example/dicom-web/studies/{StudyInstanceUID}"])
    patient_class: str = Field("O", description="PV1-2 patient class (HL7 table 0004).")
    result_status: Literal["F", "P", "C", "I"] = Field("F", description="OBR-25 / OBX-11 result status.")
    patient_identifier_system: str | None = _id["patient_identifier_system"]
    identifier_systems: dict[str, str] = _id["identifier_systems"]
    default_identifier_system: str = _id["default_identifier_system"]
    timezone: str = Field("UTC", description="IANA zone of MSH-7.")
    validate_output: bool = Field(True, description="Validate with hl7apy before sending.")
    code_tables: dict[str, str] = Field(
        default_factory=dict, description="Coded field (CE/CWE) -> table under top-level `tables:`: a code "
        "found in the table is replaced by its row (components 1-3 from target_code, target_display, "
        "target_system), e.g. {OBR-4: procedures} for local procedure codes to RadLex/LOINC; others are kept.",
        examples=[{"OBR-4": "procedures"}])

    def rule_problems(self, tables: dict[str, Any]) -> list[Any]:
        """`medrelay check`: the code tables (transforms/converter_tables.py)."""
        return code_table_problems("hl7v2", self.code_tables, tables)

    @field_validator("retrieve_url_template")
    @classmethod
    def _known_placeholders(cls, v: str | None) -> str | None:
        if v:
            names = {f for _, f, _, _ in string.Formatter().parse(v) if f is not None}
            unknown = names - TEMPLATE_KEYS
            if unknown:
                raise ValueError(f"unknown placeholder(s) {sorted(unknown)}; allowed: {sorted(TEMPLATE_KEYS)}")
        return v


def _e(v: str) -> str:
    return escape(v, D)


def _seg(*fields: str) -> str:
    return D.field.join(fields).rstrip(D.field)


def _dtm(ds: Dataset) -> str:
    da, tm = text(ds, "StudyDate"), text(ds, "StudyTime").replace(":", "").split(".")[0]
    if not (len(da) == 8 and da.isdigit()):
        return ""
    tz = text(ds, "TimezoneOffsetFromUTC")
    return da + (tm if tm.isdigit() else "") + (tz if tm.isdigit() and len(tz) == 5 else "")


def _procedure(ds: Dataset) -> str:
    code = first_code(ds, "RequestedProcedureCodeSequence", "ProcedureCodeSequence")
    if code is not None and code[0]:
        return D.component.join([_e(code[0]), _e(code[2]), _e(code[1])]).rstrip(D.component)
    desc = text(ds, "StudyDescription") or request_attr(ds, "RequestedProcedureDescription") or \
        f"{text(ds, 'Modality') or 'Imaging'} study"
    return D.component + _e(desc)


def _xcn(pn: Any) -> str:
    """DICOM PN -> XCN (id empty): ^Family^Given^Middle^Suffix^Prefix."""
    if not pn:
        return ""
    c = (str(pn).split("=")[0].split("^") + [""] * 5)[:5]
    return D.component.join(["", _e(c[0]), _e(c[1]), _e(c[2]), _e(c[4]), _e(c[3])]).rstrip(D.component)


def build_message(ds: Dataset, cfg: DicomToHl7Config, control_id: str | None = None,
                  timestamp: str | None = None, post: Callable[[str], str] | None = None) -> tuple[str, str]:
    """Dataset -> (message text with CR separators, MSH-10); ``post`` (the code tables) runs before validation."""
    msg_type, event, structure = MESSAGES[cfg.message]
    control_id = control_id or uuid.uuid4().hex[:20]  # MSH-10 is ST(20) in v2.5.1
    study_uid = text(ds, "StudyInstanceUID")
    if not study_uid:
        raise ValueError("dataset has no StudyInstanceUID")
    accession = text(ds, "AccessionNumber")
    placer = request_attr(ds, "PlacerOrderNumberImagingServiceRequest")
    filler = request_attr(ds, "FillerOrderNumberImagingServiceRequest") or accession
    rp_id = request_attr(ds, "RequestedProcedureID")
    sps_id = request_attr(ds, "ScheduledProcedureStepID")
    modality = text(ds, "Modality")
    status = cfg.result_status
    msh = D.field.join(["MSH", D.encoding_characters, _e(cfg.sending_application), _e(cfg.sending_facility),
                        _e(cfg.receiving_application), _e(cfg.receiving_facility), timestamp or now_v2(cfg.timezone),
                        "", D.component.join((msg_type, event, structure)), control_id, cfg.processing_id,
                        "2.5.1", "", "", "", "", "", cfg.charset])
    segs = [msh, pid_from_dicom(ds, rules_from(cfg), D), _seg("PV1", "1", _e(cfg.patient_class) or "U")]
    order_control, order_status = ("RE", "CM") if msg_type == "ORU" else ("SC", "CM")
    segs.append(_seg("ORC", order_control, _e(placer), _e(filler), "", order_status))
    obr = ["OBR", "1", _e(placer), _e(filler), _procedure(ds), "", "", _dtm(ds)] + [""] * 8
    obr += [_xcn(ds.get("ReferringPhysicianName")), "", _e(accession), _e(rp_id), _e(sps_id), "", "", "", "",
            status]
    segs.append(_seg(*obr))
    if msg_type == "ORU":
        segs.append(_seg("OBX", "1", "ST", "110180^Study Instance UID^DCM", "", _e(study_uid),
                         "", "", "", "", "", status))
        if cfg.retrieve_url_template:
            url = cfg.retrieve_url_template.format(
                StudyInstanceUID=study_uid, SeriesInstanceUID=text(ds, "SeriesInstanceUID"),
                SOPInstanceUID=text(ds, "SOPInstanceUID"), AccessionNumber=accession)
            rp = D.component.join([_e(url), _e(cfg.sending_application), "AP", "DICOM"])
            segs.append(_seg("OBX", "2", "RP", "RETRIEVE^Study retrieve location^99MEDRELAY", "", rp,
                             "", "", "", "", "", status))
    elif msg_type == "OMI":
        acc = accession or text(ds, "StudyID") or filler
        rp = rp_id or acc
        segs.append(_seg("IPC", _e(acc), _e(rp), _e(study_uid), _e(sps_id or rp), _e(modality)))
    text_msg = "\r".join(segs)
    if post is not None:
        text_msg = post(text_msg)
    if cfg.validate_output:
        validate_v2(text_msg, structure)
    return text_msg, control_id


@component("transform", "dicom_to_hl7", config=DicomToHl7Config, kinds=("dicom",))
def build(config: DicomToHl7Config, ctx: ComponentContext | None = None) -> Callable[[Envelope], Envelope]:
    """DICOM instance -> HL7 v2.5.1 ORU^R01 / ORM^O01 / OMI^O23 announcing the study."""
    from engine.mapping.tables import tables_of

    msg_type, event, _structure = MESSAGES[config.message]
    codec = CODECS[config.charset]
    program = code_table_program("hl7v2", config.code_tables, tables_of(ctx))
    post = (lambda text_msg: apply_hl7(program, text_msg)) if program is not None else None

    def transform(env: Envelope) -> Envelope:
        ds = read_dataset(env.payload)
        msg, control_id = build_message(ds, config, post=post)
        log.debug("dicom_to_hl7.built", message_id=env.id, msh_10=control_id)
        return env.derive(kind="hl7v2", payload=msg.encode(codec, errors="replace"), headers={
            "MSH-9.1": msg_type, "MSH-9.2": event, "MSH-10": control_id, "MSH-12": "2.5.1",
            "StudyInstanceUID": text(ds, "StudyInstanceUID")})

    return transform
