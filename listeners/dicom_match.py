"""C-FIND attribute matching after PS3.4 C.2.2.2, and the response identifiers.

The index narrows candidates in SQL (UIDs, dates, modality, and the blind terms of
PatientName, PatientID and AccessionNumber for exact values and wildcards with a literal
start); this module decides the final match on the decrypted attributes, so SQL
narrowing can only ever be a superset and the matching rules live in one place.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from pydicom.dataset import Dataset
from pydicom.tag import Tag

from engine.store.dicom import index as idx
from engine.store.dicom import terms

STRING_VRS = {"AE", "CS", "LO", "LT", "PN", "SH", "ST", "UC", "UR", "UT"}
RANGE_VRS = {"DA", "TM", "DT"}
NOT_MATCHING = {"QueryRetrieveLevel", "SpecificCharacterSet", "RetrieveAETitle", "InstanceAvailability",
                "TimezoneOffsetFromUTC"}


@dataclass(frozen=True)
class Key:
    """One key of a request identifier: the value to match ('' = universal) and its VR."""

    keyword: str
    tag: int
    vr: str
    value: Any  # str, list[str] or None

    @property
    def universal(self) -> bool:
        v = self.value
        return v is None or v == "" or v == [] or (isinstance(v, str) and v.strip("*") == "" and v != "")


def keys_of(identifier: Dataset) -> list[Key]:
    out = []
    for elem in identifier:
        if elem.tag.group in (0x0000, 0x0002) or not elem.keyword:
            continue
        if elem.VR == "SQ":
            out.append(Key(elem.keyword, int(elem.tag), "SQ", None))
            continue
        v = elem.value
        if v is None:
            value: Any = None
        elif isinstance(v, (list, tuple)) or type(v).__name__ == "MultiValue":
            value = [str(x) for x in v]
        elif isinstance(v, bytes):
            value = None
        else:
            value = str(v)
        out.append(Key(elem.keyword, int(elem.tag), elem.VR, value))
    return out


@lru_cache(maxsize=1024)
def _wild(pattern: str, fold: bool) -> re.Pattern[str]:
    rx = "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern)
    return re.compile(rx + r"\Z", re.DOTALL | (re.IGNORECASE if fold else 0))


def _norm_time(t: str) -> str:
    t = t.replace(":", "").strip()
    head, _, frac = t.partition(".")
    return (head + "000000")[:6] + "." + (frac + "000000")[:6]


def _in_range(actual: str, query: str, vr: str) -> bool:
    lo, _, hi = query.partition("-")
    if vr == "TM":
        a = _norm_time(actual)
        return (not lo or a >= _norm_time(lo)) and (not hi or a <= _norm_time(hi))
    a = actual.strip()
    if vr == "DT":
        lo, hi = lo[:len(a)] if lo else lo, hi
    return (not lo.strip() or a >= lo.strip()) and (not hi.strip() or a[:len(hi.strip())] <= hi.strip())


def _one(actual: Any, q: str, vr: str, fold_pn: bool) -> bool:
    a = str(actual).strip() if actual is not None else ""
    q = q.strip() if vr not in ("LT", "ST", "UT") else q
    if vr in RANGE_VRS and "-" in q:
        return bool(a) and _in_range(a, q, vr)
    fold = fold_pn and vr == "PN"
    if vr in STRING_VRS and ("*" in q or "?" in q):
        return bool(_wild(q, fold).match(a))
    if vr == "PN":
        return (idx.norm_pn(a) == idx.norm_pn(q)) if fold else a.rstrip("^= ") == q.rstrip("^= ")
    if vr in ("IS", "US", "UL", "SS", "SL", "DS"):
        try:
            return float(a) == float(q)
        except ValueError:
            return False
    return a == q


def value_matches(actual: Any, key: Key, *, fold_pn: bool = True) -> bool:
    """Single value, universal, wildcard, UID list, range matching (PS3.4 C.2.2.2.1-5)."""
    if key.universal or key.vr == "SQ":
        return True
    wanted = key.value if isinstance(key.value, list) else (
        key.value.split("\\") if key.vr == "UI" or "\\" in key.value else [key.value])
    actuals = actual if isinstance(actual, list) else [actual]
    if actual is None or actual == "" or actual == []:
        return False
    return any(_one(a, w, key.vr, fold_pn) for a in actuals for w in wanted if w != "")


def identifier_matches(attrs: Mapping[str, Any], keys: Iterable[Key], *, fold_pn: bool = True,
                       derived: Any = None) -> bool:
    """Every non-universal key must match; keys the index does not hold are not used for matching.

    ``derived(keyword)`` computes ModalitiesInStudy and the Number of ... Related
    keys for the row; they are matched like stored values when given.
    """
    for key in keys:
        if key.keyword in NOT_MATCHING or key.universal:
            continue
        if key.keyword in idx.DERIVED:
            if derived is not None and not value_matches(derived(key.keyword), key, fold_pn=fold_pn):
                return False
            continue
        if key.keyword not in attrs and not _known(key.keyword):
            continue
        if not value_matches(attrs.get(key.keyword), key, fold_pn=fold_pn):
            return False
    return True


@lru_cache(maxsize=512)
def _known(keyword: str) -> bool:
    return any(keyword in a for a in idx.LEVEL_ATTRS.values())


def narrow(cands: idx.Candidates, keys: Iterable[Key], hkey: bytes) -> None:
    """Add SQL conditions that every match must satisfy (a superset of the matches)."""
    t = {"PATIENT": idx.patients, "STUDY": idx.studies, "SERIES": idx.series, "IMAGE": idx.instances}
    depth = cands.depth
    uid_cols = {"StudyInstanceUID": (1, t["STUDY"].c.study_uid), "SeriesInstanceUID": (2, t["SERIES"].c.series_uid),
                "SOPInstanceUID": (3, t["IMAGE"].c.sop_uid), "SOPClassUID": (3, t["IMAGE"].c.sop_class_uid)}
    date_cols = {"StudyDate": (1, t["STUDY"].c.study_date), "ContentDate": (3, t["IMAGE"].c.content_date)}
    for key in keys:
        if key.universal or key.vr == "SQ":
            continue
        values = key.value if isinstance(key.value, list) else key.value.split("\\")
        values = [v.strip() for v in values if v.strip()]
        if not values:
            continue
        wild = any("*" in v or "?" in v for v in values)
        kw = key.keyword
        if kw in uid_cols and uid_cols[kw][0] <= depth and not wild:
            cands.add(uid_cols[kw][1].in_(values))
        elif kw in date_cols and date_cols[kw][0] <= depth and len(values) == 1 and not wild:
            lo, dash, hi = values[0].partition("-")
            col = date_cols[kw][1]
            if not dash:
                cands.add(col == values[0])
            else:
                if lo.strip():
                    cands.add(col >= lo.strip())
                if hi.strip():  # as _in_range: a bound shorter than the value compares its prefix
                    cands.add(col <= hi.strip() + "~")  # (a short "2024" takes all of 2024; "~" > digits)
        elif kw == "Modality" and depth >= 2 and not wild:
            cands.add(t["SERIES"].c.modality.in_(values))
        elif kw in terms.SCOPES and idx.LEVELS.index(terms.SCOPES[kw][0]) <= depth:
            # blind terms: exact values and the literal start of wildcards (DOE*, DOE^J*)
            cond = terms.condition(hkey, kw, values)
            if cond is not None:
                cands.add(cond)


def response(attrs: Mapping[str, Any], keys: Iterable[Key], level: str, derived: Any,
             extra: Mapping[str, Any]) -> Dataset:
    """Only the requested keys (PS3.4 C.4.1.1.3.2), plus QueryRetrieveLevel."""
    ds = Dataset()
    ds.QueryRetrieveLevel = level
    non_ascii = False
    for key in keys:
        if key.keyword in ("QueryRetrieveLevel", "SpecificCharacterSet"):
            continue
        if key.keyword in extra:
            value = extra[key.keyword]
        elif key.keyword in idx.DERIVED:
            value = derived(key.keyword) if idx.LEVELS.index(idx.DERIVED[key.keyword]) <= idx.LEVELS.index(
                level) else None
        else:
            value = attrs.get(key.keyword)
        if key.vr == "SQ":
            ds.add_new(Tag(key.tag), "SQ", [])
            continue
        if isinstance(value, list):
            value = [str(v) for v in value] if value else None
        elif value is not None:
            value = str(value) if key.vr not in ("US", "UL", "SS", "SL", "FL", "FD") else value
        for v in value if isinstance(value, list) else [value]:
            if isinstance(v, str) and not v.isascii():
                non_ascii = True
        ds.add_new(Tag(key.tag), key.vr, value)
    if non_ascii:
        ds.SpecificCharacterSet = "ISO_IR 192"
    return ds
