"""`when:` conditions: which routes a message takes.

Keys are HL7 positions (`MSH-9.1`, `PID-8`), DICOM keywords (`Modality`,
`SOPClassUID`, `CallingAETitle`) or FHIR fields (`resourceType`). Every key must
match (AND); a list matches any of its values (OR); `*` and `?` are wildcards.
Header fields answer first, so the common case never parses the payload; a key that
is not a header is read from the payload once, lazily.

This lives in the engine, not routes/, because intake decides at commit time which
deliveries a message gets.
"""

from __future__ import annotations

import fnmatch
import importlib
import io
import json
from collections.abc import Mapping
from functools import lru_cache
from typing import Any

from engine.envelope import Envelope

MISSING = object()


@lru_cache(maxsize=4096)
def _pattern(value: str) -> Any:
    if any(c in value for c in "*?["):
        return fnmatch.translate(value)
    return None


def value_matches(actual: Any, wanted: Any) -> bool:
    if actual is MISSING or actual is None:
        return False
    if isinstance(actual, list | tuple):
        return any(value_matches(a, wanted) for a in actual)
    if isinstance(wanted, list | tuple):
        return any(value_matches(actual, w) for w in wanted)
    a, w = str(actual), str(wanted)
    if _pattern(w) is not None:
        return fnmatch.fnmatchcase(a, w)
    return a == w


def _from_payload(env: Envelope, key: str) -> Any:
    if env.kind == "hl7v2":
        hl7mod = importlib.import_module("engine.hl7.message")
        return hl7mod.field(env.payload, key)
    if env.kind == "dicom":
        from pydicom import dcmread

        ds = dcmread(io.BytesIO(env.payload), stop_before_pixels=True, force=True)
        v = ds.get(key, MISSING)
        return v if v is MISSING else (v if isinstance(v, str | int | float) else str(v))
    if env.kind == "fhir":
        node: Any = json.loads(env.payload)
        for part in key.split("."):
            if isinstance(node, dict):
                node = node.get(part, MISSING)
            else:
                return MISSING
        return node
    return MISSING


def lookup(env: Envelope, key: str) -> Any:
    """The value of ``key`` for this message: a header, else read from the payload; MISSING if absent."""
    if key == "kind":
        return env.kind
    actual = env.headers.get(key, MISSING)
    if actual is MISSING:
        try:
            actual = _from_payload(env, key)
        except Exception:  # an unreadable payload matches nothing rather than failing intake
            actual = MISSING
    return actual


def matches(when: Mapping[str, Any], env: Envelope) -> bool:
    return all(value_matches(lookup(env, key), wanted) for key, wanted in when.items())
