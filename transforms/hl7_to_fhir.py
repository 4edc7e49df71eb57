"""HL7 v2 -> FHIR R4 transaction Bundle, after the HL7 v2-to-FHIR IG (segment maps).

Supported: ADT^A01/A04/A08 (Patient, Encounter from PV1), ADT^A40 (merge: Patient.link
replaces / replaced-by), ORU^R01 (DiagnosticReport per OBR, Observation per OBX; an OBX of
type ED, e.g. a PDF report, becomes a Binary and a DocumentReference instead: transforms/hl7_documents.py),
ORM^O01 and OMI^O23 (ServiceRequest per ORC). Every entry is a conditional request on
a business identifier so that a re-sent message creates nothing new:

- Patient: ``POST`` + ``ifNoneExist`` (A01/A04/ORU/ORM/OMI: a lab or order message does
  not overwrite the master patient record), ``PUT Patient?identifier=`` for A08 and A40.
  ``patient_request`` overrides this.
- Encounter: ``PUT Encounter?identifier=`` on PV1-19 (visit number); no PV1-19, no
  Encounter, because an Encounter without identifier would duplicate on every re-send.
- DiagnosticReport / Observation / ServiceRequest: ``PUT ...?identifier=`` so that
  corrections (OBR-25 C) and order updates/cancels (ORC-1 XO/CA) replace what was sent.

The mapping tables are hand-written (see transforms/v2_tables.py for why).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import structlog
from pydantic import Field

from engine.components import ComponentConfig
from engine.context import ComponentContext
from engine.envelope import Drop, Envelope
from engine.registry import component
from transforms import hl7_documents
from transforms.converter_tables import ExtensionSpec, build_post, problems
from transforms.fhir_bundle import TransactionBuilder, dumps, local_url, prune, validate_bundle
from transforms.fhir_time import v2_datetime
from transforms.hl7_text import Segment, V2Message
from transforms.patient import (
    IdentityRules,
    identity_fields,
    name_from_xpn,
    patient_from_pid,
    rules_from,
    system_for,
)
from transforms.v2_datatypes import (
    codeable,
    comp,
    identifier_from_ei,
    number,
    practitioner_ref,
    quantity,
    reference_range,
    structured_numeric,
)
from transforms.v2_tables import (
    CODED_TYPES,
    DATE_TYPES,
    INTERPRETATION_0078,
    NUMERIC_TYPES,
    OBR_STATUS_0123,
    OBX_STATUS_0085,
    ORDER_CONTROL_0119,
    ORDER_STATUS_0038,
    PATIENT_CLASS_0004,
    PRIORITY_0485,
    TEXT_TYPES,
    V2_0203,
    V3_ACT_CODE,
    V3_INTERPRETATION,
)

log = structlog.get_logger()
_id = identity_fields()

SUPPORTED: frozenset[tuple[str, str]] = frozenset({
    ("ADT", "A01"), ("ADT", "A04"), ("ADT", "A08"), ("ADT", "A40"),
    ("ORU", "R01"), ("ORM", "O01"), ("OMI", "O23"),
})


class Hl7ToFhirConfig(ComponentConfig):
    """Convert HL7 v2 ADT/ORU/ORM/OMI to a FHIR R4 transaction Bundle."""

    type: Literal["hl7_to_fhir"] = Field(description="Component type.")
    patient_identifier_system: str | None = _id["patient_identifier_system"]
    identifier_systems: dict[str, str] = _id["identifier_systems"]
    default_identifier_system: str = _id["default_identifier_system"]
    patient_request: Literal["auto", "create", "update"] = Field(
        "auto", description="How Patient is written: auto = conditional update for ADT^A08/A40, "
        "conditional create (ifNoneExist) otherwise; create/update force one for every message.")
    timezone: str = Field("UTC", description="IANA zone for v2 times without an offset (FHIR needs one).",
                          examples=["Europe/Berlin"])
    assume_ucum_units: bool = Field(
        False, description="Treat OBX-6 units without a coding system as UCUM codes.")
    unsupported: Literal["drop", "error"] = Field(
        "drop", description="Other message types: drop (filtered on this route) or error.")
    validate_output: bool = Field(True, description="Validate the Bundle with fhir.resources (R4B) before it leaves.")
    code_tables: dict[str, str] = Field(
        default_factory=dict, description="FHIR CodeableConcept element -> table under top-level `tables:`: "
        "a coding from the matching row (target_system, target_code, target_display) is added next to the "
        "converted one, e.g. {Observation.code: lab-codes} for OBX-3 local codes to LOINC.",
        examples=[{"Observation.code": "lab-codes"}])
    extensions: list[ExtensionSpec] = Field(
        default_factory=list, description="HL7 fields (Z-segments) as valueString extensions: "
        "[{from: ZPI-2, resource: Patient, url: ...}]")

    def rule_problems(self, tables: dict[str, Any]) -> list[Any]:
        """`medrelay check`: the code tables and extensions (engine/mapping, transforms/converter_tables.py)."""
        return problems(self.code_tables, self.extensions, tables)


@dataclass
class _Ctx:
    cfg: Hl7ToFhirConfig
    rules: IdentityRules
    tx: TransactionBuilder
    event: str


def _patient(seg: Segment, c: _Ctx, default_update: bool) -> str:
    res, (system, value) = patient_from_pid(seg, c.rules)
    mode = c.cfg.patient_request
    update = default_update if mode == "auto" else mode == "update"
    return c.tx.put(res, system, value, create_only=not update)


# ---------------------------------------------------------------- ADT
def _encounter(pv1: Segment, patient_ref: str, c: _Ctx) -> None:
    visit = pv1.reps(19)
    if not visit or not comp(visit[0], 0):
        return
    cx = visit[0]
    system = system_for(comp(cx, 3), comp(cx, 3, 1), comp(cx, 3, 2), c.rules)
    value = comp(cx, 0)
    pclass = PATIENT_CLASS_0004.get(pv1.get(2).upper())
    start, end = v2_datetime(pv1.get(44), c.cfg.timezone), v2_datetime(pv1.get(45), c.cfg.timezone)
    status = "finished" if end else ("in-progress" if start or c.event == "A01" else "arrived")
    loc = pv1.reps(3)
    loc_display = " ".join(p for p in (comp(loc[0], i) for i in (0, 1, 2, 3)) if p) if loc else ""
    participants = []
    for field, code in ((7, "ATND"), (8, "REF"), (9, "CON")):
        for rep in pv1.reps(field):
            ref = practitioner_ref(rep, c.rules)
            if ref:
                participants.append({"type": [{"coding": [{
                    "system": "http://terminology.hl7.org/CodeSystem/v3-ParticipationType", "code": code}]}],
                    "individual": ref})
    res = prune({
        "resourceType": "Encounter",
        "identifier": [{"type": {"coding": [{"system": V2_0203, "code": "VN"}]}, "system": system, "value": value}],
        "status": status,
        "class": ({"system": V3_ACT_CODE, "code": pclass[0], "display": pclass[1]} if pclass else
                  {"system": "http://terminology.hl7.org/CodeSystem/v3-NullFlavor", "code": "UNK"}),
        "subject": {"reference": patient_ref},
        "participant": participants,
        "period": {"start": start, "end": end},
        "location": [{"location": {"display": loc_display}}] if loc_display else [],
    })
    c.tx.update(res, system, value)


def _adt(msg: V2Message, c: _Ctx) -> None:
    pid = msg.first("PID")
    if pid is None:
        raise ValueError(f"ADT^{c.event} without PID")
    ref = _patient(pid, c, default_update=c.event == "A08")
    pv1 = msg.first("PV1")
    if pv1 is not None:
        _encounter(pv1, ref, c)


def _merge(msg: V2Message, c: _Ctx) -> None:
    """A40: each PID (survivor) is followed by its MRG (prior identifiers)."""
    pid: Segment | None = None
    pairs = 0
    for seg in msg:
        if seg.name == "PID":
            pid = seg
        elif seg.name == "MRG" and pid is not None:
            survivor, (system, value) = patient_from_pid(pid, c.rules)
            prior_ids = []
            for rep in seg.reps(1):
                if comp(rep, 0):
                    psys = system_for(comp(rep, 3), comp(rep, 3, 1), comp(rep, 3, 2), c.rules)
                    prior_ids.append((psys, comp(rep, 0), comp(rep, 4)))
            if not prior_ids:
                raise ValueError("MRG-1 has no prior patient identifier")
            psys, pval, ptype = prior_ids[0]
            surv_url = c.tx.tx_url("Patient", system, value)
            prior_url = c.tx.tx_url("Patient", psys, pval)
            survivor["link"] = [{"other": {"reference": prior_url}, "type": "replaces"}]
            prior = prune({
                "resourceType": "Patient",
                "identifier": [prune({"type": {"coding": [{"system": V2_0203, "code": t}]} if t else {},
                                      "system": s, "value": v}) for s, v, t in prior_ids],
                "active": False,
                "name": [name_from_xpn(rep) for rep in seg.reps(7)],
                "link": [{"other": {"reference": surv_url}, "type": "replaced-by"}],
            })
            c.tx.update(survivor, system, value)
            c.tx.update(prior, psys, pval)
            pairs += 1
            pid = None
    if not pairs:
        raise ValueError("ADT^A40 without PID/MRG pair")


# ---------------------------------------------------------------- ORU
def _obx_value(obx: Segment, c: _Ctx) -> dict[str, Any]:
    vtype = obx.get(2).upper()
    reps = obx.reps(5)
    if not reps:
        return {}
    units = obx.reps(6)
    unit = units[0] if units else None
    first = reps[0]
    if vtype in NUMERIC_TYPES:
        v = number(comp(first, 0))
        return {"valueQuantity": quantity(v, unit, c.cfg.assume_ucum_units)} if v is not None else \
            {"valueString": comp(first, 0)}
    if vtype == "SN":
        return structured_numeric(first, unit, c.cfg.assume_ucum_units)
    if vtype in CODED_TYPES:
        return {"valueCodeableConcept": codeable(first)}
    if vtype in DATE_TYPES:
        dt = v2_datetime(comp(first, 0), c.cfg.timezone)
        return {"valueDateTime": dt} if dt else {"valueString": comp(first, 0)}
    if vtype == "TM":
        t = comp(first, 0)
        if len(t) >= 4 and t[:4].isdigit():
            return {"valueTime": f"{t[:2]}:{t[2:4]}:{t[4:6] or '00'}"}
    # ST, TX, FT and anything else: text; repetitions are lines (TX/FT carry one line each)
    sep = "\n" if vtype in TEXT_TYPES else " "
    text = sep.join("^".join(c0[0] if c0 else "" for c0 in r).rstrip("^") for r in reps)
    return {"valueString": text} if text else {}


def _observation(obx: Segment, obr_ident: tuple[str, str], effective: str | None, patient_ref: str,
                 index: int, c: _Ctx) -> tuple[dict[str, Any], str, str]:
    system, report_value = obr_ident
    set_id = obx.get(1) or str(index)
    value = f"{report_value}-{set_id}" + (f"-{obx.get(4)}" if obx.get(4) else "")
    units = obx.reps(6)
    interp = [{"coding": [{"system": V3_INTERPRETATION, "code": INTERPRETATION_0078[f.upper()]}]}
              for f in (r[0][0].strip() for r in obx.reps(8) if r and r[0]) if f.upper() in INTERPRETATION_0078]
    code = codeable(obx.reps(3)[0]) if obx.reps(3) else {}
    res = prune({
        "resourceType": "Observation",
        "identifier": [{"system": system, "value": value}],
        "status": OBX_STATUS_0085.get(obx.get(11).upper(), "unknown"),
        "code": code or {"text": "unspecified"},
        "subject": {"reference": patient_ref},
        "effectiveDateTime": v2_datetime(obx.get(14), c.cfg.timezone) or effective,
        **_obx_value(obx, c),
        "interpretation": interp,
        "referenceRange": [reference_range(obx.get(7), units[0] if units else None, c.cfg.assume_ucum_units)],
        "performer": [practitioner_ref(r, c.rules) for r in obx.reps(16)],
    })
    return res, system, value


def _oru(msg: V2Message, c: _Ctx) -> None:
    """PID starts a patient, OBR a DiagnosticReport, OBX an Observation in it; NTE notes the OBX."""
    patient_ref = ""
    report: dict[str, Any] | None = None
    report_key: tuple[str, str] = ("", "")
    last_obs: dict[str, Any] | None = None
    orc: Segment | None = None
    reports: list[dict[str, Any]] = []
    n_obx = 0
    for seg in msg:
        if seg.name == "PID":
            report, last_obs = None, None
            patient_ref = _patient(seg, c, default_update=False)
        elif seg.name == "ORC":
            orc = seg
        elif seg.name == "OBR":
            if not patient_ref:
                raise ValueError("ORU^R01: OBR before PID")
            ident = _order_ident(seg, orc, c)
            if ident is None:
                raise ValueError("ORU^R01: OBR without filler or placer order number")
            ident_res, system, value = ident
            report_key = (system, value)
            report = prune({
                "resourceType": "DiagnosticReport",
                "identifier": [ident_res],
                "status": OBR_STATUS_0123.get(seg.get(25).upper(), "unknown"),
                "code": (codeable(seg.reps(4)[0]) if seg.reps(4) else {}) or {"text": "unspecified"},
                "subject": {"reference": patient_ref},
                "effectiveDateTime": v2_datetime(seg.get(7), c.cfg.timezone),
                "issued": _instant(v2_datetime(seg.get(22), c.cfg.timezone)),
                "resultsInterpreter": [practitioner_ref(r, c.rules) for r in seg.reps(32)],
            })
            report["result"] = []  # filled below; the entry holds this same dict
            c.tx.update(report, system, value)
            reports.append(report)
            last_obs, n_obx, orc = None, 0, None
        elif seg.name == "OBX" and report is not None and seg.get(2).upper() == "ED" and seg.reps(5):
            n_obx += 1
            _document(seg, report, report_key, patient_ref, n_obx, c)
            last_obs = None
        elif seg.name == "OBX" and report is not None:
            n_obx += 1
            obs, system, value = _observation(seg, report_key, report.get("effectiveDateTime"),
                                              patient_ref, n_obx, c)
            report["result"].append({"reference": c.tx.update(obs, system, value)})
            last_obs = obs
        elif seg.name == "NTE" and last_obs is not None:
            text = "\n".join(r[0][0] for r in seg.reps(3) if r and r[0] and r[0][0])
            if text:
                last_obs.setdefault("note", []).append({"text": text})
    if not reports:
        raise ValueError("ORU^R01 without OBR")
    for res in reports:
        if not res["result"]:
            del res["result"]


def _document(obx: Segment, report: dict[str, Any], report_key: tuple[str, str], patient_ref: str, index: int,
              c: _Ctx) -> None:
    """OBX ED: Binary (PUT Binary/{stable id}) + DocumentReference (conditional PUT on the OBX
    identifier, as an Observation would be) + the report's presentedForm by URL."""
    system, report_value = report_key
    value = f"{report_value}-{obx.get(1) or index}" + (f"-{obx.get(4)}" if obx.get(4) else "")
    code = codeable(obx.reps(3)[0]) if obx.reps(3) else {}
    date = _instant(v2_datetime(obx.get(14), c.cfg.timezone)) or _instant(report.get("effectiveDateTime"))
    binary, doc, form = hl7_documents.document(
        obx.reps(5)[0], system=system, value=value, code=code, patient_ref=patient_ref,
        status=obx.get(11).upper(), date=date, report_url=c.tx.tx_url("DiagnosticReport", system, report_value))
    c.tx.entries.append({"fullUrl": local_url("Binary", system, value), "resource": binary,
                         "request": {"method": "PUT", "url": f"Binary/{binary['id']}"}})
    c.tx.update(doc, system, value)
    report.setdefault("presentedForm", []).append(form)


def _instant(dt: str | None) -> str | None:
    """FHIR instant needs seconds and a zone; v2_datetime gives both whenever it has a time."""
    return dt if dt and "T" in dt else None


def _order_ident(obr: Segment, orc: Segment | None, c: _Ctx) -> tuple[dict[str, Any], str, str] | None:
    """Filler order number first (the result's own id), then placer."""
    for seg, field, code in ((obr, 3, "FILL"), (orc, 3, "FILL"), (obr, 2, "PLAC"), (orc, 2, "PLAC")):
        if seg is not None and seg.reps(field):
            got = identifier_from_ei(seg.reps(field)[0], code, c.rules)
            if got:
                return got
    return None


# ---------------------------------------------------------------- ORM / OMI
def _service_request(orc: Segment, obr: Segment | None, tq1: Segment | None, ipc: Segment | None,
                     patient_ref: str, c: _Ctx) -> None:
    idents: list[tuple[dict[str, Any], str, str]] = []
    for seg, field, code in ((orc, 2, "PLAC"), (obr, 2, "PLAC"), (orc, 3, "FILL"), (obr, 3, "FILL")):
        if seg is not None and seg.reps(field) and not any(i[0]["type"]["coding"][0]["code"] == code for i in idents):
            got = identifier_from_ei(seg.reps(field)[0], code, c.rules)
            if got:
                idents.append(got)
    accession = (ipc.get(1) if ipc is not None else "") or (obr.get(18) if obr is not None else "")
    if accession:
        acc_system = system_for(ipc.get(1, 2) if ipc is not None else "", "", "", c.rules)
        idents.append(({"type": {"coding": [{"system": V2_0203, "code": "ACSN"}]}, "system": acc_system,
                        "value": accession}, acc_system, accession))
    if not idents:
        raise ValueError("order without placer, filler or accession number")
    status = ORDER_STATUS_0038.get(orc.get(5).upper()) or ORDER_CONTROL_0119.get(orc.get(1).upper(), "active")
    priority_code = (tq1.get(9) if tq1 is not None else "") or orc.get(7, 6) or \
        (obr.get(27, 6) if obr is not None else "")
    when = ((tq1.get(7) if tq1 is not None else "") or orc.get(7, 4)
            or (obr.get(27, 4) if obr is not None else "") or (obr.get(36) if obr is not None else ""))
    requester = orc.reps(12) or (obr.reps(16) if obr is not None else [])
    res = prune({
        "resourceType": "ServiceRequest",
        "identifier": [i[0] for i in idents],
        "status": status,
        "intent": "order",
        "priority": PRIORITY_0485.get(priority_code.upper(), ""),
        "code": codeable(obr.reps(4)[0]) if obr is not None and obr.reps(4) else {},
        "subject": {"reference": patient_ref},
        "occurrenceDateTime": v2_datetime(when, c.cfg.timezone),
        "authoredOn": v2_datetime(orc.get(9), c.cfg.timezone),
        "requester": practitioner_ref(requester[0], c.rules) if requester else {},
        "reasonCode": [codeable(r) for r in obr.reps(31)] if obr is not None else [],
    })
    _ident, system, value = idents[0]
    c.tx.update(res, system, value)


@dataclass
class _OrderGroup:
    orc: Segment
    patient_ref: str
    obr: Segment | None = None
    tq1: Segment | None = None
    ipc: Segment | None = None


def _orders(msg: V2Message, c: _Ctx) -> None:
    """ORM^O01 / OMI^O23: one ServiceRequest per ORC, with the OBR/TQ1/IPC that follow it."""
    patient_ref = ""
    groups: list[_OrderGroup] = []
    for seg in msg:
        if seg.name == "PID":
            patient_ref = _patient(seg, c, default_update=False)
        elif seg.name == "ORC":
            if not patient_ref:
                raise ValueError("order without PID")
            groups.append(_OrderGroup(seg, patient_ref))
        elif seg.name in ("OBR", "TQ1", "IPC") and groups:
            attr = seg.name.lower()
            if getattr(groups[-1], attr) is None:
                setattr(groups[-1], attr, seg)
    if not groups:
        raise ValueError("order message without ORC")
    for g in groups:
        _service_request(g.orc, g.obr, g.tq1, g.ipc, g.patient_ref, c)


_HANDLERS: dict[str, Callable[[V2Message, _Ctx], None]] = {
    "A01": _adt, "A04": _adt, "A08": _adt, "A40": _merge, "R01": _oru, "O01": _orders, "O23": _orders,
}


def convert(payload: bytes, cfg: Hl7ToFhirConfig) -> dict[str, Any]:
    """HL7 v2 bytes -> transaction Bundle (dict). Raises Drop for unsupported types (if configured)."""
    msg = V2Message.from_bytes(payload)
    mtype = msg.message_type
    if mtype not in SUPPORTED:
        if cfg.unsupported == "drop":
            raise Drop(f"hl7_to_fhir: {mtype[0]}^{mtype[1]} not supported")
        raise ValueError(f"hl7_to_fhir: {mtype[0]}^{mtype[1]} not supported")
    c = _Ctx(cfg, rules_from(cfg), TransactionBuilder(), mtype[1])
    _HANDLERS[mtype[1]](msg, c)
    bundle = c.tx.bundle()
    if cfg.validate_output:
        validate_bundle(bundle)
    return bundle


@component("transform", "hl7_to_fhir", config=Hl7ToFhirConfig, kinds=("hl7v2",))
def build(config: Hl7ToFhirConfig, ctx: ComponentContext | None = None) -> Callable[[Envelope], Envelope]:
    """HL7 v2 (ADT A01/A04/A08/A40, ORU R01, ORM O01, OMI O23) -> FHIR R4 transaction Bundle."""
    from engine.mapping.tables import tables_of

    post = build_post(config.code_tables, config.extensions, tables_of(ctx))

    def transform(env: Envelope) -> Envelope:
        bundle = convert(env.payload, config)
        if post is not None:  # site codings and Z-segment extensions, then validated again
            post(env.payload, bundle)
            if config.validate_output:
                validate_bundle(bundle)
        log.debug("hl7_to_fhir.converted", message_id=env.id, entries=len(bundle["entry"]))
        return env.derive(kind="fhir", payload=dumps(bundle), headers={
            "resourceType": "Bundle", "bundleType": "transaction",
            "source_msh_10": env.headers.get("MSH-10", ""),
            "MSH-9.1": env.headers.get("MSH-9.1", ""), "MSH-9.2": env.headers.get("MSH-9.2", "")})

    return transform
