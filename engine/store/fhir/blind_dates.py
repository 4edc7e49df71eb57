"""Birth dates as blind terms: FHIR date search (eq, ne, lt, gt, le, ge, sa, eb, ap) without the
date in clear.

A birth date is PHI, so ``Patient.birthdate`` is not kept as the clear ``low``/``high`` epoch
pair the clinical dates use. Range search needs order, and keyed HMACs have none; instead each
date is stored as a few *labels* (HMACed by the caller with ``engine.security.blind_index.term``)
and a search value is turned into the finite set of labels whose dates satisfy it:

  day precision ``1980-03-15``  ->  ``Y1980``  ``M1980-03``  ``D1980-03-15``
  month precision ``1980-03``   ->  ``Y1980``  ``M1980-03``  ``Mx1980-03``
  year precision ``1980``       ->  ``Y1980``  ``Yx1980``

``Y`` matches every value within that year whatever its precision, ``M`` every value within
that month, ``D`` one day; ``Yx``/``Mx`` match only the value *of* that precision (a birth date
known to the month satisfies ``gt1980-03-15`` although no day of it is known). A search is a
condition on the stored value's range [tl, th) (FHIR R4 3.1.1.4.2); for each precision the
values satisfying one conjunction of bounds form an interval of days, months or years, which
``cover`` writes as the fewest labels: whole years as ``Y``, whole months as ``M``, the rest as
``D``, plus ``Yx``/``Mx`` where only the coarse value satisfies it. The match is exact; no
candidate needs decrypting.

Years are spelt out between ``LOW_YEAR`` and ``HIGH_YEAR``. Outside that window (implausible
for a living patient, possible in legacy data) a value also gets a century label ``C17`` and a
range reaching out there uses whole centuries, so ``lt1900`` stays a bounded list (about 120
labels) and still finds a date of 1750. ``ne`` is "has a birth date and not eq", in SQL.

What the labels reveal to a holder of the database alone is in docs/architecture.md ("Blind
search index"): which patients share a birth year, a birth month or a birth day, not which one.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import date

LOW_YEAR, HIGH_YEAR = 1800, 2200  # [LOW, HIGH): years spelt out one by one; centuries outside
MIN_YEAR, MAX_YEAR = 1, 9999
_EPOCH = date(1970, 1, 1).toordinal()
_MIN_ORD, _MAX_ORD = date(MIN_YEAR, 1, 1).toordinal(), date(MAX_YEAR, 12, 31).toordinal()
_DAY = 86400.0
_DATE = re.compile(r"^(\d{4})(?:-(\d{2})(?:-(\d{2}))?)?$")
AP_FRACTION = 0.1  # ``ap``: 10 % of the gap between now and the date (FHIR R4's recommendation)


def parse(value: str) -> tuple[int, int | None, int | None] | None:
    """(year, month, day) of a FHIR ``date`` (YYYY, YYYY-MM, YYYY-MM-DD); None if it is not one."""
    m = _DATE.match(value.strip()) if isinstance(value, str) else None
    if m is None:
        return None
    y, mo, d = int(m.group(1)), m.group(2), m.group(3)
    try:
        date(y, int(mo or 1), int(d or 1))
    except ValueError:
        return None
    return y, (int(mo) if mo else None), (int(d) if d else None)


def stored_labels(value: str) -> list[str]:
    """The labels one stored date is indexed under (empty when it is not a FHIR date)."""
    parsed = parse(value)
    if parsed is None:
        return []
    y, m, d = parsed
    out = [f"Y{y:04d}"]
    if m is None:
        out.append(f"Yx{y:04d}")
    else:
        out.append(f"M{y:04d}-{m:02d}")
        out.append(f"Mx{y:04d}-{m:02d}" if d is None else f"D{y:04d}-{m:02d}-{d:02d}")
    if not LOW_YEAR <= y < HIGH_YEAR:
        out.append(f"C{y // 100:02d}")
    return out


# -- conditions ------------------------------------------------------------
@dataclass(frozen=True)
class Cond:
    """A conjunction of bounds on a stored value's range [tl, th), in epoch seconds."""

    tl_ge: float = -math.inf
    tl_lt: float = math.inf
    th_le: float = math.inf
    th_gt: float = -math.inf


def conditions(prefix: str, low: float, high: float, now: float | None = None) -> list[Cond]:
    """The union of conjunctions a prefixed search value [low, high) means (FHIR R4 3.1.1.4.2).

    ``ne`` is not here: it is the complement of ``eq`` among values that exist, which SQL does.
    """
    eq = Cond(tl_ge=low, th_le=high)
    if prefix == "eq":
        return [eq]
    if prefix == "gt":
        return [Cond(th_gt=high)]
    if prefix == "lt":
        return [Cond(tl_lt=low)]
    if prefix == "ge":
        return [Cond(th_gt=high), eq]
    if prefix == "le":
        return [Cond(tl_lt=low), eq]
    if prefix == "sa":
        return [Cond(tl_ge=high)]
    if prefix == "eb":
        return [Cond(th_le=low)]
    if prefix == "ap":
        lo, hi = approximate(low, high, now)
        return [Cond(tl_lt=hi, th_gt=lo)]
    raise ValueError(f"no date prefix {prefix!r}")


def approximate(low: float, high: float, now: float | None = None) -> tuple[float, float]:
    """``ap``: the search range widened by 10 % of its distance from now (at least a day), as overlap."""
    now = time.time() if now is None else now
    delta = max(_DAY, AP_FRACTION * abs(now - (low + high) / 2))
    return low - delta, high + delta


# -- units: days, months, years as integer indexes -----------------------------
class _Unit:
    """Days (date ordinals), months (year*12 + month-1) or years, with their first day."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.lo = {"D": _MIN_ORD, "M": MIN_YEAR * 12, "Y": MIN_YEAR}[name]
        self.hi = {"D": _MAX_ORD, "M": MAX_YEAR * 12 + 11, "Y": MAX_YEAR}[name]

    def first_ord(self, i: int) -> int:
        if i > self.hi:
            return _MAX_ORD + 1
        if self.name == "D":
            return i
        if self.name == "M":
            return date(i // 12, i % 12 + 1, 1).toordinal()
        return date(i, 1, 1).toordinal()

    def start(self, i: int) -> float:
        return (self.first_ord(i) - _EPOCH) * _DAY

    def containing(self, ordinal: int) -> int:
        if self.name == "D":
            return ordinal
        d = date.fromordinal(ordinal)
        return d.year * 12 + d.month - 1 if self.name == "M" else d.year

    def first_at_or_after(self, x: float, *, strictly: bool = False) -> int:
        """The first unit whose start is >= x (> x with ``strictly``)."""
        if x < self.start(self.lo) or (not strictly and x == self.start(self.lo)):
            return self.lo
        ordinal = math.floor(x / _DAY) + _EPOCH
        if ordinal > _MAX_ORD:
            return self.hi + 1
        i = self.containing(ordinal)
        return i if (not strictly and self.start(i) == x) else i + 1

    def interval(self, c: Cond) -> tuple[int, int] | None:
        """The units whose value [start(i), start(i+1)) satisfies ``c``, as an inclusive interval."""
        lo, hi = self.lo, self.hi
        if c.tl_ge > -math.inf:
            lo = max(lo, self.first_at_or_after(c.tl_ge))
        if c.th_gt > -math.inf:  # start(i+1) > x
            lo = max(lo, self.first_at_or_after(c.th_gt, strictly=True) - 1)
        if c.tl_lt < math.inf:  # start(i) < x
            hi = min(hi, self.first_at_or_after(c.tl_lt) - 1)
        if c.th_le < math.inf:  # start(i+1) <= x
            hi = min(hi, self.first_at_or_after(c.th_le, strictly=True) - 2)
        return (lo, hi) if lo <= hi else None


_UNITS = {n: _Unit(n) for n in "DMY"}


class _Set:
    """A union of inclusive integer intervals, merged."""

    def __init__(self, intervals: list[tuple[int, int]]) -> None:
        merged: list[list[int]] = []
        for lo, hi in sorted(intervals):
            if merged and lo <= merged[-1][1] + 1:
                merged[-1][1] = max(merged[-1][1], hi)
            else:
                merged.append([lo, hi])
        self.parts = [(a, b) for a, b in merged]

    def covers(self, lo: int, hi: int) -> bool:
        return any(a <= lo and hi <= b for a, b in self.parts)

    def meets(self, lo: int, hi: int) -> bool:
        return any(a <= hi and lo <= b for a, b in self.parts)

    def within(self, lo: int, hi: int) -> Iterator[int]:
        for a, b in self.parts:
            yield from range(max(a, lo), min(b, hi) + 1)


def cover(conds: list[Cond]) -> set[str]:
    """The labels of exactly the stored dates that satisfy any of ``conds``."""
    days = _Set([iv for c in conds if (iv := _UNITS["D"].interval(c)) is not None])
    months = _Set([iv for c in conds if (iv := _UNITS["M"].interval(c)) is not None])
    years = _Set([iv for c in conds if (iv := _UNITS["Y"].interval(c)) is not None])
    out: set[str] = set()

    def span(y0: int, y1: int) -> tuple[tuple[int, int], tuple[int, int]]:
        return (date(y0, 1, 1).toordinal(), date(y1, 12, 31).toordinal()), (y0 * 12, y1 * 12 + 11)

    def year(y: int) -> None:
        (d0, d1), (m0, m1) = span(y, y)
        if days.covers(d0, d1) and months.covers(m0, m1) and years.covers(y, y):
            out.add(f"Y{y:04d}")
            return
        if not (days.meets(d0, d1) or months.meets(m0, m1) or years.meets(y, y)):
            return
        if years.covers(y, y):
            out.add(f"Yx{y:04d}")
        for mi in range(m0, m1 + 1):
            f0, f1 = _UNITS["M"].first_ord(mi), _UNITS["M"].first_ord(mi + 1) - 1
            label = f"{y:04d}-{mi % 12 + 1:02d}"
            if days.covers(f0, f1) and months.covers(mi, mi):
                out.add(f"M{label}")
                continue
            if months.covers(mi, mi):
                out.add(f"Mx{label}")
            for o in days.within(f0, f1):
                out.add(f"D{date.fromordinal(o).isoformat()}")

    for century in range(MIN_YEAR // 100, MAX_YEAR // 100 + 1):
        y0, y1 = max(MIN_YEAR, century * 100), min(MAX_YEAR, century * 100 + 99)
        if LOW_YEAR <= y0 and y1 < HIGH_YEAR:
            for y in range(y0, y1 + 1):
                year(y)
            continue
        (d0, d1), (m0, m1) = span(y0, y1)
        if days.covers(d0, d1) and months.covers(m0, m1) and years.covers(y0, y1):
            out.add(f"C{century:02d}")
        elif days.meets(d0, d1) or months.meets(m0, m1) or years.meets(y0, y1):
            for y in range(y0, y1 + 1):
                year(y)
    return out


def matches(stored: str, conds: list[Cond]) -> bool:
    """Whether one stored date satisfies the conditions (the reference the labels are tested against)."""
    parsed = parse(stored)
    if parsed is None:
        return False
    y, m, d = parsed
    if m is None:
        lo, hi = date(y, 1, 1).toordinal(), (date(y + 1, 1, 1).toordinal() if y < MAX_YEAR else _MAX_ORD + 1)
    elif d is None:
        lo = date(y, m, 1).toordinal()
        hi = date(y + (m == 12), m % 12 + 1, 1).toordinal() if (y, m) != (MAX_YEAR, 12) else _MAX_ORD + 1
    else:
        lo = date(y, m, d).toordinal()
        hi = lo + 1
    tl, th = (lo - _EPOCH) * _DAY, (hi - _EPOCH) * _DAY
    return any(tl >= c.tl_ge and tl < c.tl_lt and th <= c.th_le and th > c.th_gt for c in conds)
