"""HL7 ADT A08/A31/A40/A18 and FHIR Patient -> a patient change for the archive (IHE PIR).

The output goes to ``to: {type: store}`` (header ``store_as: patient_update``), whose handler in
engine/store/dicom/reconcile.py applies it to the DICOM archive: C-FIND, DICOMweb and retrieved
instances then show the new demographics, and a merge moves the studies to the surviving
patient. The change is a FHIR Parameters resource (so it stays readable in the message store):
``action`` update | merge, ``patient`` (PatientID, IssuerOfPatientID and the new values as DICOM
strings), ``key`` (the identities the archive may hold the patient under), ``prior`` (merge: the
patient that goes). A value to remove is a part without a value.

- ADT A08 / A31 (update patient / person information): PID. A40 / A18 (merge patient / merge
  patient information): each PID (surviving) with its MRG (MRG-1: the prior identifier).
  PID-3: the repetition of type ``identifier_type`` (MR), else the first; Issuer of Patient ID
  = its assigning authority namespace (PID-3.4.1), as ``hl7_to_worklist`` writes it into the
  worklist item a modality copies it from. PID-5 (first repetition) -> PN, PID-7 -> birth date,
  PID-8 -> sex (M, F, O; U/A/N remove it). An empty field changes nothing; ``""`` removes.
- FHIR Patient (create, update): the identifier of type ``identifier_type``, else the first;
  Issuer of Patient ID from ``issuer_systems`` (system -> issuer), or the namespace of a
  ``urn:medrelay:id:<namespace>`` system (how medrelay's own conversions write it); ``name[0]``,
  ``birthDate``, ``gender``. A ``link`` of type ``replaces`` naming the other patient by
  identifier makes it a merge. Elements absent from the resource change nothing.

Other messages are dropped (filtered), so a route can take a whole ADT feed.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, Literal

import structlog
from pydantic import Field

from engine.components import ComponentConfig
from engine.context import ComponentContext
from engine.envelope import Drop, Envelope
from engine.registry import component
from engine.store.dicom import reconcile as _reconcile  # noqa: F401  (registers the patient_update handler)
from transforms.hl7_text import Segment, V2Message
from transforms.hl7_to_worklist import _pn

log = structlog.get_logger()

UPDATES = frozenset({"A08", "A31"})
MERGES = frozenset({"A40", "A18"})
FHIR_SEX = {"male": "M", "female": "F", "other": "O", "unknown": ""}
LOCAL_SYSTEM = "urn:medrelay:id:"


class PatientUpdateConfig(ComponentConfig):
    """Make the DICOM archive follow patient updates and merges (ADT A08/A31/A40/A18, FHIR Patient)."""

    type: Literal["patient_update"] = Field(description="Component type.")
    issuer: Literal["from_message", "none"] = Field(
        "from_message", description="Issuer of Patient ID of the archive's patient: from_message = PID-3.4.1 "
        "or the FHIR identifier's system (issuer_systems); none = patients the archive keeps without an issuer")
    issuer_systems: dict[str, str] = Field(
        default_factory=dict, description="FHIR identifier system -> Issuer of Patient ID, e.g. "
        "{'urn:oid:1.2.3.4': HOSP}")
    also_without_issuer: bool = Field(
        False, description="also change the patient the archive holds under the same Patient ID without an "
        "issuer (modalities that leave Issuer of Patient ID out); only where Patient IDs are unique in the site")
    identifier_type: str = Field("MR", description="identifier type (PID-3.5, FHIR identifier.type) that is "
                                 "the archive's Patient ID; the first identifier when none has it")


def _part(name: str, value: str | None) -> dict[str, Any]:
    return {"name": name, "valueString": value} if value else {"name": name}


def _ident(pid: str, issuer: str) -> dict[str, Any]:
    return {"name": "", "part": [_part("PatientID", pid), _part("IssuerOfPatientID", issuer)]}


def change(action: str, pid: str, issuer: str, values: dict[str, str | None],
           prior: list[tuple[str, str]], cfg: PatientUpdateConfig) -> dict[str, Any]:
    """The Parameters resource the archive's handler reads (``values``: None = no change, "" = remove)."""
    if cfg.issuer == "none":
        issuer, prior = "", [(p, "") for p, _ in prior]
    patient = {"name": "patient", "part": [_part("PatientID", pid), _part("IssuerOfPatientID", issuer)]}
    patient["part"] += [_part(k, v) for k, v in values.items() if v is not None]
    params: list[dict[str, Any]] = [{"name": "action", "valueCode": action}, patient]
    keys = [(pid, issuer)] + ([(pid, "")] if cfg.also_without_issuer and issuer else [])
    for p, i in keys:
        params.append({**_ident(p, i), "name": "key"})
    for p, i in prior:
        params.append({**_ident(p, i), "name": "prior"})
        if cfg.also_without_issuer and i:
            params.append({**_ident(p, ""), "name": "prior"})
    return {"resourceType": "Parameters", "parameter": params}


# -- HL7 v2 -------------------------------------------------------------------------------
def _cx(seg: Segment, n: int, want_type: str) -> tuple[str, str]:
    """(id, assigning authority namespace) of the CX repetition of type ``want_type``, else the first."""
    reps = seg.reps(n)
    if not reps:
        return "", ""
    pick = next((r for r in reps if len(r) > 4 and r[4] and r[4][0].upper() == want_type.upper()), reps[0])
    pid = pick[0][0].strip() if pick and pick[0] else ""
    issuer = pick[3][0].strip() if len(pick) > 3 and pick[3] else ""
    return pid, issuer


def _value(seg: Segment, n: int, value: str) -> str | None:
    """None when the field is empty (no change), "" for HL7's explicit null (remove), else ``value``."""
    raw = seg.raw(n)
    if raw == '""':
        return ""
    return value if raw else None


def _digits(v: str, n: int) -> str:
    return "".join(ch for ch in v if ch.isdigit())[:n]


def from_adt(msg: V2Message, cfg: PatientUpdateConfig) -> list[dict[str, Any]]:
    _type, event = msg.message_type
    out = []
    segs = list(msg)
    for i, seg in enumerate(segs):
        if seg.name != "PID":
            continue
        pid, issuer = _cx(seg, 3, cfg.identifier_type)
        if not pid:
            raise ValueError("PID-3 has no patient identifier")
        sex = seg.get(8).upper()
        values = {
            "PatientName": _value(seg, 5, _pn(seg, 5)),
            "PatientBirthDate": _value(seg, 7, _digits(seg.get(7), 8)),
            "PatientSex": _value(seg, 8, sex if sex in ("M", "F", "O") else ""),
        }
        if event in MERGES:
            mrg = next((s for s in segs[i + 1:] if s.name in ("MRG", "PID")), None)
            if mrg is None or mrg.name != "MRG":
                raise ValueError(f"{event} without MRG after its PID")
            prior = _cx(mrg, 1, cfg.identifier_type)
            if not prior[0]:
                raise ValueError("MRG-1 has no prior patient identifier")
            out.append(change("merge", pid, issuer, values, [prior], cfg))
        else:
            out.append(change("update", pid, issuer, values, [], cfg))
    return out


# -- FHIR ----------------------------------------------------------------------------------
def _issuer(system: str, cfg: PatientUpdateConfig) -> str:
    if system in cfg.issuer_systems:
        return cfg.issuer_systems[system]
    return system[len(LOCAL_SYSTEM):] if system.startswith(LOCAL_SYSTEM) else ""


def _fhir_identifier(ids: list[dict[str, Any]], cfg: PatientUpdateConfig) -> tuple[str, str]:
    def typed(i: dict[str, Any]) -> bool:
        return any(c.get("code") == cfg.identifier_type for c in (i.get("type") or {}).get("coding") or [])

    pick = next((i for i in ids if typed(i)), ids[0] if ids else {})
    return str(pick.get("value", "")), _issuer(str(pick.get("system", "")), cfg)


def _pn_from_name(name: dict[str, Any]) -> str:
    given = [str(g) for g in name.get("given") or []]
    parts = [str(name.get("family", "")), given[0] if given else "", " ".join(given[1:]),
             " ".join(name.get("prefix") or []), " ".join(name.get("suffix") or [])]
    return "^".join(parts).rstrip("^")


def from_patient(res: dict[str, Any], cfg: PatientUpdateConfig) -> list[dict[str, Any]]:
    pid, issuer = _fhir_identifier(list(res.get("identifier") or []), cfg)
    if not pid:
        raise Drop("patient_update: the Patient has no identifier the archive could know it by")
    values: dict[str, str | None] = {
        "PatientName": _pn_from_name(res["name"][0]) if res.get("name") else None,
        "PatientBirthDate": _digits(str(res["birthDate"]), 8) if res.get("birthDate") else None,
        "PatientSex": FHIR_SEX.get(str(res["gender"]), "") if res.get("gender") else None,
    }
    prior = []
    for link in res.get("link") or []:
        other = (link.get("other") or {}).get("identifier")
        if link.get("type") == "replaces" and other:
            got = _fhir_identifier([other], cfg)
            if got[0]:
                prior.append(got)
    return [change("merge" if prior else "update", pid, issuer, values, prior, cfg)]


@component("transform", "patient_update", config=PatientUpdateConfig, kinds=("hl7v2", "fhir"))
def build(config: PatientUpdateConfig, ctx: ComponentContext | None = None
          ) -> Callable[[Envelope], Envelope | list[Envelope]]:
    """ADT A08/A31/A40/A18 or FHIR Patient -> patient changes for the archive (store_as: patient_update)."""

    def transform(env: Envelope) -> Envelope | list[Envelope]:
        if env.kind == "hl7v2":
            msg = V2Message.from_bytes(env.payload)
            mtype, event = msg.message_type
            if mtype != "ADT" or event not in UPDATES | MERGES:
                raise Drop(f"patient_update: {mtype}^{event} does not change a patient")
            changes = from_adt(msg, config)
        elif env.kind == "fhir":
            res = json.loads(env.payload)
            if res.get("resourceType") != "Patient":
                raise Drop(f"patient_update: a {str(res.get('resourceType'))[:40]} is not a Patient")
            changes = from_patient(res, config)
        else:
            raise Drop("patient_update: takes HL7 v2 ADT or FHIR Patient")
        if not changes:
            raise Drop("patient_update: no patient in the message")
        out = [env.derive(kind="fhir", payload=json.dumps(c, separators=(",", ":")).encode(), headers={
            "store_as": "patient_update", "action": c["parameter"][0]["valueCode"],
            "resourceType": "Parameters", "MSH-3": env.headers.get("MSH-3", ""),
            "MSH-10": env.headers.get("MSH-10", "")}) for c in changes]
        log.debug("patient_update.changes", message_id=env.id, changes=len(out))
        return out[0] if len(out) == 1 else out

    return transform
