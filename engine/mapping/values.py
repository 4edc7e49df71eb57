"""Value functions of the ``compute`` rule (and of ``lookup.apply``): text in, text out.

The functions a feed needs every week, and nothing that would make the rules a programming
language: ``trim``, ``upper``, ``lower``, ``substring``, ``replace`` (regex), ``pad``,
``date`` (between HL7 DTM, DICOM DA/TM/DT, ISO 8601 and strftime patterns) and ``default``.
They are compiled once with the rules (a bad regex or date format is a `medrelay check`
error), and each is a plain ``str -> str`` function, so the same chain serves HL7 v2,
DICOM and FHIR: the kind only reads and writes the text.

Dates are written by hand rather than through dateutil: the formats are fixed by the
standards, the precision of the input must be kept (an HL7 ``199001`` is a month, not the
1st of it) and an ambiguous value must be an error, not a guess.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

ValueFn = Callable[[str], str]


class InvalidValue(ValueError):
    """A value a function cannot take (a date that is no date); the rule's ``invalid:`` decides."""


# -- dates -------------------------------------------------------------------------------------
DATE_FORMATS = ("auto", "hl7", "dicom-da", "dicom-tm", "dicom-dt", "iso", "iso-date")
_COMPACT = re.compile(r"^(\d{4})(\d{2})?(\d{2})?(\d{2})?(\d{2})?(\d{2})?(\.\d{1,6})?([+-]\d{4})?$")
_TM = re.compile(r"^(\d{2})(?::?(\d{2}))?(?::?(\d{2}))?(\.\d{1,6})?$")
_ISO = re.compile(r"^(\d{4})(?:-(\d{2})(?:-(\d{2})(?:[T ](\d{2}):(\d{2})(?::(\d{2})(\.\d{1,6})?)?"
                  r"(Z|[+-]\d{2}:?\d{2})?)?)?)?$")


@dataclass(frozen=True)
class _When:
    """A date/time with the precision it was given in (None: not given)."""

    year: int | None
    month: int | None = None
    day: int | None = None
    hour: int | None = None
    minute: int | None = None
    second: int | None = None
    fraction: str = ""  # ".123", as sent
    offset: str = ""  # "+0100", "Z" kept as "+0000"

    def check(self) -> _When:
        try:
            datetime(self.year or 2000, self.month or 1, self.day or 1, self.hour or 0, self.minute or 0,
                     self.second or 0)
        except ValueError:
            raise InvalidValue("not a calendar date or time") from None
        return self


def _i(s: str | None) -> int | None:
    return int(s) if s else None


def _offset(s: str | None) -> str:
    if not s:
        return ""
    if s == "Z":
        return "+0000"
    return s.replace(":", "")


def _parse(text: str, fmt: str) -> _When:
    s = text.strip()
    if fmt == "dicom-tm":
        m = _TM.match(s)
        if not m:
            raise InvalidValue("not a DICOM TM (HHMMSS.FFFFFF)")
        return _When(None, None, None, _i(m.group(1)), _i(m.group(2)), _i(m.group(3)), m.group(4) or "").check()
    if fmt not in ("iso", "iso-date"):
        m = _COMPACT.match(s)
        if m:
            y, mo, d, h, mi, sec, frac, off = m.groups()
            return _When(int(y), _i(mo), _i(d), _i(h), _i(mi), _i(sec), frac or "", _offset(off)).check()
        if fmt != "auto":
            raise InvalidValue(f"not a {fmt} date/time")
    m = _ISO.match(s)
    if m:
        y, mo, d, h, mi, sec, frac, off = m.groups()
        return _When(int(y), _i(mo), _i(d), _i(h), _i(mi), _i(sec), frac or "", _offset(off)).check()
    raise InvalidValue("not a date/time in a known format")


def _render(w: _When, fmt: str) -> str:
    if fmt in ("hl7", "dicom-dt"):
        if w.year is None:
            raise InvalidValue("a time without a date")
        out = f"{w.year:04d}"
        for part in (w.month, w.day, w.hour, w.minute, w.second):
            if part is None:
                return out + w.offset
            out += f"{part:02d}"
        return out + w.fraction + w.offset
    if fmt == "dicom-da":
        if w.year is None or w.day is None:
            raise InvalidValue("DICOM DA needs year, month and day")
        return f"{w.year:04d}{w.month:02d}{w.day:02d}"
    if fmt == "dicom-tm":
        if w.hour is None:
            raise InvalidValue("DICOM TM needs at least the hour")
        out = f"{w.hour:02d}"
        for part in (w.minute, w.second):
            if part is None:
                return out
            out += f"{part:02d}"
        return out + w.fraction
    if fmt == "iso-date":
        if w.year is None or w.day is None:
            raise InvalidValue("an ISO date needs year, month and day")
        return f"{w.year:04d}-{w.month:02d}-{w.day:02d}"
    if fmt == "iso":
        if w.year is None:
            raise InvalidValue("a time without a date")
        out = f"{w.year:04d}"
        if w.month is None:
            return out
        out += f"-{w.month:02d}"
        if w.day is None:
            return out
        out += f"-{w.day:02d}"
        if w.hour is None:
            return out
        out += f"T{w.hour:02d}:{w.minute or 0:02d}"
        if w.second is not None:
            out += f":{w.second:02d}{w.fraction}"
        return out + (f"{w.offset[:3]}:{w.offset[3:]}" if w.offset else "")
    # a strftime pattern: every part it does not have is taken as its start (month 1, 00:00)
    if w.year is None:
        raise InvalidValue("a time without a date")
    dt = datetime(w.year, w.month or 1, w.day or 1, w.hour or 0, w.minute or 0, w.second or 0)
    return dt.strftime(fmt)


def _check_format(fmt: str, *, reading: bool) -> None:
    if fmt in DATE_FORMATS and not (fmt == "auto" and not reading):
        return
    if "%" in fmt:
        try:
            datetime(2001, 2, 3, 4, 5, 6).strftime(fmt)
        except ValueError as e:
            raise ValueError(f"date format {fmt!r}: {e}") from None
        return
    allowed = [f for f in DATE_FORMATS if reading or f != "auto"]
    raise ValueError(f"unknown date format {fmt!r} (one of: {', '.join(allowed)}, or a strftime pattern such "
                     "as %d.%m.%Y)")


def date_function(source: str, target: str) -> ValueFn:
    """Reformat a date/time, keeping the precision it came with (as far as the target format can)."""
    _check_format(source, reading=True)
    _check_format(target, reading=False)

    def reformat(v: str) -> str:
        if "%" in source:
            try:
                dt = datetime.strptime(v.strip(), source)
            except ValueError:
                raise InvalidValue(f"does not match {source!r}") from None
            w = _When(dt.year, dt.month, dt.day, dt.hour, dt.minute, dt.second)
            if not any(c in source for c in ("%H", "%I", "%M", "%S", "%X", "%c", "%T")):
                w = _When(dt.year, dt.month, dt.day)
        else:
            w = _parse(v, source)
        return _render(w, target)
    return reformat


# -- the other functions ---------------------------------------------------------------------
def _substring(args: Sequence[int]) -> ValueFn:
    start = args[0]
    end = args[1] if len(args) > 1 else None
    return lambda v: v[start:end]


def _pad(width: int, char: str, side: str) -> ValueFn:
    if side == "left":
        return lambda v: v.rjust(width, char)
    return lambda v: v.ljust(width, char)


def _replace(pattern: str, repl: str, count: int) -> ValueFn:
    try:
        pat = re.compile(pattern)
    except re.error as e:
        raise ValueError(f"replace: pattern {pattern!r}: {e}") from None
    names = {i: n for n, i in pat.groupindex.items()}
    probe = "".join(f"(?P<{names[i]}>)" if i in names else "()" for i in range(1, pat.groups + 1))
    try:  # the template is checked once, on an empty match with the same groups
        re.compile(probe).sub(repl, "", count=1)
    except (re.error, IndexError) as e:
        raise ValueError(f"replace: with {repl!r}: {e}") from None
    return lambda v: pat.sub(repl, v, count=count)


def _default(value: str) -> ValueFn:
    return lambda v: v if v != "" else value


def compile_function(fn: Any) -> ValueFn:
    """One function model (engine.mapping.rules) as a ``str -> str``; ValueError for a bad argument."""
    name = type(fn).__name__
    if name == "TrimFn":
        chars = None if fn.trim is True else str(fn.trim)
        return lambda v: v.strip(chars)
    if name == "UpperFn":
        return str.upper
    if name == "LowerFn":
        return str.lower
    if name == "SubstringFn":
        return _substring(fn.substring)
    if name == "ReplaceFn":
        return _replace(fn.replace.pattern, fn.replace.with_, fn.replace.count)
    if name == "PadFn":
        return _pad(fn.pad.width, fn.pad.char, fn.pad.side)
    if name == "DateFn":
        return date_function(fn.date.from_, fn.date.to)
    if name == "DefaultFn":
        return _default(fn.default)
    raise ValueError(f"unknown function {name}")


def compile_chain(functions: Sequence[Any]) -> list[ValueFn]:
    return [compile_function(f) for f in functions]


def run_chain(chain: Sequence[ValueFn], value: str) -> str:
    for f in chain:
        value = f(value)
    return value
