"""Blind index terms of FHIR values: strings (names, addresses), identifiers, telecoms, birth dates.

Every term is ``engine.security.blind_index.term(key, scope, kind, text)``: a keyed HMAC of an
already normalised text, scoped by ``Type.param`` so the same word in two parameters (or two
resource types) gives unrelated terms. The kinds:

  string   ``eq``  the whole normalised field (candidates for ``:exact``)
           ``fp``  each prefix of the whole normalised field, 1 to ``MAX_PREFIX`` characters
                   (FHIR's default "starts with"; longer values are checked after decryption)
  token    ``tok`` system and value; ``tokv`` the value in any system; ``toks`` the system
           alone (``system|``); ``tokt`` identifier type and value (``:of-type``)
  date     ``bd``  the labels of engine.store.fhir.blind_dates

String normalisation is blind_index.normalise (FHIR R4 3.1.1.4.1: case- and accent-insensitive;
punctuation separates words). A field, not each word, must start with the search value: R4 says
"a field matches a string query if the value of the field equals or starts with the supplied
parameter value", and ``given`` repeats are separate fields. Identifier values are exact
(case-sensitive tokens). Telecom values are compared as phone numbers when they look like one
(digits and a leading +) and case-folded otherwise (R4 allows servers "special handling, such as
ignoring punctuation" for ContactPoint tokens).
"""

from __future__ import annotations

import re

from engine.security import blind_index as bi

MAX_PREFIX = bi.MAX_PREFIX
_SEP = "\x1f"  # cannot occur in a FHIR string, so system and value can never run together
_PHONEISH = re.compile(r"^\+?[\d\s().\-/]+$")


def string_terms(key: bytes, scope: str, value: str) -> set[str]:
    """The terms of one string field: its exact form and the prefixes of the whole field."""
    n = bi.normalise(value)
    if not n:
        return set()
    out = {bi.term(key, scope, "eq", n)}
    for k in range(1, min(len(n), MAX_PREFIX) + 1):
        if n[k - 1] != " ":
            out.add(bi.term(key, scope, "fp", n[:k]))
    return out


def prefix_term(key: bytes, scope: str, normalised: str) -> str:
    """The stored term every field starting with ``normalised`` has (cut at ``MAX_PREFIX``)."""
    return bi.term(key, scope, "fp", normalised[:MAX_PREFIX].rstrip())


def exact_term(key: bytes, scope: str, value: str) -> str:
    return bi.term(key, scope, "eq", bi.normalise(value))


def token_terms(key: bytes, scope: str, system: str, value: str) -> set[str]:
    """``system|value``, ``value`` (any system), ``|value`` (no system) and ``system|`` lookups."""
    out = {bi.term(key, scope, "tok", f"{system}{_SEP}{value}"), bi.term(key, scope, "tokv", value)}
    if system:
        out.add(bi.term(key, scope, "toks", system))
    return out


def token_query(key: bytes, scope: str, system: str | None, value: str) -> str:
    """The one term a token search selects: ``system`` None = no ``|`` given (any system)."""
    if system is None:
        return bi.term(key, scope, "tokv", value)
    if not value:
        return bi.term(key, scope, "toks", system)
    return bi.term(key, scope, "tok", f"{system}{_SEP}{value}")


def type_term(key: bytes, scope: str, type_system: str, type_code: str, value: str) -> str:
    """``identifier:of-type=type-system|type-code|value``."""
    return bi.term(key, scope, "tokt", f"{type_system}{_SEP}{type_code}{_SEP}{value}")


def telecom_value(value: str) -> str:
    """A contact point as compared: a phone number as ``+``/digits only, anything else case-folded."""
    v = value.strip()
    if _PHONEISH.match(v) and any(c.isdigit() for c in v):
        return ("+" if v.startswith("+") else "") + "".join(c for c in v if c.isdigit())
    return v.casefold()


def date_term(key: bytes, scope: str, label: str) -> str:
    return bi.term(key, scope, "bd", label)
