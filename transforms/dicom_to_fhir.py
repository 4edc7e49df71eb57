"""DICOM instance -> FHIR R4 ImagingStudy (+ Patient, + Endpoint) transaction Bundle.

Mapping after the R4 ImagingStudy DICOM mapping (hl7.org/fhir/R4/imagingstudy-mappings.html):
StudyInstanceUID -> identifier (system ``urn:dicom:uid``, value ``urn:oid:<uid>``),
AccessionNumber -> identifier typed ACSN, Modality of each series -> modality,
StudyDate/StudyTime -> started, ReferringPhysicianName -> referrer (display),
StudyDescription -> description, ProcedureCodeSequence -> procedureCode, series:
SeriesInstanceUID -> uid, SeriesNumber -> number, Modality -> modality (DCM),
BodyPartExamined -> bodySite (SNOMED via PS3.16 Annex L, only when in our table),
Laterality -> laterality; instance: SOPInstanceUID -> uid, SOPClassUID -> sopClass
(``urn:ietf:rfc:3986`` / ``urn:oid:``), InstanceNumber -> number.

A study arrives one instance at a time. Each instance is recorded in the
``study_instances`` table (engine/store/dicom/study.py) and the emitted
ImagingStudy lists every instance seen so far; it is written with
``PUT ImagingStudy?identifier=urn:dicom:uid|urn:oid:<uid>`` so the server holds one
resource per study that grows, never a duplicate. The last PUT wins, so the route
should deliver in order (one worker per route) when instances of one study race.
Series description and series dates are left out on purpose: the aggregate keeps no
free text or dates (PHI), and emitting them only for the current series would make
the resource flap as instances of other series arrive.

The quiet period before a study counts as complete is the route's ``debounce: {key:
StudyInstanceUID, seconds: N}``: the engine then converts only the study's last instance, and
the ImagingStudy lists every instance the archive index holds.
Holding back emission until a study has been quiet needs a delayed job in the
engine; a transform cannot schedule one, and a throttle without it would lose the
last instances of a study. The key is there so configs can state intent and fail
loudly rather than silently behave differently.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import structlog
from pydantic import Field
from pydicom import Dataset

from engine.components import ComponentConfig
from engine.context import ComponentContext
from engine.envelope import Envelope
from engine.registry import component
from engine.store.dicom.study import InstanceRow, record, with_archived
from transforms.dicom_common import first_code, instance_row, read_dataset, text
from transforms.fhir_bundle import TransactionBuilder, dumps, prune, validate_bundle
from transforms.fhir_time import dicom_datetime
from transforms.patient import identity_fields, name_from_pn, patient_from_dicom, rules_from
from transforms.v2_datatypes import coding
from transforms.v2_tables import (
    BODY_PART_SNOMED,
    DCM,
    DICOM_UID,
    LATERALITY_SNOMED,
    RFC3986,
    SNOMED,
    V2_0203,
)

log = structlog.get_logger()
_id = identity_fields()


class DicomToFhirConfig(ComponentConfig):
    """Convert a DICOM instance to a FHIR ImagingStudy transaction (Patient, ImagingStudy, Endpoint)."""

    type: Literal["dicom_to_fhir"] = Field(description="Component type.")
    patient_identifier_system: str | None = _id["patient_identifier_system"]
    identifier_systems: dict[str, str] = _id["identifier_systems"]
    default_identifier_system: str = _id["default_identifier_system"]
    accession_system: str | None = Field(
        None, description="Identifier system for the accession number (ImagingStudy.identifier ACSN).")
    patient_request: Literal["create", "update"] = Field(
        "create", description="Patient as conditional create (ifNoneExist; does not overwrite the "
        "master patient index) or conditional update (PUT Patient?identifier=).")
    endpoint_url: str | None = Field(
        None, description="DICOMweb (WADO-RS) base URL; adds an Endpoint and ImagingStudy.endpoint. Default: "
        "the URL of medrelay's own `dicomweb` source when one is configured",
        examples=["https://pacs.example/dicom-web"])
    status: Literal["registered", "available"] = Field("available", description="ImagingStudy.status.")
    timezone: str = Field("UTC", description="IANA zone for StudyTime when TimezoneOffsetFromUTC is absent.")
    validate_output: bool = Field(True, description="Validate the Bundle with fhir.resources (R4B).")


def _series(rows: list[InstanceRow]) -> list[dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for r in rows:
        s = out.get(r.series_uid)
        if s is None:
            body = BODY_PART_SNOMED.get(r.body_part)
            lat = LATERALITY_SNOMED.get(r.laterality)
            s = out[r.series_uid] = prune({
                "uid": r.series_uid, "number": r.series_number,
                "modality": {"system": DCM, "code": r.modality or "OT"},
                "bodySite": {"system": SNOMED, "code": body[0], "display": body[1]} if body else {},
                "laterality": {"system": SNOMED, "code": lat[0], "display": lat[1]} if lat else {},
                "instance": [],
            })
            s["instance"] = []
        s["instance"].append(prune({
            "uid": r.sop_instance_uid,
            "sopClass": {"system": RFC3986, "code": f"urn:oid:{r.sop_class_uid}"} if r.sop_class_uid else
            {"system": RFC3986, "code": "urn:oid:1.2.840.10008.5.1.4.1.1.7"},
            "number": r.instance_number,
        }))
    for s in out.values():
        s["numberOfInstances"] = len(s["instance"])
    return list(out.values())


def convert(ds: Dataset, cfg: DicomToFhirConfig, rows: list[InstanceRow] | None = None) -> dict[str, Any]:
    """Dataset (+ every instance of its study seen so far) -> transaction Bundle (dict)."""
    rows = rows or [instance_row(ds)]
    study_uid = rows[0].study_uid
    tx = TransactionBuilder()
    patient, (psys, pval) = patient_from_dicom(ds, rules_from(cfg))
    patient_ref = tx.put(patient, psys, pval, create_only=cfg.patient_request == "create")
    endpoint_ref = None
    if cfg.endpoint_url:
        endpoint_ref = tx.create({
            "resourceType": "Endpoint", "status": "active",
            "identifier": [{"system": RFC3986, "value": cfg.endpoint_url}],
            "connectionType": {"system": "http://terminology.hl7.org/CodeSystem/endpoint-connection-type",
                               "code": "dicom-wado-rs"},
            "payloadType": [{"text": "DICOM"}],
            "payloadMimeType": ["application/dicom"],
            "address": cfg.endpoint_url,
        }, RFC3986, cfg.endpoint_url)
    series = _series(rows)
    modalities: dict[str, None] = {}
    for s in series:
        modalities.setdefault(s["modality"]["code"], None)
    accession = text(ds, "AccessionNumber")
    proc = first_code(ds, "ProcedureCodeSequence")
    referrer = ds.get("ReferringPhysicianName")
    referrer_name = name_from_pn(str(referrer)) if referrer else {}
    referrer_display = " ".join([*referrer_name.get("given", []), referrer_name.get("family", "")]).strip()
    study = prune({
        "resourceType": "ImagingStudy",
        "identifier": [
            {"system": DICOM_UID, "value": f"urn:oid:{study_uid}"},
            {"type": {"coding": [{"system": V2_0203, "code": "ACSN"}]}, "system": cfg.accession_system,
             "value": accession} if accession else {},
        ],
        "status": cfg.status,
        "modality": [{"system": DCM, "code": m} for m in modalities],
        "subject": {"reference": patient_ref},
        "started": dicom_datetime(text(ds, "StudyDate"), text(ds, "StudyTime"),
                                  text(ds, "TimezoneOffsetFromUTC"), cfg.timezone),
        "referrer": {"display": referrer_display} if referrer_display else {},
        "endpoint": [{"reference": endpoint_ref}] if endpoint_ref else [],
        "numberOfSeries": len(series),
        "numberOfInstances": len(rows),
        "procedureCode": [prune({"coding": [coding(proc[0], proc[2], proc[1])], "text": proc[2]})] if proc else [],
        "description": text(ds, "StudyDescription"),
        "series": series,
    })
    tx.update(study, DICOM_UID, f"urn:oid:{study_uid}")
    bundle = tx.bundle()
    if cfg.validate_output:
        validate_bundle(bundle)
    return bundle


def dicomweb_url(settings: Any) -> str | None:
    """The base URL of the first `dicomweb` source in the configuration (its public_url, else
    scheme://host:port/base_path), or None when no channel serves DICOMweb."""
    channels = getattr(settings, "channels", None) or {}
    for ch in channels.values():
        src = getattr(ch, "source", None)
        if getattr(src, "type", None) == "dicomweb" and hasattr(src, "base_url"):
            return str(src.base_url())
    return None


@component("transform", "dicom_to_fhir", config=DicomToFhirConfig, kinds=("dicom",))
def build(config: DicomToFhirConfig, ctx: ComponentContext | None = None) -> Callable[[Envelope], Envelope]:
    """DICOM instance -> FHIR R4 transaction Bundle with Patient and the study's ImagingStudy so far.

    With ``ctx=None`` (unit tests, `medrelay test`) there is no aggregate: the
    ImagingStudy lists the one instance converted.
    """
    engine = ctx.store.engine if ctx is not None and getattr(ctx, "store", None) is not None else None
    if config.endpoint_url is None and ctx is not None:
        served = dicomweb_url(getattr(ctx, "settings", None))
        if served is not None:  # the Endpoint points at the DICOMweb service medrelay itself runs
            config = config.model_copy(update={"endpoint_url": served})

    def transform(env: Envelope) -> Envelope:
        ds = read_dataset(env.payload)
        row = instance_row(ds)
        rows = with_archived(engine, record(engine, row)) if engine is not None else [row]
        bundle = convert(ds, config, rows)
        log.debug("dicom_to_fhir.converted", message_id=env.id, instances=len(rows))
        return env.derive(kind="fhir", payload=dumps(bundle), headers={
            "resourceType": "Bundle", "bundleType": "transaction",
            "StudyInstanceUID": row.study_uid, "SOPInstanceUID": row.sop_instance_uid})

    return transform
