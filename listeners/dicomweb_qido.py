"""QIDO-RS (PS3.18 10.6): search for studies, series and instances, answered from the archive index.

A query's parameters become a C-FIND identifier and go through the very matching the
DICOM listener's C-FIND uses (``listeners.dicom_qr.QueryRetrieve.find_responses``:
SQL narrowing on clear columns and blind terms, then the PS3.4 C.2.2.2 rules on the
decrypted attributes: wildcards, ranges, UID lists), so the two protocols cannot
disagree about what matches. Only what differs is here: parameter syntax (keywords
or tags, comma-separated UID lists, ``includefield``, ``limit``/``offset``,
``fuzzymatching``), the default return attributes of Tables 10.6.3-3..5, RetrieveURL
and the DICOM JSON encoding.
"""

from __future__ import annotations

import datetime
import functools
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.tag import Tag

from engine.store.dicom import index as idx
from listeners.dicom_dimse import valid_uid
from listeners.dicomweb_json import dataset_json, ur

# PS3.18 Tables 10.6.3-3 (study), -4 (series), -5 (instance): returned unless includefield says more;
# a search not scoped by a study (or series) returns the defaults of the levels above too (``scope``).
STUDY_DEFAULTS = ("StudyDate", "StudyTime", "AccessionNumber", "InstanceAvailability", "ModalitiesInStudy",
                  "ReferringPhysicianName", "PatientName", "PatientID", "PatientBirthDate", "PatientSex",
                  "StudyInstanceUID", "StudyID", "NumberOfStudyRelatedSeries", "NumberOfStudyRelatedInstances")
SERIES_DEFAULTS = ("Modality", "SeriesDescription", "SeriesInstanceUID", "SeriesNumber",
                   "NumberOfSeriesRelatedInstances", "PerformedProcedureStepStartDate",
                   "PerformedProcedureStepStartTime", "StudyInstanceUID")
INSTANCE_DEFAULTS = ("SOPClassUID", "SOPInstanceUID", "InstanceAvailability", "InstanceNumber", "Rows",
                     "Columns", "NumberOfFrames", "StudyInstanceUID", "SeriesInstanceUID")
DEFAULTS = {"STUDY": STUDY_DEFAULTS, "SERIES": SERIES_DEFAULTS, "IMAGE": INSTANCE_DEFAULTS}
# Levels above a level whose attributes a search at it may match and return (10.6.1.2).
ABOVE = {"STUDY": ("PATIENT", "STUDY"), "SERIES": ("PATIENT", "STUDY", "SERIES"),
         "IMAGE": ("PATIENT", "STUDY", "SERIES", "IMAGE")}
CONTROL = {"limit", "offset", "fuzzymatching", "includefield", "access_token"}
TEXT_VRS = frozenset(("AE", "AS", "CS", "DA", "DT", "TM", "LO", "LT", "PN", "SH", "ST", "UC", "UI", "UR", "UT",
                      "IS", "DS"))
_HEX_TAG = re.compile(r"^[0-9A-Fa-f]{8}$")
COUNT_CLAMP = 10**9  # limit and offset above this are taken as this (see _count)
RANGE_VRS = ("DA", "TM", "DT")
_DA = re.compile(r"^(\d{4})(\d{2})(\d{2})$")
_TM = re.compile(r"^(\d{2})(?::?(\d{2})(?::?(\d{2})(\.\d{1,6})?)?)?$")  # HH[MM[SS[.F]]], also with colons
_DT = re.compile(r"^(\d{4})(?:(\d{2})(?:(\d{2})(?:(\d{2})(?:(\d{2})(?:(\d{2})(\.\d{1,6})?)?)?)?)?)?([+-]\d{4})?$")
_NUMBER = {"IS": re.compile(r"^[+-]?\d{1,12}$"),
           "DS": re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?$")}
FORMS = {"DA": "a date YYYYMMDD or a range of them (a-b, a-, -b)",
         "TM": "a time HH[MM[SS[.FFFFFF]]] or a range of them (a-b, a-, -b)",
         "DT": "a date-time YYYY[MM[DD[HH[MM[SS[.FFFFFF]]]]]][&ZZXX] or a range of them (a-b, a-, -b)",
         "IS": "an integer", "DS": "a decimal number"}


class QueryError(ValueError):
    """A parameter that is not a valid QIDO-RS query (400)."""


@dataclass
class Query:
    level: str
    identifier: Dataset
    limit: int | None = None
    offset: int = 0
    warnings: list[str] = field(default_factory=list)


def attribute_tag(name: str) -> int:
    """A keyword or an 8-digit hex tag (PS3.18 8.3.4.1 attributeID); sequences are not searched."""
    if "." in name:
        raise QueryError(f"{name[:64]}: sequence attributes cannot be searched here")
    if _HEX_TAG.match(name):
        tag = int(name, 16)
        if keyword_for_tag(tag) == "":
            raise QueryError(f"{name}: not a known attribute")
        return tag
    tag = tag_for_keyword(name)
    if tag is None:
        raise QueryError(f"{name[:64]}: not a DICOM keyword or tag")
    return int(tag)


def _count(name: str, value: str) -> int:
    """A non-negative integer, clamped to COUNT_CLAMP: a larger limit is max_results anyway (as FHIR
    _count is clamped) and a larger offset is past every result (204), so neither is an error."""
    if not value.isascii() or not value.isdigit():
        raise QueryError(f"{name} must be a non-negative integer")
    return COUNT_CLAMP if len(value) > 9 else min(int(value), COUNT_CLAMP)


def _date(y: str, mo: str | None, d: str | None) -> bool:
    try:
        datetime.date(int(y), int(mo or 1), int(d or 1))
    except ValueError:
        return False
    return True


def _time(h: str | None, mi: str | None, sec: str | None) -> bool:
    return int(h or 0) <= 23 and int(mi or 0) <= 59 and int(sec or 0) <= 60  # 60: a leap second (PS3.5)


def _one_value(vr: str, text: str) -> str | None:
    """``text`` as a sortable key (for the range order check) when it is a valid DA/TM/DT/IS/DS
    value (PS3.5 Table 6.2-1), else None."""
    if vr == "DA":
        m = _DA.match(text)
        return text if m and _date(*m.groups()) else None
    if vr == "TM":
        m = _TM.match(text)
        if not m or not _time(*m.groups()[:3]):
            return None
        h, mi, sec, frac = m.groups()
        return h + (mi or "00") + (sec or "00") + (frac or ".").ljust(7, "0")
    if vr == "DT":
        m = _DT.match(text)
        if not m:
            return None
        y, mo, d, h, mi, sec, frac, tz = m.groups()
        if not (_date(y, mo, d) and _time(h, mi, sec)):
            return None
        if tz and not (-1200 <= int(tz) <= 1400 and int(tz[-2:]) <= 59):
            return None
        return y + (mo or "01") + (d or "01") + (h or "00") + (mi or "00") + (sec or "00") + \
            (frac or ".").ljust(7, "0")
    return text if _NUMBER[vr].match(text) else None


def check_value(keyword: str, vr: str, value: str) -> None:
    """QueryError unless ``value`` is a valid match value of a DA, TM, DT, IS or DS attribute: a
    single value, ``*``, a range (``a-b``, ``a-``, ``-b``; dates, times and date-times, PS3.4
    C.2.2.2.5, with the start not after the end) or such values separated by ``\\``. An invalid one
    matched nothing (204), which a client cannot tell from "no such study"."""
    if value.strip() == "*":
        return
    for item in value.split("\\"):
        item = item.strip()
        if _one_value(vr, item) is not None:
            continue
        if vr in RANGE_VRS and _range_ok(keyword, vr, item):
            continue
        raise QueryError(f"{keyword} ({vr}) must be {FORMS[vr]}")


def _range_ok(keyword: str, vr: str, item: str) -> bool:
    """A range: a '-' splitting ``item`` into two values (one may be empty); for DT, whose time zone
    offset may also be '-', every '-' is tried. A range whose start is after its end is not valid."""
    for at in [i for i, c in enumerate(item) if c == "-"]:
        lo, hi = item[:at], item[at + 1:]
        if not lo and not hi:
            continue
        a = _one_value(vr, lo) if lo else ""
        b = _one_value(vr, hi) if hi else ""
        if a is None or b is None:
            continue
        if a and b and a > b:
            raise QueryError(f"{keyword} ({vr}): the range starts after it ends (PS3.4 C.2.2.2.5)")
        return True
    return False


@functools.lru_cache(maxsize=4096)
def _vr(tag: int) -> str:
    return str(dictionary_VR(tag))


def _add(ds: Dataset, tag: int, value: str | None) -> None:
    vr = _vr(tag)
    if vr == "SQ":
        if value:
            raise QueryError(f"{keyword_for_tag(tag)}: sequence attributes cannot be matched")
        ds.add_new(Tag(tag), vr, [])
        return
    if value and vr not in TEXT_VRS:
        raise QueryError(f"{keyword_for_tag(tag)} ({vr}) cannot be matched")
    if vr not in TEXT_VRS:
        ds.add_new(Tag(tag), vr, None)
        return
    if value and vr in FORMS:
        check_value(keyword_for_tag(tag), vr, value)
        if value.strip() == "*":
            value = None  # universal matching, as C-FIND takes it (a DA of "*" is no date to pydicom)
    if value and vr == "UI":
        if not all(valid_uid(u) for u in value.replace("\\", ",").split(",")):
            raise QueryError(f"{keyword_for_tag(tag)}: not a UID or a comma-separated UID list")
        value = value.replace(",", "\\")
    ds.add_new(Tag(tag), vr, value or None)


def _level_keywords(level: str) -> list[str]:
    out: list[str] = []
    for lv in ABOVE[level]:
        out += idx.LEVEL_ATTRS[lv]
    out += [kw for kw, lv in idx.DERIVED.items() if lv in ABOVE[level] and lv != "PATIENT"]
    return out


_DEFAULT_TAGS = {level: tuple(int(tag_for_keyword(kw)) for kw in kws) for level, kws in DEFAULTS.items()}


def scope(level: str, path_uids: dict[str, str]) -> tuple[str, ...]:
    """The levels whose default attributes a search at ``level`` returns (PS3.18 10.6.3.3.2/3): All
    Series adds the study ones (Table 10.6.3-3), All Instances the study and series ones, a Study's
    Instances the series ones; a search inside a study (or series) leaves out what its path fixes."""
    if level == "SERIES" and "StudyInstanceUID" not in path_uids:
        return ("STUDY", "SERIES")
    if level == "IMAGE" and "SeriesInstanceUID" not in path_uids:
        return ("SERIES", "IMAGE") if "StudyInstanceUID" in path_uids else ("STUDY", "SERIES", "IMAGE")
    return (level,)


def parse(params: Sequence[tuple[str, str]], level: str, path_uids: dict[str, str]) -> Query:
    """Query parameters (and the UIDs of the path) -> the C-FIND identifier at ``level``."""
    q = Query(level=level, identifier=Dataset())
    include: list[int] = []
    matching: dict[int, str] = {}
    for name, value in params:
        if name == "limit":
            q.limit = _count(name, value)
        elif name == "offset":
            q.offset = _count(name, value)
        elif name == "fuzzymatching":
            if value.lower() not in ("true", "false"):
                raise QueryError("fuzzymatching must be true or false")
            if value.lower() == "true":
                q.warnings.append("299 medrelay: The fuzzymatching parameter is not supported. "
                                  "Only literal matching has been performed.")
        elif name == "includefield":
            for part in value.split(","):
                part = part.strip()
                if part == "all":
                    include += [int(tag_for_keyword(kw)) for kw in _level_keywords(level)]
                elif part:
                    include.append(attribute_tag(part))
        elif name in CONTROL:
            continue
        else:
            tag = attribute_tag(name)
            if tag in matching:
                raise QueryError(f"{name[:64]} given twice")
            matching[tag] = value
    for kw, uid in path_uids.items():
        matching[int(tag_for_keyword(kw))] = uid
    # its own dict; the shared elements are replaced, never changed
    ds = Dataset(dict(_template(level, scope(level, path_uids))))
    for tag, value in matching.items():
        _add(ds, tag, value)
    for tag in dict.fromkeys(include):
        if tag not in matching and tag not in ds:
            _add(ds, tag, None)
    q.identifier = ds
    return q


@functools.cache
def _template(level: str, levels: tuple[str, ...]) -> dict[Any, Any]:
    """The elements every query at ``level`` starts from (QueryRetrieveLevel and the default
    return keys of ``levels``, empty), built once: 15 pydicom DataElements cost ~0.3 ms a request."""
    ds = Dataset()
    ds.QueryRetrieveLevel = level
    for tag in dict.fromkeys(t for lv in levels for t in _DEFAULT_TAGS[lv]):
        if tag not in ds:
            _add(ds, tag, None)
    return {tag: ds[tag] for tag in ds.keys()}


def retrieve_url(base: str, attrs: Dataset, level: str) -> str | None:
    st = str(attrs.get("StudyInstanceUID", "") or "")
    if not st:
        return None
    url = f"{base}/studies/{st}"
    if level in ("SERIES", "IMAGE"):
        se = str(attrs.get("SeriesInstanceUID", "") or "")
        if not se:
            return None
        url += f"/series/{se}"
    if level == "IMAGE":
        sop = str(attrs.get("SOPInstanceUID", "") or "")
        if not sop:
            return None
        url += f"/instances/{sop}"
    return url


def results_json(responses: Sequence[Dataset], q: Query, base: str) -> list[dict[str, Any]]:
    """The C-FIND responses, sliced by offset/limit, as DICOM JSON with RetrieveURL."""
    out = []
    end = None if q.limit is None else q.offset + q.limit
    for ds in responses[q.offset:end]:
        if "QueryRetrieveLevel" in ds:
            del ds.QueryRetrieveLevel
        url = retrieve_url(base, ds, q.level)
        extra = [(0x00081190, ur(url))] if url else []
        out.append(dataset_json(ds, extra=extra))
    return out
