"""Code tables the conversions need, written out by hand.

Why tables in code and not a mapping library: the HL7 v2-to-FHIR IG publishes its
maps as CSV/ConceptMaps meant for humans and FHIR Mapping Language engines; no Python
package implements them faithfully, and the few rows medrelay needs are short, easy to
review against the IG page they cite, and fast (a dict lookup per field).
Each table names its source. Unknown codes fall back to the value noted per table.
"""

from __future__ import annotations

V2_0203 = "http://terminology.hl7.org/CodeSystem/v2-0203"  # identifier type
V3_ACT_CODE = "http://terminology.hl7.org/CodeSystem/v3-ActCode"
V3_INTERPRETATION = "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation"
DCM = "http://dicom.nema.org/resources/ontology/DCM"
SNOMED = "http://snomed.info/sct"
LOINC = "http://loinc.org"
UCUM = "http://unitsofmeasure.org"
RFC3986 = "urn:ietf:rfc:3986"
DICOM_UID = "urn:dicom:uid"

# HL7 table 0001 Administrative Sex -> FHIR administrative-gender
# (IG ConceptMap table-0001-to-administrative-gender). Unknown -> "unknown".
SEX_0001: dict[str, str] = {"M": "male", "F": "female", "O": "other", "U": "unknown",
                            "A": "other", "N": "other"}
# DICOM (0010,0040) PatientSex: M, F, O.
DICOM_SEX: dict[str, str] = {"M": "male", "F": "female", "O": "other"}
GENDER_TO_V2: dict[str, str] = {"male": "M", "female": "F", "other": "O", "unknown": "U"}

# HL7 table 0004 Patient Class -> Encounter.class (v3 ActCode), IG table-0004-to-v3-actcode.
PATIENT_CLASS_0004: dict[str, tuple[str, str]] = {
    "E": ("EMER", "emergency"), "I": ("IMP", "inpatient encounter"), "O": ("AMB", "ambulatory"),
    "P": ("PRENC", "pre-admission"), "R": ("AMB", "ambulatory"), "B": ("IMP", "inpatient encounter"),
    "C": ("AMB", "ambulatory"), "N": ("AMB", "ambulatory"),
}

# HL7 table 0085 Observation Result Status (OBX-11) -> Observation.status. Unknown -> "unknown".
OBX_STATUS_0085: dict[str, str] = {
    "C": "corrected", "D": "entered-in-error", "F": "final", "I": "registered", "N": "final",
    "O": "registered", "P": "preliminary", "R": "preliminary", "S": "preliminary", "U": "final",
    "W": "entered-in-error", "X": "cancelled",
}

# HL7 table 0123 Result Status (OBR-25) -> DiagnosticReport.status. Unknown -> "unknown".
OBR_STATUS_0123: dict[str, str] = {
    "O": "registered", "I": "registered", "S": "registered", "A": "partial", "P": "preliminary",
    "C": "corrected", "R": "partial", "F": "final", "X": "cancelled", "Y": "unknown", "Z": "unknown",
}

# HL7 table 0119 Order Control (ORC-1) -> ServiceRequest.status when ORC-5 is empty.
ORDER_CONTROL_0119: dict[str, str] = {
    "NW": "active", "XO": "active", "SC": "active", "CA": "revoked", "DC": "revoked",
    "OC": "revoked", "CR": "revoked", "HD": "on-hold", "RL": "active", "OK": "active",
    "SN": "active", "NA": "active", "RE": "completed",
}
# HL7 table 0038 Order Status (ORC-5) -> ServiceRequest.status (takes precedence over ORC-1).
ORDER_STATUS_0038: dict[str, str] = {
    "A": "active", "CA": "revoked", "CM": "completed", "DC": "revoked", "ER": "entered-in-error",
    "HD": "on-hold", "IP": "active", "RP": "revoked", "SC": "active",
}
# Worklist action from ORC-1: create, update or cancel the scheduled procedure step.
ORDER_CONTROL_ACTION: dict[str, str] = {
    "NW": "create", "SN": "create", "XO": "update", "SC": "update", "RL": "update",
    "CA": "cancel", "DC": "cancel", "OC": "cancel", "CR": "cancel",
}

# HL7 table 0485 Priority (TQ1-9, ORC-7.6 / OBR-27.6) -> ServiceRequest.priority.
PRIORITY_0485: dict[str, str] = {"S": "stat", "A": "asap", "R": "routine", "P": "urgent",
                                 "C": "urgent", "T": "urgent", "PRN": "routine"}

# HL7 table 0078 Abnormal Flags (OBX-8) -> v3 ObservationInterpretation (same codes for
# the common set; IG table-0078-to-v3-observationinterpretation).
INTERPRETATION_0078: dict[str, str] = {
    c: c for c in ("L", "H", "LL", "HH", "N", "A", "AA", "U", "D", "B", "W", "S", "R", "I",
                   "MS", "VS", "NR", "IND", "E", "EX", "HX", "LX", "HU", "LU", "POS", "NEG",
                   "<", ">", "QCF")
}

# HL7 table 0396 coding system names -> FHIR system URIs (IG / terminology.hl7.org).
CODING_SYSTEMS_0396: dict[str, str] = {
    "LN": LOINC, "LOINC": LOINC, "SCT": SNOMED, "SNM": SNOMED, "SNOMED-CT": SNOMED,
    "UCUM": UCUM, "DCM": DCM, "I10": "http://hl7.org/fhir/sid/icd-10", "I10C": "http://hl7.org/fhir/sid/icd-10-cm",
    "I9C": "http://hl7.org/fhir/sid/icd-9-cm", "CPT": "http://www.ama-assn.org/go/cpt",
    "C4": "http://www.ama-assn.org/go/cpt", "RXNORM": "http://www.nlm.nih.gov/research/umls/rxnorm",
    "HL70078": V3_INTERPRETATION, "RADLEX": "http://www.radlex.org", "RID": "http://www.radlex.org",
}

# OBX-2 value types mapped as numbers / text / codes / dates.
NUMERIC_TYPES = frozenset({"NM"})
TEXT_TYPES = frozenset({"ST", "TX", "FT", "ID", "IS", "SI"})
CODED_TYPES = frozenset({"CE", "CWE", "CNE", "CF"})
DATE_TYPES = frozenset({"DT", "DTM", "TS"})

# SN comparator (SN.1) -> Quantity.comparator. "=" and empty mean an exact value.
SN_COMPARATORS: dict[str, str] = {"<": "<", "<=": "<=", ">": ">", ">=": ">="}

# DICOM Body Part Examined (0018,0015) -> SNOMED CT, from DICOM PS3.16 Annex L
# (CID 4031 "Common Anatomic Regions"); only the frequent values. Others are left
# uncoded rather than guessed.
BODY_PART_SNOMED: dict[str, tuple[str, str]] = {
    "ABDOMEN": ("818981001", "Abdomen"), "BRAIN": ("12738006", "Brain"),
    "BREAST": ("76752008", "Breast"), "CHEST": ("51185008", "Thorax"),
    "CSPINE": ("122494005", "Cervical spine"), "TSPINE": ("122495006", "Thoracic spine"),
    "LSPINE": ("122496007", "Lumbar spine"), "SPINE": ("421060004", "Spine"),
    "HEAD": ("69536005", "Head"), "HEART": ("80891009", "Heart"), "KNEE": ("72696002", "Knee"),
    "LIVER": ("10200004", "Liver"), "NECK": ("45048000", "Neck"), "PELVIS": ("816092008", "Pelvis"),
    "SHOULDER": ("16982005", "Shoulder"), "SKULL": ("89546000", "Skull"), "HIP": ("29836001", "Hip"),
    "HAND": ("85562004", "Hand"), "FOOT": ("56459004", "Foot"), "ANKLE": ("70258002", "Ankle joint"),
    "ELBOW": ("16953009", "Elbow joint"), "WRIST": ("74670003", "Wrist joint"),
}
# DICOM Laterality (0020,0060) -> SNOMED CT (PS3.16 CID 244).
LATERALITY_SNOMED: dict[str, tuple[str, str]] = {
    "L": ("7771000", "Left"), "R": ("24028007", "Right"), "B": ("51440002", "Right and left"),
}


def coding_system(name: str) -> str | None:
    """FHIR system URI for an HL7 coding-system name; None for local/unknown ones."""
    if not name:
        return None
    return CODING_SYSTEMS_0396.get(name.upper())
