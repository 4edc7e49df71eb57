"""FHIR R4 de-identification of a resource or a Bundle, with the DICOM/HL7 pseudonyms.

The same intent as Table E.1-1, resource by resource: Patient (and the other
person resources) is a whitelist, so an element added by a profile or extension
cannot slip through; narrative (``text``) is dropped everywhere because it
repeats the structured data as free HTML we cannot clean; people's contact data
(telecom, address, photo, contact) is dropped; identifiers become the shared
pseudonyms (Patient identifiers as PatientID/PID-3, ACSN as AccessionNumber,
PLAC/FILL as the HL7 order numbers, ``urn:dicom:uid`` as the DICOM UID); dates move
by the patient's shift. Logical ids of people are replaced and every reference to
them is rewritten, so a Bundle stays internally consistent.
"""

from __future__ import annotations

import json
import re
from typing import Any

from transforms.deid_config import DeidentifyConfig
from transforms.deid_limits import MAX_JSON_DEPTH, TooDeep, check_json_depth
from transforms.deid_pseudonym import Pseudonymizer, shift_iso

PEOPLE = ("Patient", "Practitioner", "RelatedPerson", "Person")
PATIENT_KEYS = {"resourceType", "id", "meta", "active", "identifier", "name", "gender", "birthDate",
                "deceasedBoolean", "deceasedDateTime", "managingOrganization", "link"}
PERSON_KEYS = {"resourceType", "id", "meta", "active", "patient", "relationship"}
CONTACT_KEYS = {"telecom", "address", "photo", "contact"}
_REF = re.compile(r"(^|/)(" + "|".join(PEOPLE) + r")/([A-Za-z0-9\-.]{1,64})")
_ISO_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}(T[0-9:.]+(Z|[+-]\d{2}:\d{2})?)?$")
_IDENT_PARAM = re.compile(r"(identifier=)([^&]*)")


def _type_codes(identifier: dict[str, Any]) -> set[str]:
    codings = (identifier.get("type") or {}).get("coding") or []
    return {str(c.get("code", "")).upper() for c in codings if isinstance(c, dict)}


def _resources(node: Any) -> list[dict[str, Any]]:
    """Every resource in a document: itself, Bundle entries, contained, nested Bundles."""
    found: list[dict[str, Any]] = []
    if isinstance(node, dict):
        if "resourceType" in node:
            found.append(node)
        for entry in node.get("entry", []) if node.get("resourceType") == "Bundle" else []:
            found.extend(_resources(entry.get("resource")))
        for res in node.get("contained", []) or []:
            found.extend(_resources(res))
    return found


class FhirDeidentifier:
    """A configured FHIR de-identifier; ``apply`` maps JSON bytes to JSON bytes."""

    def __init__(self, config: DeidentifyConfig, pseudo: Pseudonymizer) -> None:
        self.config = config
        self.pseudo = pseudo
        self.opts = config.option_set

    def apply(self, payload: bytes) -> bytes:
        """De-identify a resource or a Bundle; ``ValueError`` when it is not a FHIR JSON object,
        ``TooDeep`` (a ValueError too) when it nests past ``deid_limits.MAX_JSON_DEPTH``."""
        try:
            doc = json.loads(payload)
        except RecursionError:  # the json module's own recursion limit
            raise TooDeep(f"JSON nested too deep to read (more than {MAX_JSON_DEPTH} levels are refused)") from None
        check_json_depth(doc, MAX_JSON_DEPTH)  # before any change: the walk below recurses
        if not isinstance(doc, dict) or "resourceType" not in doc:
            raise ValueError("not a FHIR resource (no resourceType)")
        resources = _resources(doc)
        self.keys: dict[str, str] = {}
        for res in resources:
            if res.get("resourceType") == "Patient":
                self.keys[str(res.get("id", ""))] = self._patient_key(res)
        self.default_key = next(iter(self.keys.values()), "")
        if doc.get("resourceType") == "Bundle":
            self._bundle(doc)
        for res in resources:
            self._resource(res)
        return json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode("utf-8")

    # -- keys ------------------------------------------------------------------------
    def _patient_key(self, patient: dict[str, Any]) -> str:
        """The MRN (identifier typed MR, else the first one), as DICOM PatientID would carry it."""
        idents = [i for i in patient.get("identifier", []) or [] if isinstance(i, dict) and i.get("value")]
        mrn = next((i for i in idents if "MR" in _type_codes(i)), idents[0] if idents else None)
        return str(mrn["value"]) if mrn else "fhir-patient:" + str(patient.get("id", ""))

    def _key_for(self, res: dict[str, Any]) -> str:
        if res.get("resourceType") == "Patient":
            return self.keys.get(str(res.get("id", "")), self.default_key)
        for field in ("subject", "patient", "beneficiary"):
            ref = (res.get(field) or {}) if isinstance(res.get(field), dict) else {}
            m = _REF.search(str(ref.get("reference", "")))
            if m and m.group(2) == "Patient":
                return self.keys.get(m.group(3), "fhir-patient:" + m.group(3))
            ident = ref.get("identifier")
            if isinstance(ident, dict) and ident.get("value"):
                return str(ident["value"])
        return self.default_key

    # -- pieces ------------------------------------------------------------------------
    def _logical_id(self, rtype: str, rid: str) -> str:
        return self.pseudo.ident("fhirid:" + rtype, rid, 32).lower()

    def _ref(self, value: str) -> str:
        value = _REF.sub(lambda m: f"{m.group(1)}{m.group(2)}/{self._logical_id(m.group(2), m.group(3))}", value)
        return _IDENT_PARAM.sub(lambda m: m.group(1) + self._ident_param(m.group(2)), value)

    def _ident_param(self, token: str) -> str:
        system, _, value = token.rpartition("|")
        return (system + "|" if system else "") + self.pseudo.patient_id(value)

    def _identifier(self, ident: dict[str, Any], rtype: str) -> dict[str, Any]:
        out = {k: v for k, v in ident.items() if k not in ("assigner", "period")}
        value = str(ident.get("value", ""))
        if not value:
            return out
        codes = _type_codes(ident)
        if rtype == "Patient" or "MR" in codes:
            out["value"] = self.pseudo.patient_id(value)
        elif ident.get("system") == "urn:dicom:uid":
            if "retain_uids" not in self.opts:
                out["value"] = "urn:oid:" + self.pseudo.uid(value.removeprefix("urn:oid:"))
        elif "ACSN" in codes:
            out["value"] = self.pseudo.ident("acc", value)
        elif codes & {"PLAC", "FILL"}:
            out["value"] = self.pseudo.ident("order", value)
        else:
            out["value"] = self.pseudo.ident("fhir-id", value)
        return out

    def _date(self, key: str, value: str) -> str | None:
        if key == "birthDate":
            mode = self.config.birth_date_mode()
            if mode == "keep":
                return value
            if mode == "shift":
                return shift_iso(value, self.shift) or None
            return value[:4] if mode == "year" else None
        if self.config.date_mode() == "keep":
            return value
        return shift_iso(value, self.shift) or None

    # -- walk ---------------------------------------------------------------------------
    def _bundle(self, bundle: dict[str, Any]) -> None:
        bundle.pop("identifier", None)
        for entry in bundle.get("entry", []) or []:
            if isinstance(entry.get("fullUrl"), str):
                entry["fullUrl"] = self._ref(entry["fullUrl"])
            req = entry.get("request")
            if isinstance(req, dict):
                for k in ("url", "ifNoneExist"):
                    if isinstance(req.get(k), str):
                        req[k] = self._ref(req[k])

    def _resource(self, res: dict[str, Any]) -> None:
        rtype = str(res.get("resourceType"))
        self.shift = self.pseudo.date_shift_days(self._key_for(res), self.config.date_shift_max_days)
        res.pop("text", None)
        if rtype == "Patient":
            self._patient(res)
        elif rtype in PEOPLE:
            for k in [k for k in res if k not in PERSON_KEYS]:
                del res[k]
        if rtype in PEOPLE and "id" in res:
            res["id"] = self._logical_id(rtype, str(res["id"]))
        keep_contact = rtype in ("Organization", "Location") and "retain_institution_identity" in self.opts
        if rtype in ("Organization", "Location") and not keep_contact:
            for k in ("name", "alias", "identifier"):
                res.pop(k, None)
        for key in list(res):
            if key in ("resourceType", "id", "contained"):
                continue
            if key in CONTACT_KEYS and not keep_contact:
                del res[key]
                continue
            new = self._value(key, res[key], rtype)
            if new is None:
                del res[key]
            else:
                res[key] = new

    def _patient(self, res: dict[str, Any]) -> None:
        key = self._key_for(res)
        for k in [k for k in res if k not in PATIENT_KEYS]:
            del res[k]
        if "gender" in res and "retain_patient_characteristics" not in self.opts:
            del res["gender"]
        if "managingOrganization" in res and "retain_institution_identity" not in self.opts:
            del res["managingOrganization"]
        family, given = self.pseudo.patient_name(key)
        res["name"] = [{"family": family, "given": [given]}]

    def _value(self, key: str, value: Any, rtype: str) -> Any:
        if key == "note" and self.config.remove_free_text:
            return None
        if isinstance(value, list):
            items = [self._value(key, v, rtype) for v in value]
            return [v for v in items if v is not None]
        if isinstance(value, dict):
            return self._object(key, value, rtype)
        if isinstance(value, str):
            if key == "reference":
                return self._ref(value)
            if key == "uid" and "retain_uids" not in self.opts:
                return self.pseudo.uid(value)
            if key == "birthDate" or _ISO_DATE.match(value):
                return self._date(key, value)
        return value

    def _object(self, key: str, obj: dict[str, Any], rtype: str) -> dict[str, Any] | None:
        if "resourceType" in obj:  # contained / nested resources are handled on their own
            return obj
        is_ident = key == "identifier" or key.endswith("Identifier")
        if is_ident:
            obj = self._identifier(obj, rtype)
        if "display" in obj and "code" not in obj and "system" not in obj:
            obj = {k: v for k, v in obj.items() if k != "display"}  # Reference.display: often a name
        if "contentType" in obj:
            obj = {k: v for k, v in obj.items() if k not in ("data", "url")}  # attachments
        # A logical reference to the patient carries the MRN: pseudonymise it as PatientID.
        inner = "Patient" if key in ("subject", "patient", "beneficiary") else rtype
        out: dict[str, Any] = {}
        for k, v in obj.items():
            if k in CONTACT_KEYS:
                continue
            if is_ident and k in ("value", "system", "use"):
                out[k] = v
                continue
            new = self._value(k, v, inner)
            if new is not None:
                out[k] = new
        return out or None
