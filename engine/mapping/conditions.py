"""The condition language of route ``when:``, rule ``when:`` and the ``filter`` transform.

A condition is a mapping; every entry must hold (AND)::

    MSH-9.1: [ADT, ORU]            # a value, or a list of which any may match; * ? [..] are wildcards
    PID-8: {in: [F, U]}            # the same as a list
    PV1-2: {not: E}                # negation of any test below
    MSH-4: {regex: "^LAB"}         # re.search on the text
    PID-19: {exists: false}        # or {missing: true}: absent or empty
    OBX-5: {gt: 10, le: 100}       # numbers; a value that is not a number fails
    PID-7: {after: "-18y"}         # dates: YYYYMMDD[HHMM[SS]] (HL7, DICOM) or ISO (FHIR);
                                   # relative: now, today, -18y, -6mo, -30d, -12h
    any: [{PV1-2: E}, {PV1-4: "1"}]
    all: [...]
    not: {PID-8: M}

A key whose value has several values (a field in every OBX, a repeated field, a
multi-valued DICOM attribute) passes when any of them passes; ``not`` negates the whole
test, so ``{not: E}`` means "no value is E". Compiled once (at config load), tested per
message with a reader that answers a key with a value, a list of values, or MISSING.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable, Mapping
from datetime import date, datetime, timedelta
from functools import lru_cache
from typing import Annotated, Any

from pydantic import AfterValidator

MISSING: Any = object()
Reader = Callable[[Any], Any]
Test = Callable[[Any], bool]  # a test of one key's value (scalar, list or MISSING)

COMBINATORS = ("any", "all", "not")
OPERATORS = ("in", "not", "regex", "exists", "missing", "eq", "gt", "ge", "lt", "le", "before", "after")
SCALARS = (str, int, float, bool, date)


# -- plain values (what `when:` always did) ---------------------------------------------------
@lru_cache(maxsize=4096)
def _wild(value: str) -> re.Pattern[str] | None:
    if any(c in value for c in "*?["):
        return re.compile(fnmatch.translate(value), re.S)
    return None


def _text(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    return str(v)


def value_matches(actual: Any, wanted: Any) -> bool:
    """Equality with wildcards; a list on either side matches when any element does."""
    if actual is MISSING or actual is None:
        return False
    if isinstance(actual, list | tuple):
        return any(value_matches(a, wanted) for a in actual)
    if isinstance(wanted, list | tuple):
        return any(value_matches(actual, w) for w in wanted)
    a, w = _text(actual), _text(wanted)
    pat = _wild(w)
    if pat is not None:
        return pat.match(a) is not None
    return a == w


def _each(actual: Any) -> list[Any]:
    if actual is MISSING or actual is None:
        return []
    if isinstance(actual, list | tuple):
        return [a for a in actual if a is not None and a is not MISSING]
    return [actual]


# -- numbers and dates -------------------------------------------------------------------------
def to_number(v: Any) -> float | None:
    if isinstance(v, bool):
        return None
    if isinstance(v, int | float):
        return float(v)
    try:
        return float(str(v).strip())
    except ValueError:
        return None


_COMPACT = re.compile(r"^(\d{4})(\d{2})?(\d{2})?(\d{2})?(\d{2})?(\d{2})?(?:\.\d+)?(?:[+-]\d{4}|Z)?$")
_ISO = re.compile(r"^(\d{4})(?:-(\d{2})(?:-(\d{2})(?:[T ](\d{2}):(\d{2})(?::(\d{2}))?)?)?)?")
_RELATIVE = re.compile(r"^([+-])(\d+)(y|mo|w|d|h|m)$")


def to_datetime(v: Any) -> datetime | None:
    """HL7 DTM / DICOM DA-DT (compact) or ISO 8601 text as a naive datetime (offsets ignored)."""
    if isinstance(v, datetime):
        return v.replace(tzinfo=None)
    if isinstance(v, date):
        return datetime(v.year, v.month, v.day)
    s = str(v).strip()
    m = _COMPACT.match(s) or _ISO.match(s)
    if not m:
        return None
    parts = [int(x) if x else d for x, d in zip(m.groups(), (0, 1, 1, 0, 0, 0), strict=True)]
    try:
        return datetime(*parts)
    except ValueError:
        return None


def _years_ago(now: datetime, years: int) -> datetime:
    try:
        return now.replace(year=now.year - years)
    except ValueError:  # 29 February
        return now.replace(year=now.year - years, day=28)


def _months_ago(now: datetime, months: int) -> datetime:
    y, m = divmod(now.month - 1 - months, 12)
    month, year = m + 1, now.year + y
    day = min(now.day, [31, 29 if year % 4 == 0 and (year % 100 or year % 400 == 0) else 28, 31, 30, 31, 30, 31,
                        31, 30, 31, 30, 31][month - 1])
    return now.replace(year=year, month=month, day=day)


def date_bound(wanted: Any) -> Callable[[], datetime]:
    """A comparison point: a fixed date, or relative to the time of the test (``-18y``)."""
    if isinstance(wanted, str):
        w = wanted.strip().lower()
        if w == "now":
            return datetime.now
        if w == "today":
            return lambda: datetime.combine(date.today(), datetime.min.time())
        m = _RELATIVE.match(w)
        if m:
            sign = -1 if m.group(1) == "-" else 1
            n, unit = int(m.group(2)) * sign, m.group(3)
            if unit == "y":
                return lambda: _years_ago(datetime.now(), -n)
            if unit == "mo":
                return lambda: _months_ago(datetime.now(), -n)
            delta = {"w": timedelta(weeks=1), "d": timedelta(days=1), "h": timedelta(hours=1),
                     "m": timedelta(minutes=1)}[unit] * n
            return lambda: datetime.now() + delta
    fixed = to_datetime(wanted)
    if fixed is None:
        raise ValueError(f"not a date: {wanted!r} (expected e.g. 2024-01-31, 20240131, now, today, -18y, -30d)")
    return lambda: fixed


# -- compiling ---------------------------------------------------------------------------------
def _scalar_test(wanted: Any) -> Test:
    if not isinstance(wanted, SCALARS):
        raise ValueError(f"expected a value, a list of values or an operator mapping, got {type(wanted).__name__}")
    if isinstance(wanted, date):
        wanted = wanted.isoformat()
    return lambda actual: value_matches(actual, wanted)


def compile_test(spec: Any) -> Test:
    """One key's test: a value, a list (any), or a mapping of operators (all must hold)."""
    if isinstance(spec, list | tuple):
        if not spec:
            raise ValueError("an empty list matches nothing")
        tests = [compile_test(s) for s in spec]
        return lambda actual: any(t(actual) for t in tests)
    if isinstance(spec, Mapping):
        if not spec:
            raise ValueError("an empty operator mapping")
        tests = [_operator(str(op), arg) for op, arg in spec.items()]
        return lambda actual: all(t(actual) for t in tests)
    if spec is None:
        raise ValueError("a condition value cannot be null: use {missing: true} for an absent field")
    return _scalar_test(spec)


def _operator(op: str, arg: Any) -> Test:
    if op == "in":
        if not isinstance(arg, list | tuple) or not arg:
            raise ValueError("in: takes a non-empty list")
        return compile_test(list(arg))
    if op == "not":
        inner = compile_test(arg)
        return lambda actual: not inner(actual)
    if op == "eq":
        w = _text(arg)
        return lambda actual: any(_text(a) == w for a in _each(actual))
    if op == "regex":
        try:
            pat = re.compile(str(arg))
        except re.error as e:
            raise ValueError(f"regex {arg!r}: {e}") from None
        return lambda actual: any(pat.search(_text(a)) is not None for a in _each(actual))
    if op in ("exists", "missing"):
        if not isinstance(arg, bool):
            raise ValueError(f"{op}: takes true or false")
        want = arg if op == "exists" else not arg
        return lambda actual: any(_text(a) != "" for a in _each(actual)) == want
    if op in ("gt", "ge", "lt", "le"):
        n = to_number(arg)
        if n is None or isinstance(arg, str | bool):
            raise ValueError(f"{op}: takes a number (use before/after for dates), got {arg!r}")
        cmp = {"gt": float.__gt__, "ge": float.__ge__, "lt": float.__lt__, "le": float.__le__}[op]

        def number(actual: Any) -> bool:
            for a in _each(actual):
                x = to_number(a)
                if x is not None and cmp(x, n):
                    return True
            return False
        return number
    if op in ("before", "after"):
        bound = date_bound(arg)
        earlier = op == "before"

        def when(actual: Any) -> bool:
            b = bound()
            for a in _each(actual):
                x = to_datetime(a)
                if x is not None and ((x < b) if earlier else (x > b)):
                    return True
            return False
        return when
    raise ValueError(f"unknown operator {op!r} (one of: {', '.join(OPERATORS)})")


class Condition:
    """A compiled condition: ``test(read)`` with ``read(key) -> value | [values] | MISSING``."""

    __slots__ = ("_parts", "keys")

    def __init__(self, parts: list[Callable[[Reader], bool]], keys: list[Any]) -> None:
        self._parts = parts
        self.keys = keys  # every key read, compiled (the interpreter derives a rule's groups from them)

    def test(self, read: Reader) -> bool:
        return all(p(read) for p in self._parts)


def compile_condition(spec: Mapping[str, Any], key: Callable[[str], Any] | None = None) -> Condition:
    """Compile a ``when:`` mapping. ``key`` turns a key into what ``read`` gets (a parsed path).

    Raises ValueError whose text starts with the offending key.
    """
    if not isinstance(spec, Mapping):
        raise ValueError(f"a condition is a mapping of keys to tests, got {type(spec).__name__}")
    parts: list[Callable[[Reader], bool]] = []
    keys: list[Any] = []
    for k, v in spec.items():
        name = str(k)
        try:
            if name in ("any", "all"):
                if not isinstance(v, list | tuple) or not v:
                    raise ValueError(f"takes a non-empty list of conditions, got {v!r}")
                subs = [compile_condition(s, key) for s in v]
                for s in subs:
                    keys.extend(s.keys)
                if name == "any":
                    parts.append(lambda read, subs=subs: any(s.test(read) for s in subs))
                else:
                    parts.append(lambda read, subs=subs: all(s.test(read) for s in subs))
                continue
            if name == "not":
                sub = compile_condition(v, key)
                keys.extend(sub.keys)
                parts.append(lambda read, sub=sub: not sub.test(read))
                continue
            kobj = key(name) if key is not None else name
            test = compile_test(v)
        except ValueError as e:
            raise ValueError(f"{name}: {e}") from None
        keys.append(kobj)
        parts.append(lambda read, kobj=kobj, test=test: test(read(kobj)))
    return Condition(parts, keys)


def check_when(spec: Mapping[str, Any]) -> Mapping[str, Any]:
    """Pydantic validator for a route's ``when:``: the mapping stays as written, but must compile."""
    compile_condition(spec)
    return spec


# The type of a route's `when:` in engine.config.
When = Annotated[dict[str, Any], AfterValidator(check_when)]

_compiled: dict[int, tuple[Mapping[str, Any], Condition]] = {}


def compiled(spec: Mapping[str, Any]) -> Condition:
    """The compiled form of a ``when:`` mapping held by a route (compiled on first use, then kept).

    Keyed by identity, with the mapping itself kept alive next to it, so an id is never reused
    for another mapping while it is in the cache.
    """
    hit = _compiled.get(id(spec))
    if hit is not None and hit[0] is spec:
        return hit[1]
    cond = compile_condition(spec)
    if len(_compiled) > 4096:
        _compiled.clear()
    _compiled[id(spec)] = (spec, cond)
    return cond

