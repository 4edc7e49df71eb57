"""A FHIR search request, parsed: SQL filters, exact re-checks and result options (FHIR R4 3.1.1).

Every parameter is either applied or refused; none is dropped silently. An unknown parameter,
a modifier or chain this server does not implement, or a result parameter it does not support
is an error naming the parameter (400 ``not-supported``) unless the client asked for
``Prefer: handling=lenient``, in which case it is left out and listed in ``Query.ignored``;
``Query.used`` is what was applied, for the Bundle's ``self`` link (R4 3.1.1.5, http.html
"handling"). Ignoring a parameter widens the result, which for ``Patient?family=`` is a
wrong-patient answer, so strict is the default. A known parameter with a bad value is an error
in both modes (``invalid``): ignoring it would widen the result just the same.

Filters are SQL over ``fhir_resources`` (``rid IN`` the index rows that match). Where the
blind index can only narrow (``:exact`` is case- and accent-sensitive, a prefix longer than the
terms keep, ``:contains``), the filter also carries a ``recheck`` of the decrypted resource;
engine.store.fhir.search bounds how many candidates it decrypts for that.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import ColumnElement, and_, false, literal, not_, or_, select

from engine.security import blind_index as bi
from engine.store.fhir import blind_dates, terms
from engine.store.fhir.params import (
    DATE_PREFIXES,
    SEARCH_PARAMS,
    STORED_TYPES,
    FhirError,
    SearchParam,
    blind_scope,
    date_range,
    query_reference_key,
    string_values,
)
from engine.store.fhir.tables import fhir_index, fhir_resources

DEFAULT_COUNT = 20
MAX_COUNT = 500
# Index terms (bound values) one search may expand to: an open birth-date range is ~600, and
# SQLite refuses statements with more than 32 766 variables; more is refused as too-costly.
MAX_QUERY_TERMS = 10_000
RESULT_PARAMS = ("_count", "_include", "_revinclude", "_summary", "_elements", "_total", "_sort", "_format",
                 "_pretty", "_cursor")
SORT_KEYS = ("_id", "_lastUpdated")  # in clear; names, birth dates are blind and have no order to sort by
SUMMARY_VALUES = ("true", "false", "text", "data", "count")
TOTAL_VALUES = ("none", "estimate", "accurate")
_TYPE_NAME = re.compile(r"^[A-Z][A-Za-z]{0,63}$")
_ELEMENT_NAME = re.compile(r"^[a-z][A-Za-z0-9]{0,63}$")
Recheck = Callable[[dict[str, Any]], bool]


class Unsupported(Exception):
    """A parameter, modifier, chain or result option this server does not implement."""


@dataclass
class Filter:
    """One parameter's condition: SQL, and optionally an exact check of the decrypted resource.

    ``chained`` filters need the connection (a chain whose inner search needs re-checking is
    resolved to a list of ids first); engine.store.fhir.search calls ``sql(conn)``.
    """

    clause: ColumnElement[bool] | None = None
    recheck: Recheck | None = None
    chained: tuple[str, str, str, Filter] | None = None  # (param, target type, searched type, inner)


@dataclass(frozen=True)
class Include:
    """``_include`` (source = the searched type) or ``_revinclude`` (target = the searched type)."""

    source: str
    param: str
    target: str | None


@dataclass
class Query:
    rtype: str
    filters: list[Filter] = field(default_factory=list)
    used: list[tuple[str, str]] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    count: int = DEFAULT_COUNT
    includes: list[Include] = field(default_factory=list)
    revincludes: list[Include] = field(default_factory=list)
    summary: str | None = None
    elements: list[str] | None = None
    total: str = "accurate"
    cursor: str | None = None
    sort: tuple[str, bool] | None = None  # (``_id`` or ``_lastUpdated``, descending)


# -- values --------------------------------------------------------------
def split_values(raw: str) -> list[str]:
    """Comma-separated alternatives (OR), with FHIR's ``\\,`` ``\\|`` ``\\$`` ``\\\\`` escapes undone."""
    out, cur, i = [], [], 0
    while i < len(raw):
        c = raw[i]
        if c == "\\" and i + 1 < len(raw):
            cur.append(raw[i:i + 2])
            i += 2
            continue
        if c == ",":
            out.append("".join(cur))
            cur = []
        else:
            cur.append(c)
        i += 1
    out.append("".join(cur))
    return [v for v in out if v != ""]


def _unescape(value: str) -> str:
    return re.sub(r"\\([,|$\\])", r"\1", value)


def _split_token(value: str) -> tuple[str | None, str]:
    """``system|code`` at the first unescaped bar; system None when there is none."""
    m = re.search(r"(?<!\\)\|", value)
    if m is None:
        return None, _unescape(value)
    return _unescape(value[:m.start()]), _unescape(value[m.end():])


def _values(name: str, raw: str) -> list[str]:
    values = split_values(raw)
    if not values:
        raise FhirError(400, "invalid", f"search parameter {name} has no value")
    return values


# -- SQL building blocks ---------------------------------------------------
def _rows(rtype: str, param: str, *cond: ColumnElement[bool]) -> ColumnElement[bool]:
    i = fhir_index
    return fhir_resources.c.rid.in_(select(i.c.rid).where(i.c.type == rtype, i.c.param == param, *cond))


def _tokens(rtype: str, param: str, tokens: list[str] | set[str]) -> ColumnElement[bool]:
    if not tokens:
        return false()
    return _rows(rtype, param, fhir_index.c.token.in_(sorted(tokens)))


def _missing(rtype: str, p: str, raw: str) -> Filter:
    if raw not in ("true", "false"):
        raise FhirError(400, "invalid", f"{p}:missing takes true or false")
    present = _rows(rtype, p)
    return Filter(not_(present) if raw == "true" else present)


def date_clause(low: Any, high: Any, raw: str) -> ColumnElement[bool]:
    """SQL for one prefixed date value against a [low, high) column pair (FHIR R4 search 3.1.1.4.2)."""
    prefix, pl, ph = _date_value(raw)
    contained = and_(low >= pl, high <= ph)
    if prefix == "ap":
        lo, hi = blind_dates.approximate(pl, ph)
        return and_(low < hi, high > lo)
    return {
        "eq": contained,
        "ne": not_(contained),
        "gt": high > ph,
        "lt": low < pl,
        "ge": or_(high > ph, contained),
        "le": or_(low < pl, contained),
        "sa": low >= ph,
        "eb": high <= pl,
    }[prefix]


def _date_value(raw: str) -> tuple[str, float, float]:
    prefix = raw[:2] if raw[:2] in DATE_PREFIXES else "eq"
    value = raw[2:] if raw[:2] in DATE_PREFIXES else raw
    try:
        pl, ph = date_range(value)
    except (ValueError, OverflowError):
        raise FhirError(400, "invalid", "date search value is not a FHIR date (YYYY, YYYY-MM, YYYY-MM-DD or a "
                                        "dateTime), optionally after a prefix eq ne lt gt le ge sa eb ap") from None
    return prefix, pl, ph


# -- one parameter -----------------------------------------------------------
def _string_filter(key: bytes, rtype: str, p: SearchParam, modifier: str, raw: str) -> Filter:
    scope = blind_scope(rtype, p)
    tokens: set[str] = set()
    checks: list[Callable[[str], bool]] = []
    recheck = False
    for v in (_unescape(x) for x in _values(p.name, raw)):
        n = bi.normalise(v)
        if modifier == "exact":
            tokens.add(terms.exact_term(key, scope, v))
            checks.append(lambda f, v=v: f == v)
            recheck = True
        elif not n:
            raise FhirError(400, "invalid", f"search parameter {p.name}: the value has no letters or digits")
        elif modifier == "contains":
            checks.append(lambda f, n=n: n in bi.normalise(f))
            recheck = True
        else:
            tokens.add(terms.prefix_term(key, scope, n))
            checks.append(lambda f, n=n: bi.normalise(f).startswith(n))
            recheck = recheck or len(n) > terms.MAX_PREFIX
    clause = _rows(rtype, p.name) if modifier == "contains" else _tokens(rtype, p.name, tokens)
    if not recheck:
        return Filter(clause)

    def check(body: dict[str, Any]) -> bool:
        return any(c(f) for f in string_values(body, p) for c in checks)

    return Filter(clause, check)


def _token_filter(key: bytes, rtype: str, p: SearchParam, modifier: str, raw: str) -> Filter:
    scope = blind_scope(rtype, p)
    tokens: set[str] = set()
    for v in _values(p.name, raw):
        if modifier == "of-type":
            parts = re.split(r"(?<!\\)\|", v)
            if len(parts) != 3 or not parts[1] or not parts[2]:
                raise FhirError(400, "invalid", f"{p.name}:of-type takes type-system|type-code|value")
            tokens.add(terms.type_term(key, scope, *(_unescape(x) for x in parts)))
            continue
        system, code = _split_token(v)
        if p.blind:
            if p.value == "telecom":
                code = terms.telecom_value(code)
            if not code and not system:
                raise FhirError(400, "invalid", f"search parameter {p.name}: empty token")
            tokens.add(terms.token_query(key, scope, system, code))
        elif system is None:  # the clear keys of params.token_keys: any system, no system, system only
            tokens.add(f"*|{code}")
        else:
            tokens.add(f"{system}|{code}" if code else f"{system}|*")
    clause = _tokens(rtype, p.name, tokens)
    return Filter(not_(clause) if modifier == "not" else clause)


def _reference_filter(rtype: str, p: SearchParam, modifier: str, raw: str) -> Filter:
    """``Type/id``, ``id`` or an absolute URL; ``:Type`` (or the parameter's own target) fixes the type."""
    target = modifier or p.target
    keys = []
    for v in (_unescape(x).rstrip("/") for x in _values(p.name, raw)):
        parts = v.split("/")
        if modifier and len(parts) >= 2 and parts[-2] != modifier:
            continue  # subject:Patient=Group/1 names no Patient
        keys.append(query_reference_key(v, target))
    return Filter(_tokens(rtype, p.name, keys))


def _date_filter(key: bytes, rtype: str, p: SearchParam, raw: str) -> Filter:
    if not p.blind:
        i = fhir_index
        cond = or_(*(date_clause(i.c.low, i.c.high, v) for v in _values(p.name, raw)))
        return Filter(_rows(rtype, p.name, cond))
    scope = blind_scope(rtype, p)
    clauses = []
    for v in _values(p.name, raw):
        prefix, pl, ph = _date_value(v)
        if prefix == "ne":
            eq = {terms.date_term(key, scope, lb) for lb in blind_dates.cover(blind_dates.conditions("eq", pl, ph))}
            clauses.append(and_(_rows(rtype, p.name), not_(_tokens(rtype, p.name, eq))))
        else:
            labels = blind_dates.cover(blind_dates.conditions(prefix, pl, ph))
            clauses.append(_tokens(rtype, p.name, {terms.date_term(key, scope, lb) for lb in labels}))
    return Filter(or_(*clauses))


def _resource_filter(name: str, modifier: str, raw: str) -> Filter:
    r = fhir_resources
    if modifier:
        raise Unsupported(f"modifier :{modifier} is not supported on {name}")
    if name == "_id":
        return Filter(r.c.id.in_([_unescape(v) for v in _values(name, raw)]))
    return Filter(or_(*(date_clause(r.c.last_updated, r.c.last_updated + 0.001, v) for v in _values(name, raw))))


def param_filter(key: bytes, rtype: str, name: str, raw: str, *, chain_ok: bool = True) -> Filter:
    """The filter of one ``name=value`` pair on ``rtype``; Unsupported if this server cannot apply it."""
    head, dot, chain = name.partition(".")
    base, _, modifier = head.partition(":")
    if base in ("_id", "_lastUpdated") and not dot:
        return _resource_filter(base, modifier, raw)
    spec = SEARCH_PARAMS.get(rtype, {})
    p = spec.get(base)
    if p is None:
        raise Unsupported(f"search parameter {base} is not supported on {rtype}")
    if dot:
        if p.type != "reference" or not chain_ok:
            raise Unsupported(f"chained search {name} is not supported")
        return _chain(key, rtype, p, modifier, chain, raw)
    if modifier == "missing":
        return _missing(rtype, p.name, raw)
    typed = p.type == "reference" and _TYPE_NAME.match(modifier) is not None \
        and p.target in (None, modifier)
    if modifier and modifier not in p.modifiers and not typed or modifier == "[type]":
        raise Unsupported(f"modifier :{modifier} is not supported on {base} (supported: "
                          + " ".join(f":{m}" for m in p.modifiers) + ")")
    if p.type == "string":
        return _string_filter(key, rtype, p, modifier, raw)
    if p.type == "token":
        return _token_filter(key, rtype, p, modifier, raw)
    if p.type == "reference":
        return _reference_filter(rtype, p, modifier, raw)
    return _date_filter(key, rtype, p, raw)


def _chain(key: bytes, rtype: str, p: SearchParam, modifier: str, chain: str, raw: str) -> Filter:
    """``subject:Patient.name=x`` / ``patient.identifier=s|v``: one level, to a type we store."""
    target = modifier or p.target
    if modifier and (not _TYPE_NAME.match(modifier) or (p.target is not None and modifier != p.target)):
        raise Unsupported(f"modifier :{modifier} is not supported on {p.name}")
    if target is None:
        raise Unsupported(f"chained search on {p.name} needs the target type, e.g. {p.name}:Patient.{chain}")
    if target not in STORED_TYPES:
        raise Unsupported(f"chained search into {target} is not supported")
    inner = param_filter(key, target, chain, raw, chain_ok=False)
    return Filter(chained=(p.name, target, rtype, inner))


def chain_clause(f: Filter, inner_ids: Any) -> ColumnElement[bool]:
    """SQL of a chained filter given the ids (a subquery or a list) of the matching targets."""
    assert f.chained is not None
    param, target, rtype, _ = f.chained
    if isinstance(inner_ids, list):
        refs: Any = [f"{target}/{i}" for i in inner_ids]
    else:
        refs = inner_ids
    return _rows(rtype, param, fhir_index.c.token.in_(refs))


def inner_ids_subquery(f: Filter) -> Any:
    assert f.chained is not None
    _, target, _, inner = f.chained
    r = fhir_resources
    assert inner.clause is not None
    return select(literal(f"{target}/").concat(r.c.id)).where(r.c.type == target, r.c.deleted == 0, inner.clause)


# -- result parameters ---------------------------------------------------------
def _include(rtype: str, raw: str, *, reverse: bool) -> Include:
    parts = raw.split(":")
    if len(parts) not in (2, 3) or not all(parts):
        raise Unsupported(f"{'_revinclude' if reverse else '_include'}={raw} is not supported")
    source, pname = parts[0], parts[1]
    target = parts[2] if len(parts) == 3 else None
    p = SEARCH_PARAMS.get(source, {}).get(pname)
    ok = p is not None and p.type == "reference"
    if reverse:
        ok = ok and target in (None, rtype) and p is not None and p.target in (None, rtype)
    else:
        ok = ok and source == rtype and (target is None or _TYPE_NAME.match(target) is not None)
    if not ok:
        raise Unsupported(f"{'_revinclude' if reverse else '_include'}={raw} is not supported on {rtype}")
    return Include(source, pname, target)


def _result(q: Query, name: str, raw: str) -> bool:
    """Apply one result parameter; False when it is one for the self link to leave out."""
    if name == "_count":
        try:
            n = int(raw)
        except ValueError:
            raise FhirError(400, "invalid", "_count must be an integer") from None
        if n < 0:
            raise FhirError(400, "invalid", "_count must not be negative")
        q.count = min(n, MAX_COUNT)
        return False
    if name == "_cursor":
        q.cursor = raw
        return False
    if name in ("_format", "_pretty"):  # the listener serves JSON (and checks _format); no effect here
        return False
    if name == "_include":
        q.includes.append(_include(q.rtype, raw, reverse=False))
    elif name == "_revinclude":
        q.revincludes.append(_include(q.rtype, raw, reverse=True))
    elif name == "_summary":
        if raw not in SUMMARY_VALUES:
            raise FhirError(400, "invalid", "_summary takes " + ", ".join(SUMMARY_VALUES))
        q.summary = raw
    elif name == "_elements":
        names = [e.strip() for e in raw.split(",") if e.strip()]
        if not names or not all(_ELEMENT_NAME.match(e) for e in names):
            raise FhirError(400, "invalid", "_elements takes a comma-separated list of element names")
        q.elements = names
    elif name == "_sort":
        key = raw.strip()
        if key.lstrip("-") not in SORT_KEYS:
            raise Unsupported(f"_sort={key} is not supported (only " + ", ".join(SORT_KEYS)
                              + ", each optionally with -; by default results come in the order resources "
                                "were created)")
        q.sort = (key.lstrip("-"), key.startswith("-"))
    elif name == "_total":
        if raw not in TOTAL_VALUES:
            raise FhirError(400, "invalid", "_total takes " + ", ".join(TOTAL_VALUES))
        q.total = raw
    return True


def parse(key: bytes, rtype: str, params: list[tuple[str, str]], *, strict: bool = True) -> Query:
    """The Query a request means; ``strict`` refuses what it cannot apply, lenient ignores it."""
    q = Query(rtype)
    size = 0
    for name, raw in params:
        try:
            if name in RESULT_PARAMS:
                if _result(q, name, raw):
                    q.used.append((name, raw))
                continue
            if name.startswith("_") and name.partition(":")[0].partition(".")[0] not in ("_id", "_lastUpdated"):
                raise Unsupported(f"{_shown(name)} is not supported")
            f = param_filter(key, rtype, name, raw)
            size += _size(f)
            if size > MAX_QUERY_TERMS:
                raise FhirError(400, "too-costly", f"the search expands to more than {MAX_QUERY_TERMS} index "
                                                   "terms: use fewer values or narrower date ranges")
            q.filters.append(f)
            q.used.append((name, raw))
        except Unsupported as e:
            if strict:
                raise FhirError(400, "not-supported", f"{e} (parameter '{_shown(name)}'; send "
                                "'Prefer: handling=lenient' to have unsupported parameters ignored)") from None
            q.ignored.append(name)
    return q


def _size(f: Filter) -> int:
    """How many values a filter binds in SQL (its index terms, ids, dates)."""
    clause = f.clause if f.chained is None else f.chained[3].clause
    if clause is None:
        return 0
    return sum(len(v) if isinstance(v, list | tuple) else 1 for v in clause.compile().params.values())


def _shown(name: str) -> str:
    """A parameter name as quoted back: printable and short (it is the client's text)."""
    text = "".join(c if c.isprintable() else "?" for c in name)
    return text if len(text) <= 100 else text[:100] + "..."


__all__ = ["DEFAULT_COUNT", "MAX_COUNT", "Filter", "Include", "Query", "Unsupported", "date_clause", "parse",
           "split_values"]
