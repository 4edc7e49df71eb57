"""Dates and times between HL7 v2 (DTM), DICOM (DA/TM) and FHIR (dateTime).

FHIR requires a timezone on any dateTime that carries a time; v2 and DICOM often
omit it. The configured ``timezone`` (IANA name) supplies it, so the site states
once where its modalities and HIS stand instead of every time being guessed as UTC.
"""

from __future__ import annotations

import re
from datetime import datetime
from functools import lru_cache
from zoneinfo import ZoneInfo

_DTM = re.compile(r"^(\d{4})(\d{2})?(\d{2})?(\d{2})?(\d{2})?(\d{2})?(\.\d{1,6})?([+-]\d{4})?$")


@lru_cache(maxsize=32)
def _zone(name: str) -> ZoneInfo:
    return ZoneInfo(name)


def _offset(dt_naive: datetime, tz: str) -> str:
    off = dt_naive.replace(tzinfo=_zone(tz)).utcoffset()
    minutes = int(off.total_seconds() // 60) if off is not None else 0
    sign = "+" if minutes >= 0 else "-"
    minutes = abs(minutes)
    return f"{sign}{minutes // 60:02d}:{minutes % 60:02d}"


def v2_datetime(value: str, tz: str = "UTC") -> str | None:
    """HL7 DTM/TS (``YYYY[MM[DD[HH[MM[SS[.S]]]]]][+/-ZZZZ]``) -> FHIR dateTime, None if malformed.

    A value with only hours gets minutes ``00`` (FHIR needs hh:mm at least).
    """
    m = _DTM.match(value.strip())
    if not m:
        return None
    y, mo, d, h, mi, s, frac, zone = m.groups()
    if mo is None:
        return y
    if d is None:
        return f"{y}-{mo}"
    date = f"{y}-{mo}-{d}"
    if h is None:
        return date
    mi = mi or "00"
    s = s or "00"
    try:
        naive = datetime(int(y), int(mo), int(d), int(h), int(mi), int(s))
    except ValueError:
        return None
    off = f"{zone[:3]}:{zone[3:]}" if zone else _offset(naive, tz)
    return f"{date}T{h}:{mi}:{s}{frac or ''}{off}"


def v2_date(value: str) -> str | None:
    """HL7 DT/DTM -> FHIR date (time part dropped), e.g. for birthDate."""
    full = v2_datetime(value[:8]) if value else None
    return full


def dicom_datetime(da: str, tm: str = "", offset: str = "", tz: str = "UTC") -> str | None:
    """DICOM DA + TM (+ TimezoneOffsetFromUTC) -> FHIR dateTime; date only when TM is unusable."""
    da = (da or "").strip()
    if len(da) != 8 or not da.isdigit():
        return None
    tm, _, frac = (tm or "").strip().replace(":", "").partition(".")
    if not tm.isdigit():
        return v2_datetime(da, tz)
    frac = "." + frac[:6] if frac.isdigit() and len(tm) == 6 else ""
    zone = (offset or "").strip()
    zone = zone if re.fullmatch(r"[+-]\d{4}", zone) else ""
    return v2_datetime(da + tm + frac + zone, tz)


def dicom_date(da: str) -> str | None:
    """DICOM DA -> FHIR date."""
    da = (da or "").strip()
    if len(da) != 8 or not da.isdigit():
        return None
    return f"{da[:4]}-{da[4:6]}-{da[6:]}"


def now_v2(tz: str = "UTC") -> str:
    """Current time as HL7 DTM with offset (MSH-7)."""
    return datetime.now(_zone(tz)).strftime("%Y%m%d%H%M%S%z")
