"""Semantic comparison for golden files: what may differ between runs is normalised away.

Ignored: ``urn:uuid:`` values (renumbered by order of first appearance, so a
reference still has to point at the same entry), resource ``id``, ``meta.lastUpdated``,
and in HL7 MSH-7 (time of creation) and MSH-10 (fresh control id). Everything else
must match exactly.
"""

from __future__ import annotations

import difflib
import json
import re
from typing import Any

_UUID = re.compile(r"urn:uuid:[0-9a-fA-F-]{36}")


def normalise_fhir(obj: Any) -> Any:
    seen: dict[str, str] = {}

    def uuid_name(m: re.Match[str]) -> str:
        return seen.setdefault(m.group(0), f"urn:uuid:#{len(seen) + 1}")

    def walk(o: Any, in_resource: bool = False) -> Any:
        if isinstance(o, dict):
            out = {}
            for k, v in o.items():
                if in_resource and k == "id" and "resourceType" in o:
                    continue
                if k == "meta" and isinstance(v, dict):
                    v = {mk: mv for mk, mv in v.items() if mk != "lastUpdated"}
                    if not v:
                        continue
                out[k] = walk(v, in_resource or "resourceType" in o)
            return out
        if isinstance(o, list):
            return [walk(v, in_resource) for v in o]
        if isinstance(o, str):
            return _UUID.sub(uuid_name, o)
        return o

    return walk(obj)


def normalise_hl7(text: str) -> str:
    segs = [s for s in text.replace("\r\n", "\r").replace("\n", "\r").split("\r") if s]
    if segs and segs[0].startswith("MSH"):
        f = segs[0][3]
        parts = segs[0].split(f)
        for n in (7, 10):  # parts[n-1] is MSH-n
            if len(parts) > n - 1:
                parts[n - 1] = "<ignored>"
        segs[0] = f.join(parts)
    return "\n".join(segs) + "\n"


def diff_fhir(expected: Any, actual: Any) -> str:
    """'' when semantically equal, else a unified diff of the normalised JSON."""
    e = json.dumps(normalise_fhir(expected), indent=1, ensure_ascii=False, sort_keys=True).splitlines()
    a = json.dumps(normalise_fhir(actual), indent=1, ensure_ascii=False, sort_keys=True).splitlines()
    return "" if e == a else "\n".join(difflib.unified_diff(e, a, "expected", "actual", lineterm=""))


def diff_hl7(expected: str, actual: str) -> str:
    e, a = normalise_hl7(expected).splitlines(), normalise_hl7(actual).splitlines()
    return "" if e == a else "\n".join(difflib.unified_diff(e, a, "expected", "actual", lineterm=""))
