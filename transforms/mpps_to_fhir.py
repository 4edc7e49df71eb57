"""Performed procedure step (MPPS) -> FHIR R4 transaction: Procedure and ImagingStudy status.

Each MPPS message (``event: mpps``) becomes a transaction Bundle of conditional entries, so a
re-sent message changes nothing:

- Patient from the step's patient attributes (conditional create, as ``dicom_to_fhir``);
- Procedure, identified by the step's SOP Instance UID (``urn:dicom:uid`` | ``urn:oid:<uid>``):
  status IN PROGRESS -> ``in-progress``, COMPLETED -> ``completed``, DISCONTINUED -> ``stopped``
  (``not-done`` when no series was acquired), ``performedPeriod`` from the step's start and end,
  ``code`` from the Procedure Code Sequence (else the step's description), ``basedOn`` the
  order by its accession number (a logical reference: ``identifier`` typed ACSN);
- ImagingStudy for each study the step names, identified as ``dicom_to_fhir`` identifies it (so
  both update the one resource): status IN PROGRESS -> ``registered``, COMPLETED -> ``available``,
  DISCONTINUED -> ``available`` when something was acquired, else ``cancelled``; its series and
  instances are what the archive index holds plus what the step's Performed Series Sequence
  references that has not arrived yet, so an update never drops instances the archive has.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import structlog
from pydantic import Field
from pydicom import Dataset

from engine.components import ComponentConfig
from engine.context import ComponentContext
from engine.envelope import Drop, Envelope
from engine.registry import component
from engine.store.dicom.study import InstanceRow, with_archived
from transforms.dicom_common import first_code, read_dataset, text
from transforms.dicom_to_fhir import _series
from transforms.fhir_bundle import TransactionBuilder, dumps, prune, validate_bundle
from transforms.fhir_time import dicom_datetime
from transforms.patient import identity_fields, patient_from_dicom, rules_from
from transforms.v2_datatypes import coding
from transforms.v2_tables import DCM, DICOM_UID, V2_0203

log = structlog.get_logger()
_id = identity_fields()
PROCEDURE_STATUS = {"IN PROGRESS": "in-progress", "COMPLETED": "completed", "DISCONTINUED": "stopped"}


class MppsToFhirConfig(ComponentConfig):
    """Procedure and ImagingStudy status from the modality's performed procedure step."""

    type: Literal["mpps_to_fhir"] = Field(description="Component type.")
    patient_identifier_system: str | None = _id["patient_identifier_system"]
    identifier_systems: dict[str, str] = _id["identifier_systems"]
    default_identifier_system: str = _id["default_identifier_system"]
    accession_system: str | None = Field(None, description="Identifier system of the accession number.")
    imaging_study: bool = Field(True, description="also update the ImagingStudy of each study the step names")
    timezone: str = Field("UTC", description="IANA zone for times without TimezoneOffsetFromUTC.")
    validate_output: bool = Field(True, description="Validate the Bundle with fhir.resources (R4B).")


def _performed(ds: Dataset) -> list[InstanceRow]:
    """(study, series, instance) rows the step's Performed Series Sequence references."""
    items = list(ds.get("ScheduledStepAttributesSequence") or [])
    study = text(items[0], "StudyInstanceUID") if items else ""
    rows = []
    for s in ds.get("PerformedSeriesSequence") or []:
        series_uid = text(s, "SeriesInstanceUID")
        for ref in [*(s.get("ReferencedImageSequence") or []),
                    *(s.get("ReferencedNonImageCompositeSOPInstanceSequence") or [])]:
            sop = text(ref, "ReferencedSOPInstanceUID")
            if study and series_uid and sop:
                rows.append(InstanceRow(study, series_uid, sop, text(ref, "ReferencedSOPClassUID"),
                                        modality=text(ds, "Modality").upper()))
    return rows


def study_rows(engine: Any, study_uid: str, performed: list[InstanceRow]) -> list[InstanceRow]:
    """What the archive index holds for the study, then what the step references besides."""
    if engine is None:
        return [r for r in performed if r.study_uid == study_uid]
    seed = InstanceRow(study_uid, "", "")
    archived = [r for r in with_archived(engine, [seed]) if r is not seed]
    seen = {r.sop_instance_uid for r in archived}
    return archived + [r for r in performed if r.study_uid == study_uid and r.sop_instance_uid not in seen]


def convert(ds: Dataset, uid: str, cfg: MppsToFhirConfig, engine: Any = None) -> dict[str, Any]:
    state = text(ds, "PerformedProcedureStepStatus").upper()
    if state not in PROCEDURE_STATUS:
        raise ValueError(f"not a performed procedure step state: {state[:20]!r}")
    items = list(ds.get("ScheduledStepAttributesSequence") or [])
    performed = _performed(ds)
    acquired = bool(performed or ds.get("PerformedSeriesSequence"))
    tx = TransactionBuilder()
    patient, (psys, pval) = patient_from_dicom(ds, rules_from(cfg))
    patient_ref = tx.create(patient, psys, pval)
    proc = first_code(ds, "ProcedureCodeSequence")
    desc = text(ds, "PerformedProcedureStepDescription")
    status = PROCEDURE_STATUS[state]
    if state == "DISCONTINUED" and not acquired:
        status = "not-done"
    tz = text(ds, "TimezoneOffsetFromUTC")
    accessions = sorted({text(i, "AccessionNumber") for i in items if text(i, "AccessionNumber")})
    procedure = prune({
        "resourceType": "Procedure",
        "identifier": [{"system": DICOM_UID, "value": f"urn:oid:{uid}"}],
        "status": status,
        "subject": {"reference": patient_ref},
        "code": prune({"coding": [coding(proc[0], proc[2], proc[1])] if proc else [], "text": desc or
                       (proc[2] if proc else "")}) or {"text": f"{text(ds, 'Modality') or 'Imaging'} procedure"},
        "performedPeriod": prune({
            "start": dicom_datetime(text(ds, "PerformedProcedureStepStartDate"),
                                    text(ds, "PerformedProcedureStepStartTime"), tz, cfg.timezone),
            "end": dicom_datetime(text(ds, "PerformedProcedureStepEndDate"),
                                  text(ds, "PerformedProcedureStepEndTime"), tz, cfg.timezone),
        }),
        "basedOn": [{"type": "ServiceRequest", "identifier": prune({
            "type": {"coding": [{"system": V2_0203, "code": "ACSN"}]}, "system": cfg.accession_system,
            "value": a})} for a in accessions],
    })
    procedure_ref = tx.update(procedure, DICOM_UID, f"urn:oid:{uid}")
    if cfg.imaging_study:
        for study_uid in dict.fromkeys(text(i, "StudyInstanceUID") for i in items if text(i, "StudyInstanceUID")):
            rows = study_rows(engine, study_uid, performed)
            series = _series(rows) if rows else []
            study_status = {"IN PROGRESS": "registered", "COMPLETED": "available"}.get(
                state, "available" if rows else "cancelled")
            acc = next((text(i, "AccessionNumber") for i in items if text(i, "StudyInstanceUID") == study_uid), "")
            tx.update(prune({
                "resourceType": "ImagingStudy",
                "identifier": [
                    {"system": DICOM_UID, "value": f"urn:oid:{study_uid}"},
                    {"type": {"coding": [{"system": V2_0203, "code": "ACSN"}]}, "system": cfg.accession_system,
                     "value": acc} if acc else {},
                ],
                "status": study_status,
                "modality": [{"system": DCM, "code": m} for m in
                             dict.fromkeys(s["modality"]["code"] for s in series)] or
                            ([{"system": DCM, "code": text(ds, "Modality")}] if text(ds, "Modality") else []),
                "subject": {"reference": patient_ref},
                "started": procedure.get("performedPeriod", {}).get("start"),
                "procedureReference": {"reference": procedure_ref},
                "procedureCode": [prune({"coding": [coding(proc[0], proc[2], proc[1])], "text": proc[2]})]
                if proc else [],
                "numberOfSeries": len(series),
                "numberOfInstances": len(rows),
                "series": series,
            }), DICOM_UID, f"urn:oid:{study_uid}")
    bundle = tx.bundle()
    if cfg.validate_output:
        validate_bundle(bundle)
    return bundle


@component("transform", "mpps_to_fhir", config=MppsToFhirConfig, kinds=("dicom",))
def build(config: MppsToFhirConfig, ctx: ComponentContext | None = None) -> Callable[[Envelope], Envelope]:
    """MPPS (event: mpps) -> FHIR transaction: Procedure status and the ImagingStudy's status."""
    engine = ctx.store.engine if ctx is not None and getattr(ctx, "store", None) is not None else None

    def transform(env: Envelope) -> Envelope:
        if env.headers.get("event") != "mpps":
            raise Drop("mpps_to_fhir: not a performed procedure step (route it with when: {event: mpps})")
        ds = read_dataset(env.payload)
        uid = str(env.headers.get("mpps_uid") or text(ds, "SOPInstanceUID"))
        bundle = convert(ds, uid, config, engine)
        log.debug("mpps_to_fhir.converted", message_id=env.id, mpps_uid=uid)
        return env.derive(kind="fhir", payload=dumps(bundle), headers={
            "resourceType": "Bundle", "bundleType": "transaction", "mpps_uid": uid,
            "mpps_state": env.headers.get("mpps_state", "")})

    return transform
