"""Building FHIR R4 transaction bundles that are safe to send twice.

Every entry carries a conditional request (create with ``ifNoneExist`` or update with
a search URL on a business identifier), so a message re-sent by an at-least-once
destination changes nothing on the server. ``fullUrl`` values are ``urn:uuid:``s
derived (uuid5) from that same identifier: stable across re-sends and across
messages, and still only a local name the server replaces with its own ids.
"""

from __future__ import annotations

import json
import uuid
from typing import Any
from urllib.parse import quote

_NS = uuid.UUID("6d3f8f8e-4c1b-5e0a-9a57-3c8b2a1f0e11")


def identifier_query(system: str | None, value: str) -> str:
    """``identifier=system|value`` with the parts percent-encoded for a query string."""
    token = f"{system}|{value}" if system else value
    return "identifier=" + quote(token, safe=":/|.-_~")


def local_url(*parts: str) -> str:
    """A stable ``urn:uuid:`` for a resource named by its type and business identifier."""
    return "urn:uuid:" + str(uuid.uuid5(_NS, "\x1f".join(parts)))


def random_url() -> str:
    return "urn:uuid:" + str(uuid.uuid4())


class TransactionBuilder:
    """Collects entries; ``ref(key)`` returns the fullUrl to use in references."""

    def __init__(self) -> None:
        self.entries: list[dict[str, Any]] = []

    @staticmethod
    def tx_url(rtype: str, system: str | None, value: str) -> str:
        """The fullUrl an entry for this identifier gets (to reference it before it is added)."""
        return local_url(rtype, system or "", value)

    def create(self, resource: dict[str, Any], system: str | None, value: str) -> str:
        """POST with ``ifNoneExist`` on the identifier: never overwrites what the server has."""
        rtype = resource["resourceType"]
        full = local_url(rtype, system or "", value)
        self.entries.append({"fullUrl": full, "resource": resource,
                             "request": {"method": "POST", "url": rtype,
                                         "ifNoneExist": identifier_query(system, value)}})
        return full

    def update(self, resource: dict[str, Any], system: str | None, value: str) -> str:
        """Conditional update ``PUT Type?identifier=system|value``: creates or replaces the one match."""
        rtype = resource["resourceType"]
        full = local_url(rtype, system or "", value)
        self.entries.append({"fullUrl": full, "resource": resource,
                             "request": {"method": "PUT", "url": f"{rtype}?{identifier_query(system, value)}"}})
        return full

    def put(self, resource: dict[str, Any], system: str | None, value: str, *, create_only: bool) -> str:
        return (self.create if create_only else self.update)(resource, system, value)

    def bundle(self) -> dict[str, Any]:
        return {"resourceType": "Bundle", "type": "transaction", "entry": self.entries}


def validate_bundle(bundle: dict[str, Any]) -> None:
    """Validate with fhir.resources' R4B models (wire-compatible with R4 for these resources).

    Raises pydantic's ValidationError; the route then fails loudly instead of sending a
    bundle the server would reject with a less helpful message.
    """
    from fhir.resources.R4B.bundle import Bundle

    Bundle.model_validate(bundle)


def dumps(bundle: dict[str, Any]) -> bytes:
    """Compact UTF-8 JSON (``application/fhir+json``)."""
    return json.dumps(bundle, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def prune(obj: Any) -> Any:
    """Drop empty strings, lists and dicts recursively: FHIR forbids empty elements."""
    if isinstance(obj, dict):
        out = {k: prune(v) for k, v in obj.items()}
        return {k: v for k, v in out.items() if v not in ("", None, [], {})}
    if isinstance(obj, list):
        out_l = [prune(v) for v in obj]
        return [v for v in out_l if v not in ("", None, [], {})]
    return obj
