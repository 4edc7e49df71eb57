"""PS3.15 Annex E Table E.1-1, loaded from the packaged CSV, and how to read an action from it.

The table *is* the specification of the Basic Application Level Confidentiality
Profile, so we ship it as data (``transforms/data/ps3.15-table-e1-1.csv``, edition
2026c) instead of transcribing it into code: a new edition is a file swap, and the
self-check in ``conformance/deid`` scores against the same rows.

Compound actions (Z/D, X/Z, X/D, X/Z/D, X/Z/U*) depend on the attribute's Type in
the IOD of the instance. We do not carry all of PS3.3; instead ``ATTRIBUTE_TYPE``
lists the attributes among the compound rows that are Type 1 or 2 in the common
image and SR IODs, with per-SOP-class overrides. Anything not listed is treated as
Type 3, so an unknown case resolves to the *most removing* alternative (X before Z
before D): for a privacy tool, a non-conformant-but-empty result beats a leak.
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Literal, get_args

Option = Literal[
    "retain_safe_private",
    "retain_uids",
    "retain_device_identity",
    "retain_institution_identity",
    "retain_patient_characteristics",
    "retain_long_full_dates",
    "retain_long_modified_dates",
    "clean_descriptors",
    "clean_structured_content",
    "clean_graphics",
]
OPTIONS: tuple[Option, ...] = get_args(Option)

# PS3.16 CID 7050 De-identification Method (checked against pydicom's PS3.16 concept table).
CID_7050: dict[str, tuple[str, str]] = {
    "basic": ("113100", "Basic Application Confidentiality Profile"),
    "clean_pixel_data": ("113101", "Clean Pixel Data Option"),
    "clean_graphics": ("113103", "Clean Graphics Option"),
    "clean_structured_content": ("113104", "Clean Structured Content Option"),
    "clean_descriptors": ("113105", "Clean Descriptors Option"),
    "retain_long_full_dates": ("113106", "Retain Longitudinal Temporal Information Full Dates Option"),
    "retain_long_modified_dates": ("113107", "Retain Longitudinal Temporal Information Modified Dates Option"),
    "retain_patient_characteristics": ("113108", "Retain Patient Characteristics Option"),
    "retain_device_identity": ("113109", "Retain Device Identity Option"),
    "retain_uids": ("113110", "Retain UIDs Option"),
    "retain_safe_private": ("113111", "Retain Safe Private Option"),
    "retain_institution_identity": ("113112", "Retain Institution Identity Option"),
}

PRIVATE_ROW_TAG = "(gggg,eeee) where gggg is odd"

# Type 1 or 2 in the IODs we see most (CT, MR, CR/DX, US, SC, PET, NM, RT, SR),
# restricted to attributes whose basic action is compound. Everything else: Type 3.
ATTRIBUTE_TYPE: dict[str, int] = {
    "PatientID": 2,  # Patient module
    "ContentDate": 2,  # General Image (2C), General Series-level in most image IODs
    "ContentTime": 2,
    "ContentCreatorName": 2,  # Presentation State Identification
    "ContrastBolusAgent": 2,  # Contrast/Bolus module
    "AcquisitionContextSequence": 2,  # Acquisition Context module
    "PatientSexNeutered": 2,  # Patient module, 2C (animals)
    "ReviewerName": 2,  # RT/Approval, 2C
    "TreatmentMachineName": 2,  # RT Beams
}
_ENHANCED = {"ContentDate": 1, "ContentTime": 1, "AcquisitionDateTime": 1, "DeviceSerialNumber": 1}
_SR = {"ContentDate": 1, "ContentTime": 1}
SOP_CLASS_TYPE: dict[str, dict[str, int]] = {
    "1.2.840.10008.5.1.4.1.1.2.1": _ENHANCED,  # Enhanced CT
    "1.2.840.10008.5.1.4.1.1.4.1": _ENHANCED,  # Enhanced MR
    "1.2.840.10008.5.1.4.1.1.128.1": _ENHANCED,  # Enhanced PET
    "1.2.840.10008.5.1.4.1.1.12.1.1": _ENHANCED,  # Enhanced XA
    "1.2.840.10008.5.1.4.1.1.88.": _SR,  # every SR storage class (prefix)
}


@dataclass(frozen=True, slots=True)
class Row:
    """One row of Table E.1-1: the basic action and what each option column says."""

    tag: str
    name: str
    retired: bool
    basic: str
    options: dict[str, str]


def _parse_mask(tag: str) -> tuple[int, int] | None:
    """``(50xx,xxxx)`` -> (mask, value) for a tag int; None for a plain tag."""
    m = re.fullmatch(r"\(([0-9A-Fa-fx]{4}),([0-9A-Fa-fx]{4})\)", tag)
    if not m:
        return None
    hexes = (m.group(1) + m.group(2)).upper()
    mask = int("".join("0" if c == "X" else "F" for c in hexes), 16)
    value = int(hexes.replace("X", "0"), 16)
    return mask, value


@dataclass(frozen=True)
class Table:
    exact: dict[int, Row]
    masks: tuple[tuple[int, int, Row], ...]
    private: Row
    rows: tuple[Row, ...]

    def lookup(self, tag: int) -> Row | None:
        """The row for a standard tag (exact first, then repeating-group masks)."""
        row = self.exact.get(tag)
        if row is not None:
            return row
        for mask, value, mrow in self.masks:
            if tag & mask == value:
                return mrow
        return None


@cache
def load_table() -> Table:
    """Read the packaged CSV once per process."""
    text = resources.files("transforms").joinpath("data/ps3.15-table-e1-1.csv").read_text("utf-8")
    exact: dict[int, Row] = {}
    masks: list[tuple[int, int, Row]] = []
    private: Row | None = None
    rows: list[Row] = []
    for rec in csv.DictReader(text.splitlines()):
        row = Row(
            tag=rec["tag"],
            name=rec["name"],
            retired=rec["retired"] == "Y",
            basic=rec["basic"],
            options={o: rec[o] for o in OPTIONS if rec[o]},
        )
        rows.append(row)
        if row.tag == PRIVATE_ROW_TAG:
            private = row
            continue
        parsed = _parse_mask(row.tag)
        if parsed is None:
            raise ValueError(f"unparseable tag in Table E.1-1: {row.tag!r}")
        mask, value = parsed
        if mask == 0xFFFFFFFF:
            exact[value] = row
        else:
            masks.append((mask, value, row))
    if private is None:
        raise ValueError("Table E.1-1 has no private-attributes row")
    return Table(exact=exact, masks=tuple(masks), private=private, rows=tuple(rows))


def effective_action(row: Row, options: frozenset[str]) -> str:
    """The action after the enabled option columns override the basic one.

    When two enabled options disagree on a row (e.g. retain_device_identity K and
    retain_long_modified_dates C on Date of Last Calibration), C wins over K: it
    honours both wishes (the attribute stays, the identifying part goes).
    """
    said = {row.options[o] for o in options if o in row.options}
    if "C" in said:
        return "C"
    if "K" in said:
        return "K"
    return row.basic


def attribute_type(keyword: str, sop_class_uid: str) -> int:
    """The attribute's Type (1, 2 or 3) in the instance's IOD, as far as we know it."""
    for prefix, table in SOP_CLASS_TYPE.items():
        if sop_class_uid.startswith(prefix) and keyword in table:
            return table[keyword]
    return ATTRIBUTE_TYPE.get(keyword, 3)


def resolve(action: str, keyword: str, sop_class_uid: str) -> str:
    """Turn a compound action into one of D, Z, X, K, C, U for this attribute.

    Type 1 needs a value (D, or U for X/Z/U*), Type 2 needs presence (Z), Type 3
    may go (X). Alternatives a compound does not offer fall to the next most
    removing one that it does.
    """
    if "/" not in action:
        return action
    choices = action.replace("*", "").split("/")
    typ = attribute_type(keyword, sop_class_uid)
    wanted = {1: ["D", "U", "Z", "X"], 2: ["Z", "D", "U", "X"], 3: ["X", "Z", "D", "U"]}[typ]
    for w in wanted:
        if w in choices:
            return w
    return choices[0]
