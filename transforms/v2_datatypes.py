"""HL7 v2 data types -> FHIR data types (the IG's datatype maps, the parts we use).

Inputs are one repetition as components -> subcomponents (see `hl7_text.Segment.reps`).
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation
from typing import Any

from transforms.fhir_bundle import prune
from transforms.patient import IdentityRules, system_for
from transforms.v2_tables import SN_COMPARATORS, UCUM, V2_0203, coding_system

Rep = list[list[str]]


def comp(rep: Rep, i: int, sub: int = 0) -> str:
    """Component i (0-based) of a repetition; '' when absent."""
    return rep[i][sub].strip() if i < len(rep) and sub < len(rep[i]) else ""


def coding(code: str, display: str, system_name: str) -> dict[str, Any]:
    system = coding_system(system_name)
    return prune({"system": system, "code": code, "display": display})


def codeable(rep: Rep) -> dict[str, Any]:
    """CE/CWE/CNE -> CodeableConcept: primary triplet, alternate triplet, original text (CWE-9)."""
    codings = [coding(comp(rep, 0), comp(rep, 1), comp(rep, 2)),
               coding(comp(rep, 3), comp(rep, 4), comp(rep, 5))]
    codings = [c for c in codings if c.get("code")]
    text = comp(rep, 8) or (comp(rep, 1) if not codings else "")
    return prune({"coding": codings, "text": text})


def number(text: str) -> int | float | None:
    """A v2 NM as a JSON number (ints stay ints so '5' does not become 5.0)."""
    t = text.strip()
    if not t:
        return None
    try:
        d = Decimal(t)
    except InvalidOperation:
        return None
    if not d.is_finite():
        return None
    return int(d) if d == d.to_integral_value() and "." not in t and "e" not in t.lower() else float(d)


def quantity(value: int | float, units: Rep | None, assume_ucum: bool) -> dict[str, Any]:
    """Quantity with OBX-6 units: UCUM system when OBX-6.3 says UCUM (or assume_ucum is on)."""
    q: dict[str, Any] = {"value": value}
    if units:
        code, text, sysname = comp(units, 0), comp(units, 1), comp(units, 2).upper()
        q["unit"] = text or code
        if code and (sysname == "UCUM" or (assume_ucum and not sysname)):
            q["system"] = UCUM
            q["code"] = code
    return prune(q)


def identifier_from_ei(rep: Rep, type_code: str, rules: IdentityRules) -> tuple[dict[str, Any], str, str] | None:
    """EI (entity id ^ namespace ^ universal id ^ type) -> Identifier with v2-0203 type."""
    value = comp(rep, 0)
    if not value:
        return None
    system = system_for(comp(rep, 1), comp(rep, 2), comp(rep, 3), rules)
    ident = {"type": {"coding": [{"system": V2_0203, "code": type_code}]}, "system": system, "value": value}
    return ident, system, value


def practitioner_ref(rep: Rep, rules: IdentityRules) -> dict[str, Any]:
    """XCN -> a logical Reference (identifier + display) without creating a Practitioner."""
    ident = comp(rep, 0)
    name = " ".join(p for p in (comp(rep, 5), comp(rep, 2), comp(rep, 3), comp(rep, 1), comp(rep, 4)) if p)
    ref: dict[str, Any] = {"display": name}
    if ident:
        ref["identifier"] = {"system": system_for(comp(rep, 8), comp(rep, 8, 1), comp(rep, 8, 2), rules),
                             "value": ident}
    return prune(ref)


_RANGE = re.compile(r"^\s*([-+]?\d+(?:\.\d+)?)\s*(?:-|–|\.\.)\s*([-+]?\d+(?:\.\d+)?)\s*$")
_BOUND = re.compile(r"^\s*(<=|>=|<|>)\s*([-+]?\d+(?:\.\d+)?)\s*$")


def reference_range(text: str, units: Rep | None, assume_ucum: bool) -> dict[str, Any]:
    """OBX-7 ``3.5-5.0``, ``<5``, ``>10`` -> low/high Quantities; anything else -> text."""
    t = text.strip()
    if not t:
        return {}
    m = _RANGE.match(t)
    if m:
        lo, hi = number(m.group(1)), number(m.group(2))
        if lo is not None and hi is not None:
            return {"low": quantity(lo, units, assume_ucum), "high": quantity(hi, units, assume_ucum)}
    m = _BOUND.match(t)
    if m:
        v = number(m.group(2))
        if v is not None:
            return {"high" if m.group(1).startswith("<") else "low": quantity(v, units, assume_ucum)}
    return {"text": t}


def structured_numeric(rep: Rep, units: Rep | None, assume_ucum: bool) -> dict[str, Any]:
    """SN (comparator ^ num1 ^ separator/suffix ^ num2) -> value[x] as the IG maps it.

    ``>^100`` valueQuantity with comparator; ``^10^-^20`` valueRange; ``^1^:^128``
    valueRatio; anything FHIR cannot hold exactly (``<>``, ``2^+``) valueString.
    """
    cmp_, n1, sep, n2 = comp(rep, 0), comp(rep, 1), comp(rep, 2), comp(rep, 3)
    v1, v2 = number(n1), number(n2)
    literal = "".join((cmp_, n1, sep, n2))
    if v1 is not None and not sep and not n2 and cmp_ in ("", "=", *SN_COMPARATORS):
        q = quantity(v1, units, assume_ucum)
        if cmp_ in SN_COMPARATORS:
            rest = {k: v for k, v in q.items() if k != "value"}
            q = {"value": q["value"], "comparator": SN_COMPARATORS[cmp_], **rest}
        return {"valueQuantity": q}
    if v1 is not None and v2 is not None and cmp_ in ("", "="):
        if sep == "-":
            return {"valueRange": {"low": quantity(v1, units, assume_ucum), "high": quantity(v2, units, assume_ucum)}}
        if sep in (":", "/"):
            return {"valueRatio": {"numerator": {"value": v1}, "denominator": {"value": v2}}}
    return {"valueString": literal}
