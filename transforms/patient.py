"""The patient, the same way from DICOM and from HL7 v2, to FHIR and to PID.

All three conversions meet in one FHIR server, so a patient from a CT header and the
same patient from an ADT message must get the same identifier system and value, or
the server ends up with two Patients. That rule lives here and nowhere else.

Identifier system, in order: the transform's ``patient_identifier_system`` if set;
``identifier_systems[<assigning authority namespace or universal id>]``; the
universal id itself (``urn:oid:`` for ISO, as-is for URI, ``urn:uuid:`` for UUID);
``urn:medrelay:id:<namespace>``; else ``default_identifier_system``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

from pydantic import Field

from engine.hl7.message import Delimiters
from transforms.fhir_bundle import prune
from transforms.fhir_time import dicom_date, v2_date, v2_datetime
from transforms.hl7_escape import escape
from transforms.hl7_text import Segment
from transforms.v2_tables import DICOM_SEX, SEX_0001, V2_0203


@dataclass(frozen=True)
class IdentityRules:
    """How identifier systems are chosen (built from each transform's config)."""

    system: str | None = None
    by_authority: Mapping[str, str] = field(default_factory=dict)
    default: str = "urn:medrelay:id:local"


def identity_fields() -> dict[str, Any]:
    """The three config fields every converting transform shares (same names, same meaning)."""
    return {
        "patient_identifier_system": Field(
            None, description="Fixed FHIR identifier system for patient ids; overrides the derivation "
            "from the assigning authority (PID-3.4 / IssuerOfPatientID).", examples=["urn:oid:1.2.3.4"]),
        "identifier_systems": Field(
            default_factory=dict, description="Assigning authority (namespace or universal id) -> FHIR "
            "identifier system, e.g. {HOSP: 'urn:oid:1.2.3.4'}."),
        "default_identifier_system": Field(
            "urn:medrelay:id:local", description="System used when the message names no assigning authority."),
    }


def system_for(namespace: str, universal: str, utype: str, rules: IdentityRules) -> str:
    if rules.system:
        return rules.system
    for key in (namespace, universal):
        if key and key in rules.by_authority:
            return rules.by_authority[key]
    utype = utype.upper()
    if universal:
        if utype == "ISO" or (not utype and universal.replace(".", "").isdigit()):
            return f"urn:oid:{universal}"
        if utype in ("URI", "URL"):
            return universal
        if utype == "UUID":
            return f"urn:uuid:{universal}"
    if namespace:
        return "urn:medrelay:id:" + quote(namespace, safe="")
    return rules.default


def _id_type(code: str) -> dict[str, Any]:
    return {"coding": [{"system": V2_0203, "code": code}]} if code else {}


# ---------------------------------------------------------------- names
_NAME_USE_0200 = {"L": "official", "D": "usual", "M": "maiden", "N": "nickname"}


def human_name(family: str, given: list[str], prefix: str = "", suffix: str = "", use: str = "") -> dict[str, Any]:
    return prune({"use": use, "family": family, "given": [g for g in given if g],
                  "prefix": [prefix] if prefix else [], "suffix": [suffix] if suffix else []})


def name_from_pn(pn: str) -> dict[str, Any]:
    """DICOM PN (``Family^Given^Middle^Prefix^Suffix``, alphabetic group only) -> HumanName."""
    c = (str(pn).split("=")[0].split("^") + [""] * 5)[:5]
    return human_name(c[0].strip(), [c[1].strip(), c[2].strip()], c[3].strip(), c[4].strip())


def xpn_from_pn(pn: str, d: Delimiters) -> str:
    """DICOM PN -> HL7 XPN. The two standards order prefix and suffix differently:
    PN is Family^Given^Middle^Prefix^Suffix, XPN is Family^Given^Middle^Suffix^Prefix."""
    c = (str(pn).split("=")[0].split("^") + [""] * 5)[:5]
    comps = [escape(c[0].strip(), d), escape(c[1].strip(), d), escape(c[2].strip(), d),
             escape(c[4].strip(), d), escape(c[3].strip(), d)]
    return d.component.join(comps).rstrip(d.component)


def name_from_xpn(comps: list[list[str]]) -> dict[str, Any]:
    """HL7 XPN (one repetition, components -> subcomponents) -> HumanName."""
    def c(i: int) -> str:
        return comps[i][0].strip() if i < len(comps) and comps[i] else ""

    return human_name(c(0), [c(1), c(2)], prefix=c(4), suffix=c(3), use=_NAME_USE_0200.get(c(6).upper(), ""))


# ---------------------------------------------------------------- HL7 PID -> Patient
def _identifier_from_cx(cx: list[list[str]], rules: IdentityRules) -> tuple[dict[str, Any], str, str] | None:
    def c(i: int, s: int = 0) -> str:
        return cx[i][s].strip() if i < len(cx) and s < len(cx[i]) else ""

    value = c(0)
    if not value:
        return None
    system = system_for(c(3, 0), c(3, 1), c(3, 2), rules)
    ident = prune({"type": _id_type(c(4)), "system": system, "value": value})
    return ident, system, value


_XAD_USE = {"H": "home", "B": "work", "O": "work", "C": "temp", "BA": "old", "M": "home"}
_XTN_SYSTEM = {"PH": "phone", "FX": "fax", "CP": "phone", "BP": "pager", "INTERNET": "email",
               "X.400": "email", "MD": "other"}


def _address(xad: list[list[str]]) -> dict[str, Any]:
    def c(i: int) -> str:
        return xad[i][0].strip() if i < len(xad) and xad[i] else ""

    return prune({"use": _XAD_USE.get(c(6).upper(), ""), "line": [c(0), c(1)], "city": c(2),
                  "state": c(3), "postalCode": c(4), "country": c(5)})


def _telecom(xtn: list[list[str]], use: str) -> dict[str, Any]:
    def c(i: int) -> str:
        return xtn[i][0].strip() if i < len(xtn) and xtn[i] else ""

    equip = c(2).upper()
    system = _XTN_SYSTEM.get(equip, "phone")
    value = c(3) if system == "email" and c(3) else c(0)
    if not value and (c(5) or c(6)):
        value = " ".join(p for p in (c(4) and "+" + c(4), c(5), c(6)) if p)
    if equip == "CP":
        use = "mobile"
    return prune({"system": system, "value": value, "use": use}) if value else {}


def patient_from_pid(pid: Segment, rules: IdentityRules) -> tuple[dict[str, Any], tuple[str, str]]:
    """PID -> (Patient resource, (system, value) of the identifier used for matching).

    Matching prefers the PID-3 repetition typed MR (medical record number), else the first.
    Raises ValueError when PID-3 has no value: without it no conditional request is possible.
    """
    idents: list[tuple[dict[str, Any], str, str, str]] = []
    for n in (3, 2, 4):
        for rep in pid.reps(n):
            got = _identifier_from_cx(rep, rules)
            if got:
                type_code = rep[4][0].strip().upper() if len(rep) > 4 and rep[4] else ""
                idents.append((*got, type_code))
    if not idents:
        raise ValueError("PID-3 has no patient identifier")
    primary = next((i for i in idents if i[3] == "MR"), idents[0])
    res: dict[str, Any] = {
        "resourceType": "Patient",
        "identifier": [i[0] for i in idents],
        "name": [name_from_xpn(rep) for rep in pid.reps(5)],
        "gender": SEX_0001.get(pid.get(8).upper(), "unknown" if pid.get(8) else ""),
        "birthDate": v2_date(pid.get(7)) or "",
        "address": [_address(rep) for rep in pid.reps(11)],
        "telecom": [_telecom(rep, "home") for rep in pid.reps(13)] + [_telecom(rep, "work") for rep in pid.reps(14)],
    }
    death = pid.get(29)
    if death:
        res["deceasedDateTime"] = v2_datetime(death) or ""
    elif pid.get(30).upper() == "Y":
        res["deceasedBoolean"] = True
    return prune(res), (primary[1], primary[2])


# ---------------------------------------------------------------- DICOM -> Patient / PID
def dicom_identity(ds: Any, rules: IdentityRules) -> tuple[str, str, str, str, str]:
    """(system, value, issuer namespace, issuer universal id, universal id type) from a dataset."""
    value = str(ds.get("PatientID", "") or "").strip()
    ns = str(ds.get("IssuerOfPatientID", "") or "").strip()
    uid = utype = ""
    quals = ds.get("IssuerOfPatientIDQualifiersSequence")
    if quals:
        uid = str(quals[0].get("UniversalEntityID", "") or "").strip()
        utype = str(quals[0].get("UniversalEntityIDType", "") or "").strip()
    return system_for(ns, uid, utype, rules), value, ns, uid, utype


def patient_from_dicom(ds: Any, rules: IdentityRules) -> tuple[dict[str, Any], tuple[str, str]]:
    """Patient module attributes (PS3.3 C.7.1.1) -> (Patient, (system, value))."""
    system, value, *_ = dicom_identity(ds, rules)
    if not value:
        raise ValueError("dataset has no PatientID")
    pn = ds.get("PatientName")
    res = {
        "resourceType": "Patient",
        "identifier": [{"type": _id_type("MR"), "system": system, "value": value}],
        "name": [name_from_pn(str(pn))] if pn else [],
        "gender": DICOM_SEX.get(str(ds.get("PatientSex", "") or "").strip().upper(), ""),
        "birthDate": dicom_date(str(ds.get("PatientBirthDate", "") or "")) or "",
    }
    return prune(res), (system, value)


def pid_from_dicom(ds: Any, rules: IdentityRules, d: Delimiters) -> str:
    """Build a PID segment (v2.5.1) from the DICOM Patient module, every value escaped."""
    _system, value, ns, uid, utype = dicom_identity(ds, rules)
    hd = d.subcomponent.join(escape(x, d) for x in (ns, uid, utype)).rstrip(d.subcomponent)
    cx = d.component.join([escape(value, d), "", "", hd, "MR"])
    sex = str(ds.get("PatientSex", "") or "").strip().upper()
    sex = sex if sex in ("M", "F", "O") else "U"
    birth = str(ds.get("PatientBirthDate", "") or "").strip()
    pn = ds.get("PatientName")
    xpn = xpn_from_pn(str(pn), d) if pn else ""
    if not xpn:
        xpn = '""'  # PID-5 is required in v2.5.1: explicit null
    return d.field.join(["PID", "1", "", cx, "", xpn, "", birth if birth.isdigit() else "", sex])


def rules_from(config: Any) -> IdentityRules:
    """IdentityRules from any config carrying the fields of `identity_fields`."""
    return IdentityRules(config.patient_identifier_system, dict(config.identifier_systems),
                         config.default_identifier_system)
