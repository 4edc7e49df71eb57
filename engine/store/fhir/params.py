"""What the FHIR store indexes and how a resource is validated before it is stored.

One table (``SEARCH_PARAMS``) drives three things: the index rows written with each
version, the search parser, and the CapabilityStatement. So the statement cannot
claim a parameter the store does not index, and the index never grows a key that
nothing can search. Parameter names follow the FHIR R4 SearchParameter registry.

The index holds only non-PHI keys in clear (status, codes, clinical dates, references).
Names, addresses, identifiers, telecoms and the birth date are kept only as keyed HMAC
terms (``engine.store.fhir.terms``, ``engine.store.fhir.blind_dates``): search matches
them in SQL, but the table alone does not reveal a name or a medical record number.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from typing import Any, Literal

from engine.store.fhir import structure
from engine.store.fhir.blind_dates import stored_labels
from engine.store.fhir.terms import date_term, string_terms, telecom_value, token_terms, type_term

FHIR_VERSION = "4.0.1"
ParamType = Literal["token", "reference", "date", "string"]
UNBOUNDED_LOW = -1.0e15
UNBOUNDED_HIGH = 1.0e15
ID_RE = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")


class FhirError(Exception):
    """A FHIR-level failure that becomes an OperationOutcome with an HTTP status.

    ``str()`` deliberately omits the diagnostics: the intake logs the exception text
    of a failed tx_hook, and diagnostics may quote client data. ``issues`` (each an
    OperationOutcome.issue with ``expression``) replace the single issue when given.
    """

    def __init__(self, status: int, code: str, diagnostics: str, *, headers: dict[str, str] | None = None,
                 issues: list[dict[str, Any]] | None = None) -> None:
        super().__init__(f"{status} {code}")
        self.status = status
        self.code = code
        self.diagnostics = diagnostics
        self.headers = headers or {}
        self.issues = issues or []

    def outcome(self) -> dict[str, Any]:
        severity = "error" if self.status < 500 else "fatal"
        if self.issues:
            return {"resourceType": "OperationOutcome",
                    "issue": [{**i, "diagnostics": _printable(str(i.get("diagnostics", "")))} for i in self.issues]}
        return operation_outcome(severity, self.code, self.diagnostics)


def operation_outcome(severity: str, code: str, diagnostics: str) -> dict[str, Any]:
    return {"resourceType": "OperationOutcome",
            "issue": [{"severity": severity, "code": code, "diagnostics": _printable(diagnostics)}]}


def _printable(text: str, limit: int = 1000) -> str:
    """Diagnostics that always serialise: a client's lone surrogate or megabyte-long value
    quoted in a message must not break the error response itself."""
    text = text if len(text) <= limit else text[:limit] + "..."
    return text.encode("utf-8", "replace").decode("utf-8")


@dataclass(frozen=True)
class SearchParam:
    """One search parameter: what it indexes, and how.

    ``blind`` values are PHI and are kept only as keyed HMAC terms (engine.store.fhir.terms):
    every string parameter, identifiers, telecoms and the birth date. ``value`` says how a
    token reads its element (``code``: Coding/CodeableConcept/code, ``identifier``,
    ``telecom``: ContactPoint, optionally only of ``system``, ``boolean``).
    """

    name: str
    type: ParamType
    paths: tuple[str, ...]
    doc: str
    target: str | None = None  # reference params: only references to this type
    blind: bool = False
    value: str = "code"
    system: str | None = None  # telecom params: only contact points of this ContactPoint.system

    @property
    def hashed(self) -> bool:
        return self.blind

    @property
    def modifiers(self) -> tuple[str, ...]:
        """The modifiers search accepts on this parameter (the CapabilityStatement lists them)."""
        if self.type == "string":
            return ("missing", "exact", "contains")
        if self.type == "token":
            return ("missing", "not", "of-type") if self.value == "identifier" else ("missing", "not")
        if self.type == "reference":
            return ("missing", "[type]")
        return ("missing",)


def _common(*extra: SearchParam) -> dict[str, SearchParam]:
    base = [SearchParam("identifier", "token", ("identifier",), "system|value, value, |value or system|; "
                        "exact match (kept as keyed hashes)", blind=True, value="identifier")]
    return {p.name: p for p in (*base, *extra)}


def _string(name: str, paths: tuple[str, ...], doc: str) -> SearchParam:
    return SearchParam(name, "string", paths, doc + "; starts with, case- and accent-insensitive (kept as keyed "
                       "hashes of the normalised value and its prefixes)", blind=True)


def _telecom(name: str, system: str | None, doc: str) -> SearchParam:
    return SearchParam(name, "token", ("telecom",), doc + "; phone numbers compared by digits, others "
                       "case-insensitive (kept as keyed hashes)", blind=True, value="telecom", system=system)


_STATUS = SearchParam("status", "token", ("status",), "status code")
_CODE = SearchParam("code", "token", ("code",), "system|code of the resource code")
_SUBJECT = SearchParam("subject", "reference", ("subject",), "subject reference (Type/id)")
_PATIENT = SearchParam("patient", "reference", ("subject",), "subject when it is a Patient", target="Patient")
_NAME_PARTS = ("name.family", "name.given", "name.prefix", "name.suffix", "name.text")
_ADDRESS_PARTS = ("address.line", "address.city", "address.district", "address.state", "address.postalCode",
                  "address.country", "address.text")

SEARCH_PARAMS: dict[str, dict[str, SearchParam]] = {
    "Patient": _common(
        _string("name", _NAME_PARTS, "any part of a name: family, given, prefix, suffix, text"),
        _string("family", ("name.family",), "family name"),
        _string("given", ("name.given",), "a given name"),
        SearchParam("birthdate", "date", ("birthDate",), "birth date (kept as keyed hashes of its year, month "
                    "and day, never in clear)", blind=True),
        SearchParam("gender", "token", ("gender",), "administrative gender code"),
        SearchParam("active", "token", ("active",), "true or false", value="boolean"),
        _telecom("telecom", None, "any contact point value"),
        _telecom("phone", "phone", "a phone number"),
        _telecom("email", "email", "an e-mail address"),
        _string("address", _ADDRESS_PARTS, "any part of an address"),
        _string("address-city", ("address.city",), "city"),
        _string("address-state", ("address.state",), "state"),
        _string("address-postalcode", ("address.postalCode",), "postal code"),
        _string("address-country", ("address.country",), "country"),
    ),
    "Encounter": _common(_STATUS, _SUBJECT, _PATIENT,
                         SearchParam("date", "date", ("period",), "date within the encounter period")),
    "Observation": _common(_STATUS, _CODE, _SUBJECT, _PATIENT,
                           SearchParam("date", "date", ("effective",), "effective[x]")),
    "DiagnosticReport": _common(_STATUS, _CODE, _SUBJECT, _PATIENT,
                                SearchParam("date", "date", ("effective",), "effective[x]")),
    "ServiceRequest": _common(_STATUS, _CODE, _SUBJECT, _PATIENT,
                              SearchParam("authored", "date", ("authoredOn",), "authoredOn")),
    "ImagingStudy": _common(_STATUS, _SUBJECT, _PATIENT,
                            SearchParam("modality", "token", ("modality", "series.modality"),
                                        "modality of the study or a series (DICOM DCM code)"),
                            SearchParam("started", "date", ("started",), "when the study started")),
    "Endpoint": _common(_STATUS, _string("name", ("name",), "endpoint name")),
    # documents (e.g. a PDF report from an ORU's OBX ED value): the bytes in a Binary, streamed
    "DocumentReference": {
        "identifier": SearchParam("identifier", "token", ("masterIdentifier", "identifier"),
                                  "masterIdentifier or identifier, system|value, value, |value or system|; exact "
                                  "match (kept as keyed hashes)", blind=True, value="identifier"),
        **{p.name: p for p in (_STATUS, _SUBJECT, _PATIENT)},
        "type": SearchParam("type", "token", ("type",), "system|code of the document type"),
        "category": SearchParam("category", "token", ("category",), "system|code of the document category"),
        "date": SearchParam("date", "date", ("date",), "when the document reference was created"),
        "period": SearchParam("period", "date", ("context.period",), "time of service documented"),
        "contenttype": SearchParam("contenttype", "token", ("content.attachment.contentType",),
                                   "MIME type of an attachment"),
    },
    # raw content (PDFs, images): read back as its own bytes; no search parameters of its own in R4
    "Binary": {},
    # what medrelay records about the resources it writes (engine/provenance.py); also accepted from clients
    "Provenance": _common(SearchParam("target", "reference", ("target",), "a resource it is about (Type/id)"),
                          SearchParam("recorded", "date", ("recorded",), "when it was recorded")),
}
# Resource types the REST API serves. AuditEvent is read/search only, from the audit trail.
STORED_TYPES: tuple[str, ...] = tuple(SEARCH_PARAMS)
READ_ONLY_TYPES: tuple[str, ...] = ("AuditEvent",)
DATE_PREFIXES = ("eq", "ne", "lt", "gt", "le", "ge", "sa", "eb", "ap")


# -- validation ----------------------------------------------------------
def _model_class(resource_type: str) -> Any:
    try:
        from fhir.resources.R4B import get_fhir_model_class
    except ImportError:  # fhir.resources without the R4B package: default (R5) models
        from fhir.resources import get_fhir_model_class  # type: ignore[no-redef]
    return get_fhir_model_class(resource_type)


def validate_resource(resource: Any, expected_type: str | None = None) -> str:
    """Check a resource against the FHIR R4 element table (engine.store.fhir.structure:
    JSON shapes and required bindings), then the fhir.resources R4B model; returns its type.

    R4B is wire-compatible with R4 for the resources served here. Each issue names the
    element as a FHIRPath (``expression``) and the rule, never the offending value (it
    may be PHI).
    """
    if not isinstance(resource, dict):
        raise FhirError(400, "invalid", "the body is not a JSON object")
    rtype = resource.get("resourceType")
    if not isinstance(rtype, str) or not rtype:
        raise FhirError(400, "invalid", "resourceType is missing")
    shown = rtype if TYPE_RE.match(rtype) else "(not a resource type name)"
    if expected_type is not None and rtype != expected_type:
        raise FhirError(400, "invalid", f"resourceType {shown} does not match the URL type {expected_type}")
    if rtype not in STORED_TYPES:
        raise FhirError(404 if expected_type is None else 400, "not-supported",
                        f"resource type {shown} is not supported for writes")
    rid = resource.get("id")
    if rid is not None and (not isinstance(rid, str) or not ID_RE.match(rid)):
        raise FhirError(400, "invalid", "id must match [A-Za-z0-9-.]{1,64}",
                        issues=[_issue("invalid", f"{rtype}.id: must match [A-Za-z0-9-.]{{1,64}}", f"{rtype}.id")])
    problems = structure.check(resource, rtype)
    if problems:
        raise FhirError(400, problems[0].code, f"{rtype} is not valid FHIR", issues=[p.as_dict() for p in problems])
    try:
        _model_class(rtype).model_validate(resource)
    except Exception as e:
        issues = _describe(rtype, e)
        raise FhirError(400, "invalid", f"{rtype} is not valid FHIR", issues=issues) from None
    return rtype


TYPE_RE = re.compile(r"^[A-Z][A-Za-z]{0,63}$")
_PY_TYPES = {"list": "an array", "dict": "an object", "str": "a string", "int": "a number", "float": "a number",
             "bool": "a boolean", "NoneType": "null"}


def _issue(code: str, diagnostics: str, expression: str) -> dict[str, Any]:
    return {"severity": "error", "code": code, "diagnostics": diagnostics, "expression": [expression]}


def _fhirpath(rtype: str, loc: tuple[Any, ...]) -> str:
    path = rtype
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif part not in ("root", "__root__"):  # fhir_core's wrapper levels, not FHIR elements
            path += f".{part}"
    return path


def _message(msg: str) -> str:
    """pydantic's text without Python type names (``<class 'list'>``) or its ``Value error,`` prefix."""
    msg = re.sub(r"<class '(\w+)'>", lambda m: _PY_TYPES.get(m.group(1), "a value"), msg)
    return msg.removeprefix("Value error, ")


def _describe(rtype: str, exc: Exception) -> list[dict[str, Any]]:
    errors = getattr(exc, "errors", None)
    if not callable(errors):  # not a ValidationError: say so without naming Python's exception
        return [_issue("invalid", f"{rtype}: the resource could not be validated (an element has a form "
                                  f"this server cannot read)", rtype)]
    issues = []
    for err in errors(include_input=False, include_url=False)[:10]:
        where = _fhirpath(rtype, tuple(err.get("loc", ())))
        issues.append(_issue("invalid" if err.get("type") != "extra_forbidden" else "structure",
                             f"{where}: {_message(str(err.get('msg', 'invalid')))}", where))
    return issues or [_issue("invalid", f"{rtype}: not valid FHIR", rtype)]


# -- value extraction ----------------------------------------------------
def _walk(node: Any, path: list[str]) -> Iterator[tuple[str, Any]]:
    """Yield (element name, value) at ``path``; a final name matches choice types (effective[x])."""
    if isinstance(node, list):
        for item in node:
            yield from _walk(item, path)
        return
    if not isinstance(node, dict) or not path:
        return
    head, rest = path[0], path[1:]
    if rest:
        yield from _walk(node.get(head), rest)
        return
    for key, value in node.items():
        if key == head or (key.startswith(head) and key[len(head):len(head) + 1].isupper()):
            for v in value if isinstance(value, list) else [value]:
                yield key, v


def _codings(value: Any) -> Iterator[tuple[str, str]]:
    if isinstance(value, bool):  # Patient.active
        yield "", "true" if value else "false"
    elif isinstance(value, str):
        yield "", value
    elif isinstance(value, dict):
        if "coding" in value:
            for c in value.get("coding") or []:
                yield from _codings(c)
        elif "code" in value and isinstance(value["code"], str):
            yield str(value.get("system") or ""), value["code"]
        elif "value" in value and isinstance(value["value"], str):  # Identifier
            yield str(value.get("system") or ""), value["value"]


def token_keys(system: str | None, code: str | None, hash_key: bytes | None) -> list[str]:
    """Index keys of one coded value: exact ``system|code``, any-system ``*|code``, ``system|*``.

    Searches map ``s|c``, ``c``, ``|c`` and ``s|`` onto exactly one of these keys. With a
    ``hash_key`` (identifiers) the value part is replaced by a keyed HMAC.
    """
    keys = []
    if code:
        keys.append(_token(system or "", code, hash_key))
        keys.append(_token("*", code, hash_key))
    if system:
        keys.append(f"{system}|*")
    return keys


def _token(system: str, code: str, hash_key: bytes | None) -> str:
    if hash_key is None:
        return f"{system}|{code}"
    digest = hmac.new(hash_key, f"{system}|{code}".encode(), hashlib.sha256).hexdigest()
    return f"{'*' if system == '*' else 'h'}|{digest}"


def query_token_key(value: str, hash_key: bytes | None) -> str:
    """The one index key a token search value selects (see token_keys)."""
    if "|" not in value:
        return _token("*", value, hash_key)
    system, _, code = value.partition("|")
    if not code:
        return f"{system}|*"
    return _token(system, code, hash_key)


def reference_keys(ref: str, target: str | None) -> list[str]:
    """``Type/id`` and ``*/id`` for a relative or absolute reference; nothing for urn:/contained."""
    parts = ref.split("?")[0].rstrip("/").split("/")
    if ref.startswith(("urn:", "#")) or len(parts) < 2:
        return []
    if len(parts) >= 4 and parts[-2] == "_history":
        parts = parts[:-2]
    rtype, rid = parts[-2], parts[-1]
    if target is not None and rtype != target:
        return []
    return [f"{rtype}/{rid}", f"*/{rid}"]


def query_reference_key(value: str, target: str | None) -> str:
    parts = value.rstrip("/").split("/")
    if len(parts) >= 2:
        return f"{parts[-2]}/{parts[-1]}"
    return f"{target}/{value}" if target else f"*/{value}"


# -- dates ---------------------------------------------------------------
_DATE_RE = re.compile(
    r"^(\d{4})(?:-(\d{2})(?:-(\d{2})(?:T(\d{2}):(\d{2})(?::(\d{2})(\.\d+)?)?(Z|[+-]\d{2}:\d{2})?)?)?)?$")


def date_range(value: str) -> tuple[float, float]:
    """``_date_range``, with dates at the ends of the calendar (9999-12-31T23:59:59.9999,
    0001-01-01T00:00-05:00) a ValueError like any other date we cannot use, not an OverflowError."""
    try:
        return _date_range(value)
    except OverflowError:
        raise ValueError("date out of range") from None


def _date_range(value: str) -> tuple[float, float]:
    """The half-open interval [low, high) of epoch seconds a FHIR date/dateTime/instant covers.

    ``2024`` is the whole year, ``2024-03-01`` the whole day, an instant its second
    (or millisecond). Values without a zone are read as UTC.
    """
    m = _DATE_RE.match(value.strip())
    if m is None:
        raise ValueError("not a FHIR date")
    y, mo, d, hh, mi, ss, frac, tz = m.groups()
    tzinfo: timezone = UTC
    if tz and tz != "Z":
        sign = 1 if tz[0] == "+" else -1
        tzinfo = timezone(sign * timedelta(hours=int(tz[1:3]), minutes=int(tz[4:6])))
    start = datetime(int(y), int(mo or 1), int(d or 1), int(hh or 0), int(mi or 0), int(ss or 0),
                     tzinfo=tzinfo)
    if frac:
        start = start + timedelta(seconds=float(frac))
    if mo is None:
        end = start.replace(year=start.year + 1)
    elif d is None:
        end = start.replace(year=start.year + (start.month == 12), month=start.month % 12 + 1)
    elif hh is None:
        end = start + timedelta(days=1)
    elif ss is None:
        end = start + timedelta(minutes=1)
    elif frac:
        end = start + timedelta(milliseconds=1)
    else:
        end = start + timedelta(seconds=1)
    return start.timestamp(), end.timestamp()


def _value_range(key: str, value: Any) -> tuple[float, float] | None:
    try:
        if isinstance(value, str):
            return date_range(value)
        if isinstance(value, dict) and ("start" in value or "end" in value):  # Period
            low = date_range(value["start"])[0] if value.get("start") else UNBOUNDED_LOW
            high = date_range(value["end"])[1] if value.get("end") else UNBOUNDED_HIGH
            return low, high
    except ValueError:
        return None
    return None


# -- index rows ------------------------------------------------------------
def element_values(resource: dict[str, Any], p: SearchParam) -> Iterator[tuple[str, Any]]:
    """(element name, value) of every element a parameter reads."""
    for path in p.paths:
        yield from _walk(resource, path.split("."))


def string_values(resource: dict[str, Any], p: SearchParam) -> list[str]:
    """The string fields a string parameter matches against (search re-checks them after decryption)."""
    return [v for _, v in element_values(resource, p) if isinstance(v, str)]


def blind_scope(rtype: str, p: SearchParam) -> str:
    return f"{rtype}.{p.name}"


def _blind_token_terms(hash_key: bytes, scope: str, p: SearchParam, value: Any) -> set[str]:
    if not isinstance(value, dict) or not isinstance(value.get("value"), str) or not value["value"]:
        return set()
    system = value.get("system") if isinstance(value.get("system"), str) else ""
    if p.value == "telecom":
        if p.system is not None and system != p.system:
            return set()
        return token_terms(hash_key, scope, system, telecom_value(value["value"]))
    out = token_terms(hash_key, scope, system, value["value"])
    codings = value.get("type", {}).get("coding") if isinstance(value.get("type"), dict) else None
    for c in codings if isinstance(codings, list) else []:
        if isinstance(c, dict) and isinstance(c.get("code"), str):
            out.add(type_term(hash_key, scope, str(c.get("system") or ""), c["code"], value["value"]))
    return out


def index_entries(resource: dict[str, Any], hash_key: bytes) -> list[dict[str, Any]]:
    """The search-index rows (param, token, low, high) of one resource version.

    Blind parameters (``SearchParam.blind``) give only keyed HMAC terms in ``token``; the
    others their clear keys. A parameter with a value always has at least one row, which is
    what ``:missing`` asks about.
    """
    rows: list[dict[str, Any]] = []
    seen: set[tuple[str, str | None, float | None, float | None]] = set()

    def add(param: str, token: str | None, low: float | None = None, high: float | None = None) -> None:
        key = (param, token, low, high)
        if key not in seen:
            seen.add(key)
            rows.append({"param": param, "token": token[:320] if token else token, "low": low, "high": high})

    rtype = resource.get("resourceType", "")
    for p in SEARCH_PARAMS.get(rtype, {}).values():
        scope = blind_scope(rtype, p)
        for key, value in element_values(resource, p):
            if p.type == "string":
                for t in string_terms(hash_key, scope, value) if isinstance(value, str) else ():
                    add(p.name, t)
            elif p.type == "token" and p.blind:
                for t in _blind_token_terms(hash_key, scope, p, value):
                    add(p.name, t)
            elif p.type == "token":
                for system, code in _codings(value):
                    for tk in token_keys(system, code, None):
                        add(p.name, tk)
            elif p.type == "reference":
                ref = value.get("reference") if isinstance(value, dict) else None
                for rk in reference_keys(ref, p.target) if isinstance(ref, str) else []:
                    add(p.name, rk)
            elif p.blind:  # birthdate: labels of its year, month and day (engine.store.fhir.blind_dates)
                for label in stored_labels(value) if isinstance(value, str) else ():
                    add(p.name, date_term(hash_key, scope, label))
            else:
                rng = _value_range(key, value)
                if rng is not None:
                    add(p.name, None, *rng)
    return rows
