"""DICOM de-identification: PS3.15 Table E.1-1 applied to every attribute, at every depth.

One walk over the data set: each standard attribute is looked up in the table
(exact tag, then repeating-group masks), its action is the basic one overridden by
the enabled option columns, a compound action is resolved by the attribute's Type
(see ``deid_table.resolve``), and sequences are walked recursively so an attribute
inside an item gets the same treatment as at top level. The recursion is bounded: a data
set is measured first (``deid_limits``) and one nested deeper than ``MAX_SEQUENCE_DEPTH``
is refused with ``TooDeep`` before anything is changed. Attributes the table does
not name are kept (the table is the profile), except inside a sequence being
*cleaned*, where free text is scrubbed of this instance's identifiers.
"""

from __future__ import annotations

import io
import re
from collections.abc import Iterable
from typing import Any

import pydicom
from pydicom.datadict import dictionary_VR, keyword_for_tag
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from transforms.deid_config import DeidentifyConfig
from transforms.deid_limits import MAX_SEQUENCE_DEPTH, TooDeep, check_dataset_depth
from transforms.deid_pixels import screen
from transforms.deid_pseudonym import Pseudonymizer, shift_compact
from transforms.deid_table import CID_7050, OPTIONS, effective_action, load_table, resolve

DUMMY: dict[str, Any] = {
    "AE": "ANONYMOUS", "AS": "000Y", "CS": "ANONYMIZED", "DA": "19000101", "DS": "0",
    "DT": "19000101000000", "IS": "0", "LO": "ANONYMIZED", "LT": "ANONYMIZED",
    "PN": "ANONYMIZED", "SH": "ANONYMIZED", "ST": "ANONYMIZED", "TM": "000000",
    "UC": "ANONYMIZED", "UR": "urn:anonymized", "UT": "ANONYMIZED",
    "FL": 0.0, "FD": 0.0, "SL": 0, "SS": 0, "SV": 0, "UL": 0, "US": 0, "UV": 0, "AT": 0,
}
# (options, tag, SOP class) -> resolved action; shared by all instances (dict get/set is thread-safe).
_ACTIONS: dict[tuple[frozenset[str], int, str], str | None] = {}
TEXT_VRS = {"AE", "LO", "LT", "PN", "SH", "ST", "UC", "UT", "UR"}
BINARY_VRS = {"OB", "OD", "OF", "OL", "OV", "OW", "UN"}
# Values whose text we also hunt for inside free text being cleaned (C).
PHI_KEYWORDS = {
    "PatientID", "OtherPatientIDs", "AccessionNumber", "PatientBirthDate", "PatientAddress",
    "PatientTelephoneNumbers", "InstitutionName", "InstitutionAddress", "MedicalRecordLocator",
    "IssuerOfPatientID", "PatientBirthName", "PatientMotherBirthName", "StudyID",
    "AdmissionID", "MilitaryRank", "BranchOfService", "RegionOfResidence", "CountryOfResidence",
}


def _vr(elem: DataElement) -> str:
    return str(elem.VR).split(" or ")[0]


def _raw_vr(ds: Dataset, tag: Any) -> str | None:
    """VR without converting the value (None when implicit and unknown to the dictionary)."""
    vr = ds.get_item(tag).VR
    if vr:
        return str(vr)
    try:
        return str(dictionary_VR(tag))
    except KeyError:
        return None


def collect_phi(ds: Dataset, out: set[str] | None = None) -> set[str]:
    """Identifying strings of this instance (names, ids, dates): what C must not leave behind."""
    out = set() if out is None else out
    for elem in ds:
        vr = _vr(elem)
        if vr == "SQ":
            for item in elem.value or []:
                collect_phi(item, out)
            continue
        if elem.value in (None, "", b""):
            continue
        if vr == "PN" or elem.keyword in PHI_KEYWORDS:
            values = elem.value if elem.VM > 1 else [elem.value]
            for v in values:
                s = str(v).strip()
                out.add(s)
                out.update(p for p in re.split(r"[\^= ,]+", s) if len(p) >= 3)
                if vr == "DA" and len(s) == 8:
                    out.update({f"{s[:4]}-{s[4:6]}-{s[6:]}", f"{s[4:6]}/{s[6:]}/{s[:4]}", f"{s[6:]}.{s[4:6]}.{s[:4]}"})
    out.discard("")
    return {t for t in out if len(t) >= 3}


def scrub(text: str, phi: Iterable[str]) -> str:
    """Remove each identifying string (case-insensitive, longest first)."""
    for token in sorted(phi, key=len, reverse=True):
        if token.lower() in text.lower():
            text = re.sub(re.escape(token), "***", text, flags=re.IGNORECASE)
    return text


class DicomDeidentifier:
    """A configured Basic Profile; ``apply`` changes a data set in place."""

    def __init__(self, config: DeidentifyConfig, pseudo: Pseudonymizer) -> None:
        self.config = config
        self.pseudo = pseudo
        self.table = load_table()
        self.opts = config.option_set
        self.private_action = effective_action(self.table.private, self.opts)
        self.safe = {(s.group, s.low, s.creator.strip().upper()) for s in config.safe_private}

    # -- entry -----------------------------------------------------------
    def apply(self, ds: Dataset) -> Dataset:
        """De-identify ``ds`` (and its file meta) in place; may raise ``Quarantine`` or ``TooDeep``."""
        check_dataset_depth(ds, MAX_SEQUENCE_DEPTH)  # before any change: the walks below recurse
        cleaned_pixels = screen(ds, self.config)
        self.sop_class = str(ds.get("SOPClassUID", ""))
        pid = str(ds.get("PatientID", "") or "").strip()
        self.patient_key = pid or str(ds.get("PatientName", "") or "") or str(ds.get("StudyInstanceUID", ""))
        self.shift = self.pseudo.date_shift_days(self.patient_key, self.config.date_shift_max_days)
        self.phi = collect_phi(ds) if self.opts else set()
        self._walk(ds, cleaning=False)
        meta = getattr(ds, "file_meta", None)
        if meta is not None and "SOPInstanceUID" in ds:
            meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        self._mark(ds, cleaned_pixels)
        return ds

    # -- the walk ----------------------------------------------------------
    def _walk(self, ds: Dataset, *, cleaning: bool) -> None:
        creators: list[int] = []
        for tag in list(ds.keys()):
            if tag.is_private:
                if tag.is_private_creator:
                    creators.append(int(tag))
                elif not self._keep_private(ds, tag):
                    del ds[tag]
                elif _vr(ds[tag]) == "SQ":
                    for item in ds[tag].value or []:
                        self._walk(item, cleaning=cleaning)
                continue
            if tag.element == 0 and tag.group != 0x0002:
                del ds[tag]  # group lengths: stale after any change
                continue
            action = self._action(int(tag))
            if action == "X":
                del ds[tag]  # before ds[tag]: removing needs no parsing of the value
            elif action is None:
                if cleaning or _raw_vr(ds, tag) in ("SQ", None):
                    self._untabled(ds, ds[tag], cleaning)
            else:
                self._act(ds, ds[tag], action)
        for ctag in creators:
            group, block = ctag >> 16, ctag & 0xFF
            lo = (group << 16) | (block << 8)
            if not any(lo <= int(t) <= lo + 0xFF for t in ds.keys()):
                del ds[ctag]

    def _action(self, tag: int) -> str | None:
        """Resolved action for a standard tag (None: not in the table), cached per options and SOP class."""
        key = (self.opts, tag, self.sop_class)
        try:
            return _ACTIONS[key]
        except KeyError:
            pass
        row = self.table.lookup(tag)
        action = None
        if row is not None:
            action = resolve(effective_action(row, self.opts), keyword_for_tag(tag), self.sop_class)
        if len(_ACTIONS) > 200_000:
            _ACTIONS.clear()
        _ACTIONS[key] = action
        return action

    def _untabled(self, ds: Dataset, elem: DataElement, cleaning: bool) -> None:
        vr = _vr(elem)
        if vr == "SQ":
            for item in elem.value or []:
                self._walk(item, cleaning=cleaning)
        elif cleaning and vr in TEXT_VRS and elem.value not in (None, ""):
            self._clean_text(elem)

    def _keep_private(self, ds: Dataset, tag: Any) -> bool:
        if self.private_action != "C" or not self.safe:
            return False
        creator_tag = (tag.group << 16) | (tag.element >> 8)
        creator = ds.get(creator_tag)
        if creator is None:
            return False
        return (tag.group, tag.element & 0xFF, str(creator.value).strip().upper()) in self.safe

    # -- actions ---------------------------------------------------------------
    def _act(self, ds: Dataset, elem: DataElement, action: str) -> None:
        vr = _vr(elem)
        if action == "X":
            del ds[elem.tag]
        elif action == "K":
            if vr == "SQ":
                for item in elem.value or []:
                    self._walk(item, cleaning=False)
        elif action == "Z":
            self._zero(elem, vr)
        elif action == "D":
            self._dummy(elem, vr)
        elif action == "U":
            self._uid(elem, vr)
        elif action == "C":
            self._clean(ds, elem, vr)
        else:
            raise ValueError(f"unknown de-identification action {action!r}")

    def _pseudonym(self, elem: DataElement) -> Any:
        """Consistent replacements for the identifiers HL7 and FHIR also carry."""
        if elem.keyword == "PatientID":
            return self.pseudo.patient_id(self.patient_key)
        if elem.keyword == "PatientName":
            family, given = self.pseudo.patient_name(self.patient_key)
            return f"{family}^{given}"
        if elem.keyword == "AccessionNumber" and elem.value:
            return self.pseudo.ident("acc", str(elem.value))
        return None

    def _zero(self, elem: DataElement, vr: str) -> None:
        if vr == "SQ":
            elem.value = Sequence()
            return
        elem.value = self._pseudonym(elem)  # Z allows a dummy: pseudonyms keep HL7/FHIR links

    def _dummy(self, elem: DataElement, vr: str) -> None:
        if vr == "SQ":
            elem.value = Sequence([Dataset()])
            return
        pseudo = self._pseudonym(elem)
        if pseudo is not None:
            elem.value = pseudo
        elif vr == "UI":
            self._uid(elem, vr)
        elif vr in BINARY_VRS:
            elem.value = b"\0\0"
        else:
            elem.value = DUMMY.get(vr, "ANONYMIZED")

    def _uid(self, elem: DataElement, vr: str) -> None:
        if vr == "SQ":  # X/Z/U* resolved to U: keep the references, replace what they point at
            for item in elem.value or []:
                self._walk(item, cleaning=False)
            return
        if vr != "UI":
            self._dummy(elem, vr)
            return
        if elem.VM > 1:
            elem.value = [self.pseudo.uid(str(v)) for v in elem.value]
        elif elem.value:
            elem.value = self.pseudo.uid(str(elem.value))

    def _clean(self, ds: Dataset, elem: DataElement, vr: str) -> None:
        if vr == "SQ":
            for item in elem.value or []:
                self._walk(item, cleaning=True)
        elif vr in ("DA", "DT"):
            if elem.VM > 1:
                elem.value = [shift_compact(str(v), self.shift) for v in elem.value]
            elif elem.value:
                elem.value = shift_compact(str(elem.value), self.shift) or None
        elif vr == "TM":
            pass  # the shift is whole days: times of day stay
        elif vr == "UI":
            self._uid(elem, vr)
        elif vr in BINARY_VRS:
            del ds[elem.tag]  # overlay/curve bitmaps cannot be read for text: remove
        elif vr in TEXT_VRS or vr in ("CS", "AS"):
            if elem.value not in (None, ""):
                self._clean_text(elem)

    def _clean_text(self, elem: DataElement) -> None:
        if elem.VM > 1:
            elem.value = [scrub(str(v), self.phi) for v in elem.value]
        else:
            elem.value = scrub(str(elem.value), self.phi)

    # -- what was done -------------------------------------------------------------
    def _mark(self, ds: Dataset, cleaned_pixels: bool) -> None:
        """PS3.15 E.1.1: record that identity was removed and how (CID 7050 codes)."""
        ds.PatientIdentityRemoved = "YES"
        methods = ["basic", *(o for o in OPTIONS if o in self.opts)]
        if cleaned_pixels:
            methods.insert(1, "clean_pixel_data")
        old = ds.get("DeidentificationMethod")
        prior = [] if not old else [old] if isinstance(old, str) else list(old)
        ds.DeidentificationMethod = [*prior, "medrelay PS3.15 Basic Profile"]
        seq = list(ds.get("DeidentificationMethodCodeSequence", []) or [])
        for m in methods:
            code, meaning = CID_7050[m]
            item = Dataset()
            item.CodeValue = code
            item.CodingSchemeDesignator = "DCM"
            item.CodeMeaning = meaning
            seq.append(item)
        ds.DeidentificationMethodCodeSequence = Sequence(seq)
        if "retain_long_full_dates" in self.opts:
            ds.LongitudinalTemporalInformationModified = "UNMODIFIED"
        elif "retain_long_modified_dates" in self.opts:
            ds.LongitudinalTemporalInformationModified = "MODIFIED"
        else:
            ds.LongitudinalTemporalInformationModified = "REMOVED"


def read(payload: bytes) -> Dataset:
    """Parse a Part 10 file (or a bare data set) from bytes.

    pydicom reads undefined-length sequences recursively, so a data set nested a few
    hundred levels deep fails inside it; that is the same refusal as ``TooDeep``.
    """
    try:
        return pydicom.dcmread(io.BytesIO(payload), force=True)
    except RecursionError:
        raise TooDeep(f"DICOM sequences nested too deep to read (more than {MAX_SEQUENCE_DEPTH} levels "
                      "are refused)") from None


def write(ds: Dataset) -> bytes:
    """Serialise as the input came: Part 10 when it had file meta, else a bare data set."""
    buf = io.BytesIO()
    has_meta = "TransferSyntaxUID" in (getattr(ds, "file_meta", None) or {})
    pydicom.dcmwrite(buf, ds, enforce_file_format=has_meta)
    return buf.getvalue()
