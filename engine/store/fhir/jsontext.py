"""FHIR JSON bodies from peers: UTF-8, bounded nesting, no lone surrogates, finite numbers.

``json.loads`` recurses once per nesting level and raises RecursionError near 1 000
levels (after using the stack of a worker thread); the depth is therefore measured on
the raw bytes first, without parsing: strings are cut out with one regex, every byte but
brackets is deleted (``bytes.translate``), and innermost pairs are removed pass by pass
(``bytes.replace``), at most ``max_depth`` passes, each in C. FHIR JSON is UTF-8
(json.html); ``json.loads`` would also take UTF-16/32. A ``\\ud800`` escape decodes
to a lone surrogate, which cannot be encoded again: found after parsing and refused.
NaN/Infinity and numbers that overflow a float are not JSON FHIR can hold.

The same scan counts objects, arrays, members and strings, for ``max_cost``: json.loads
builds ~7-9 bytes of Python objects per byte of real FHIR JSON but ~25 per byte of
``[{},{},...]``, so 16 MiB of it would take ~400 MiB. ``parse_cost`` over-estimates
(by ~1.7, measured on Bundles, Patients and such arrays); a body whose estimate passes
the bound is refused (413) before parsing.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

from engine.store.fhir.params import FhirError

_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
_TO_SQUARE = bytes.maketrans(b"{}", b"[]")
# bytes of Python objects json.loads builds (CPython 3.11, 64-bit), rounded up
OBJECT_COST, ARRAY_COST, MEMBER_COST, STRING_COST = 200, 64, 48, 50
MAX_AMPLIFICATION = 100  # no body costs more per byte (`{},{},...`): a smaller one needs no count
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")


def nesting_depth_exceeds(body: bytes, max_depth: int) -> bool:
    """True when objects/arrays in ``body`` nest deeper than ``max_depth`` (or do not balance)."""
    return _too_deep(_STRING.sub(b"", body).translate(_TO_SQUARE, _NOT_BRACKETS), max_depth)


def _too_deep(brackets: bytes, max_depth: int) -> bool:
    for _ in range(max_depth):
        if not brackets:
            return False
        shorter = brackets.replace(b"[]", b"")
        if len(shorter) == len(brackets):  # unbalanced: invalid JSON, and possibly deep: refused
            return len(brackets) > max_depth
        brackets = shorter
    return bool(brackets)


def parse_cost(body: bytes) -> int:
    """At least how many bytes of Python objects json.loads builds for ``body``."""
    return _cost(_STRING.sub(b'""', body))


def _cost(bare: bytes) -> int:
    members = bare.count(b",") + bare.count(b":")
    return (OBJECT_COST * bare.count(b"{") + ARRAY_COST * bare.count(b"[") + MEMBER_COST * members
            + STRING_COST * bare.count(b'""'))


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError("number out of range")
    return value


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _lone_surrogate(node: Any) -> bool:
    stack = [node]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return True
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


def loads(body: bytes, *, max_depth: int, max_cost: int | None = None) -> Any:
    """Parse a peer's JSON body, or raise FhirError 400 (413 past ``max_cost``) saying what is wrong."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise FhirError(400, "invalid", f"the body is not valid UTF-8 (byte {e.start})") from None
    text = text.removeprefix("\ufeff")
    bare = _STRING.sub(b'""', body)
    if _too_deep(bare.translate(_TO_SQUARE, _NOT_BRACKETS), max_depth):
        raise FhirError(400, "too-costly", f"the JSON nests deeper than {max_depth} levels")
    if max_cost is not None and len(body) * MAX_AMPLIFICATION > max_cost and (cost := _cost(bare)) > max_cost:
        raise FhirError(413, "too-costly", f"the JSON has too many values to hold at once (about "
                                           f"{cost // 2**20} MiB of objects; limit {max_cost // 2**20} MiB)")
    try:
        doc = json.loads(text, parse_float=_finite, parse_constant=_no_constants)
    except RecursionError:  # unreachable after the depth check; kept so it can never be a 500
        raise FhirError(400, "too-costly", "the JSON nests too deeply") from None
    except ValueError as e:
        where = f" (line {e.lineno}, column {e.colno})" if isinstance(e, json.JSONDecodeError) else ""
        raise FhirError(400, "invalid", f"the body is not valid JSON{where}") from None
    if _SURROGATE_ESCAPE.search(text) and _lone_surrogate(doc):
        raise FhirError(400, "invalid", "the body has a \\u escape of an unpaired UTF-16 surrogate (D800-DFFF)")
    return doc
